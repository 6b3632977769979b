"""llamascopium's CLT trainer as a step-timing worker for `bench_clt.py` (the outside reference).

Run by `bench_clt.py --reference-python PY` under an interpreter that has `llamascopium` (with
`transformer-lens<4`), usually a venv of its own; this project does not depend on it. It trains
llamascopium's `CrossLayerTranscoder` with its own `Trainer.fit` (normalisation, loss,
backward, gradient clip, metrics, Adam, scheduler, progress bar: its whole training iteration)
on the batches `bench_clt.py` saved, and reports the wall time of each iteration. Its metrics
are off (see below): the reference step does less bookkeeping than ours.

Protocol on stdin/stdout, one line each: the worker prints `ready` once built; each
`steps N` line runs N more training iterations and answers a JSON list of their seconds;
`quit` (or end of input) ends the run. The whole time the worker waits for a command it
holds its next batch unstarted, so the bench can alternate rounds with its own step.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import tempfile
import time
import warnings


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--data", required=True, help="torch.save'd {'inputs': [N,B,L,M], 'targets': ...}"
    )
    ap.add_argument("--features", type=int, required=True, help="features per layer")
    ap.add_argument(
        "--activation", required=True, choices=["relu", "jumprelu", "topk", "batchtopk"]
    )
    ap.add_argument("--k", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    return ap.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    logging.disable(logging.WARNING)  # its per-step logger would interleave with the protocol
    warnings.filterwarnings("ignore")
    import torch
    from llamascopium.models.clt import CLTConfig, CrossLayerTranscoder
    from llamascopium.trainer import Trainer, TrainerConfig

    if args.threads:
        torch.set_num_threads(args.threads)
    data = torch.load(args.data)
    inputs, targets = data["inputs"], data["targets"]  # N,B,L,M
    n_batches, B, L, M = inputs.shape
    hooks_in = [f"blocks.{i}.ln2.hook_normalized" for i in range(L)]
    hooks_out = [f"blocks.{i}.hook_mlp_out" for i in range(L)]
    topk = args.activation in ("topk", "batchtopk")
    cfg = CLTConfig(
        d_model=M,
        expansion_factor=args.features / M,
        act_fn=args.activation,
        top_k=args.k if topk else 50,
        hook_points_in=hooks_in,
        hook_points_out=hooks_out,
        device="cpu",
        dtype=torch.float32,
    )
    clt = CrossLayerTranscoder(cfg)
    clt.init_parameters(init_log_jumprelu_threshold_value=math.log(0.1))
    clt.set_current_k(cfg.top_k)
    # The batches are normalised already: a dataset norm of √M makes its scale factor 1.
    clt.set_dataset_average_activation_norm({h: math.sqrt(M) for h in hooks_in + hooks_out})
    # Every batch as llamascopium's activation stream hands it over: one [B, M] per hook.
    batches = []
    for i in range(n_batches):
        batch = {h: inputs[i, :, j].contiguous() for j, h in enumerate(hooks_in)}
        batch |= {h: targets[i, :, j].contiguous() for j, h in enumerate(hooks_out)}
        batch["tokens"] = torch.zeros(B, dtype=torch.long)
        batch["mask"] = torch.ones(B, dtype=torch.bool)
        batches.append(batch)

    def stream():
        yield batches[0]  # Trainer's first look, to count the tokens of a batch
        served = 0
        while True:
            command = sys.stdin.readline().split()
            if not command or command[0] == "quit":
                return
            times, t = [], time.perf_counter()
            for _ in range(int(command[1])):
                yield batches[served % n_batches]
                served += 1
                now = time.perf_counter()  # fit asks for the next batch: one iteration done
                times.append(now - t)
                t = now
            print(json.dumps(times), flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(
            TrainerConfig(
                lr=1e-3,
                # far more tokens than any benchmark runs: no schedule or checkpoint ends it
                total_training_tokens=B * 10**9,
                lr_warm_up_steps=100,
                clip_grad_norm=1.0,
                sparsity_loss_type="tanh" if args.activation == "jumprelu" else None,
                l1_coefficient=1e-3 if args.activation == "jumprelu" else None,
                k_warmup_steps=0,  # k fixed from the start, as ours
                amp_dtype=torch.float32,  # the dtype our CPU step computes in
                # Its per-step metrics fail on a CLT's [L, B, M] labels (a broadcast of the
                # label mean) in this version: it trains without them, as its CLT runs must.
                skip_metrics_calculation=True,
                n_checkpoints=0,
                log_frequency=10**9,
                exp_result_path=tmp,
            )
        )
        print("ready", flush=True)
        sys.stdout.flush()
        # Its progress bar goes to stderr, as in a real run; stdout carries the protocol only.
        trainer.fit(clt, stream())


if __name__ == "__main__":
    main()
