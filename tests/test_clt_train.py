"""CLT training: the default schedule follows the store's and the dictionary's sizes (and warns
when a run is too short), a known sparse dictionary is learnt, the saved CLT works on raw
activations, a SIGKILLed run resumes to the same weights, two gloo ranks match one process, and
the CLI trains on a harvested store."""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import signal

import pytest
import torch
from gloo import free_port, gloo_rank

from sparse_circuits.cli import main
from sparse_circuits.clt.cltdir import load_clt
from sparse_circuits.clt.harvest import HarvestConfig, harvest
from sparse_circuits.clt.model import CLTConfig, CrossLayerTranscoder
from sparse_circuits.clt.train import (
    TrainCLTConfig,
    _train,
    default_steps,
    learning_rate,
    resolve_schedule,
    update_dead_counters,
    warn_if_too_short,
)
from sparse_circuits.io import load_checkpoint, read_json
from sparse_circuits.progress import ProgressSink, install_sink


class SparseDictionary:
    """Activations made from a known sparse code z ≥ 0 (n_true latents per layer, each on with
    probability p): inputs x_l = z_l E_l, targets y_k = Σ_{i≤k} z_i D_ik. Batch j is a pure
    function of j, so any run can start at any batch."""

    def __init__(self, n_layers=2, d_model=16, n_true=16, p=0.15, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.L, self.M, self.n_true, self.p, self.seed = n_layers, d_model, n_true, p, seed
        E = torch.randn(n_layers, n_true, d_model, generator=g)
        self.E = E / E.norm(dim=-1, keepdim=True)
        D = torch.randn(n_layers, n_layers, n_true, d_model, generator=g) / math.sqrt(n_true * p)
        self.D = D * torch.ones(n_layers, n_layers).triu()[:, :, None, None]  # i writes to k ≥ i
        x, y = self.raw(4096, torch.Generator().manual_seed(seed + 1))
        self.stats = {
            "inputs_mean": x.mean(0),
            "inputs_scale": (x - x.mean(0)).pow(2).mean((0, 2)).sqrt(),
            "targets_mean": y.mean(0),
            "targets_scale": (y - y.mean(0)).pow(2).mean((0, 2)).sqrt(),
        }

    def raw(self, B, generator):
        on = torch.rand(B, self.L, self.n_true, generator=generator) < self.p
        z = on * (0.5 + torch.rand(B, self.L, self.n_true, generator=generator))
        return torch.einsum("blf,lfm->blm", z, self.E), torch.einsum("bif,ikfm->bkm", z, self.D)

    def normalise(self, x, y):
        s = self.stats
        return (x - s["inputs_mean"]) / s["inputs_scale"][:, None], (y - s["targets_mean"]) / s[
            "targets_scale"
        ][:, None]

    def batches(self, batch_size, rank=0, world=1, kill_at=None, starts=None):
        """batches(start) -> this rank's share of global batches start, start + 1, ..."""

        def source(start):
            if starts is not None:
                starts.append(start)
            j = start
            while True:
                if j == kill_at:
                    os.kill(os.getpid(), signal.SIGKILL)
                x, y = self.normalise(
                    *self.raw(batch_size, torch.Generator().manual_seed(1000 + j))
                )
                b = batch_size // world
                yield x[rank * b : (rank + 1) * b], y[rank * b : (rank + 1) * b]
                j += 1

        return source


def config(out, **kw) -> TrainCLTConfig:
    base = dict(
        activations="synthetic", out=out, d_features=32, activation="jumprelu", batch_size=128,
        steps=200, lr=3e-2, lr_warmup_steps=10, sparsity_coefficient=1e-2, init_fire_rate=0.1,
        eval_steps=20, checkpoint_every=50, seed=0, device="cpu",
    )  # fmt: skip
    return TrainCLTConfig(**(base | kw))


def run(cfg: TrainCLTConfig, data: SparseDictionary, **source_kw):
    return _train(cfg, data.batches(cfg.batch_size, **source_kw), data.stats, steps=cfg.steps)


def trained_model(out) -> CrossLayerTranscoder:
    """The CLT in normalised units, from the run's last checkpoint."""
    tensors, _ = load_checkpoint(out / "checkpoints")
    clt = CrossLayerTranscoder(CLTConfig(**read_json(out / "config.json")["clt"]))
    clt.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    return clt


def final_tensors(out) -> dict[str, torch.Tensor]:
    return load_checkpoint(out / "checkpoints")[0]


def metric_lines(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------------------- schedules


def test_learning_rate_warms_up_then_decays_to_the_floor():
    lr = [
        learning_rate(s, peak=1.0, warmup_steps=10, total_steps=110, decay="cosine", min_ratio=0.1)
        for s in range(120)
    ]
    assert (
        lr[0] == pytest.approx(0.1) and lr[9] == pytest.approx(1.0) and lr[10] == pytest.approx(1.0)
    )
    assert (
        lr[60] == pytest.approx(0.55)
        and lr[110] == pytest.approx(0.1)
        and lr[119] == pytest.approx(0.1)
    )
    assert all(a >= b for a, b in zip(lr[10:], lr[11:], strict=False))
    linear = learning_rate(
        60, peak=1.0, warmup_steps=10, total_steps=110, decay="linear", min_ratio=0.0
    )
    assert linear == pytest.approx(0.5)


def test_default_steps_follow_the_store_and_the_dictionary():
    cfg = TrainCLTConfig(activations="a", out="c", tokens_per_feature=400, max_passes=20)
    toy = 4 * 512  # L × F of a dictionary of 512 features a layer on the addition toy
    needed = math.ceil(400 * toy / 1024)  # 800 steps
    # A small store is read several times until the dictionary has its tokens ...
    assert default_steps(cfg, n_features=toy, batches_per_pass=70) == needed
    # ... a bigger dictionary needs more of them ...
    assert default_steps(cfg, n_features=toy * 3 // 2, batches_per_pass=70) == needed * 3 // 2
    # ... a large store is read once, whole ...
    assert default_steps(cfg, n_features=toy, batches_per_pass=100_000) == 100_000
    # ... and a tiny one at most max_passes times.
    assert default_steps(cfg, n_features=toy, batches_per_pass=10) == 200
    assert (
        default_steps(
            cfg.model_copy(update={"max_passes": 2.5}), n_features=toy, batches_per_pass=10
        )
        == 25
    )


def test_warm_ups_and_dead_window_are_fractions_of_the_run_unless_set():
    cfg = TrainCLTConfig(activations="a", out="c", batch_size=1000, tokens_per_feature=400)
    short, long = resolve_schedule(cfg, 800, 2048), resolve_schedule(cfg, 1_000_000, 2048)
    assert (short.lr_warmup_steps, short.sparsity_warmup_steps) == (40, 640)
    assert (long.lr_warmup_steps, long.sparsity_warmup_steps) == (1000, 800_000)
    # a tenth of the run's tokens, within [1e5, 1e7]
    assert short.dead_feature_tokens == 100_000 and long.dead_feature_tokens == 10_000_000
    assert resolve_schedule(cfg, 20_000, 2048).dead_feature_tokens == 2_000_000
    assert short.needed_steps == math.ceil(400 * 2048 / 1000)
    given = cfg.model_copy(
        update={"lr_warmup_steps": 7, "sparsity_warmup_steps": 0, "dead_feature_tokens": 5}
    )
    assert resolve_schedule(given, 800, 2048)[1:4] == (7, 0, 5)


def test_a_run_too_short_for_its_dictionary_warns_naming_the_fix(caplog):
    cfg = TrainCLTConfig(activations="a", out="c", tokens_per_feature=400)
    enough = resolve_schedule(cfg, 800, 2048)
    assert not warn_if_too_short(cfg, enough, 2048, rows=71_680) and not caplog.records
    assert warn_if_too_short(cfg, resolve_schedule(cfg, 70, 2048), 2048, rows=71_680)
    assert "71,680 rows" in caplog.text and "harvest more rows" in caplog.text
    caplog.clear()
    fixed = cfg.model_copy(update={"steps": 70})
    assert warn_if_too_short(fixed, resolve_schedule(fixed, 70, 2048), 2048)
    assert "--steps 70" in caplog.text and "35 tokens to each of 2048" in caplog.text


def test_defaults_are_batchtopk_with_a_default_k():
    cfg = TrainCLTConfig(activations="a", out="c")
    assert (cfg.activation, cfg.sparsity_coefficient) == ("batchtopk", 0.0)
    clt = cfg.clt_config(4, 128)
    assert (clt.activation, clt.d_features, clt.k) == ("batchtopk", 1024, 14)
    # a store too small to train 8 × d_model features (400 tokens each, at most 20 passes)
    # gets half, or a quarter, but no fewer
    assert cfg.clt_config(4, 128, rows=300_000).d_features == 1024
    assert cfg.clt_config(4, 128, rows=72_000).d_features == 512
    assert cfg.clt_config(4, 128, rows=1_000).d_features == 256
    assert cfg.clt_config(2, 8).k == 8  # at most d_features / 8 ...
    assert TrainCLTConfig(activations="a", out="c", d_features=32).clt_config(2, 16).k == 4
    assert (
        TrainCLTConfig(activations="a", out="c", k=30).clt_config(4, 128).k == 30
    )  # ... unless set
    jumprelu = TrainCLTConfig(activations="a", out="c", activation="jumprelu")
    assert jumprelu.clt_config(4, 128).k is None and jumprelu.sparsity_coefficient == 1e-3


# ----------------------------------------------------------------------------- learning


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    data = SparseDictionary()
    out = run(config(tmp_path_factory.mktemp("clt") / "run"), data)
    return out, data


def test_training_recovers_a_known_sparse_dictionary(trained_run):
    out, data = trained_run
    metrics = read_json(out / "metrics.json")
    # True L0 is p · n_true = 2.4 per layer of 32 features; a dense code would explain nothing.
    assert metrics["fvu"] < 0.05
    assert 1.5 < metrics["l0"] < 5
    assert len(metrics["fvu_per_layer"]) == len(metrics["l0_per_layer"]) == 2
    lines = metric_lines(out)
    assert [r["step"] for r in lines] == list(range(1, 201))
    assert lines[-1]["nmse"] < 0.1 < lines[0]["nmse"]
    assert lines[0]["sparsity_coefficient"] == 0 and lines[-1][
        "sparsity_coefficient"
    ] == pytest.approx(1e-2, rel=0.01)
    assert read_json(out / "run.json")["stage"] == "train-clt"


def test_saved_clt_on_raw_activations_equals_trained_clt_on_normalised_ones(trained_run):
    out, data = trained_run
    assert read_json(out / "config.json")["normalization_folded"] is True
    x_raw, y_raw = data.raw(256, torch.Generator().manual_seed(99))
    x, _ = data.normalise(x_raw, y_raw)
    s = data.stats
    with torch.no_grad():
        normalised = trained_model(out)(x)
        saved = load_clt(out)(x_raw)
        y_hat = normalised.reconstruction * s["targets_scale"][:, None] + s["targets_mean"]
    torch.testing.assert_close(saved.reconstruction, y_hat, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(saved.features, normalised.features, rtol=1e-4, atol=1e-4)
    # ... and it reconstructs the raw targets as well as metrics.json says.
    fvu = (saved.reconstruction - y_raw).pow(2).sum() / (y_raw - y_raw.mean(0)).pow(2).sum()
    assert fvu < 0.1


# ----------------------------------------------------------------------------- resume


def _killed_run(cfg_json: str, kill_at: int) -> None:
    cfg = TrainCLTConfig.model_validate_json(cfg_json)
    run(cfg, SparseDictionary(), kill_at=kill_at)


def test_sigkilled_run_resumes_to_the_same_weights(tmp_path):
    data = SparseDictionary()
    kw = dict(steps=40, checkpoint_every=10, eval_steps=5)
    reference = run(config(tmp_path / "reference", **kw), data)

    cfg = config(tmp_path / "resumed", **kw)
    child = multiprocessing.get_context("spawn").Process(
        target=_killed_run, args=(cfg.model_dump_json(), 23)
    )
    child.start()
    child.join(timeout=120)
    assert child.exitcode == -signal.SIGKILL  # killed while reading batch 23
    assert not (cfg.out / "metrics.json").exists()
    assert [r["step"] for r in metric_lines(cfg.out)] == list(range(1, 24))

    starts: list[int] = []
    run(cfg, data, starts=starts)
    assert starts == [20]  # picked up at the checkpoint's batch, nothing replayed
    assert [r["step"] for r in metric_lines(cfg.out)] == list(range(1, 41))
    ref, got = final_tensors(reference), final_tensors(cfg.out)
    assert ref.keys() == got.keys()
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-6, atol=1e-6, msg=name)
    m_ref, m_got = read_json(reference / "metrics.json"), read_json(cfg.out / "metrics.json")
    assert m_ref.keys() == m_got.keys()
    for key in m_ref:
        assert m_got[key] == pytest.approx(m_ref[key], rel=1e-6), key
    assert run(cfg, data) == cfg.out  # a finished run is left as it is


def test_a_run_killed_after_its_last_checkpoint_reports_its_steps_on_resume(tmp_path):
    """A job whose process died between the last checkpoint and metrics.json resumes at the
    end: its progress must still say so (a worker records the job's steps from it)."""
    data = SparseDictionary()
    cfg = config(tmp_path / "run", steps=20, checkpoint_every=10, eval_steps=5)
    run(cfg, data)
    (cfg.out / "metrics.json").unlink()  # as if killed before the run's last file
    reports: list[tuple[int, int | None]] = []
    install_sink(ProgressSink(report=lambda step, total, desc: reports.append((step, total))))
    try:
        run(cfg, data)
    finally:
        install_sink(None)
    assert reports and reports[-1] == (20, 20)
    assert (cfg.out / "metrics.json").exists()


def test_another_run_in_the_same_directory_is_refused(trained_run):
    out, data = trained_run
    with pytest.raises(ValueError, match="another run"):
        run(config(out, lr=1e-3), data)


# ----------------------------------------------------------------------------- DDP


def _ddp_worker(rank: int, world: int, port: int, cfg_json: str, results: str) -> None:
    with gloo_rank(rank, world, port):
        # Each rank sees its own feature fire; both must count it as alive.
        fired = torch.zeros(2, 4, dtype=torch.bool)
        fired[0, rank] = True
        counters = update_dead_counters(torch.full((2, 4), 7, dtype=torch.int64), fired, 10, world)
        torch.save(counters, os.path.join(results, f"counters_{rank}.pt"))
        cfg = TrainCLTConfig.model_validate_json(cfg_json)
        run(cfg, SparseDictionary(), rank=rank, world=world)


def test_two_gloo_ranks_match_one_process_of_the_same_global_batch(tmp_path):
    data = SparseDictionary()
    # ReLU keeps the dynamics continuous, so reduction-order noise stays at float level; a dead
    # window of one global batch makes "dead" mean "silent on the whole last batch".
    kw = dict(
        activation="relu",
        steps=12,
        batch_size=64,
        checkpoint_every=6,
        eval_steps=4,
        dead_feature_tokens=64,
    )
    single = run(config(tmp_path / "single", **kw), data)
    cfg = config(tmp_path / "ddp", **kw)
    torch.multiprocessing.spawn(
        _ddp_worker, args=(2, free_port(), cfg.model_dump_json(), str(tmp_path)), nprocs=2
    )

    expected = torch.tensor([[0, 0, 17, 17], [17, 17, 17, 17]])
    for rank in range(2):
        assert torch.equal(torch.load(tmp_path / f"counters_{rank}.pt"), expected)
    one, two = final_tensors(single), final_tensors(cfg.out)
    for name in one:
        if name.startswith("model."):
            torch.testing.assert_close(two[name], one[name], rtol=1e-5, atol=1e-5, msg=name)
    assert torch.equal(two["tokens_since_fired"], one["tokens_since_fired"])
    dead_one = [r["dead_fraction"] for r in metric_lines(single)]
    assert dead_one == [r["dead_fraction"] for r in metric_lines(cfg.out)] and max(dead_one) > 0
    m1, m2 = read_json(single / "metrics.json"), read_json(cfg.out / "metrics.json")
    assert m2["dead_fraction"] == m1["dead_fraction"] and m2["l0"] == pytest.approx(
        m1["l0"], rel=1e-4
    )


# ----------------------------------------------------------------------------- CLI on a real store


def test_cli_trains_on_a_harvested_store(tmp_path, tiny_model_dir, token_file, caplog):
    store = tmp_path / "acts.zarr"
    harvest(
        HarvestConfig(
            model=tiny_model_dir,
            out=str(store),
            tokens_file=token_file,
            tokens=256,
            batch_size=8,
            shard_rows=64,
            device="cpu",
        )
    )
    out = tmp_path / "clt"
    # 2 layers × 24 features need 48 tokens: one pass of the store's 256 rows is plenty.
    argv = ["train-clt", "--activations", str(store), "--out", str(out), "--batch-size", "32", "--d-features", "24",
            "--k", "4", "--tokens-per-feature", "1", "--checkpoint-every", "4", "--eval-steps", "2", "--device", "cpu"]  # fmt: skip
    assert main(argv) == 0
    assert "too short" not in caplog.text
    metrics = read_json(out / "metrics.json")
    assert (  # a one-pass batchtopk run holds its last batch back to calibrate JumpReLU on
        metrics["steps"] == 256 // 32 - 1
        and metrics["calibration_tokens"] == metrics["eval_tokens"] == 32
        and math.isfinite(metrics["fvu"])
        and metrics["l0"] == pytest.approx(4)
        and metrics["l0_before_conversion"] == pytest.approx(4)
    )
    saved = read_json(out / "config.json")
    assert saved["clt"]["activation"] == "jumprelu" and saved["activations"]["url"] == str(store)
    clt = load_clt(out)
    assert (clt.cfg.n_layers, clt.cfg.d_model, clt.cfg.d_features) == (2, 16, 24)
    assert main(argv) == 0  # the same run again: already finished
    assert main([*argv[:-2], "--lr", "0.5"]) == 2  # another run in the same --out is refused

    # At 100 tokens per feature the store is too small: 2 passes at most, then a warning.
    short = tmp_path / "short"
    argv = [*argv[:4], str(short), *argv[5:]]
    argv[argv.index("--tokens-per-feature") + 1] = "100"
    assert main([*argv, "--max-passes", "2"]) == 0
    metrics = read_json(short / "metrics.json")
    assert metrics["steps"] == 2 * (256 // 32) and metrics["schedule"]["needed_steps"] == 150
    assert "too short" in caplog.text and "256 rows" in caplog.text
