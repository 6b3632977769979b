"""CLT training throughput against this machine's own matmul peak at the same GEMM shapes.

Side by side in one run, on one device, step by step alternated (so a neighbour's load on a
shared machine hits both alike):
  train   - one real training step of the trainer (`_Trainer.train_step`: forward, loss
            terms, backward, clip, AdamW, dead-feature counters, its metrics line) on
            in-memory random batches; FLOP/s = tokens x `flops_per_token(training=True)` / s.
  matmul  - a plain `torch.matmul` loop over exactly that step's GEMMs:
              encoder  [L,B,M] @ [L,M,F]        forward
                       [L,F,B] @ [L,B,M]        weight gradient (inputs need none)
              decoder  [B,F] @ [F,K_i*M]        forward, per source layer i
                       [F,B] @ [B,K_i*M]        weight gradient
                       [B,K_i*M] @ [K_i*M,F]    feature gradient
            in the dtype the step computes in (bf16 under autocast on CUDA, fp32 on CPU).
Times are medians over the timed steps, after --warmup untimed ones. The figure is
train FLOP/s / matmul FLOP/s: the share of the matmul-bound ceiling the whole training step
reaches (elementwise work, the optimiser and bookkeeping are the rest).

Run from the repository root:
    python benchmarks/bench_clt.py                                   # CPU defaults, ~1 min
    python benchmarks/bench_clt.py --device cuda --layers 12 --d-model 768 --features 12288 --batch 4096
Writes benchmarks/results/clt.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sparse_circuits.clt.model import CLTConfig, CrossLayerTranscoder  # noqa: E402
from sparse_circuits.clt.train import TrainCLTConfig, _Trainer  # noqa: E402
from sparse_circuits.io import write_json  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--features", type=int, default=1024, help="features per layer")
    ap.add_argument("--batch", type=int, default=1024, help="tokens per step")
    ap.add_argument(
        "--activation", default="jumprelu", choices=["relu", "jumprelu", "topk", "batchtopk"]
    )
    ap.add_argument("--k", type=int, default=32, help="for topk/batchtopk")
    ap.add_argument(
        "--steps", type=int, default=40, help="training steps (the first --warmup are not timed)"
    )
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:n]")
    ap.add_argument("--out", type=Path, default=RESULTS / "clt.json")
    return ap.parse_args(argv)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def gemm_operands(
    cfg: CLTConfig, B: int, dtype: torch.dtype, device: torch.device
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(a, b) pairs of the training step's GEMMs; see the module docstring."""
    L, F, M = cfg.n_layers, cfg.d_features, cfg.d_model

    def r(*shape):
        return torch.randn(*shape, dtype=dtype, device=device)

    pairs = [(r(L, B, M), r(L, M, F)), (r(L, F, B), r(L, B, M))]
    for K in cfg.decoder_layers:
        pairs += [(r(B, F), r(F, K * M)), (r(F, B), r(B, K * M)), (r(B, K * M), r(K * M, F))]
    return pairs


def step_flops(pairs) -> int:
    return sum(
        2 * a.shape[-2] * a.shape[-1] * b.shape[-1] * (a.shape[0] if a.ndim == 3 else 1)
        for a, b in pairs
    )


def training_flops_per_token(cfg: CLTConfig) -> int:
    with torch.device("meta"):  # the count needs the shapes only
        return CrossLayerTranscoder(cfg).flops_per_token(training=True)


def timed(fn, device: torch.device) -> float:
    synchronize(device)
    t0 = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - t0


def measure(args: argparse.Namespace, clt_cfg: CLTConfig, device: torch.device, tmp: Path) -> dict:
    L, M = clt_cfg.n_layers, clt_cfg.d_model
    g = torch.Generator().manual_seed(0)
    pool = [
        (
            torch.randn(args.batch, L, M, generator=g).to(device),
            torch.randn(args.batch, L, M, generator=g).to(device),
        )
        for _ in range(4)
    ]
    config = TrainCLTConfig(
        activations="in-memory", out=tmp, d_features=clt_cfg.d_features, activation=clt_cfg.activation, k=clt_cfg.k,
        batch_size=args.batch, steps=args.steps, eval_steps=1, lr_warmup_steps=1, device=str(device),
    )  # fmt: skip
    tmp.mkdir(parents=True, exist_ok=True)
    trainer = _Trainer(config, clt_cfg, device, rank=0, world=1, steps=args.steps)
    trainer.model.init_from_batch(*pool[0], config.init_fire_rate)
    trainer.prepare(progress=False)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # what the step computes in
    pairs = gemm_operands(clt_cfg, args.batch, dtype, device)

    def matmuls():
        for a, b in pairs:
            torch.matmul(a, b)

    train_s, matmul_s = [], []
    for i in range(args.steps):
        t_train = timed(lambda i=i: trainer.train_step(*pool[i % len(pool)]), device)
        t_matmul = timed(matmuls, device)
        if i >= args.warmup:
            train_s.append(t_train)
            matmul_s.append(t_matmul)
    flops = args.batch * training_flops_per_token(clt_cfg)
    assert flops == step_flops(pairs), "the matmul loop and flops_per_token disagree"
    train, matmul = statistics.median(train_s), statistics.median(matmul_s)
    return {
        "dtype": str(dtype).removeprefix("torch."),
        "flops_per_step": flops,
        "train": {
            "step_s": train,
            "tokens_per_s": args.batch / train,
            "flops_per_s": flops / train,
        },
        "matmul": {"step_s": matmul, "flops_per_s": flops / matmul},
        "ratio": matmul / train,
    }


def main(argv=None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")
    k = args.k if args.activation in ("topk", "batchtopk") else None
    clt_cfg = CLTConfig(
        n_layers=args.layers,
        d_model=args.d_model,
        d_features=args.features,
        activation=args.activation,
        k=k,
    )
    (RESULTS / "tmp").mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=RESULTS / "tmp") as tmp:
        measured = measure(args, clt_cfg, device, Path(tmp) / "clt")
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "shape": {
            "layers": args.layers, "d_model": args.d_model, "features_per_layer": args.features,
            "batch": args.batch, "activation": args.activation, "k": k,
        },
        "timed_steps": args.steps - args.warmup,
        **measured,
    }  # fmt: skip
    write_json(args.out, result)
    train, matmul = measured["train"], measured["matmul"]
    print("| device | shape (L, M, F, B) | train GFLOP/s | matmul GFLOP/s | ratio | step ms |")
    print("|---|---|---|---|---|---|")
    print(
        f"| {result['device']} ({measured['dtype']}, {result['threads']} threads) "
        f"| {args.layers}, {args.d_model}, {args.features}, {args.batch} "
        f"| {train['flops_per_s'] / 1e9:.1f} | {matmul['flops_per_s'] / 1e9:.1f} | {measured['ratio']:.2f} "
        f"| {train['step_s'] * 1e3:.1f} |"
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
