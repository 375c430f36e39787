"""What a search's verify Job runs: the size and SHA-256 of each delivered file in a claim.

The operator does not mount the claims searches deliver to (``output.pvc``); the trainers
that write there run the search author's image, possibly on a rented host, so what they
say of the files is only their word. After a final job, the operator starts a short Job
with its own image and this program (:func:`mloptimizer.operator.builders.build_verify_job`):
it mounts the claim read-only, reads each file, and writes what it found as the container's
termination message, which the operator reads back from the pod's status and compares with
the trainer's ``delivered`` (:mod:`mloptimizer.operator.claimverify`).

Only regular files inside the mounted claim are read: a symbolic link (a file, or a folder
on the way to it, pointing elsewhere) is reported, never followed. The message stays well
under Kubernetes' 4,096-byte limit for a termination message: a few files, each a name,
a size and 64 hex digits.

Run as ``python -m mloptimizer.operator.claimcheck --root /claim FOLDER FILE...``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import stat
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["MESSAGE_VERSION", "check", "main"]

MESSAGE_VERSION = 1
CHUNK = 1 << 20


def _one(folder: Path, file: str) -> dict[str, Any]:
    if "/" in file or file in ("", ".", ".."):
        return {"error": "not a file name"}
    try:
        # no link followed; O_NONBLOCK: a FIFO left there cannot hang the Job on open
        fd = os.open(folder / file, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        return {"error": "missing"}
    except OSError as error:  # ELOOP: a symbolic link
        return {"error": f"unreadable: {error.strerror}"}
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return {"error": "not a regular file"}
        digest = hashlib.sha256()
        size = 0
        while chunk := os.read(fd, CHUNK):
            digest.update(chunk)
            size += len(chunk)
    finally:
        os.close(fd)
    return {"bytes": size, "sha256": digest.hexdigest()}


def check(root: Path, folder: str, files: Sequence[str]) -> dict[str, Any]:
    """What ``root/folder`` holds of ``files``: each one's bytes and sha256, or its error.
    The folder must resolve inside ``root`` with no symbolic link on the way."""
    root = root.resolve()
    where = root / folder.strip("/")
    if where.resolve() != where or not where.is_relative_to(root):
        return {"v": MESSAGE_VERSION, "error": f"{folder}: not a folder inside the claim"}
    if not where.is_dir():
        return {"v": MESSAGE_VERSION, "error": f"{folder}: no such folder in the claim"}
    return {"v": MESSAGE_VERSION, "files": {file: _one(where, file) for file in files}}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mloptimizer.operator.claimcheck",
        description="Print the size and SHA-256 of delivered files in a mounted claim, as "
        "JSON, and write it as the container's termination message.",
    )
    parser.add_argument("--root", type=Path, default=Path("/claim"), help="the claim's mount")
    parser.add_argument(
        "--message-file", type=Path, default=Path("/dev/termination-log"),
        help="where Kubernetes reads the termination message from",
    )  # fmt: skip
    parser.add_argument("folder", help="the search's folder in the claim")
    parser.add_argument("files", nargs="+", help="file names in that folder")
    args = parser.parse_args(argv)
    found = check(args.root, args.folder, args.files)
    text = json.dumps(found, separators=(",", ":"), sort_keys=True)
    print(text)
    try:
        args.message_file.write_text(text)
    except OSError as error:  # outside a pod: stdout is enough
        print(f"cannot write {args.message_file}: {error.strerror}", file=sys.stderr)
    return 0 if "files" in found else 1


if __name__ == "__main__":
    sys.exit(main())
