"""Files that survive a kill: atomic writes, run directories, checkpoints.

Every file is written to a temporary sibling and renamed into place; a checkpoint is a
directory renamed into place plus an atomically replaced `latest` pointer.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

RUN_FILE = "run.json"  # names the stage and config that own an output directory


class RunDirError(ValueError):
    """An output directory that holds another run, or a missing input."""


@contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary sibling path; on success rename it onto `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
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
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        yield tmp
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
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e


def save_tensors(
    path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict | None = None
) -> None:
    with atomic_path(path) as tmp:
        save_file(
            {k: v.detach().contiguous().cpu() for k, v in tensors.items()},
            str(tmp),
            metadata=metadata,
        )


def load_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own types for truncated or corrupt files
        raise ValueError(f"{path} is not a readable safetensors file: {e}") from e


def append_jsonl(path: str | os.PathLike, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def claim_run_dir(out: str | os.PathLike, stage: str, config: dict, resume: bool = True) -> Path:
    """Make `out` this run's directory, or refuse if it holds another run.

    The same stage with the same config is the same run (resumed, not overwritten); a
    different one, or files we did not write, is refused and left untouched.
    """
    out = Path(out)
    marker = out / RUN_FILE
    if out.exists() and not out.is_dir():
        raise RunDirError(f"output {out} exists and is not a directory")
    if marker.exists():
        previous = read_json(marker)
        if previous.get("stage") != stage or previous.get("config") != config:
            raise RunDirError(
                f"output directory {out} holds another run (stage {previous.get('stage')!r} with a "
                "different config); choose a new --out or delete it yourself"
            )
        if not resume:
            raise RunDirError(
                f"output directory {out} already holds this run; pass --resume to continue it"
            )
        return out
    if out.exists() and any(out.iterdir()):
        raise RunDirError(
            f"output directory {out} is not empty and holds no run of ours; choose a new --out"
        )
    out.mkdir(parents=True, exist_ok=True)
    write_json(marker, {"stage": stage, "config": config})
    return out


# ----------------------------------------------------------------------------- checkpoints


def save_checkpoint(
    root: str | os.PathLike, step: int, tensors: dict[str, torch.Tensor], state: dict, keep: int = 2
) -> Path:
    """Write `root/step_{step}/` as a whole directory, then point `root/latest` at it."""
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
    tensors = load_file(str(ckpt / "tensors.safetensors"))
    # Our own file, written above; weights_only keeps it to tensors and plain containers.
    state = torch.load(ckpt / "state.pt", weights_only=True)
    return tensors, state
