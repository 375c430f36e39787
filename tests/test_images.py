"""The Dockerfiles, checked statically (no container engine here): pinned bases, the
right extras, a non-root user matching the pod security contexts, the right command."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

from mloptimizer.operator.builders import CACHE_DIR, TRAINER_UID

ROOT = Path(__file__).parent.parent


def instructions(name: str) -> list[tuple[str, str]]:
    text = (ROOT / name).read_text().replace("\\\n", " ")
    found = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            found.append((keyword.upper(), rest.strip()))
    return found


def final_stage(steps: list[tuple[str, str]]) -> list[tuple[str, str]]:
    last = max(i for i, (keyword, _) in enumerate(steps) if keyword == "FROM")
    return steps[last:]


@pytest.mark.parametrize(
    ("dockerfile", "extra", "command", "uid"),
    [
        ("Dockerfile.operator", "operator", "operator", 10001),
        ("Dockerfile.trainer", "trainer-gpu", "trainer", TRAINER_UID),
    ],
)
def test_images_are_pinned_multi_stage_non_root_and_run_the_right_command(
    dockerfile: str, extra: str, command: str, uid: int
) -> None:
    steps = instructions(dockerfile)
    bases = [rest for keyword, rest in steps if keyword == "FROM"]
    assert len(bases) >= 2  # multi-stage: build tools stay out of the image
    for base in bases:
        image = base.split()[0]
        assert re.fullmatch(r"[\w./-]+:\d+\.\d+\.\d+[\w.-]*", image), f"unpinned base {image}"
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    installs = [rest for keyword, rest in steps if keyword == "RUN" and "pip install" in rest]
    assert any(f'".[{extra}]"' in rest for rest in installs)
    assert extra in extras
    final = final_stage(steps)
    users = [rest for keyword, rest in final if keyword == "USER"]
    assert users == [str(uid)]  # numeric, so runAsNonRoot can verify it
    assert ("ENTRYPOINT", '["mloptimizer"]') in final
    assert ("CMD", f'["{command}"]') in final
    assert not any(keyword == "RUN" and "pip install" in rest for keyword, rest in final)


def test_the_trainer_image_caches_datasets_where_the_deployment_mounts_its_volume() -> None:
    final = dict(final_stage(instructions("Dockerfile.trainer")))
    assert f"MLOPT_CACHE_DIR={CACHE_DIR}" in final["ENV"]
    assert CACHE_DIR in final["VOLUME"]


def test_the_build_context_leaves_out_the_venv_and_git() -> None:
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".git", ".venv", "runs", "build"} <= set(ignored)
    for needed in ("mloptimizer", "operator", "trainer", "pyproject.toml", "README.md"):
        assert needed not in ignored
