"""Fixtures for the real services: a fresh PostgreSQL database per test, RabbitMQ names
per test. A missing service fails the test that needs it, with the command to start it."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from services import RABBITMQ_URL, Broker, ServiceUnavailable, fresh_postgres_database


@pytest.fixture
def postgres_dsn() -> Iterator[str]:
    """DSN of an empty PostgreSQL database created for this test, dropped after it."""
    try:
        with fresh_postgres_database() as dsn:
            yield dsn
    except ServiceUnavailable as error:
        pytest.fail(str(error), pytrace=False)


@pytest.fixture
def broker() -> Iterator[Broker]:
    """The machine's RabbitMQ, with queue names unique to this test and deleted after it."""
    found = Broker(RABBITMQ_URL)
    try:
        found.connect().close()
    except ServiceUnavailable as error:
        pytest.fail(str(error), pytrace=False)
    yield found
    found.cleanup()
