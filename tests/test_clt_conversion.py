"""CLT training beyond the happy path: TopK/BatchTopK saved as JumpReLU with thresholds from
held-out batches and the saved model's own figures in metrics.json (read back from the files
on disk), BatchTopK over the global batch under DDP (two gloo ranks against one process),
no tanh penalty by default for the TopK family, a torn metrics line that does not stop a
resume, and a store on S3 (moto's server) that trains as its local twin does."""

from __future__ import annotations

import json
import os

import pytest
import torch
from gloo import free_port, gloo_rank

from sparse_circuits.clt import train as clt_train
from sparse_circuits.clt.cltdir import load_clt
from sparse_circuits.clt.harvest import HarvestConfig, harvest
from sparse_circuits.clt.model import (
    CLTConfig,
    CrossLayerTranscoder,
    batchtopk_activation,
    jumprelu_thresholds,
)
from sparse_circuits.clt.train import TrainCLTConfig, _train, train_clt
from sparse_circuits.io import read_json
from sparse_circuits.sparse_attention import training

L, M = 2, 8


class Planted:
    """Batch j (inputs, targets [B, L, M]) is a pure function of j: targets a fixed linear map
    of a sparse code the inputs carry, plus noise. `starts` records where each read began."""

    def __init__(self, batch_size: int, rank: int = 0, world: int = 1, fail_at: int | None = None):
        g = torch.Generator().manual_seed(0)
        self.E = torch.randn(L, 24, M, generator=g)
        self.D = torch.randn(L, 24, M, generator=g) / 3
        self.batch_size, self.rank, self.world, self.fail_at = batch_size, rank, world, fail_at
        self.starts: list[int] = []
        self.stats = {
            "inputs_mean": torch.zeros(L, M), "inputs_scale": torch.ones(L),
            "targets_mean": torch.zeros(L, M), "targets_scale": torch.ones(L),
        }  # fmt: skip

    def batch(self, j: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(1000 + j)
        z = (torch.rand(self.batch_size, L, 24, generator=g) < 0.1) * torch.rand(
            self.batch_size, L, 24, generator=g
        )
        x = torch.einsum("blf,lfm->blm", z, self.E) + 0.05 * torch.randn(
            self.batch_size, L, M, generator=g
        )
        return x, torch.einsum("blf,lfm->blm", z, self.D)

    def __call__(self, start: int):
        self.starts.append(start)
        j, b = start, self.batch_size // self.world
        while True:
            if j == self.fail_at:
                raise RuntimeError(f"the source failed at batch {j}")
            x, y = self.batch(j)
            yield x[self.rank * b : (self.rank + 1) * b], y[self.rank * b : (self.rank + 1) * b]
            j += 1


def config(out, **kw) -> TrainCLTConfig:
    base = dict(
        activations="synthetic", out=out, d_features=16, activation="batchtopk", k=3,
        batch_size=64, steps=20, lr=1e-2, lr_warmup_steps=2, eval_steps=5, checkpoint_every=10,
        calibration_tokens=256, seed=0, device="cpu",
    )  # fmt: skip
    return TrainCLTConfig(**(base | kw))


def fvu_l0(clt: CrossLayerTranscoder, batches) -> tuple[float, float]:
    """FVU (variance about the mean of all these tokens) and mean L0 per layer."""
    x, y = (torch.cat(t) for t in zip(*batches, strict=True))
    with torch.no_grad():
        o = clt(x)
    fvu = (o.reconstruction - y).double().pow(2).sum() / (y - y.mean(0)).double().pow(2).sum()
    return float(fvu), float((o.features != 0).sum()) / x.shape[0] / L


# ----------------------------------------------------------------------------- held-out calibration


def test_topk_is_saved_as_jumprelu_calibrated_on_held_out_batches(tmp_path):
    source = Planted(64)
    cfg = config(tmp_path / "clt")
    out = _train(cfg, source, source.stats, steps=cfg.steps)
    metrics = read_json(out / "metrics.json")
    # 256 tokens = 4 held-out batches, 20..23: thresholds from 20 and 21, figures from 22 and 23
    assert source.starts[-1] == cfg.steps and metrics["steps"] == cfg.steps
    assert metrics["calibration_tokens"] == metrics["eval_tokens"] == 128
    saved = load_clt(out)  # the files on disk
    assert saved.cfg.activation == "jumprelu"
    fvu, l0 = fvu_l0(saved, [source.batch(22), source.batch(23)])
    assert metrics["fvu"] == pytest.approx(fvu, rel=1e-4) and metrics["l0"] == pytest.approx(
        l0, rel=1e-4
    )
    assert metrics["fvu_before_conversion"] != metrics["fvu"]
    assert metrics["l0_before_conversion"] == pytest.approx(3, rel=1e-6)  # BatchTopK's k
    # On the calibration batches the JumpReLU model fires exactly as often as BatchTopK did.
    _, l0_cal = fvu_l0(saved, [source.batch(20), source.batch(21)])
    assert l0_cal == pytest.approx(3, abs=1 / 128)


def test_tanh_penalty_defaults_to_zero_for_the_topk_family(tmp_path):
    assert (
        TrainCLTConfig(activations="a", out="c", activation="topk", k=4).sparsity_coefficient == 0
    )
    assert (
        TrainCLTConfig(activations="a", out="c", activation="batchtopk", k=4).sparsity_coefficient
        == 0
    )
    assert (
        TrainCLTConfig(activations="a", out="c", activation="jumprelu").sparsity_coefficient == 1e-3
    )
    assert TrainCLTConfig(activations="a", out="c", activation="topk", k=4,
                          sparsity_coefficient=1e-4).sparsity_coefficient == 1e-4  # fmt: skip
    source = Planted(64)
    out = _train(config(tmp_path / "clt", steps=6), source, source.stats, steps=6)
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 6 and all(r["sparsity_coefficient"] == 0 for r in lines)
    assert all(
        r["loss"] == pytest.approx(r["nmse"] + 3e-6 * r["preact"] + r["auxk"] / 32) for r in lines
    )


# ----------------------------------------------------------------------------- torn metrics lines


def test_a_torn_metrics_line_does_not_stop_a_resume(tmp_path):
    cfg = TrainCLTConfig(
        activations="synthetic", out=tmp_path / "clt", d_features=16, activation="relu",
        batch_size=64, steps=8, lr=1e-2, lr_warmup_steps=2, eval_steps=2, checkpoint_every=3,
        device="cpu",
    )  # fmt: skip
    with pytest.raises(RuntimeError, match="failed at batch 5"):
        _train(cfg, Planted(64, fail_at=5), Planted(64).stats, steps=8)
    log = tmp_path / "clt" / "metrics.jsonl"
    with log.open("a") as f:
        f.write('{"step": 6, "loss": 0.3')  # the line a kill cut short
    source = Planted(64)
    _train(cfg, source, source.stats, steps=8)
    assert source.starts == [3]  # resumed at the checkpoint
    steps = [json.loads(x)["step"] for x in log.read_text().splitlines()]
    assert steps == list(range(1, 9))


def test_one_log_truncator_and_one_schedule_serve_both_training_loops(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(
        '{"step": 0}\n{"step": 1}\nnot json\n{"lr": 1}\n[1, 2]\n{"step": 2}\n{"step": 3, "lo'
    )
    assert training.truncate_log(path, below=2) == 2
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [0, 1]
    assert clt_train.learning_rate is training.learning_rate
    for s in range(0, 120, 7):
        assert training.lr_at(s, lr=2.0, warmup_steps=10, steps=110, min_lr_ratio=0.1) == training.learning_rate(
            s, peak=2.0, warmup_steps=10, total_steps=110, decay="cosine", min_ratio=0.1
        )  # fmt: skip


# ----------------------------------------------------------------------------- DDP


def _ddp_worker(rank: int, world: int, port: int, results: str, cfg_json: str) -> None:
    with gloo_rank(rank, world, port):
        pre = torch.randn(16, L, 32, generator=torch.Generator().manual_seed(0))
        share = pre[rank * 8 : (rank + 1) * 8]
        got = {s: batchtopk_activation(share, 3, s, distributed=True) for s in ("layer", "all")}
        torch.manual_seed(0)
        clt = CrossLayerTranscoder(
            CLTConfig(n_layers=L, d_model=M, d_features=16, activation="batchtopk", k=3)
        )
        clt.distributed_batch = True
        x = Planted(64).batch(0)[0]
        theta = jumprelu_thresholds(clt, [x[rank * 32 : (rank + 1) * 32]], 64, world=world)
        torch.save({"activation": got, "theta": theta}, os.path.join(results, f"rank{rank}.pt"))
        cfg = TrainCLTConfig.model_validate_json(cfg_json)
        source = Planted(64, rank=rank, world=world)
        _train(cfg, source, source.stats, steps=cfg.steps)


def test_batchtopk_under_ddp_selects_over_the_global_batch(tmp_path):
    cfg = config(tmp_path / "ddp", steps=4, checkpoint_every=4)
    torch.multiprocessing.spawn(
        _ddp_worker, args=(2, free_port(), str(tmp_path), cfg.model_dump_json()), nprocs=2
    )
    pre = torch.randn(16, L, 32, generator=torch.Generator().manual_seed(0))
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for scope in ("layer", "all"):
        whole = batchtopk_activation(pre, 3, scope)  # one process, the whole batch
        torch.testing.assert_close(torch.cat([r["activation"][scope] for r in ranks]), whole)
    torch.manual_seed(0)
    clt = CrossLayerTranscoder(
        CLTConfig(n_layers=L, d_model=M, d_features=16, activation="batchtopk", k=3)
    )
    theta = clt.to_jumprelu(Planted(64).batch(0)[0]).threshold[:, 0]
    for r in ranks:
        torch.testing.assert_close(r["theta"], theta)
    source = Planted(64)
    single = _train(
        config(tmp_path / "single", steps=4, checkpoint_every=4), source, source.stats, steps=4
    )
    one, two = load_clt(single), load_clt(cfg.out)
    for (name, a), b in zip(one.state_dict().items(), two.state_dict().values(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=name)
    m1, m2 = read_json(single / "metrics.json"), read_json(cfg.out / "metrics.json")
    assert m2["l0"] == pytest.approx(m1["l0"], rel=1e-4) and m2["fvu"] == pytest.approx(
        m1["fvu"], rel=1e-4
    )


# ----------------------------------------------------------------------------- S3


def test_train_clt_reads_a_store_on_s3_as_its_local_twin(
    tmp_path, s3_bucket, tiny_model_dir, token_file
):
    bucket, options = s3_bucket
    creds = {k: v for k, v in options.items() if k != "endpoint_url"}
    access = dict(endpoint_url=options["endpoint_url"], storage_options=creds)
    url = f"s3://{bucket}/acts.zarr"
    common = dict(model=tiny_model_dir, tokens_file=token_file, tokens=256, batch_size=8,
                  shard_rows=256, shuffle_shards=1, device="cpu")  # fmt: skip
    harvest(HarvestConfig(out=url, **common, **access))
    harvest(HarvestConfig(out=str(tmp_path / "twin.zarr"), **common))
    train = dict(batch_size=32, d_features=24, activation="jumprelu", steps=6, checkpoint_every=3,
                 eval_steps=2, device="cpu")  # fmt: skip
    remote = train_clt(TrainCLTConfig(activations=url, out=tmp_path / "remote", **train, **access))
    local = train_clt(
        TrainCLTConfig(activations=str(tmp_path / "twin.zarr"), out=tmp_path / "local", **train)
    )
    for (name, a), b in zip(
        load_clt(local).state_dict().items(), load_clt(remote).state_dict().values(), strict=True
    ):
        torch.testing.assert_close(b, a, msg=name)
    assert read_json(remote / "metrics.json")["fvu"] == read_json(local / "metrics.json")["fvu"]
    saved = read_json(remote / "config.json")
    assert saved["activations"]["url"] == url and saved["activations"]["attrs"]["rows_total"] == 256
    for name in ("run.json", "config.json"):  # credentials are never saved with the run
        text = (remote / name).read_text()
        assert creds["secret"] not in text and options["endpoint_url"] not in text
