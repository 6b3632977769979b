"""Data, dense training, sparse attention post-training: schedules, end-to-end runs through the
CLI, resume after SIGKILL, and the errors a user meets on bad input."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sparse_circuits.cli import main
from sparse_circuits.io import load_tensors
from sparse_circuits.sparse_attention.connectivity import evaluate
from sparse_circuits.sparse_attention.data import (
    DataSpec,
    build_data,
    load_texts,
    pack,
    stdlib_source_files,
    train_bpe_tokenizer,
)
from sparse_circuits.sparse_attention.modeldir import load_model
from sparse_circuits.sparse_attention.sparsify import (
    SparsifyConfig,
    constraint_error,
    dense_reference,
    excess_over_dense,
    gate_offset_at,
    tolerance,
    update_lambda,
    wrap_lora,
)
from sparse_circuits.sparse_attention.toy import (
    addition_data,
    addition_text,
    addition_tokenizer,
    exact_match,
)
from sparse_circuits.sparse_attention.training import lr_at

TINY = ["--n-layers", "2", "--d-model", "32", "--n-heads", "2", "--batch-size", "32"]


# ----------------------------------------------------------------------------- schedules


def test_schedules_are_pure_functions_of_the_step():
    assert gate_offset_at(0, start=3.0, anneal_steps=100) == 3.0
    assert gate_offset_at(50, start=3.0, anneal_steps=100) == pytest.approx(1.5)
    assert gate_offset_at(100, start=3.0, anneal_steps=100) == 0.0
    assert gate_offset_at(1000, start=3.0, anneal_steps=100) == 0.0
    assert lr_at(0, lr=1.0, warmup_steps=10, steps=100, min_lr_ratio=0.1) == pytest.approx(0.1)
    assert lr_at(9, lr=1.0, warmup_steps=10, steps=100, min_lr_ratio=0.1) == pytest.approx(1.0)
    assert lr_at(100, lr=1.0, warmup_steps=10, steps=100, min_lr_ratio=0.1) == pytest.approx(0.1)


def test_tolerance_has_an_absolute_floor():
    assert tolerance(5e-4, 0.02, 0.01) == pytest.approx(5e-4 + 0.01)  # tiny CE: the floor wins
    assert tolerance(3.0, 0.02, 0.01) == pytest.approx(3.06)  # large CE: 2 % wins


def test_constraint_error_is_measured_in_units_of_the_slack():
    # the same place inside the tolerance reads the same on a near-zero CE and on an LM's CE
    toy_tau, lm_tau = tolerance(1e-4, 0.02, 0.005), tolerance(3.5, 0.02, 0.005)
    assert constraint_error(1e-4, 1e-4, toy_tau) == pytest.approx(-1.0)
    assert constraint_error(3.5, 3.5, lm_tau) == pytest.approx(-1.0)
    assert constraint_error(toy_tau, 1e-4, toy_tau) == 0.0
    half_toy = constraint_error(1e-4 + 0.0025, 1e-4, toy_tau)
    half_lm = constraint_error(3.5 + 0.035, 3.5, lm_tau)
    assert half_toy == pytest.approx(half_lm) == pytest.approx(-0.5)
    assert constraint_error(100.0, 1e-4, toy_tau) == 1.0  # a CE spike is clipped


def test_validation_excess_counts_only_beyond_its_noise():
    """A task's one wrong answer on a near-zero CE is noise to λ; every sequence a little worse
    than dense (memorised training text) is a clear excess."""
    dense = {"ce_per_sequence": torch.full((128,), 0.01, dtype=torch.float64),
             "scored_per_sequence": torch.full((128,), 3)}  # fmt: skip

    def clear(ce):  # the excess less one standard error, as λ sees it
        excess, noise = excess_over_dense({"ce_per_sequence": ce}, dense)
        return excess - noise

    one_wrong = dense["ce_per_sequence"].clone()
    one_wrong[7] += 15.0  # 15 nats on one problem: 0.039 nats per scored token
    assert clear(one_wrong) <= 1e-9
    two_wrong = one_wrong.clone()
    two_wrong[9] += 15.0
    assert clear(two_wrong) > 0.01
    noise = torch.randn(128, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    everywhere = dense["ce_per_sequence"] + 0.1 + 0.01 * noise
    assert clear(everywhere) == pytest.approx(0.1 / 3, rel=0.05)


def test_lambda_update_is_bounded_per_step_and_clamped():
    cfg = SparsifyConfig(model=Path("m"), out=Path("o"), lambda_max=2.0)
    lam, integral, ema = update_lambda(0.0, 0.0, error=1.0, cfg=cfg)  # the largest violation
    bound = cfg.lambda_ki + cfg.lambda_kp * (1 - cfg.lambda_ema)
    assert math.log(lam) == pytest.approx(bound) and integral == pytest.approx(cfg.lambda_ki)
    for _ in range(1000):  # held at the clamp: the integral does not wind up beyond it
        lam, integral, ema = update_lambda(integral, ema, error=1.0, cfg=cfg)
    assert lam == 2.0 and integral == pytest.approx(math.log(2.0))
    steps_back = 0
    while lam == 2.0 and steps_back < 100:
        lam, integral, ema = update_lambda(integral, ema, error=-1.0, cfg=cfg)
        steps_back += 1
    assert steps_back < 15  # back below τ, λ falls within the EMA's horizon, not hundreds of steps


def test_lambda_controller_settles_on_a_lagging_constraint():
    """A plant like sparsify's: the constraint follows log λ through a lag of ~100 steps (the
    optimiser has to move the weights before CE changes) plus batch noise. The controller must
    bring it to the constraint and hold it there without a sustained oscillation."""
    cfg = SparsifyConfig(model=Path("m"), out=Path("o"))
    rng = torch.Generator().manual_seed(0)
    target, felt = math.log(30.0), 0.0  # the λ that holds CE at τ; the λ the weights reflect
    integral, ema, trace = 0.0, 0.0, []
    for _ in range(3000):
        lam_log = min(
            math.log(cfg.lambda_max), max(math.log(cfg.lambda_min), integral + cfg.lambda_kp * ema)
        )
        felt += (lam_log - felt) / 100
        noise = 0.2 * torch.randn((), generator=rng).item()
        error = max(-1.0, min(1.0, 0.5 * (target - felt) + noise))
        lam, integral, ema = update_lambda(integral, ema, error, cfg)
        trace.append(math.log(lam))
    tail = torch.tensor(trace[-1000:])
    assert abs(tail.mean().item() - target) < 0.15  # on the constraint
    assert (tail.max() - tail.min()).item() < 1.0  # no swing of more than e× in λ


# ----------------------------------------------------------------------------- data


def test_addition_data_is_the_task_and_splits_held_out_problems():
    data = addition_data(DataSpec(task="addition", heldout_fraction=0.1))
    assert data.train_inputs.shape == (9000, 9) and data.heldout_inputs.shape == (1000, 9)
    tok = addition_tokenizer()
    for x, y in zip(data.heldout_inputs[:20], data.heldout_targets[:20], strict=True):
        text = tok.decode(x.tolist() + [int(y[-1])], skip_special_tokens=False).replace(" ", "")
        a, b = int(text[5:7]), int(text[8:10])
        assert text == addition_text(a, b)
        assert (y[:6] == -100).all() and (y[6:] != -100).all()
    train = {tuple(r) for r in data.train_inputs.tolist()}
    assert not train & {tuple(r) for r in data.heldout_inputs.tolist()}
    logits = torch.nn.functional.one_hot(data.heldout_targets.clamp(min=0), 13).float()
    assert exact_match(logits, data.heldout_targets).all()


def test_batches_depend_only_on_seed_and_step():
    data = addition_data(DataSpec(task="addition"))
    x1, _ = data.batch(17, 8, seed=3)
    x2, _ = data.batch(17, 8, seed=3)
    x3, _ = data.batch(18, 8, seed=3)
    assert torch.equal(x1, x2) and not torch.equal(x1, x3)


def test_text_corpus_through_datasets(tmp_path):
    (tmp_path / "a.txt").write_text("def f(x):\n    return x + 1\n" * 40)
    (tmp_path / "b.jsonl").write_text(
        "\n".join(json.dumps({"body": f"print({i} * {i})"}) for i in range(50))
    )
    texts = load_texts([str(tmp_path / "a.txt")])
    assert len(texts) == 1 and texts[0].startswith("def f")
    assert len(load_texts([str(tmp_path / "b.jsonl")], text_field="body")) == 50
    tok = train_bpe_tokenizer(texts + ["print(1)"], vocab_size=300)
    seqs = pack(texts, tok, context_length=16)
    assert seqs.shape[1] == 17 and seqs.dtype == torch.int64
    data = build_data(
        DataSpec(corpus=[str(tmp_path / "a.txt")], context_length=16, heldout_fraction=0.2), tok
    )
    assert torch.equal(data.train_inputs[:, 1:], data.train_targets[:, :-1])


def test_stdlib_corpus_exists_on_this_machine():
    files = stdlib_source_files()
    assert len(files) > 100 and all(f.suffix == ".py" for f in files)
    assert not any("site-packages" in f.parts or "test" in f.parts for f in files)


def test_empty_corpus_and_missing_files_are_named(tmp_path):
    (tmp_path / "empty.txt").write_text("   \n\n")
    with pytest.raises(ValueError, match="empty"):
        load_texts([str(tmp_path / "empty.txt")])
    with pytest.raises(FileNotFoundError, match="nowhere.txt"):
        load_texts([str(tmp_path / "nowhere.txt")])
    tok = addition_tokenizer()
    with pytest.raises(ValueError, match="fewer than one sequence"):
        pack(["0+1"], tok, context_length=64)


# ----------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def toy_model(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("toy") / "dense"
    assert main(["train-toy", "--out", str(out), "--steps", "60", "--lr", "3e-3", *TINY]) == 0
    return out


def test_train_toy_writes_a_model_dir(toy_model):
    metrics = json.loads((toy_model / "metrics.json").read_text())
    assert {"accuracy", "loss"} <= set(metrics)
    assert metrics["loss"] < math.log(13)  # better than uniform over the vocabulary
    for name in (
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "data.json",
        "metrics.jsonl",
    ):
        assert (toy_model / name).is_file()
    model, tok = load_model(toy_model)
    assert tok.get_vocab_size() == 13 and model.cfg.gate is None


def test_sparsify_writes_metrics_gate_and_picture(toy_model, tmp_path):
    out = tmp_path / "sparse"
    args = ["--steps", "30", "--batch-size", "32", "--eval-sequences", "200", "--select-every", "5"]
    assert main(["sparsify", "--model", str(toy_model), "--out", str(out), *args]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    if metrics["selected_step"] < 30:  # the final weights are the chosen snapshot's
        best = load_tensors(out / "best.safetensors")
        saved = load_tensors(out / "model.safetensors")
        assert metrics["selected_step"] in (20, 25) and torch.equal(
            best["embed.weight"], saved["embed.weight"]
        )
    need = {
        "dense_loss",
        "loss",
        "connectivity",
        "keys_per_query",
        "context_length",
        "dense_accuracy",
        "accuracy",
    }
    assert need <= set(metrics)
    assert 0 <= metrics["connectivity"] <= 1 and metrics["context_length"] == 9
    assert (out / "attention_patterns.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    model, _ = load_model(out)
    assert model.cfg.gate is not None and model.gate_mode == "hard"
    # the saved metrics are what the saved model measures
    data = addition_data(DataSpec(task="addition"))
    again = evaluate(model, data.heldout_inputs[:200], data.heldout_targets[:200], task="addition")
    assert again["connectivity"] == pytest.approx(metrics["connectivity"])
    assert again["loss"] == pytest.approx(metrics["loss"], rel=1e-5)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {"ce", "tau", "lambda", "open", "hard_connectivity", "keys_per_query"} <= set(
        records[-1]
    )


def test_sparsify_with_lora_and_distillation(toy_model, tmp_path):
    out = tmp_path / "lora"
    args = [
        "sparsify",
        "--model",
        str(toy_model),
        "--out",
        str(out),
        "--steps",
        "6",
        "--batch-size",
        "16",
    ]
    assert (
        main([*args, "--lora-rank", "4", "--distill-weight", "0.5", "--eval-sequences", "64"]) == 0
    )
    model, _ = load_model(out)
    assert not any("lora" in k for k in model.state_dict())
    assert json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["kl"] >= 0


def test_the_constraints_dense_reference_is_the_dense_model(toy_model):
    """Per-batch dense CE: a frozen copy, or under LoRA the base weights with adapters off,
    whatever the trainee's gates and adapters are doing."""
    dense, _ = load_model(toy_model)
    x = torch.randint(0, dense.cfg.vocab_size, (3, 8))
    with torch.no_grad():
        expected = dense(x, x).loss
    for lora in (False, True):
        model, _ = load_model(toy_model)
        trainee = wrap_lora(model, 4) if lora else model
        dense_forward = dense_reference(model, trainee, lora=lora)
        with torch.no_grad():  # the trainee moves away from the dense model
            for name, p in trainee.named_parameters():
                if not lora or "lora_" in name:
                    p.add_(0.05 * torch.randn_like(p))
        model.set_gate("stochastic", 0.0)
        assert dense_forward(x, x).loss.item() == pytest.approx(expected.item(), rel=1e-6)
        assert trainee(x, x).loss.item() != pytest.approx(expected.item(), rel=1e-3)


def _sparsify_cmd(model: Path, out: Path) -> list[str]:
    return [
        sys.executable, "-m", "sparse_circuits.cli", "sparsify", "--model", str(model), "--out", str(out),
        "--steps", "40", "--batch-size", "16", "--checkpoint-every", "5", "--log-every", "1", "--eval-sequences", "32",
    ]  # fmt: skip


def test_sparsify_resumes_after_sigkill_exactly(toy_model, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    clean = tmp_path / "clean"
    subprocess.run(_sparsify_cmd(toy_model, clean), check=True, env=env, capture_output=True)

    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        _sparsify_cmd(toy_model, killed),
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    pointer = killed / "checkpoints" / "latest"
    deadline = time.time() + 120
    while time.time() < deadline and not (
        pointer.exists() and pointer.read_text().strip() >= "step_00000015"
    ):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert pointer.exists(), "the run was killed before its first checkpoint"
    assert not (killed / "metrics.json").exists(), "the run finished before it was killed"
    subprocess.run(_sparsify_cmd(toy_model, killed), check=True, env=env, capture_output=True)

    steps = [
        json.loads(line)["step"] for line in (killed / "metrics.jsonl").read_text().splitlines()
    ]
    assert steps == list(range(40))  # every step once
    a, b = load_tensors(clean / "model.safetensors"), load_tensors(killed / "model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)
    lam = [json.loads((d / "metrics.json").read_text())["lambda"] for d in (clean, killed)]
    assert lam[0] == pytest.approx(lam[1], rel=1e-5)


# ----------------------------------------------------------------------------- bad input


def test_output_dir_holding_another_run_is_refused_and_kept(toy_model, tmp_path, capsys):
    before = {p: p.read_bytes() for p in toy_model.iterdir() if p.is_file()}
    assert (
        main(["sparsify", "--model", str(toy_model), "--out", str(toy_model), "--steps", "2"]) == 2
    )
    assert "holds another run" in capsys.readouterr().err
    assert before == {p: p.read_bytes() for p in toy_model.iterdir() if p.is_file()}
    stranger = tmp_path / "stranger"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("mine")
    assert main(["train-toy", "--out", str(stranger), "--steps", "2"]) == 2
    assert "not empty" in capsys.readouterr().err and (stranger / "notes.txt").read_text() == "mine"


def test_context_longer_than_the_model_is_refused(toy_model, tmp_path, capsys):
    (tmp_path / "c.txt").write_text("x = 1\n" * 500)
    args = [
        "sparsify",
        "--model",
        str(toy_model),
        "--out",
        str(tmp_path / "o"),
        "--data",
        str(tmp_path / "c.txt"),
    ]
    assert main([*args, "--context-length", "64"]) == 2
    assert "longer than the model's" in capsys.readouterr().err


def test_bad_config_values_are_named(tmp_path, capsys):
    assert main(["train-toy", "--out", str(tmp_path / "o"), "--steps", "0"]) == 2
    assert "steps" in capsys.readouterr().err
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"out": str(tmp_path / "o"), "n_layerz": 3}))
    assert main(["train-toy", "--config", str(cfg)]) == 2
    assert "n_layerz" in capsys.readouterr().err
