"""OpenMP's wait policy, side by side: the same short training run with OMP_WAIT_POLICY unset
(the OpenMP runtime's default: spin a while, then sleep) and PASSIVE (sleep at once), and with
--active ACTIVE (always spin), each on the machine as it is ("idle": no load of ours) and beside
a competing CPU load of ours (one spinning process per core).

    python benchmarks/bench_omp_wait.py [--seconds 5] [--repeats 1] [--active]

Each run is a fresh subprocess (the policy is read once, when torch's OpenMP starts) doing, for
a fixed wall time, training steps (forward, backward, AdamW) of the addition toy's model
(4 layers, d_model 128, batch 128): the small matmuls and many parallel regions the quickstart's
stages are made of. Prints a markdown table and writes benchmarks/results/omp_wait.json. The
CLI's default (OMP_WAIT_POLICY=PASSIVE unless the user set it) was chosen from these figures.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "omp_wait.json"
POLICIES = ("default", "PASSIVE")  # ACTIVE (spin always) with --active: slower still when loaded


def workload(seconds: float) -> float:
    """Training steps per second of the toy model over `seconds` (after two warm-up steps)."""
    import torch  # noqa: PLC0415  (in the subprocess, after its environment is set)

    from sparse_circuits.sparse_attention.model import ModelConfig, Transformer  # noqa: PLC0415

    torch.manual_seed(0)
    cfg = ModelConfig(family="gpt2", vocab_size=13, n_layers=4, d_model=128, n_heads=4,
                      d_mlp=512, context_length=9, bias=True)  # fmt: skip
    model = Transformer(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randint(0, 13, (128, 9))

    def step() -> None:
        opt.zero_grad()
        model(x, x).loss.backward()
        opt.step()

    step(), step()
    t0, n = time.perf_counter(), 0
    while time.perf_counter() - t0 < seconds:
        step()
        n += 1
    return n / (time.perf_counter() - t0)


def _spin() -> None:
    while True:
        pass


def run(policy: str, seconds: float) -> float:
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if policy != "default":
        env["OMP_WAIT_POLICY"] = policy
    try:
        out = subprocess.run(
            [sys.executable, __file__, "--worker", "--seconds", str(seconds)],
            capture_output=True, text=True, env=env, check=True, timeout=4 * seconds + 60,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        return 0.0  # not even torch's start and two steps in the time: as good as stalled
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=5.0, help="wall time of each run")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--active", action="store_true", help="also OMP_WAIT_POLICY=ACTIVE")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(workload(args.seconds))
        return
    cores = os.cpu_count() or 1
    policies = (*POLICIES, "ACTIVE") if args.active else POLICIES
    load_average = os.getloadavg()[0]  # what others ran on the machine meanwhile
    rows = []
    for load in ("idle", "loaded"):
        spinners = []
        if load == "loaded":
            spinners = [multiprocessing.Process(target=_spin, daemon=True) for _ in range(cores)]
            for p in spinners:
                p.start()
        try:
            for _ in range(args.repeats):  # interleaved, so drift in the machine's load is shared
                for policy in policies:
                    rate = run(policy, args.seconds)
                    rows.append({"load": load, "policy": policy, "steps_per_s": rate})
                    print(f"  {load:6s} {policy:8s} {rate:7.1f} steps/s", flush=True)
        finally:
            for p in spinners:
                p.terminate()
                p.join()
    table = {
        (load, policy): statistics.median(
            r["steps_per_s"] for r in rows if r["load"] == load and r["policy"] == policy
        )
        for load in ("idle", "loaded")
        for policy in policies
    }
    print(f"\ntraining steps per second of the toy model, {cores} cores, torch threads = cores, "
          f"{args.seconds:g} s per run, median of {args.repeats}, load average {load_average:.1f}\n")  # fmt: skip
    print("| load | " + " | ".join(f"{p} (steps/s)" for p in policies) + " | PASSIVE / default |")
    print("|---" * (len(policies) + 2) + "|")
    for load in ("idle", "loaded"):
        cells = " | ".join(
            f"{table[load, p]:.2f}" if table[load, p] else "stalled" for p in policies
        )
        ratio = (
            f"{table[load, 'PASSIVE'] / table[load, 'default']:.2f}"
            if table[load, "default"]
            else "∞ (default stalled)"
        )
        print(f"| {load} | {cells} | {ratio} |")
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps({
        "seconds_per_run": args.seconds, "cores": cores, "load_average_1min": load_average, "repeats": args.repeats, "runs": rows,
        "median_steps_per_s": {f"{load}/{policy}": s for (load, policy), s in table.items()},
    }, indent=2) + "\n")  # fmt: skip


if __name__ == "__main__":
    main()
