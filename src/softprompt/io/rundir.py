"""The run directory: what `softprompt train --output_dir D` writes, and what it guarantees.

    D/.lock                  the writer's lock (an OS file lock; holds its PID, host and start time)
    D/config.yaml            the resolved config of the run
    D/metrics.jsonl          one JSON record per event (train, eval, start, resume, end)
    D/results.json           the final scores, written at the end
    D/predictions_step{N}.json, D/predictions_best.json
    D/tensorboard/
    D/checkpoint-NNNNNNN/    a resumable checkpoint: trainer_state.json, the weights, the optimizer
                             state, every rank's RNG state, a prompt's README.md, and manifest.json
    D/last -> checkpoint-NNNNNNN   the newest checkpoint
    D/best/                  the weights of the best dev step (a prompt checkpoint or an HF model) + manifest.json

Who owns what: this module owns the layout (every name above), who may write a run directory (the
lock), how a checkpoint is published (a temporary directory, a manifest written last, fsync, one
rename, then `last`, then pruning), how checkpoints are verified and which one `--resume` continues
from, and the trainer's state record. `softprompt.io.checkpoint` owns what is inside the files (tensor
and prompt formats, safe loading, atomic single-file writes); `softprompt.training.loop` decides when to
save. This module imports nothing but the standard library, so the CLI can use it while parsing,
and `softprompt verify` runs without torch.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import hashlib
import json
import os
import re
import shutil
import socket
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from softprompt.errors import CheckpointError, StorageError, UserError

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
RESULTS_FILE = "results.json"
TENSORBOARD_DIR = "tensorboard"
LAST = "last"
BEST = "best"
PREDICTIONS_BEST = "predictions_best.json"
TRAINER_STATE = "trainer_state.json"
MANIFEST = "manifest.json"
LOCK_FILE = ".lock"
CHECKPOINT_PREFIX = "checkpoint-"
_CHECKPOINT_RE = re.compile(r"checkpoint-(\d+)")


def checkpoint_name(step: int) -> str:
    """The directory name of the checkpoint saved at `step` (zero-padded, so names sort by step)."""
    return f"{CHECKPOINT_PREFIX}{step:07d}"


def predictions_file(step: int) -> str:
    """The name of the dev predictions written by the evaluation at `step`."""
    return f"predictions_step{step}.json"


def is_run_dir(path: Path) -> bool:
    """Whether `path` looks like a directory `softprompt train` wrote."""
    return (path / CONFIG_FILE).is_file() or (path / BEST).is_dir() or (path / LAST).exists()


def checkpoints(out: Path) -> list[Path]:
    """The `checkpoint-*` directories of a run, oldest step first."""
    found = []
    for p in Path(out).glob(f"{CHECKPOINT_PREFIX}*"):
        m = _CHECKPOINT_RE.fullmatch(p.name)
        if m and p.is_dir() and not p.is_symlink():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def last_checkpoint(out: Path) -> str | None:
    """The name of the checkpoint `last` names, if any."""
    try:
        return os.readlink(Path(out) / LAST)
    except OSError:
        return None


# ------------------------------------------------------------------------------------- durable renames


def fsync_dir(path: Path) -> None:
    """Make a rename inside `path` durable."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def fsync_tree(path: Path) -> None:
    """fsync every file under `path` (giving it the usual mode: temporaries are created private), then `path`."""
    mode = 0o666 & ~_umask()
    for p in sorted(Path(path).rglob("*")):
        if p.is_file() and not p.is_symlink():
            os.chmod(p, mode)
            with open(p, "rb+") as f:
                os.fsync(f.fileno())
    fsync_dir(path)


def replace_dir(tmp: Path, target: Path) -> None:
    """Put the complete directory `tmp` in place of `target`, durably.

    An existing `target` is moved aside first and deleted after the new one is in place, so `target`
    never names a missing directory for longer than two renames, and a kill between them leaves the
    aside copy, which `remove_stale_temporaries` puts back.
    """
    old = None
    if target.exists():
        old = target.parent / f".old-{target.name}-{uuid.uuid4().hex[:8]}"
        os.replace(target, old)
    os.replace(tmp, target)
    fsync_dir(target.parent)
    if old is not None:
        # `target` may have been a file (`export --overwrite` onto one): rmtree would leave it behind.
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)


def install_dir(tmp: Path, target: Path, *, manifest: bool = False) -> None:
    """Publish the finished temporary directory `tmp` as `target`: (its manifest,) fsync, `replace_dir`.

    On any failure `tmp` is removed and `target` is left as it was.
    """
    try:
        if manifest:
            write_manifest(tmp)
        fsync_tree(tmp)
        replace_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def remove_stale_temporaries(directory: str | os.PathLike) -> None:
    """Delete `.tmp-*` / `.old-*` leftovers of writes that a killed run never finished.

    An `.old-NAME-*` whose `NAME` is missing is the only complete copy left by a kill between the two
    renames of a replacement (`replace_dir`), so it is put back, not deleted.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return
    for p in sorted(directory.iterdir()):
        if p.name.startswith(".old-") and p.is_dir():
            original = directory / p.name.removeprefix(".old-").rpartition("-")[0]
            if original.name and not original.exists() and not original.is_symlink():
                os.replace(p, original)
                fsync_dir(directory)
                continue
        # `.NAME.*.tmp` files are softprompt.io.atomic.atomic_write_bytes's temporaries.
        if p.name.startswith((".tmp-", ".old-")) or (p.name.startswith(".") and p.name.endswith(".tmp")):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() and not p.is_symlink() else p.unlink(
                missing_ok=True
            )


def _write_new(path: Path, text: str) -> None:
    # Unlink first: inside `amend`, the old file is a hard link to the published checkpoint's copy.
    path.unlink(missing_ok=True)
    path.write_text(text, encoding="utf-8")


# ------------------------------------------------------------------------------------- one writer


class RunDirBusy(UserError):
    """Another live process holds the run directory's lock."""


class RunLock:
    """An exclusive `flock` on `D/.lock`, held for a training run's whole life.

    The kernel releases it when the process dies, however it dies, so kill -9 never leaves a stale
    lock. The file itself stays (deleting it would let two processes lock two different files).
    """

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd: int | None = fd

    def release(self) -> None:
        """Unlock (idempotent)."""
        if self._fd is not None:
            import fcntl

            with contextlib.suppress(OSError):
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __del__(self) -> None:  # a run dropped without `release` (a test's setup()) frees the lock too
        self.release()


def lock(out: Path) -> RunLock:
    """Take the exclusive lock of run directory `out` (created if missing), or raise `RunDirBusy`.

    The message names the holder: its PID, host and start time.
    """
    import fcntl

    out.mkdir(parents=True, exist_ok=True)
    path = out / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
            raise
        raise RunDirBusy(
            f"{out} is being written by another training run ({_holder(path)}); wait for it to end or stop "
            "it, or train into another --output_dir"
        ) from None
    started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    holder = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": started})
    os.ftruncate(fd, 0)
    os.pwrite(fd, (holder + "\n").encode(), 0)
    return RunLock(path, fd)


def _holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
        return f"PID {info['pid']} on {info['host']}, started {info['started']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "a process that has not yet said who it is"


def prepare(out: Path, *, overwrite: bool) -> None:
    """Get a locked run directory ready: remove stale temporaries, and with `overwrite` the old run's files."""
    remove_stale_temporaries(out)
    if overwrite:
        for p in out.iterdir():
            if p.name.startswith(CHECKPOINT_PREFIX) or p.name in (BEST, LAST, TENSORBOARD_DIR):
                p.unlink() if p.is_symlink() else shutil.rmtree(p, ignore_errors=True)
            elif p.name in (METRICS_FILE, RESULTS_FILE) or p.name.startswith("predictions_"):
                p.unlink()


# ------------------------------------------------------------------------------------- the trainer's state


@dataclass
class TrainerState:
    """What a checkpoint must carry for `--resume` to continue the very same run."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    # The QA scores at best_step under their own names, where the task's metric has them (checkpoints
    # written before best_scores held every task's scores carry only these).
    best_f1: float = -1.0
    best_em: float = -1.0
    best_step: int = -1
    # Every score at best_step, the selection score first (F1 for SQuAD, a text task's first metric).
    best_scores: dict[str, float] = field(default_factory=dict)
    best_t5_em: float | None = None  # T5's own scores at best_step (padded SQuAD text only)
    best_t5_f1: float | None = None
    train_seconds: float = 0.0
    examples_seen: int = 0
    skipped_nonfinite: int = 0
    last_eval_step: int = -1  # a checkpoint is written before its step's evaluation; resume finishes it
    # The loss window since the last `train` record: a resume continues it, so the next record is the
    # one an uninterrupted run writes (checkpoints older than these fields restart the window).
    window_loss: float = 0.0
    window_tokens: float = 0.0
    window_examples: int = 0
    window_time: float = 0.0
    python_rng: list[Any] = field(default_factory=list)

    @property
    def best_score(self) -> float:
        """The selection score at best_step (-1 before any; F1 in an older SQuAD checkpoint)."""
        return next(iter(self.best_scores.values())) if self.best_scores else self.best_f1

    def record_best(self, step: int, scores: dict[str, float], selection: str) -> None:
        """Make `step` the best so far, with its scores; `selection` names the one that chose it."""
        self.best_step = step
        self.best_scores = {selection: scores[selection], **scores}
        self.best_f1, self.best_em = scores.get("f1", -1.0), scores.get("exact_match", -1.0)
        self.best_t5_em, self.best_t5_f1 = scores.get("t5_exact_match"), scores.get("t5_f1")


def write_trainer_state(directory: Path, state: TrainerState) -> None:
    """Write `trainer_state.json` into a checkpoint being built."""
    _write_new(directory / TRAINER_STATE, json.dumps(asdict(state), indent=2) + "\n")


def _same_kind(value: Any, default: Any) -> bool:
    """Whether a trainer_state.json value has the type of the field's default (a None default: a number too)."""
    if isinstance(value, bool):
        return False
    if isinstance(default, list):
        return isinstance(value, list)
    if isinstance(default, dict):
        return isinstance(value, dict) and all(isinstance(v, int | float) for v in value.values())
    if isinstance(default, int):
        return isinstance(value, int)
    return isinstance(value, int | float) or (default is None and value is None)


def read_trainer_state(directory: Path) -> TrainerState:
    """Read a checkpoint's `trainer_state.json`; a missing or garbled one is one `CheckpointError`."""
    path = directory / TRAINER_STATE
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(raw, dict):
            raise TypeError(f"a JSON {type(raw).__name__}, not an object")
        state = TrainerState(**{k: v for k, v in raw.items() if k in TrainerState.__dataclass_fields__})
        for name, default in asdict(TrainerState()).items():
            if not _same_kind(getattr(state, name), default):
                raise TypeError(f"{name} is {short(getattr(state, name))}")
        named = _CHECKPOINT_RE.fullmatch(directory.name)
        if named and state.step != int(named.group(1)):
            raise ValueError(f"step is {short(state.step)} in {directory.name}")
        if min(state.step, state.epoch, state.batch_in_epoch, state.examples_seen) < 0:
            raise ValueError("a step or count is negative")
        if state.best_step >= 0 and not state.best_scores:  # written before best_scores held SQuAD's too
            t5 = {"t5_exact_match": state.best_t5_em, "t5_f1": state.best_t5_f1}
            legacy = {"f1": state.best_f1, "exact_match": state.best_em, **t5}
            state.best_scores = {k: v for k, v in legacy.items() if v is not None}
        return state
    except FileNotFoundError:
        raise CheckpointError(
            f"{directory} is not a complete checkpoint ({TRAINER_STATE} is missing)"
        ) from None
    except (OSError, ValueError, TypeError, RecursionError) as e:
        raise CheckpointError(f"{path} is damaged ({short(e)}); resume from another checkpoint") from None


def short(value: object) -> str:
    """A value or error as a message quotes it: at most 80 characters, never a 5,000-digit integer."""
    if isinstance(value, int) and value.bit_length() > 64:
        return "a huge integer"
    text = repr(value) if not isinstance(value, BaseException) else str(value) or type(value).__name__
    return text if len(text) <= 80 else text[:80] + "..."


# ------------------------------------------------------------------------------------- verification


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _files(directory: Path) -> list[str]:
    return sorted(
        str(p.relative_to(directory))
        for p in directory.rglob("*")
        if p.is_file() and not p.is_symlink() and p.name != MANIFEST
    )


def write_manifest(directory: Path) -> None:
    """Record every file of a checkpoint being built (name, size, sha256) in its manifest.json; call it last."""
    files = {
        name: {"size": (directory / name).stat().st_size, "sha256": _sha256(directory / name)}
        for name in _files(directory)
    }
    _write_new(directory / MANIFEST, json.dumps({"format": 1, "files": files}, indent=2) + "\n")


@dataclass(frozen=True)
class Verdict:
    """What `verify_checkpoint` found: "ok", "unverified" (no manifest: an older softprompt) or "damaged"."""

    status: str
    detail: str = ""

    @property
    def usable(self) -> bool:
        return self.status != "damaged"


def verify_checkpoint(directory: Path) -> Verdict:
    """Check a checkpoint's files against its manifest: each present, of the recorded size and sha256."""
    try:
        return _verify(directory)
    except OSError as e:  # unreadable, or removed while being read
        return Verdict("damaged", f"unreadable ({e.strerror or e})")


def _verify(directory: Path) -> Verdict:
    manifest = directory / MANIFEST
    if not manifest.is_file():
        if (directory / TRAINER_STATE).is_file() or directory.name == BEST:
            return Verdict("unverified", f"no {MANIFEST} (written before softprompt verified checkpoints)")
        return Verdict("damaged", f"no {MANIFEST} and no {TRAINER_STATE}: incomplete")
    try:
        files = json.loads(manifest.read_text(encoding="utf-8"))["files"]
        recorded = {str(k): (int(v["size"]), str(v["sha256"])) for k, v in files.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError) as e:
        return Verdict("damaged", f"{MANIFEST} is unreadable ({type(e).__name__})")
    # A manifest names files inside its checkpoint: `../x`, `/etc/passwd` or a link out would make
    # `verify` read (and report the size of) files outside the run.
    root = directory.resolve()
    for name in recorded:
        inside = not Path(name).is_absolute() and ".." not in Path(name).parts
        if not inside or root not in (root / name).resolve().parents:
            return Verdict("damaged", f"{MANIFEST} names a file outside the checkpoint")
    extra = [n for n in _files(directory) if n not in recorded and not Path(n).name.startswith(".")]
    if extra:
        return Verdict("damaged", f"{extra[0]} is not in the manifest")
    for name, (size, sha) in recorded.items():
        path = directory / name
        if not path.is_file():
            return Verdict("damaged", f"{name} is missing")
        actual = path.stat().st_size
        if actual != size:
            return Verdict("damaged", f"{name} has {actual:,} bytes, the manifest says {size:,}")
        if _sha256(path) != sha:
            return Verdict("damaged", f"{name} does not match its sha256")
    return Verdict("ok", f"{len(recorded)} files")


def resume_candidates(out: Path) -> tuple[list[tuple[Path, Verdict]], list[str]]:
    """Every checkpoint `--resume` may continue from, newest first: the newest that verifies, then the
    older usable ones down to the first that verifies (an `unverified` one, having no manifest, can
    still fail to load, and the trainer then falls back to the next).

    Returns:
        The usable checkpoints with their verdicts, and one phrase per newer checkpoint skipped because
        it is damaged.

    Raises:
        CheckpointError: checkpoints exist but none verifies.
    """
    skipped: list[str] = []
    usable: list[tuple[Path, Verdict]] = []
    for directory in reversed(checkpoints(out)):
        verdict = verify_checkpoint(directory)
        if verdict.usable:
            usable.append((directory, verdict))
            if verdict.status == "ok":
                break  # one that verifies loads; older ones are never needed (and hashing them costs)
        elif not usable:
            skipped.append(f"{directory.name} ({verdict.detail})")
    if usable:
        return usable, skipped
    if skipped:
        raise CheckpointError(
            f"--resume: no checkpoint in {out} verifies, and softprompt is refusing to load a damaged one: "
            f"{'; '.join(skipped)}; restore a copy, or start again with --overwrite_output_dir"
        )
    return [], []


def verify_run(out: Path) -> list[tuple[str, Verdict]]:
    """Every checkpoint of a run (and best/) with its verdict, oldest first."""
    if not Path(out).is_dir():
        raise UserError(f"{out} is not a directory; give a run directory written by softprompt train")
    rows = [(p.name, verify_checkpoint(p)) for p in checkpoints(out)]
    # A live run prunes old checkpoints: one that vanished while being read is no finding.
    rows = [(name, verdict) for name, verdict in rows if (out / name).is_dir()]
    best = out / BEST
    if best.is_dir():
        named = [] if (best / MANIFEST).is_file() else sorted(p for p in best.iterdir() if p.is_dir())
        # A multi-prompt run keeps one best prompt per name, best/<name>/, each with its own manifest.
        rows += [(f"{BEST}/{p.name}", verify_checkpoint(p)) for p in named] or [
            (BEST, verify_checkpoint(best))
        ]
    if not rows and not is_run_dir(out):
        raise UserError(
            f"{out} holds no checkpoints and no {CONFIG_FILE}: it is not a softprompt run directory"
        )
    return rows


def verify_table(out: Path, rows: list[tuple[str, Verdict]]) -> str:
    """`softprompt verify`'s table: one line per checkpoint, `last` marked."""
    last = last_checkpoint(out)
    width = max([len("checkpoint"), *(len(name) + 7 for name, _ in rows)])
    lines = [f"{'checkpoint':<{width}}  {'status':<10}  detail"]
    for name, verdict in rows:
        shown = f"{name} (last)" if name == last else name
        lines.append(f"{shown:<{width}}  {verdict.status:<10}  {verdict.detail}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------- publication


def new_checkpoint_dir(out: Path, step: int) -> Path:
    """An empty temporary directory to build the checkpoint of `step` in (rank 0 calls this)."""
    tmp = out / f".tmp-{checkpoint_name(step)}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def publish_checkpoint(tmp: Path, out: Path, step: int, *, keep: int) -> Path:
    """Make a fully written checkpoint visible: manifest, fsync, rename, point `last` at it, prune.

    Until the rename the checkpoint does not exist; after it, it is complete and verifiable. On any
    failure the temporary directory is removed and the previous checkpoint and `last` are untouched.

    Args:
        tmp: the directory from `new_checkpoint_dir`, with every file written.
        out: the run directory.
        step: the step it holds.
        keep: how many checkpoints to keep (0 or less: keep only this one).

    Returns:
        The published checkpoint's path.
    """
    target = out / checkpoint_name(step)
    install_dir(tmp, target, manifest=True)
    link_tmp = out / f".tmp-{LAST}-{os.getpid()}"
    link_tmp.unlink(missing_ok=True)
    link_tmp.symlink_to(target.name)
    os.replace(link_tmp, out / LAST)
    fsync_dir(out)
    _prune(out, keep=keep, current=target.name)
    return target


def _prune(out: Path, keep: int, current: str) -> None:
    found = checkpoints(out)
    for p in found[:-keep] if keep > 0 else found:
        if p.name != current:
            # Rename first: a kill during rmtree must not leave a half-deleted `checkpoint-*` behind.
            doomed = out / f".tmp-prune-{p.name}-{os.getpid()}"
            os.replace(p, doomed)
            shutil.rmtree(doomed, ignore_errors=True)


@contextlib.contextmanager
def amend(directory: Path) -> Iterator[Path]:
    """Change some files of a published checkpoint (or best/) as one atomic replacement.

    Yields a copy of it (hard links, so nothing large is copied) to write new files into; replace
    files by writing new ones (an atomic write, or unlink first), never by writing through a link.
    The manifest is rewritten and the copy swapped in with `replace_dir`.
    """
    directory = Path(directory).resolve()
    tmp = directory.parent / f".tmp-{directory.name}-{uuid.uuid4().hex[:8]}"
    try:
        shutil.copytree(directory, tmp, copy_function=_link_or_copy)
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    manifest = (directory / MANIFEST).is_file() or directory.name.startswith(CHECKPOINT_PREFIX)
    install_dir(tmp, directory, manifest=manifest)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:  # a filesystem without hard links
        shutil.copy2(src, dst)


# ------------------------------------------------------------------------------------- I/O failures


STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS, errno.EFBIG})
"""Errors that mean the storage failed (not a wrong path): disk full, quota, I/O error, read-only, file too large."""


def write_failed(error: OSError, out: Path) -> StorageError:
    """The one-line error for an I/O failure while writing into run directory `out`."""
    what = os.strerror(error.errno) if error.errno else str(error)
    code = f" [{errno.errorcode[error.errno]}]" if error.errno in errno.errorcode else ""
    where = error.filename or out
    last = last_checkpoint(out)
    kept = f"the last complete checkpoint is {out / last}" if last else "no checkpoint was completed"
    return StorageError(
        f"cannot write {where}: {what}{code}; {kept}; free space or fix the filesystem, then continue with --resume"
    )
