"""CLT training throughput: against this machine's own matmul peak at the same GEMM shapes, and
against llamascopium's CLT trainer (the outside reference) on the same activations and shapes.

Side by side in one run, on one device:
  train   - one real training step of the trainer (`_Trainer.train_step`: forward, loss
            terms, backward, clip, AdamW, dead-feature counters, its metrics line) on
            in-memory random batches; FLOP/s = tokens x `flops_per_token(training=True)` / s
            (dense-equivalent: a sparse TopK decoder does fewer, and is credited the dense count).
  matmul  - a plain `torch.matmul` loop over exactly that step's dense GEMMs, alternated with
            `train` step by step (so a neighbour's load on a shared machine hits both alike):
              encoder  [L,B,M] @ [L,M,F]        forward
                       [L,F,B] @ [L,B,M]        weight gradient (inputs need none)
              decoder  [B,F] @ [F,K_i*M]        forward, per source layer i
                       [F,B] @ [B,K_i*M]        weight gradient
                       [B,K_i*M] @ [K_i*M,F]    feature gradient
            in the dtype the step computes in (bf16 under autocast on CUDA, fp32 on CPU).
  reference - with --reference-python PY: llamascopium's `Trainer.fit` on a CLT of the same
            shape and activation, on the same batches, in a worker process under PY
            (`clt_reference.py`, same thread count); its steps alternate with ours.
Times are medians over the timed steps, after --warmup untimed ones, per round (--rounds). The figures: train FLOP/s / matmul FLOP/s (the share of the
matmul-bound ceiling the whole step reaches), and our tokens/s / the reference's.

--decoder-sweep K1,K2,...: for TopK, the training step with the sparse decoder against the
dense one at each k (alternated step by step), the measurement behind
`model.SPARSE_DECODE_MAX_DENSITY`.

Run from the repository root:
    python benchmarks/bench_clt.py                                   # CPU defaults
    python benchmarks/bench_clt.py --activation topk --k 16 --reference-python /path/to/venv/bin/python
    python benchmarks/bench_clt.py --activation topk --decoder-sweep 8,16,32,64,128,256
    python benchmarks/bench_clt.py --device cuda --layers 12 --d-model 768 --features 12288 --batch 4096
Writes benchmarks/results/clt.json (--out) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
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
REFERENCE_WORKER = Path(__file__).resolve().parent / "clt_reference.py"


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--features", type=int, default=1024, help="features per layer")
    ap.add_argument("--batch", type=int, default=1024, help="tokens per step")
    ap.add_argument(
        "--activation", default="jumprelu", choices=["relu", "jumprelu", "topk", "batchtopk"]
    )
    ap.add_argument("--k", type=int, default=16, help="for topk/batchtopk")
    ap.add_argument(
        "--sparse-decode", default="auto", choices=["auto", "always", "never"],
        help="topk/batchtopk: CrossLayerTranscoder.sparse_decode",
    )  # fmt: skip
    ap.add_argument("--steps", type=int, default=10, help="timed steps per round")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps before the first round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument(
        "--reference-python", type=Path, default=None,
        help="an interpreter with llamascopium (and transformer-lens<4): also time its CLT trainer",
    )  # fmt: skip
    ap.add_argument(
        "--decoder-sweep", default=None,
        help="comma-separated k values: sparse against dense decoder (topk) instead of the rest",
    )  # fmt: skip
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:n]")
    ap.add_argument("--out", type=Path, default=RESULTS / "clt.json")
    args = ap.parse_args(argv)
    for name in ("steps", "rounds", "layers", "d_model", "features", "batch", "k"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.reference_python is not None and not args.reference_python.exists():
        ap.error(f"--reference-python {args.reference_python} does not exist")
    return args


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


def batch_pool(args: argparse.Namespace, device: torch.device) -> list[tuple[torch.Tensor, ...]]:
    """Four (inputs, targets) batches [B, L, M], normalised-looking (unit variance)."""
    g = torch.Generator().manual_seed(0)
    shape = (args.batch, args.layers, args.d_model)
    return [
        (torch.randn(*shape, generator=g).to(device), torch.randn(*shape, generator=g).to(device))
        for _ in range(4)
    ]


def make_trainer(
    args, clt_cfg: CLTConfig, device: torch.device, pool, tmp: Path, sparse_decode: str = "auto"
) -> _Trainer:
    config = TrainCLTConfig(
        activations="in-memory", out=tmp, d_features=clt_cfg.d_features, activation=clt_cfg.activation, k=clt_cfg.k,
        batch_size=args.batch, steps=10**6, eval_steps=1, lr_warmup_steps=1, device=str(device),
    )  # fmt: skip
    tmp.mkdir(parents=True, exist_ok=True)
    trainer = _Trainer(config, clt_cfg, device, rank=0, world=1, steps=10**6)
    if hasattr(trainer.model, "sparse_decode"):
        trainer.model.sparse_decode = sparse_decode
    trainer.model.init_from_batch(*pool[0], config.init_fire_rate)
    trainer.prepare(progress=False)
    return trainer


class Reference:
    """llamascopium's trainer in a worker process (clt_reference.py) under another interpreter."""

    def __init__(self, python: Path, args: argparse.Namespace, pool, tmp: Path):
        data = tmp / "batches.pt"
        torch.save(
            {
                "inputs": torch.stack([x.cpu() for x, _ in pool]),
                "targets": torch.stack([y.cpu() for _, y in pool]),
            },
            data,
        )
        cmd = [
            str(python), str(REFERENCE_WORKER), "--data", str(data), "--features", str(args.features),
            "--activation", args.activation, "--k", str(args.k), "--threads", str(torch.get_num_threads()),
        ]  # fmt: skip
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
        )
        self._expect("ready")

    def _expect(self, what: str) -> str:
        line = self.proc.stdout.readline()
        if not line or (what and line.strip() != what):
            self.proc.kill()
            raise RuntimeError(
                f"the llamascopium worker answered {line!r} instead of {what or 'step times'!r}; "
                f"run {REFERENCE_WORKER.name} by hand under that interpreter to see why"
            )
        return line

    def steps(self, n: int) -> list[float]:
        self.proc.stdin.write(f"steps {n}\n")
        self.proc.stdin.flush()
        return json.loads(self._expect(""))

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.write("quit\n")
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def measure(args: argparse.Namespace, clt_cfg: CLTConfig, device: torch.device, tmp: Path) -> dict:
    pool = batch_pool(args, device)
    trainer = make_trainer(args, clt_cfg, device, pool, tmp / "clt", args.sparse_decode)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # what the step computes in
    pairs = gemm_operands(clt_cfg, args.batch, dtype, device)
    flops = args.batch * training_flops_per_token(clt_cfg)
    assert flops == step_flops(pairs), "the matmul loop and flops_per_token disagree"

    def matmuls():
        for a, b in pairs:
            torch.matmul(a, b)

    reference = Reference(args.reference_python, args, pool, tmp) if args.reference_python else None
    served = 0

    def train_step():
        nonlocal served
        trainer.train_step(*pool[served % len(pool)])
        served += 1

    try:
        for _ in range(args.warmup):
            train_step()
            matmuls()
        if reference is not None:
            reference.steps(args.warmup)
        rounds = []
        for r in range(args.rounds):
            train_s, matmul_s, reference_s = [], [], []
            for _ in range(args.steps):  # one step of each in turn: a load change hits all three
                train_s.append(timed(train_step, device))
                matmul_s.append(timed(matmuls, device))
                if reference is not None:
                    reference_s += reference.steps(1)
            train, matmul = statistics.median(train_s), statistics.median(matmul_s)
            row = {
                "train_step_s": train, "matmul_step_s": matmul, "ratio": matmul / train,
                "train_tokens_per_s": args.batch / train, "train_flops_per_s": flops / train,
                "matmul_flops_per_s": flops / matmul, "load_average": os.getloadavg()[0],
            }  # fmt: skip
            if reference is not None:
                ref = statistics.median(reference_s)
                row |= {
                    "reference_step_s": ref,
                    "reference_tokens_per_s": args.batch / ref,
                    "speedup": ref / train,
                }
            rounds.append(row)
            print(f"round {r + 1}/{args.rounds}: {json.dumps(row)}", file=sys.stderr)
    finally:
        if reference is not None:
            reference.close()
    summary = {
        key: statistics.median(row[key] for row in rounds)
        for key in rounds[0]
        if key != "load_average"
    }
    return {
        "dtype": str(dtype).removeprefix("torch."),
        "flops_per_step": flops,
        "sparse_decoder": sparse_decoder(trainer.model, args),
        "rounds": rounds,
        **summary,
    }


def sparse_decoder(model: CrossLayerTranscoder, args: argparse.Namespace) -> bool | str:
    """Whether the step decodes from selected rows: ReLU/JumpReLU decide per batch."""
    if not hasattr(model, "sparse_decode"):
        return False
    if args.activation in ("relu", "jumprelu") and args.sparse_decode != "never":
        return f"per batch ({args.sparse_decode})"
    return model.decodes_sparse


def decoder_sweep(args: argparse.Namespace, device: torch.device, tmp: Path) -> list[dict]:
    """TopK training steps, sparse decoder against dense, alternated step by step, per k."""
    pool = batch_pool(args, device)
    rows = []
    for k in (int(v) for v in args.decoder_sweep.split(",")):
        trainers = {
            mode: make_trainer(args, clt_config(args, "topk", k), device, pool, tmp / mode, mode)
            for mode in ("always", "never")
        }
        times = {mode: [] for mode in trainers}
        for i in range(args.warmup + args.steps):
            for mode, trainer in trainers.items():
                batch = pool[i % len(pool)]
                seconds = timed(lambda tr=trainer, b=batch: tr.train_step(*b), device)
                if i >= args.warmup:
                    times[mode].append(seconds)
        sparse, dense = (statistics.median(times[m]) for m in ("always", "never"))
        rows.append(
            {"k": k, "density": k / args.features, "sparse_step_s": sparse, "dense_step_s": dense,
             "dense_over_sparse": dense / sparse, "load_average": os.getloadavg()[0]}
        )  # fmt: skip
        print(json.dumps(rows[-1]), file=sys.stderr)
    return rows


def clt_config(args: argparse.Namespace, activation: str, k: int | None) -> CLTConfig:
    return CLTConfig(
        n_layers=args.layers,
        d_model=args.d_model,
        d_features=args.features,
        activation=activation,
        k=k if activation in ("topk", "batchtopk") else None,
    )


def main(argv=None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")
    clt_cfg = clt_config(args, args.activation, args.k)
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "load_average_before": os.getloadavg(),
        "shape": {
            "layers": args.layers, "d_model": args.d_model, "features_per_layer": args.features,
            "batch": args.batch, "activation": args.activation, "k": clt_cfg.k,
        },
        "timed_steps_per_round": args.steps,
    }  # fmt: skip
    (RESULTS / "tmp").mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=RESULTS / "tmp") as tmp:
        if args.decoder_sweep:
            result["decoder_sweep"] = decoder_sweep(args, device, Path(tmp))
        else:
            result |= measure(args, clt_cfg, device, Path(tmp))
    result["load_average_after"] = os.getloadavg()
    write_json(args.out, result)
    where = f"{result['device']} ({result['threads']} threads)"
    shape = f"{args.layers}, {args.d_model}, {args.features}, {args.batch}"
    if args.decoder_sweep:
        print(
            "| device | shape (L, M, F, B) | k | k/F | dense step ms | sparse step ms | dense / sparse |"
        )
        print("|---|---|---|---|---|---|---|")
        for row in result["decoder_sweep"]:
            print(
                f"| {where} | {shape} | {row['k']} | {row['density']:.4f} | {row['dense_step_s'] * 1e3:.1f} "
                f"| {row['sparse_step_s'] * 1e3:.1f} | {row['dense_over_sparse']:.2f} |"
            )
    else:
        ref = "reference_tokens_per_s" in result
        print(
            "| device | shape (L, M, F, B) | activation | train GFLOP/s | matmul GFLOP/s | ratio | step ms"
            + (" | tokens/s | llamascopium tokens/s | speedup |" if ref else " |")
        )
        print("|---" * (10 if ref else 7) + "|")
        act = args.activation + (f" k={clt_cfg.k}" if clt_cfg.k else "")
        line = (
            f"| {where} | {shape} | {act} | {result['train_flops_per_s'] / 1e9:.1f} "
            f"| {result['matmul_flops_per_s'] / 1e9:.1f} | {result['ratio']:.2f} | {result['train_step_s'] * 1e3:.1f}"
        )
        if ref:
            line += (
                f" | {result['train_tokens_per_s']:.0f} | {result['reference_tokens_per_s']:.0f}"
                f" | {result['speedup']:.2f}"
            )
        print(line + " |")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
