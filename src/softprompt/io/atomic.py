"""Atomic writes: a file or a directory appears whole or not at all.

Every write goes to a temporary sibling, is fsynced, then renamed into place, so a process killed at any
moment leaves either the old file or the new one, never half of one; a failed write raises `OSError`
naming the file, not its temporary. Standard library only, so `softprompt verify` and the report need no
torch.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from softprompt.errors import UserError
from softprompt.io.rundir import fsync_dir, install_dir


def refuse_overlap(source: str | os.PathLike, out: str | os.PathLike, flag: str) -> None:
    """Refuse an output directory that is, contains or lies inside the input it is made from.

    Replacing `out` (`--overwrite`, `atomic_dir`) deletes everything under it: with `out` a parent of the
    input (`export runs/x/best runs/x --overwrite`) that is the input itself and the run around it.

    Raises:
        UserError: one line naming both paths and `flag`.
    """
    src, dst = Path(source).resolve(), Path(out).resolve()
    if src == dst or dst in src.parents:
        raise UserError(
            f"{flag} {out} contains {source}, which it is made from; replacing it would delete the input, "
            f"so choose a {flag} outside it"
        )
    if src in dst.parents:
        raise UserError(f"{flag} {out} is inside {source}, which it is made from; choose a {flag} outside it")


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write a file so that readers see either the old one or the whole new one: a temporary
    sibling, flushed and fsynced, then renamed into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    # os.open with 0o666 lets the umask decide the mode, as for any ordinary file (mkstemp is 0600).
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise OSError(e.errno, e.strerror, str(path)) from e  # name the file, not its temporary
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write a UTF-8 text file atomically (see `atomic_write_bytes`)."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write JSON via a temporary file and a rename."""
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


#: The output path that means standard output (`--output -`), as in most command-line tools.
STDOUT = "-"


def write_output_text(path: str | os.PathLike, text: str) -> None:
    """A command's output file, written atomically (`atomic_write_text`), or to stdout for ``-``."""
    if str(path) == STDOUT:
        sys.stdout.write(text)
        sys.stdout.flush()
    else:
        atomic_write_text(path, text)


def write_output_json(path: str | os.PathLike, obj: Any) -> None:
    """`write_output_text` of JSON, as `atomic_write_json` writes it."""
    write_output_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory that replaces `target` only once the block completes.

    The old `target`, if any, is swapped out and deleted after the new one is in place
    (`rundir.install_dir`), so a crash leaves a complete directory at `target` (old or new) plus, at
    worst, a stale `.tmp-*` sibling; on failure the temporary directory is removed.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".tmp-{target.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    install_dir(tmp, target)
