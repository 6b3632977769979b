"""Activation harvest and loader throughput, each against its bare baseline, in one run.

What is compared, on the same model, tokens and store:
  harvest  - `harvest()` into a local store: the forward pass with every layer's MLP input
             and output captured, cast to 16 bits, shuffled, written as zarr shards (its
             `tokens_per_s` metric: the loop from the first forward to the last shard
             written, model loading and final statistics left out)
  forward  - a bare `model(tokens)` forward over the same sequences at the same batch size
             (inference mode, logits included; nothing captured or written); and the same
             forward stopped after the last MLP, as the harvest stops (no unembedding)
  shard readers - every shard of both activation arrays read whole into memory by: our
             parser (`read_shard_rows`: row views of the bytes read, 4 reader threads, as the
             loader reads), zarr-python, zarr-python with the zarrs codec pipeline, and
             tensorstore (each reading the whole array, its own concurrency)
  loader   - `ActivationLoader` over the whole store, one epoch a pass: shard reads, shuffle
             buffer, batches gathered; `stored_batches()` (the 16-bit batches a training
             device receives) and iteration (float32, normalised, on --device, as train-clt
             asks); counted in stored bytes (inputs + targets)
  raw read - the same shard objects read whole: from disk with plain `open().read()`, from
             S3 with one `s3fs` `cat` of all of them (concurrent requests)
Reads are timed on the local store and on a copy of it in an S3 test server (moto, in its
own process, on loopback). Local reads hit the page cache (the store was just written), so
they compare the readers' work against a file read, not disks; with --cold (root: it writes
/proc/sys/vm/drop_caches) the page cache is dropped before every timed local read, one pass
each, so every contender reads from the disk, as a store larger than memory is read.
Each round runs every contender once, alternated (so a neighbour's load on a shared machine
hits all alike), and each figure is its best round; load averages are recorded per round.
The model is random (throughput does not depend on the weights); pass --model to time a
model dir of your own. zarrs and tensorstore are optional (`pip install zarrs tensorstore`):
a missing one is reported as such.

Run from the repository root:
    python benchmarks/bench_harvest.py                 # CPU defaults, a few minutes on 2 cores
    python benchmarks/bench_harvest.py --device cuda --layers 12 --d-model 768 --rows 262144
Writes benchmarks/results/harvest.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sparse_circuits.clt.harvest import HarvestConfig, harvest  # noqa: E402
from sparse_circuits.clt.loader import ActivationLoader  # noqa: E402
from sparse_circuits.clt.store import (  # noqa: E402
    BufferPool,
    open_store,
    read_shard_rows,
    shard_range,
    zarr_store,
)
from sparse_circuits.io import write_json  # noqa: E402
from sparse_circuits.sparse_attention.hooks import hooks  # noqa: E402
from sparse_circuits.sparse_attention.model import ModelConfig, Transformer  # noqa: E402
from sparse_circuits.sparse_attention.modeldir import load_model, save_model  # noqa: E402

ARRAYS = ("inputs", "targets")
S3_CREDENTIALS = {"key": "testing", "secret": "testing"}


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
        "--passes", type=int, default=3, help="loader epochs, and raw reads of the store, a round"
    )
    ap.add_argument("--rounds", type=int, default=2, help="alternated rounds of the reads")
    ap.add_argument(
        "--harvest-rounds", type=int, default=1, help="harvests, each between two forwards"
    )
    ap.add_argument("--no-s3", action="store_true", help="leave out the S3 test server")
    ap.add_argument(
        "--cold",
        action="store_true",
        help="drop the page cache before every timed local read (root; one pass per read)",
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


def load() -> float:
    return round(os.getloadavg()[0], 2)


# ----------------------------------------------------------------------------- harvest


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


# ----------------------------------------------------------------------------- reads


def shard_keys(url: str, options: dict | None) -> list[tuple[str, int, int]]:
    """(array name, shard, rows) for every activation shard of the store."""
    group = open_store(url, options)
    n, shard = group.attrs["rows_total"], group.attrs["shard_rows"]
    return [
        (name, k, b - a)
        for name in ARRAYS
        for k in range(-(-n // shard))
        for a, b in [shard_range(k, shard, n)]
    ]


def object_paths(url: str, options: dict | None) -> list[str]:
    group = open_store(url, options)
    return [
        f"{name}/" + group[name].metadata.encode_chunk_key((k, 0, 0))
        for name, k, _ in shard_keys(url, options)
    ]


def raw_reader(url: str, options: dict | None) -> Callable[[], int]:
    paths = object_paths(url, options)
    if "://" not in url:

        def read() -> int:
            n = 0
            for p in paths:
                with open(Path(url) / p, "rb") as f:
                    n += len(f.read())
            return n

        return read
    import fsspec  # noqa: PLC0415

    fs, root = fsspec.core.url_to_fs(url, **options)

    def read_s3() -> int:
        fs.invalidate_cache()
        return sum(len(v) for v in fs.cat([f"{root}/{p}" for p in paths]).values())

    return read_s3


def ours_reader(url: str, options: dict | None, threads: int = 4) -> Callable[[], int]:
    group = open_store(url, options)
    arrays = {name: group[name] for name in ARRAYS}
    keys = shard_keys(url, options)
    buffers = BufferPool(keep=2 * threads)
    pool = ThreadPoolExecutor(max_workers=threads)

    def one(key: tuple[str, int, int]) -> int:
        name, k, rows = key
        got = read_shard_rows(arrays[name], k, rows, buffers)
        if got.buffer is not None:
            buffers.give(got.buffer)
        return sum(c.nbytes for c in got.chunks)

    return lambda: sum(pool.map(one, keys))


def zarr_reader(url: str, options: dict | None, pipeline: str | None) -> Callable[[], int]:
    """The whole activation arrays read by zarr-python (pipeline: its codec pipeline)."""
    import zarr  # noqa: PLC0415

    config = {"codec_pipeline.path": pipeline} if pipeline else {}

    def read() -> int:
        with zarr.config.set(config):
            group = zarr.open_group(zarr_store(url, options), mode="r", zarr_format=3)
            return sum(group[name][...].nbytes for name in ARRAYS)

    return read


def zarrs_reader(url: str, options: dict | None) -> Callable[[], int] | str:
    try:
        import zarrs  # noqa: F401, PLC0415
    except ImportError:
        return "not installed"
    return zarr_reader(url, options, "zarrs.ZarrsCodecPipeline")


def tensorstore_reader(url: str, options: dict | None) -> Callable[[], int] | str:
    try:
        import tensorstore as ts  # noqa: PLC0415
    except ImportError:
        return "not installed"
    if "://" in url:
        bucket, _, prefix = url.removeprefix("s3://").partition("/")
        os.environ.setdefault("AWS_ACCESS_KEY_ID", options["key"])
        os.environ.setdefault("AWS_SECRET_ACCESS_KEY", options["secret"])
        kvstores = {
            name: {
                "driver": "s3", "bucket": bucket, "path": f"{prefix}/{name}/",
                "endpoint": options["endpoint_url"], "aws_region": "us-east-1",
            }
            for name in ARRAYS
        }  # fmt: skip
        # credentials from the environment only (the default chain also looks for ~/.aws)
        context = {"aws_credentials": {"type": "environment"}}
    else:
        kvstores = {name: {"driver": "file", "path": f"{url}/{name}/"} for name in ARRAYS}
        context = {}
    # no cache: every read reads
    context = ts.Context({**context, "cache_pool": {"total_bytes_limit": 0}})

    def read() -> int:
        return sum(
            ts.open({"driver": "zarr3", "kvstore": kv}, read=True, context=context)
            .result()
            .read()
            .result()
            .nbytes
            for kv in kvstores.values()
        )

    return read


def loader_reader(
    url: str, options: dict | None, batch: int, device: torch.device, passes: int, stored: bool
) -> Callable[[], int]:
    def read() -> int:
        loader = ActivationLoader(
            url, batch, device=device, epochs=passes, normalize=True, storage_options=options
        )
        rows = 0
        for x, _ in loader.stored_batches() if stored else loader:
            rows += len(x)
        sync(device)
        return rows * loader.n_layers * loader.d_model * 2 * 2  # stored bytes, both arrays

    return read


def repeat(read: Callable[[], int], passes: int) -> Callable[[], int]:
    return lambda: sum(read() for _ in range(passes))


def drop_page_cache() -> None:
    """Write dirty pages out and drop the clean ones, so the next read comes from the disk."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError as e:
        raise SystemExit(f"--cold drops the page cache, which needs root: {e}") from None


def time_reads(
    contenders: dict[str, Callable[[], int] | str],
    rounds: int,
    before: Callable[[], None] | None = None,
) -> dict[str, dict]:
    """Best GB/s of each contender over alternated rounds (a str: why it did not run);
    `before` runs ahead of each timed read, untimed."""
    out: dict[str, dict] = {
        name: {"gbps": None, "rounds": [], "note": fn}
        for name, fn in contenders.items()
        if isinstance(fn, str)
    }
    runnable = {name: fn for name, fn in contenders.items() if not isinstance(fn, str)}
    for name in runnable:
        out[name] = {"gbps": None, "rounds": [], "note": None}
    for _ in range(rounds):
        for name, fn in runnable.items():
            if out[name]["note"]:
                continue
            try:
                if before is not None:
                    before()
                t0 = time.perf_counter()
                n = fn()
                gbps = n / (time.perf_counter() - t0) / 1e9
            except Exception as e:  # an outside reader that cannot read this store
                out[name]["note"] = f"failed: {type(e).__name__}: {str(e)[:200]}"
                continue
            out[name]["rounds"].append({"gbps": gbps, "load": load()})
            out[name]["gbps"] = max(gbps, out[name]["gbps"] or 0)
    return out


def read_contenders(
    url: str, options: dict | None, args: argparse.Namespace, device: torch.device
) -> dict[str, Callable[[], int] | str]:
    p = args.passes

    def passes(read: Callable[[], int] | str) -> Callable[[], int] | str:
        return read if isinstance(read, str) else repeat(read, p)

    return {
        "raw read": passes(raw_reader(url, options)),
        "ours": passes(ours_reader(url, options)),
        "zarr-python": passes(zarr_reader(url, options, None)),
        "zarrs": passes(zarrs_reader(url, options)),
        "tensorstore": passes(tensorstore_reader(url, options)),
        "loader 16-bit": loader_reader(url, options, args.loader_batch, device, p, stored=True),
        "loader float32": loader_reader(url, options, args.loader_batch, device, p, stored=False),
    }


@contextlib.contextmanager
def s3_server():
    """moto's S3 server in its own process on a loopback port; yields its endpoint."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
                break
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError("the moto S3 server did not start (pip install 'moto[server]')")
            time.sleep(0.2)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def upload(store: Path, endpoint: str) -> tuple[str, dict]:
    import s3fs  # noqa: PLC0415

    options = {**S3_CREDENTIALS, "endpoint_url": endpoint}
    fs = s3fs.S3FileSystem(**options)
    fs.mkdir("bench")
    fs.put(str(store), "bench/acts.zarr", recursive=True)
    return "s3://bench/acts.zarr", options


# ----------------------------------------------------------------------------- report


def markdown(rows: list[dict]) -> str:
    lines = ["| what | this | baseline | ratio |", "|---|---|---|---|"]
    for r in rows:
        if r["value"] is None:
            lines.append(f"| {r['what']} | {r['note']} | {r['baseline_name']} | - |")
            continue
        lines.append(
            f"| {r['what']} | {r['value']:,.3g} {r['unit']} | {r['baseline']:,.3g} {r['unit']} ({r['baseline_name']}) | {r['ratio']:.2f} |"
        )
    return "\n".join(lines)


def read_rows(where: str, reads: dict[str, dict]) -> list[dict]:
    raw = reads["raw read"]["gbps"]
    name = "raw file read" if where.startswith("local") else "raw S3 read (s3fs cat)"
    rows = []
    for what in ("ours", "zarr-python", "zarrs", "tensorstore", "loader 16-bit", "loader float32"):
        got = reads[what]
        label = f"{where}: {'shard read, ' if not what.startswith('loader') else ''}{what}"
        rows.append(
            {
                "what": label, "value": got["gbps"], "baseline": raw, "baseline_name": name,
                "unit": "GB/s", "ratio": got["gbps"] / raw if got["gbps"] else None,
                "note": got["note"], "rounds": got["rounds"],
                "baseline_rounds": reads["raw read"]["rounds"],
            }
        )  # fmt: skip
    return rows


def main(argv=None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    root = Path(tempfile.mkdtemp(prefix="bench_harvest_", dir=args.workdir))
    load_start = load()
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

        forwards, harvests = [], []
        forwards.append({"bare": forward_tps(False), "blocks": forward_tps(True), "load": load()})
        for r in range(args.harvest_rounds):
            store = root / f"acts{r}.zarr"
            result = harvest(
                HarvestConfig(
                    model=model_dir, out=str(store), tokens_file=root / "tokens.npy", tokens=args.rows,
                    include_bos=True, batch_size=args.batch, shard_rows=args.shard_rows,
                    dtype=args.dtype, device=args.device,
                )
            )  # fmt: skip
            harvests.append({"tokens_per_s": result.metrics["tokens_per_s"], "load": load()})
            forwards.append(
                {"bare": forward_tps(False), "blocks": forward_tps(True), "load": load()}
            )
            if r:
                shutil.rmtree(store)
        store = root / "acts0.zarr"
        harvest_tps = max(h["tokens_per_s"] for h in harvests)
        forward_best = max(f["bare"] for f in forwards)
        blocks_best = max(f["blocks"] for f in forwards)

        if args.cold:  # each timed read one pass from the disk
            args.passes = 1
        before = drop_page_cache if args.cold else None
        local = time_reads(read_contenders(str(store), None, args, device), args.rounds, before)
        remote = None
        if not args.no_s3:
            with s3_server() as endpoint:
                url, options = upload(store, endpoint)
                remote = time_reads(read_contenders(url, options, args, device), args.rounds)

        cfg = model.cfg
        store_bytes = sum(p.stat().st_size for a in ARRAYS for p in (store / a).rglob("*") if p.is_file())  # fmt: skip
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
            "store_bytes": store_bytes,
            "passes": args.passes,
            "rounds": args.rounds,
            "cold": args.cold,
            "load_average_start_end": [load_start, load()],
        }
        rows = [
            {"what": "harvest throughput", "value": harvest_tps, "baseline": forward_best, "baseline_name": "bare forward", "unit": "tokens/s", "ratio": harvest_tps / forward_best},
            {"what": "harvest throughput", "value": harvest_tps, "baseline": blocks_best, "baseline_name": "forward to the last MLP", "unit": "tokens/s", "ratio": harvest_tps / blocks_best},
        ]  # fmt: skip
        rows += read_rows("local, page cache dropped" if args.cold else "local", local)
        if remote is not None:
            rows += read_rows("S3", remote)
        write_json(
            args.out,
            {"setup": setup, "rows": rows, "harvests": harvests, "forwards": forwards},
        )
        print(
            f"{cfg.n_layers} layers, d_model {cfg.d_model}, {args.rows} tokens of context {T}, on {device}; "
            f"store {store_bytes / 2**20:.0f} MiB; load average {load_start} at the start, {load()} at the end\n"
        )
        print(markdown(rows))
        print(f"\nwrote {args.out}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
