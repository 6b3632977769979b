"""Activation harvest and loader throughput, each against its bare baseline, in one run.

What is compared, on the same model, tokens and store:
  harvest  - `harvest()` into a local store: the forward pass with every layer's MLP input
             and output captured, cast to 16 bits, shuffled, written as zarr shards (its
             `tokens_per_s` metric: the loop from the first forward to the last shard
             written, model loading and final statistics left out)
  forward  - a bare `model(tokens)` forward over the same sequences at the same batch size
             (inference mode, logits included; nothing captured or written); and the same
             forward stopped after the last MLP, as the harvest stops (no unembedding); each
             timed before and after the harvest, the faster kept (a cold process and a
             neighbour's load both slow the first)
  loader   - `ActivationLoader` over the whole store, one epoch: shard reads, shuffle buffer,
             16-bit to float32 batches on --device; counted in stored bytes (inputs + targets)
  raw read - the same shard objects read whole from disk with plain `open().read()`
Both reads make --passes passes over the store (loader epochs).
Both reads hit the page cache (the store was just written), so they compare the loader's
work against a file read, not disks. The model is random (throughput does not depend on
the weights); pass --model to time a model dir of your own.

Run from the repository root:
    python benchmarks/bench_harvest.py                 # CPU defaults, about a minute on 2 cores
    python benchmarks/bench_harvest.py --device cuda --layers 12 --d-model 768 --rows 262144
Writes benchmarks/results/harvest.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sparse_circuits.clt.harvest import HarvestConfig, harvest  # noqa: E402
from sparse_circuits.clt.loader import ActivationLoader  # noqa: E402
from sparse_circuits.io import write_json  # noqa: E402
from sparse_circuits.sparse_attention.hooks import hooks  # noqa: E402
from sparse_circuits.sparse_attention.model import ModelConfig, Transformer  # noqa: E402
from sparse_circuits.sparse_attention.modeldir import load_model, save_model  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--model", type=Path, help="a model dir to time (default: a random gpt2-family model)"
    )
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument(
        "--rows", type=int, default=32768, help="tokens harvested (sequences x context)"
    )
    ap.add_argument("--batch", type=int, default=16, help="sequences per forward")
    ap.add_argument("--shard-rows", type=int, default=4096)
    ap.add_argument("--loader-batch", type=int, default=4096)
    ap.add_argument(
        "--passes", type=int, default=3, help="loader epochs, and raw reads of the store"
    )
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    ap.add_argument(
        "--workdir", type=Path, help="where the store goes (default: a temporary folder)"
    )
    ap.add_argument(
        "--out", type=Path, default=Path(__file__).resolve().parent / "results" / "harvest.json"
    )
    return ap.parse_args(argv)


def make_model_dir(args: argparse.Namespace, root: Path) -> Path:
    if args.model is not None:
        return args.model
    cfg = ModelConfig(
        family="gpt2", vocab_size=args.vocab, n_layers=args.layers, d_model=args.d_model, n_heads=args.heads,
        d_mlp=4 * args.d_model, context_length=args.context, bias=True,
    )  # fmt: skip
    torch.manual_seed(0)
    return save_model(Transformer(cfg), root / "model")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


class _Stop(Exception):
    pass


def _raise_stop(_x):
    raise _Stop


def time_forward(
    model: Transformer, seqs: torch.Tensor, batch: int, device: torch.device, blocks_only: bool
) -> float:
    """Seconds for a bare forward over all sequences (one warm-up batch first).

    blocks_only: stop after the last MLP, as the harvest does (no final norm, no logits).
    """
    last = f"blocks.{model.cfg.n_layers - 1}.hook_mlp_out"
    stop = hooks(model, {last: _raise_stop}) if blocks_only else contextlib.nullcontext()

    def forward(tokens: torch.Tensor) -> None:
        with contextlib.suppress(_Stop):
            model(tokens.to(device))

    with torch.inference_mode(), stop:
        forward(seqs[:batch])
        sync(device)
        t0 = time.perf_counter()
        for i in range(0, len(seqs), batch):
            forward(seqs[i : i + batch])
        sync(device)
    return time.perf_counter() - t0


def time_raw_read(store: Path, passes: int) -> tuple[float, int]:
    files = sorted(
        p for name in ("inputs", "targets") for p in (store / name / "c").rglob("*") if p.is_file()
    )
    t0 = time.perf_counter()
    n = 0
    for _ in range(passes):
        for p in files:
            with open(p, "rb") as f:
                n += len(f.read())
    return time.perf_counter() - t0, n


def time_loader(store: Path, batch: int, device: torch.device, epochs: int) -> tuple[float, int]:
    loader = ActivationLoader(str(store), batch, device=device, epochs=epochs)
    t0 = time.perf_counter()
    rows = 0
    for x, _ in loader:
        rows += len(x)
    sync(device)
    seconds = time.perf_counter() - t0
    return seconds, rows * loader.n_layers * loader.d_model * 2 * 2  # stored bytes, both arrays


def markdown(rows: list[dict]) -> str:
    lines = ["| what | this | baseline | ratio |", "|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['what']} | {r['value']:,.3g} {r['unit']} | {r['baseline']:,.3g} {r['unit']} ({r['baseline_name']}) | {r['ratio']:.2f} |"
        )
    return "\n".join(lines)


def main(argv=None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    root = Path(tempfile.mkdtemp(prefix="bench_harvest_", dir=args.workdir))
    try:
        model_dir = make_model_dir(args, root)
        model, _ = load_model(model_dir, device=device)
        model.eval()
        T = args.context
        n_seq = -(-args.rows // T)
        seqs = torch.from_numpy(
            np.random.default_rng(0).integers(1, model.cfg.vocab_size, size=(n_seq, T))
        )
        np.save(root / "tokens.npy", seqs.numpy())

        def forward_tps(blocks_only: bool) -> float:
            return n_seq * T / time_forward(model, seqs, args.batch, device, blocks_only)

        before = forward_tps(False), forward_tps(True)
        store = root / "acts.zarr"
        result = harvest(
            HarvestConfig(
                model=model_dir, out=str(store), tokens_file=root / "tokens.npy", tokens=args.rows, include_bos=True,
                batch_size=args.batch, shard_rows=args.shard_rows, dtype=args.dtype, device=args.device,
            )
        )  # fmt: skip
        harvest_tps = result.metrics["tokens_per_s"]
        after = forward_tps(False), forward_tps(True)
        forward_tps, blocks_tps = max(before[0], after[0]), max(before[1], after[1])

        raw_s, raw_bytes = time_raw_read(store, args.passes)
        loader_s, loader_bytes = time_loader(store, args.loader_batch, device, args.passes)
        raw_gbps, loader_gbps = raw_bytes / raw_s / 1e9, loader_bytes / loader_s / 1e9

        cfg = model.cfg
        setup = {
            "device": str(device),
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "cpu_threads": torch.get_num_threads(),
            "platform": platform.platform(),
            "torch": torch.__version__,
            "model": {
                "layers": cfg.n_layers,
                "d_model": cfg.d_model,
                "d_mlp": cfg.d_mlp,
                "vocab": cfg.vocab_size,
                "context": T,
            },
            "rows": args.rows,
            "batch": args.batch,
            "shard_rows": args.shard_rows,
            "loader_batch": args.loader_batch,
            "dtype": args.dtype,
            "store_bytes": raw_bytes // args.passes,
            "passes": args.passes,
        }
        rows = [
            {"what": "harvest throughput", "value": harvest_tps, "baseline": forward_tps, "baseline_name": "bare forward", "unit": "tokens/s", "ratio": harvest_tps / forward_tps},
            {"what": "harvest throughput", "value": harvest_tps, "baseline": blocks_tps, "baseline_name": "forward to the last MLP", "unit": "tokens/s", "ratio": harvest_tps / blocks_tps},
            {"what": "loader read rate", "value": loader_gbps, "baseline": raw_gbps, "baseline_name": "raw file read", "unit": "GB/s", "ratio": loader_gbps / raw_gbps},
        ]  # fmt: skip
        write_json(args.out, {"setup": setup, "rows": rows})
        print(
            f"{cfg.n_layers} layers, d_model {cfg.d_model}, {args.rows} tokens of context {T}, on {device}; store {raw_bytes / args.passes / 2**20:.0f} MiB\n"
        )
        print(markdown(rows))
        print(f"\nwrote {args.out}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
