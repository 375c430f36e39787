"""Service URLs as they may be shown: in files, logs, messages and status."""

from __future__ import annotations

import re
import urllib.parse

__all__ = ["redact", "redact_text"]

# Query parameters that carry a secret (libpq, SQLAlchemy, AMQP and S3-style URLs).
_SECRET_PARAMS = {"password", "passwd", "pwd", "secret", "token", "api_key", "apikey",
                  "x-amz-signature", "x-amz-credential", "sslpassword"}  # fmt: skip


def redact(url: str) -> str:
    """``url`` with its password and any secret query parameter replaced by ``***``."""
    parts = urllib.parse.urlsplit(url)
    netloc = parts.netloc
    if parts.password is not None:
        host = parts.hostname or ""
        if ":" in host:  # IPv6
            host = f"[{host}]"
        netloc = f"{parts.username}:***@{host}" + (f":{parts.port}" if parts.port else "")
    query = parts.query
    if query:
        pairs = urllib.parse.parse_qsl(query, keep_blank_values=True)
        hidden = [(k, "***" if k.lower() in _SECRET_PARAMS else v) for k, v in pairs]
        query = urllib.parse.urlencode(hidden, safe="*")
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc, query=query))


_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"]+")


def redact_text(text: str) -> str:
    """``text`` with every URL in it redacted (a command line, an error message)."""
    return _URL.sub(lambda m: redact(m.group(0)), text)
