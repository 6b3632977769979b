"""Gated sparse attention against dense SDPA: forward+backward time and peak memory.

What is compared, side by side in one run, on the same weights and the same input:
  dense  - gate mode "off": `F.scaled_dot_product_attention(is_causal=True)` (never holds T x T)
  gated  - gate mode "stochastic" (the post-training mode), the reference path
           (`gated_impl="reference"`): the checkpointed `gated_attention_core` (via
           `gated_pattern`), which materialises this layer's T x T tensors
  tiled  - gate mode "stochastic", `gated_impl="tiled"`: the one tiled operation of
           gated_attention.py (online softmax, noise hashed per tile, no T x T tensor), its
           tiles run eagerly (SPARSE_CIRCUITS_COMPILE=0)
  tiled, compiled - the same, each tile's elementwise work fused by `torch.compile`
           (SPARSE_CIRCUITS_COMPILE=1; training's default from COMPILE_MIN_PAIRS query-key
           pairs a call); its warm-up run holds the compile (once per machine: inductor's
           disk cache)
Rows:
  layer  - one `CausalSelfAttention` (projections included), fwd + bwd of x -> out, plus the
           gate statistic that post-training penalises (expected open fraction) for the
           gated variants; "gated" is left out above --reference-max-len (its T x T tensors)
  layer, hard, fwd - inference: hard gates, forward only under no_grad, at --hard-seq-len
  model  - a small `Transformer` (4 layers by default), fwd + bwd of the next-token loss;
           a variant "gated, no ckpt" runs the reference core without the activation
           checkpoint, to show what the checkpoint saves: with it, peak memory grows by
           about one layer's T x T working set; without it, by L layers' saved T x T tensors.
The issue's aim for "tiled" (issue 13): at T = 2048, at most 1.5x SDPA's time and peak memory.

Time: median wall time of fwd+bwd over `repeats` runs after one warm-up, the variants
interleaved run by run so a neighbour's load on a shared machine hits them alike.

Peak memory, in bytes held by tensors allocated during one fwd+bwd (weights, input and
the upstream gradient exist beforehand and are not counted; parameter gradients are):
  cuda - torch.cuda.max_memory_allocated() minus memory_allocated() before the step.
  cpu  - the allocator's own record. With `torch.profiler` memory profiling on, torch's CPU
         allocator reports every allocation and free (size and address) to the profiler,
         op-internal scratch buffers included; the running sum of those records over the
         step is the bytes held at each moment, and its maximum is the peak. This counts what
         tensors hold, not what malloc keeps cached, so it is the CPU analogue of
         max_memory_allocated and does not depend on glibc's arena behaviour. The memory
         pass is separate from the timed runs (the profiler slows ops down).
Memory is also given in units of one layer's T x T fp32 tensor (B*H*T*T*4 bytes), which is
what the gated path adds over dense.

The load average (1 min) is recorded before and after each row: on a shared machine it says
how much the figures beside it can be trusted.

Run from the repository root:
    OMP_NUM_THREADS=1 python benchmarks/bench_attention.py    # CPU defaults, a few minutes
    python benchmarks/bench_attention.py --device cuda --batch 8 --d-model 768 --heads 12
Writes benchmarks/results/attention.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sparse_circuits.io import write_json  # noqa: E402
from sparse_circuits.sparse_attention import model as model_module  # noqa: E402
from sparse_circuits.sparse_attention.gated_attention import COMPILE_ENV  # noqa: E402
from sparse_circuits.sparse_attention.model import (  # noqa: E402
    CausalSelfAttention,
    ModelConfig,
    Transformer,
)

MiB = 2**20
DEFAULT_REPEATS = {256: 20, 1024: 10, 2048: 9, 4096: 4}  # medians: a single slow run moves no ratio
MODEL_REPEATS = 3


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seq-lens", type=int, nargs="+", default=[256, 1024, 2048, 4096])
    ap.add_argument(
        "--reference-max-len",
        type=int,
        default=2048,
        help="longest T at which the reference gated path runs (it holds T x T tensors)",
    )
    ap.add_argument(
        "--hard-seq-len", type=int, default=2048, help="T of the hard-gate forward row (0 skips it)"
    )
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--layers", type=int, default=4, help="layers of the whole-model row")
    ap.add_argument(
        "--model-seq-len", type=int, default=1024, help="T of the whole-model row (0 skips it)"
    )
    ap.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="timed runs per variant (default: 20/10/9/4 by T for a layer, 3 for the model)",
    )
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:n]")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--out", type=Path, default=Path(__file__).resolve().parent / "results" / "attention.json"
    )
    return ap.parse_args(argv)


# ----------------------------------------------------------------------------- measuring


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_side_by_side(
    steps: dict[str, Callable[[], None]], repeats: int, device: torch.device
) -> dict[str, float]:
    """Median seconds per step for each variant; one warm-up each, then runs interleaved."""
    for step in steps.values():
        step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            synchronize(device)
            t0 = time.perf_counter()
            step()
            synchronize(device)
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def peak_bytes(step: Callable[[], None], device: torch.device) -> int:
    """Peak bytes held by tensors allocated during `step` (see the module docstring)."""
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        step()
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    records = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    held = peak = 0
    for e in sorted(records, key=lambda e: e.start_ns()):
        held += e.nbytes()  # + on allocation, - on free
        peak = max(peak, held)
    return peak


@contextlib.contextmanager
def tiles_compiled(compiled: bool | None):
    """Set whether the tiled operation compiles its tiles (None: its own default)."""
    before = os.environ.pop(COMPILE_ENV, None)
    if compiled is not None:
        os.environ[COMPILE_ENV] = "1" if compiled else "0"
    try:
        yield
    finally:
        os.environ.pop(COMPILE_ENV, None)
        if before is not None:
            os.environ[COMPILE_ENV] = before


@contextlib.contextmanager
def no_activation_checkpoint():
    """Run the gated core without torch.utils.checkpoint: every layer keeps its T x T saves."""
    original = model_module.checkpoint
    model_module.checkpoint = lambda fn, *args, use_reentrant: fn(*args)
    try:
        yield
    finally:
        model_module.checkpoint = original


def fwd_bwd(run: Callable[[], torch.Tensor], params: list[torch.Tensor]) -> Callable[[], None]:
    """One forward+backward; gradients start unallocated so every step counts them alike."""

    def step() -> None:
        for p in params:
            p.grad = None
        run().backward()
        for p in params:
            p.grad = None

    return step


# ----------------------------------------------------------------------------- the rows


def make_config(args: argparse.Namespace, context_length: int, n_layers: int) -> ModelConfig:
    return ModelConfig(
        family="gpt2",
        vocab_size=256,  # small, so the logits do not hide the attention in the model row
        n_layers=n_layers,
        d_model=args.d_model,
        n_heads=args.heads,
        d_mlp=4 * args.d_model,
        context_length=context_length,
    )


def tt_bytes(args: argparse.Namespace, T: int, dtype: torch.dtype) -> int:
    """Bytes of one layer's T x T attention tensor, B*H*T*T."""
    return args.batch * args.heads * T * T * dtype.itemsize


def bench_layer(args, T: int, device: torch.device, dtype: torch.dtype) -> dict:
    load = os.getloadavg()[0]
    torch.manual_seed(args.seed)
    attn = CausalSelfAttention(make_config(args, T, 1)).to(device, dtype)
    x = torch.randn(args.batch, T, args.d_model, device=device, dtype=dtype, requires_grad=True)
    grad_out = torch.randn_like(x)
    params = [x, *attn.parameters()]

    def variant(mode: str, impl: str = "reference", compiled: bool = False) -> Callable[[], None]:
        def run() -> torch.Tensor:
            attn.gate_mode, attn.gated_impl = mode, impl
            with tiles_compiled(compiled):
                loss = (attn(x, None) * grad_out).sum()  # backward seeds d out = grad_out
            if mode != "off":  # and the penalty on the expected open fraction, as post-training
                loss = loss + attn.last_gate_stats.expected_open.sum()
            return loss

        return fwd_bwd(run, params)

    steps = {"dense": variant("off")}
    if T <= args.reference_max_len:
        steps["gated"] = variant("stochastic", "reference")
    steps["tiled"] = variant("stochastic", "tiled")
    steps["tiled, compiled"] = variant("stochastic", "tiled", compiled=True)
    repeats = args.repeats or DEFAULT_REPEATS.get(T, 2)
    seconds = time_side_by_side(steps, repeats, device)
    peaks = {name: peak_bytes(step, device) for name, step in steps.items()}
    return row("layer", T, repeats, seconds, peaks, tt_bytes(args, T, dtype), load)


def bench_hard_forward(args, T: int, device: torch.device, dtype: torch.dtype) -> dict:
    """Inference: hard gates, one layer's forward under no_grad."""
    load = os.getloadavg()[0]
    torch.manual_seed(args.seed)
    attn = CausalSelfAttention(make_config(args, T, 1)).to(device, dtype)
    x = torch.randn(args.batch, T, args.d_model, device=device, dtype=dtype)

    def variant(mode: str, impl: str = "reference", compiled: bool = False) -> Callable[[], None]:
        @torch.no_grad()
        def step() -> None:
            attn.gate_mode, attn.gated_impl = mode, impl
            with tiles_compiled(compiled):
                attn(x, None)

        return step

    steps = {"dense": variant("off")}
    if T <= args.reference_max_len:
        steps["gated"] = variant("hard", "reference")
    steps["tiled"] = variant("hard", "tiled")
    steps["tiled, compiled"] = variant("hard", "tiled", compiled=True)
    repeats = args.repeats or DEFAULT_REPEATS.get(T, 2)
    seconds = time_side_by_side(steps, repeats, device)
    peaks = {name: peak_bytes(step, device) for name, step in steps.items()}
    return row("layer, hard, fwd", T, repeats, seconds, peaks, tt_bytes(args, T, dtype), load)


def bench_model(args, T: int, device: torch.device, dtype: torch.dtype) -> dict:
    load = os.getloadavg()[0]
    torch.manual_seed(args.seed)
    model = Transformer(make_config(args, T, args.layers)).to(device, dtype)
    tokens = torch.randint(0, 256, (args.batch, T + 1), device=device)
    params = list(model.parameters())

    def variant(
        mode: str, impl: str = "reference", ckpt: bool = True, compiled: bool = False
    ) -> Callable[[], None]:
        def run() -> torch.Tensor:
            model.set_gate(mode, offset=0.0)
            model.set_gated_impl(impl)
            checkpointing = contextlib.nullcontext() if ckpt else no_activation_checkpoint()
            with checkpointing, tiles_compiled(compiled):
                out = model(tokens[:, :-1], tokens[:, 1:])
            if mode == "off":
                return out.loss
            return out.loss + sum(s.expected_open.mean() for s in out.gate_stats)

        return fwd_bwd(run, params)

    steps = {
        "dense": variant("off"),
        "gated": variant("stochastic"),
        "gated, no ckpt": variant("stochastic", ckpt=False),
        "tiled": variant("stochastic", "tiled"),
        "tiled, compiled": variant("stochastic", "tiled", compiled=True),
    }
    repeats = args.repeats or MODEL_REPEATS
    seconds = time_side_by_side(steps, repeats, device)
    peaks = {name: peak_bytes(step, device) for name, step in steps.items()}
    return row(
        f"model ({args.layers} layers)", T, repeats, seconds, peaks, tt_bytes(args, T, dtype), load
    )


def row(
    what: str, T: int, repeats: int, seconds: dict, peaks: dict, tt: int, load_before: float
) -> dict:
    return {
        "what": what,
        "T": T,
        "repeats": repeats,
        "seconds": seconds,
        "peak_bytes": peaks,
        "tt_bytes": tt,
        "time_ratio": {k: seconds[k] / seconds["dense"] for k in seconds if k != "dense"},
        "memory_ratio": {k: peaks[k] / peaks["dense"] for k in peaks if k != "dense"},
        "extra_over_dense_tt": {k: (peaks[k] - peaks["dense"]) / tt for k in peaks if k != "dense"},
        "load_average_before_after": [load_before, os.getloadavg()[0]],
    }


# ----------------------------------------------------------------------------- report


def markdown(rows: list[dict]) -> str:
    lines = [
        "| what | T | variant | ms | time / SDPA | peak MiB | memory / SDPA | peak / T×T | load |",
        "|---|---:|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        load = "{:.1f}–{:.1f}".format(*r["load_average_before_after"])
        for name in r["seconds"]:
            time_ratio = r["time_ratio"].get(name, 1.0)
            mem_ratio = r["memory_ratio"].get(name, 1.0)
            lines.append(
                f"| {r['what']} | {r['T']} | {name} | {1e3 * r['seconds'][name]:.1f} "
                f"| {time_ratio:.2f} | {r['peak_bytes'][name] / MiB:.1f} | {mem_ratio:.2f} "
                f"| {r['peak_bytes'][name] / r['tt_bytes']:.2f} | {load} |"
            )
    return "\n".join(lines)


def aims(rows: list[dict], T: int = 2048) -> dict | None:
    """Issue 13's aim for the tiled operation at T = 2048: <= 1.5x SDPA's time and peak
    memory, for its eager and its compiled tiles."""
    for r in rows:
        if r["what"] == "layer" and r["T"] == T:
            return {
                "T": T,
                **{
                    name: {
                        "time_ratio": r["time_ratio"][name],
                        "memory_ratio": r["memory_ratio"][name],
                        "time_met": r["time_ratio"][name] <= 1.5,
                        "memory_met": r["memory_ratio"][name] <= 1.5,
                    }
                    for name in ("tiled", "tiled, compiled")
                },
            }
    return None


def main(argv=None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    rows = []
    for T in args.seq_lens:
        rows.append(bench_layer(args, T, device, dtype))
        print(f"layer T={T} done ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    if args.hard_seq_len:
        rows.append(bench_hard_forward(args, args.hard_seq_len, device, dtype))
        print(f"hard forward done ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    if args.model_seq_len:
        rows.append(bench_model(args, args.model_seq_len, device, dtype))
    setup = {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "dtype": args.dtype,
        "batch": args.batch,
        "d_model": args.d_model,
        "heads": args.heads,
        "layers": args.layers,
        "memory_method": "cuda.max_memory_allocated"
        if device.type == "cuda"
        else "profiler allocator records",
        "load_average_before_after": [load_before[0], os.getloadavg()[0]],
        "wall_seconds": time.perf_counter() - t0,
    }
    aim = aims(rows)
    write_json(args.out, {"setup": setup, "rows": rows, "aim_at_2048": aim})
    print(
        f"{setup['device_name']}, torch {setup['torch']}, {setup['threads']} threads, {args.dtype}, "
        f"B={args.batch} d_model={args.d_model} H={args.heads}; ratios are variant / dense (SDPA); "
        "load: 1-min load average before–after the row\n"
    )
    print(markdown(rows))
    for r in rows:
        extra = ", ".join(f"{k} +{v:.1f}" for k, v in r["extra_over_dense_tt"].items())
        print(f"\n{r['what']}, T={r['T']}: peak over dense, in T×T units: {extra}", end="")
    print()
    for name in ("tiled", "tiled, compiled") if aim is not None else ():
        a = aim[name]
        print(
            f"\naim at T={aim['T']} ({name} ≤ 1.5× SDPA): time {a['time_ratio']:.2f}× "
            f"({'met' if a['time_met'] else 'not met'}), peak memory {a['memory_ratio']:.2f}× "
            f"({'met' if a['memory_met'] else 'not met'})"
        )
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
