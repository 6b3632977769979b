"""Issue 11, items 8-11: completion markers, one device rule, one error type, leftovers and locks."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import textwrap
from fractions import Fraction
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from sparse_circuits.cli import main
from sparse_circuits.clt.store import StoreError, store_complete
from sparse_circuits.config import ConfigError
from sparse_circuits.errors import MissingInputError, RunDirError, StageError
from sparse_circuits.io import (
    LOCK_FILE,
    claim_run_dir,
    read_json,
    released_locks,
    run_complete,
    write_json,
)
from sparse_circuits.sparse_attention.modeldir import load_model
from sparse_circuits.sparse_attention.sparsify import SparsifyConfig, sparsify
from sparse_circuits.sparse_attention.train import ToyTrainConfig, train_toy
from sparse_circuits.stages import STAGES

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(n_layers=1, d_model=16, n_heads=2, steps=3, batch_size=16, warmup_steps=1)


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert "Traceback" not in err[0]
    return err[0]


# ----------------------------------------------------------------------------- 8: marker last


def test_metrics_json_is_the_last_file_a_model_dir_gets(toy_pipeline, tmp_path, monkeypatch):
    """Every file lands by a rename; record the renames (the real ones still happen)."""
    landed: list[Path] = []
    real_replace = os.replace

    def replace(src, dst, *args, **kwargs):
        real_replace(src, dst, *args, **kwargs)
        landed.append(Path(dst))

    monkeypatch.setattr(os, "replace", replace)
    dense, sparse = tmp_path / "dense", tmp_path / "sparse"
    with released_locks():
        train_toy(ToyTrainConfig(out=dense, device="cpu", **TINY))
        sparsify(SparsifyConfig(model=dense, out=sparse, steps=2, batch_size=16, warmup_steps=1,
                                eval_sequences=16, select_sequences=0, device="cpu"))  # fmt: skip
    for d in (dense, sparse):
        names = [p.name for p in landed if p.parent == d]
        assert {"config.json", "data.json", "model.safetensors", "tokenizer.json"} <= set(names)
        assert names[-1] == "metrics.json", names
    assert [p.name for p in landed if p.parent == sparse].count("metrics.json") == 1


def test_completeness_is_asked_of_each_artifact(toy_pipeline, tmp_path):
    dense = shutil.copytree(toy_pipeline.dense, tmp_path / "dense")
    assert run_complete(dense)
    (dense / "metrics.json").unlink()  # killed before its last write
    assert not run_complete(dense)
    assert store_complete(str(toy_pipeline.acts))
    assert not store_complete(str(tmp_path / "no-store.zarr"))
    store = shutil.copytree(toy_pipeline.acts, tmp_path / "a.zarr")
    import zarr

    zarr.open_group(str(store), mode="r+").attrs["complete"] = False
    assert not store_complete(str(store))


# ----------------------------------------------------------------------------- 9: one device rule


def test_every_stage_takes_the_same_device_setting():
    for name, stage in STAGES.items():
        cls = stage.config_class()
        if "device" not in cls.model_fields:
            continue
        field = cls.model_fields["device"]
        assert field.default == "auto", name
        with pytest.raises(ValidationError, match="not one of auto, cpu"):
            cls.model_validate({"device": "potato"})


def test_auto_device_trains_and_sparsifies(toy_pipeline, tmp_path):
    with released_locks():
        train_toy(ToyTrainConfig(out=tmp_path / "m", device="auto", **TINY))
        sparsify(SparsifyConfig(model=toy_pipeline.dense, out=tmp_path / "s", steps=2,
                                batch_size=16, warmup_steps=1, eval_sequences=16,
                                select_sequences=0, device="auto"))  # fmt: skip
    assert run_complete(tmp_path / "m") and run_complete(tmp_path / "s")


def test_a_device_the_machine_lacks_fails_before_the_run_dir_is_claimed(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    assert main(["train-toy", "--out", str(tmp_path / "m"), "--device", "cuda"]) == 2
    assert "CUDA is not available" in one_line_error(capsys)
    assert not (tmp_path / "m").exists()


# ----------------------------------------------------------------------------- 10: one error type


def test_expected_failures_share_one_type():
    for cls in (ConfigError, RunDirError, StoreError, MissingInputError):
        assert issubclass(cls, StageError)
    assert issubclass(MissingInputError, FileNotFoundError)


def test_a_corrupt_tokenizer_is_named(toy_pipeline, tmp_path, capsys):
    model = shutil.copytree(toy_pipeline.sparse, tmp_path / "model")
    (model / "tokenizer.json").write_text('{"version": "1.0", "model": ')
    with pytest.raises(StageError, match="tokenizer.json is not a readable tokenizer"):
        load_model(model)
    assert main(["harvest", "--model", str(model), "--out", str(tmp_path / "a.zarr")]) == 2
    assert "tokenizer.json" in one_line_error(capsys)


def test_a_pickled_tokens_file_is_refused(toy_pipeline, tmp_path, capsys):
    pickled = tmp_path / "tokens.pt"
    torch.save({"tokens": Fraction(1, 2)}, pickled)  # an arbitrary object: never unpickled
    args = ["harvest", "--model", str(toy_pipeline.sparse), "--tokens-file", str(pickled)]
    assert main([*args, "--out", str(tmp_path / "a.zarr")]) == 2
    assert f"tokens file {pickled} holds no plain integer array" in one_line_error(capsys)


def test_harvest_out_naming_a_file_is_refused(toy_pipeline, tmp_path, capsys):
    target = tmp_path / "notes.txt"
    target.write_text("mine\n")
    args = ["harvest", "--model", str(toy_pipeline.sparse), "--out", str(target)]
    assert main(args) == 2
    assert "is a file" in one_line_error(capsys)
    assert target.read_text() == "mine\n"


# ----------------------------------------------------------------------------- 11: leftovers, locks


def test_a_killed_runs_temporaries_go_on_the_next_start(tmp_path):
    out = tmp_path / "run"
    with released_locks():
        claim_run_dir(out, "train-toy", {"steps": 3})
    write_json(out / "config.json", {"kept": True})
    leftovers = [
        out / ".config.json.x1y2.tmp",
        out / "checkpoints" / ".step_00000010.a1b2.tmp" / "tensors.safetensors",
        out / ".features.old" / "zarr.json",
    ]
    for path in leftovers:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("torn")
    with released_locks():
        claim_run_dir(out, "train-toy", {"steps": 3})  # the same run, started again
    assert not any(p.exists() for p in leftovers)
    assert not (out / ".features.old").exists()
    assert not (out / "checkpoints" / ".step_00000010.a1b2.tmp").exists()
    assert read_json(out / "config.json") == {"kept": True}


HOLD = textwrap.dedent("""
    import sys, time
    from sparse_circuits.io import acquire_lock, claim_run_dir
    if sys.argv[1] == "run":
        claim_run_dir(sys.argv[2], "train-toy", {"steps": 3})
    else:
        acquire_lock(sys.argv[2])
    print("held", flush=True)
    time.sleep(120)
""")


def hold(kind: str, path: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, kind, str(path)], stdout=subprocess.PIPE,
                            text=True, cwd=ROOT)  # fmt: skip
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_two_processes_cannot_write_one_run_dir(tmp_path):
    out = tmp_path / "run"
    proc = hold("run", out)
    try:
        holder = f"process {proc.pid} on host {socket.gethostname()}"
        with released_locks(), pytest.raises(RunDirError, match=holder):
            claim_run_dir(out, "train-toy", {"steps": 3})
        assert read_json(out / LOCK_FILE) == {"pid": proc.pid, "host": socket.gethostname()}
    finally:
        proc.kill()
        proc.wait()
    with released_locks():  # the holder is gone: its lock is taken over
        claim_run_dir(out, "train-toy", {"steps": 3})
        assert read_json(out / LOCK_FILE)["pid"] == os.getpid()
    assert not (out / LOCK_FILE).exists()


def test_two_processes_cannot_write_one_store(toy_pipeline, tmp_path, capsys):
    store = tmp_path / "a.zarr"
    proc = hold("lock", store.with_name(f".{store.name}.lock"))
    try:
        args = ["harvest", "--model", str(toy_pipeline.sparse), "--out", str(store)]
        assert main([*args, "--tokens", "64"]) == 2
        assert f"being written by process {proc.pid}" in one_line_error(capsys)
        assert not store.exists()
    finally:
        proc.kill()
        proc.wait()
    assert main([*args, "--tokens", "64"]) == 0
    assert store_complete(str(store))


def test_a_store_too_small_for_one_batch_is_one_line(toy_pipeline, tmp_path, capsys):
    args = ["train-clt", "--activations", str(toy_pipeline.acts), "--out", str(tmp_path / "c")]
    assert main([*args, "--batch-size", "65536", "--steps", "2", "--device", "cpu"]) == 2
    assert "not one batch of 65536" in one_line_error(capsys)
