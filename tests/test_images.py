"""The Dockerfiles and their locks, read: one Debian base, Python packages only from hashed
locks that match pyproject.toml, build tools left in the build stages, a non-root user
matching the pod security contexts, tini as PID 1, the right command.

The images themselves are built and run in ``test_containers.py``."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from mloptimizer.operator.builders import CACHE_DIR, TRAINER_UID

ROOT = Path(__file__).parent.parent
BASE = "docker.io/library/debian:bookworm-slim"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
# lock file -> the extras it holds (scripts/lock writes them)
LOCKS = {
    "operator": ["operator"],
    "trainer": ["trainer", "mnist5k"],
    "trainer-gpu": ["trainer-gpu", "mnist5k"],
    "dev": ["dev", "operator", "run", "s3", "mnist5k"],
}


def instructions(name: str) -> list[tuple[str, str]]:
    text = (ROOT / name).read_text().replace("\\\n", " ")
    found = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            found.append((keyword.upper(), " ".join(rest.split())))
    return found


def final_stage(steps: list[tuple[str, str]]) -> list[tuple[str, str]]:
    last = max(i for i, (keyword, _) in enumerate(steps) if keyword == "FROM")
    return steps[last:]


def locked(name: str) -> dict[str, str]:
    """package -> version pinned in requirements/NAME.txt (each line with its hashes)."""
    text = (ROOT / "requirements" / f"{name}.txt").read_text()
    pins: dict[str, str] = {}
    for block in re.split(r"\n(?=\S)", text):
        if block.startswith("#") or not block.strip():
            continue
        match = re.match(r"([A-Za-z0-9_.-]+)==(\S+)", block)
        assert match, f"requirements/{name}.txt: not a pin: {block[:80]!r}"
        assert "--hash=sha256:" in block, f"requirements/{name}.txt: {match[1]} has no hash"
        pins[canonicalize_name(match[1])] = match[2]
    return pins


@pytest.mark.parametrize(
    ("dockerfile", "lock", "command", "uid"),
    [
        ("Dockerfile.operator", "requirements/operator.txt", "operator", 10001),
        ("Dockerfile.trainer", "requirements/${VARIANT}.txt", "trainer", TRAINER_UID),
    ],
)
def test_images_start_from_debian_install_only_hashed_locks_and_run_non_root(
    dockerfile: str, lock: str, command: str, uid: int
) -> None:
    steps = instructions(dockerfile)
    assert steps[0] == ("ARG", f"BASE={BASE}")
    stages = [rest.split()[0] for keyword, rest in steps if keyword == "FROM"]
    assert stages[0] == "${BASE}"  # every other stage builds on this one
    assert all(stage in {"python", "tools"} for stage in stages[1:]), stages
    installs = [rest for keyword, rest in steps if keyword == "RUN" and "pip install" in rest]
    assert any("--require-hashes --no-deps -r /src/requirements.txt" in r for r in installs)
    assert ("COPY", f"{lock} /src/requirements.txt") in steps
    # the project itself: no dependency resolved at build time, none from the internet
    assert all("--no-deps" in r for r in installs), installs
    final = final_stage(steps)
    assert final[0] == ("FROM", "python")  # Debian's python3, tini and CA certificates only
    assert not any(
        keyword == "RUN" and ("pip " in rest or "apt-get" in rest) for keyword, rest in final
    )
    users = [rest for keyword, rest in final if keyword == "USER"]
    assert users == [str(uid)]  # numeric, so runAsNonRoot can verify it
    assert ("ENTRYPOINT", '["/usr/bin/tini", "--", "mloptimizer"]') in final
    assert ("CMD", f'["{command}"]') in final
    python = steps[: [k for k, _ in steps].index("FROM", 2)]
    assert any("python3 ca-certificates tini" in rest for k, rest in python if k == "RUN")


def test_the_trainer_image_caches_datasets_where_the_deployment_mounts_its_volume() -> None:
    final = dict(final_stage(instructions("Dockerfile.trainer")))
    assert f"MLOPT_CACHE_DIR={CACHE_DIR}" in final["ENV"]
    assert "HOME=/tmp" in final["ENV"]  # the pod's /tmp volume: the root is read-only
    assert CACHE_DIR in final["VOLUME"]


def test_the_build_context_leaves_out_the_venv_git_and_tests() -> None:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    ignored = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    assert {".git", ".venv", ".tools", "runs", "build", "tests"} <= set(ignored)
    for needed in ("mloptimizer", "operator", "trainer", "requirements", "pyproject.toml"):
        assert needed not in ignored
    assert "README.md" not in ignored  # pyproject.toml's readme


@pytest.mark.parametrize("lock", sorted(LOCKS))
def test_each_lock_pins_every_dependency_of_its_extras_within_pyproject(lock: str) -> None:
    """A lock older than pyproject.toml fails here: run scripts/lock and commit it."""
    pins = locked(lock)
    wanted = list(PYPROJECT["project"]["dependencies"])
    for extra in LOCKS[lock]:
        wanted += PYPROJECT["project"]["optional-dependencies"][extra]
    for line in wanted:
        requirement = Requirement(line)
        name = canonicalize_name(requirement.name)
        if name == "mloptimizer":  # an extra naming others: theirs are listed too
            continue
        assert name in pins, f"requirements/{lock}.txt lacks {name}: run scripts/lock {lock}"
        assert requirement.specifier.contains(pins[name], prereleases=True), (
            f"requirements/{lock}.txt pins {name}=={pins[name]}, outside {requirement}: "
            f"run scripts/lock {lock}"
        )
    build = PYPROJECT["build-system"]["requires"]
    assert all(canonicalize_name(Requirement(r).name) in pins for r in build)


def test_the_images_are_tagged_with_the_release_the_specs_default_to() -> None:
    from mloptimizer.spec import CPU_TRAINER_IMAGE, GPU_TRAINER_IMAGE, RELEASE, Workers

    assert PYPROJECT["project"]["version"] == RELEASE  # scripts/images tags with pyproject's
    assert Workers().trainer_image == CPU_TRAINER_IMAGE == f"ghcr.io/mloptimizer/trainer:{RELEASE}"
    gpu = Workers.model_validate({"resources": {"gpu": 1}})
    assert gpu.trainer_image == GPU_TRAINER_IMAGE == f"ghcr.io/mloptimizer/trainer-gpu:{RELEASE}"
    assert Workers.model_validate({"image": "r.example/t:1"}).trainer_image == "r.example/t:1"
