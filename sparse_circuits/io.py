"""Files that survive a kill: atomic writes, run directories, checkpoints.

Every file is written to a temporary sibling and renamed into place; a checkpoint is a
directory renamed into place plus an atomically replaced `latest` pointer.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import MissingInputError, RunDirError, StageError

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

RUN_FILE = "run.json"  # names the stage and config that own an output directory
LOCK_FILE = ".lock"  # the pid and host of the process writing a run dir or store
METRICS_FILE = "metrics.json"  # a run dir's completion marker: always its last file written

__all__ = ["RunDirError", "StageError"]  # re-exported: callers import them from here too


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _honour_umask(path: Path, directory: bool) -> None:
    """mkstemp makes 0600 files and mkdtemp 0700 folders: give them the modes an ordinary
    open()/mkdir() would have had, so a colleague, a server or a container can read them."""
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


@contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary sibling path; on success rename it onto `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        if Path(tmp).exists():
            _honour_umask(Path(tmp), directory=Path(tmp).is_dir())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def atomic_dir(path: str | os.PathLike):
    """Yield a temporary sibling directory; on success swap it in for `path` whole.

    The old directory is moved aside before the rename and removed after it, so no stale
    file of an older version survives and a failure leaves the old one in place.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        _honour_umask(tmp, directory=True)
        old = path.with_name(f".{path.name}.old") if path.exists() else None
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
            path.rename(old)
        tmp.rename(path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_json(path: str | os.PathLike, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    if path.is_dir():
        raise StageError(f"{path} is a directory, not a JSON file")
    if not path.is_file():
        raise MissingInputError(f"{path} does not exist")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise StageError(f"{path} is not valid JSON: {e}") from e


def save_tensors(
    path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict | None = None
) -> None:
    from safetensors.torch import save_file  # noqa: PLC0415  (the CLI's help needs no torch)

    with atomic_path(path) as tmp:
        save_file(
            {k: v.detach().contiguous().cpu() for k, v in tensors.items()},
            str(tmp),
            metadata=metadata,
        )


def load_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file  # noqa: PLC0415

    path = Path(path)
    if not path.is_file():
        raise MissingInputError(f"{path} does not exist")
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own types for truncated or corrupt files
        raise StageError(f"{path} is not a readable safetensors file: {e}") from e


def append_jsonl(path: str | os.PathLike, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """The records of a JSONL log, skipping a line torn by a kill."""
    records = []
    for line in Path(path).read_text(errors="replace").splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records


# ----------------------------------------------------------------------------- locks


_held: dict[Path, int] = {}  # lock files this process holds -> how many claims hold each


def _holder(lock: Path) -> dict:
    try:
        return json.loads(lock.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return {}  # being written right now, or torn by a kill: treated as held, unknown holder


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


def acquire_lock(lock: str | os.PathLike) -> Path:
    """Create `lock` holding this process's pid and host, or refuse if a live process holds it.

    A lock left by a dead process on this host is taken over; one held on another host is
    refused (we cannot tell whether it still runs). Re-entrant within one process."""
    lock = Path(lock).absolute()
    if lock in _held:
        _held[lock] += 1
        return lock
    me = {"pid": os.getpid(), "host": socket.gethostname()}
    lock.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(3):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
        except FileExistsError:
            holder = _holder(lock)
            pid, host = holder.get("pid"), holder.get("host")
            if holder == me:  # a lock this process left behind (e.g. a previous job)
                break
            if host == me["host"] and isinstance(pid, int) and not _pid_alive(pid):
                log.info("taking over %s from process %d, which is gone", lock, pid)
                lock.unlink(missing_ok=True)
                continue
            raise RunDirError(
                f"{lock.parent} is being written by process {pid} on host {host} (lock file {lock}); "
                "wait for it to finish, or delete the lock file if that process is gone"
            ) from None
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        break
    else:
        raise RunDirError(f"could not take the lock {lock}")
    _held[lock] = 1
    return lock


def release_lock(lock: str | os.PathLike) -> None:
    lock = Path(lock).absolute()
    if lock not in _held:
        return
    _held[lock] -= 1
    if _held[lock] == 0:
        del _held[lock]
        lock.unlink(missing_ok=True)


@contextmanager
def released_locks() -> Iterator[None]:
    """Release, on leaving, every lock taken inside: wrap one stage run in it (the CLI and the
    job runner do), so that a claimed run dir is free again once its stage returns or fails."""
    before = set(_held)
    try:
        yield
    finally:
        for lock in [lk for lk in _held if lk not in before]:
            _held[lock] = 1
            release_lock(lock)


def _is_leftover(path: Path) -> bool:
    """A temporary file or folder of ours (atomic_path, atomic_dir), or an old copy moved aside."""
    return path.name.startswith(".") and path.name.endswith((".tmp", ".old"))


def clean_leftovers(root: str | os.PathLike) -> int:
    """Remove the temporary files and folders a killed run left under `root`; return how many.

    Call only while holding root's lock: a live writer's temporaries look the same."""
    removed = 0
    for path in sorted(Path(root).rglob(".*"), key=lambda p: len(p.parts)):
        if not _is_leftover(path) or not path.exists():
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed += 1
    if removed:
        log.info("removed %d temporary file(s) a killed run left in %s", removed, root)
    return removed


# ----------------------------------------------------------------------------- run dirs


def _produced_nothing(out: Path) -> bool:
    """Only the run record (and our lock and temporaries): a run that failed before any work."""
    return all(p.name in (RUN_FILE, LOCK_FILE) or _is_leftover(p) for p in out.iterdir())


def claim_run_dir(out: str | os.PathLike, stage: str, config: dict, resume: bool = True) -> Path:
    """Make `out` this run's directory, or refuse if it holds another run.

    The same stage with the same config is the same run (resumed, not overwritten); a
    different one, or files we did not write, is refused and left untouched. A run that
    produced nothing but its record (it failed on a bad input) is replaced. The directory is
    locked for this process (released by `released_locks`, or taken over once the process
    is gone), and temporaries a killed run of it left are removed.
    """
    out = Path(out)
    marker = out / RUN_FILE
    if out.exists() and not out.is_dir():
        raise RunDirError(f"output {out} exists and is not a directory")
    if marker.exists():
        previous = read_json(marker)
        same = previous.get("stage") == stage and previous.get("config") == config
        if not same and not _produced_nothing(out):
            raise RunDirError(
                f"output directory {out} holds another run (stage {previous.get('stage')!r} with a "
                "different config); choose a new --out or delete it yourself"
            )
        if same and not resume:
            raise RunDirError(
                f"output directory {out} already holds this run; pass --resume to continue it"
            )
        acquire_lock(out / LOCK_FILE)
        clean_leftovers(out)
        if not same:
            log.info("%s held only the record of a run that produced nothing: replacing it", out)
            write_json(marker, {"stage": stage, "config": config})
        return out
    if out.exists() and any(p.name != LOCK_FILE for p in out.iterdir()):
        raise RunDirError(
            f"output directory {out} is not empty and holds no run of ours; choose a new --out"
        )
    out.mkdir(parents=True, exist_ok=True)
    acquire_lock(out / LOCK_FILE)
    write_json(marker, {"stage": stage, "config": config})
    return out


def run_complete(out: str | os.PathLike) -> bool:
    """Whether `out` holds a finished run: its record, and its completion marker (written last)."""
    out = Path(out)
    return (out / RUN_FILE).is_file() and (out / METRICS_FILE).is_file()


def claim_output_file(path: str | os.PathLike, overwrite: bool, is_ours) -> Path:
    """Check that a stage may write the single file `path`.

    Refused: a directory, and an existing file that `is_ours(path)` does not recognise as this
    stage's output (another stage's config.json, say). One of ours is replaced only with
    `overwrite`."""
    path = Path(path)
    if path.is_dir():
        raise RunDirError(f"output {path} is a directory; name a file to write")
    if path.exists():
        if not is_ours(path):
            raise RunDirError(
                f"output {path} exists and was not written by this stage; choose another path"
            )
        if not overwrite:
            raise RunDirError(f"output {path} exists; pass --overwrite to replace it")
    if path.parent.exists() and not path.parent.is_dir():
        raise RunDirError(f"output {path}: {path.parent} is not a directory")
    return path


def claim_output_dir(path: str | os.PathLike, overwrite: bool, is_ours) -> Path:
    """Check that a stage may write the directory `path` whole (built beside it, swapped in).

    Refused: a file, and a non-empty directory that `is_ours(path)` does not recognise as this
    stage's output (a model dir, say, which the swap would delete). One of ours is replaced only
    with `overwrite`."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise RunDirError(f"output {path} is a file; name a directory to write")
    if path.is_dir() and any(path.iterdir()):
        if not is_ours(path):
            raise RunDirError(
                f"output directory {path} holds files this stage did not write; choose another path"
            )
        if not overwrite:
            raise RunDirError(f"output {path} exists; pass --overwrite to replace it")
    return path


# ----------------------------------------------------------------------------- checkpoints


def save_checkpoint(
    root: str | os.PathLike, step: int, tensors: dict[str, torch.Tensor], state: dict, keep: int = 2
) -> Path:
    """Write `root/step_{step}/` as a whole directory, then point `root/latest` at it."""
    import torch  # noqa: PLC0415  (the CLI's help needs no torch)
    from safetensors.torch import save_file  # noqa: PLC0415

    root = Path(root)
    final = root / f"step_{step:08d}"
    with atomic_dir(final) as tmp:
        # clone: tied weights share storage, which safetensors refuses
        save_file(
            {k: v.detach().cpu().clone() for k, v in tensors.items()},
            str(tmp / "tensors.safetensors"),
        )
        torch.save(state, tmp / "state.pt")
    with atomic_path(root / "latest") as p:
        p.write_text(final.name)
    for old in sorted(root.glob("step_*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(root: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict] | None:
    """The latest complete checkpoint under `root`, or None when there is none."""
    root = Path(root)
    pointer = root / "latest"
    if not pointer.is_file():
        return None
    ckpt = root / pointer.read_text().strip()
    import torch  # noqa: PLC0415  (the CLI's help needs no torch)
    from safetensors.torch import load_file  # noqa: PLC0415

    tensors = load_file(str(ckpt / "tensors.safetensors"))
    # Our own file, written above; weights_only keeps it to tensors and plain containers.
    state = torch.load(ckpt / "state.pt", weights_only=True)
    return tensors, state
