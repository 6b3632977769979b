"""The service under load on loopback, beside plain static file servers, in one run.

1. Fetch: one ~5,000-node graph JSON (a pruning built by the server from the compact graph store,
   then served from its cache) at 50 concurrent clients for `--duration` seconds, against the
   same bytes from two plain static file servers (Starlette's StaticFiles under uvicorn, and
   Python's http.server): requests/s, p50 and p99 latency, and the service's requests/s as a
   fraction of the faster static server's (aim: at least 0.5). Rounds alternate static / service,
   so that a neighbour's load on a shared machine hits both alike; the table gives the median
   round of each.
2. Create: `--create` graph creation requests sent at once to a server with one worker of
   concurrency 1 and an inline budget of 0 (each one queued as a job, all past the worker
   count): every answer 202, none 5xx, every job succeeds and every graph is then fetchable.

The load generator is `wrk` (Debian's package) when installed, else an httpx asyncio client
(`--load httpx`). The graph is made here: a random 2-layer model, a random JumpReLU CLT whose
features fire on `--fire-rate` of the model's own tokens, and the `attribute` stage on a
`--positions`-token prompt with `--max-feature-nodes` rows, written as a graph store in the data
dir (registered by the server's scan at start).

Run from the repository root:
    python benchmarks/bench_server.py                  # ~3 min on 2 CPU cores
Writes benchmarks/results/server.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "sparse_circuits.cli"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------- the graph


def build_data_dir(root: Path, args) -> None:
    """A model, a CLT and one graph store of about `--max-feature-nodes` features under root."""
    import torch  # noqa: PLC0415  (only the build needs it)

    from sparse_circuits.attribution.attribute import AttributeConfig, run_attribute  # noqa: PLC0415
    from sparse_circuits.clt.cltdir import save_clt  # noqa: PLC0415
    from sparse_circuits.clt.model import CLTConfig, CrossLayerTranscoder  # noqa: PLC0415
    from sparse_circuits.sparse_attention.hooks import capture  # noqa: PLC0415
    from sparse_circuits.sparse_attention.model import ModelConfig, Transformer  # noqa: PLC0415
    from sparse_circuits.sparse_attention.modeldir import save_model  # noqa: PLC0415

    if (root / "graphs" / "bench-5k" / "meta.json").is_file():
        return
    T, L, vocab = args.positions, 2, 128
    torch.manual_seed(0)
    cfg = ModelConfig(family="gpt2", vocab_size=vocab, n_layers=L, d_model=32, n_heads=2,
                      d_mlp=64, context_length=T, bias=True, bos_token_id=0)  # fmt: skip
    model = Transformer(cfg).eval()
    with torch.no_grad():  # weights large enough for peaked patterns
        for p in model.parameters():
            if p.ndim > 1:
                p.mul_(10.0)
    save_model(model, root / "models" / "bench")
    names = [f"blocks.{i}.hook_mlp_{x}" for i in range(L) for x in ("in", "out")]
    with torch.no_grad(), capture(model, names) as got:
        model(torch.randint(1, vocab, (16, T)))
    x = torch.stack([got[f"blocks.{i}.hook_mlp_in"].flatten(0, 1) for i in range(L)], dim=1)
    y = torch.stack([got[f"blocks.{i}.hook_mlp_out"].flatten(0, 1) for i in range(L)], dim=1)
    clt = CrossLayerTranscoder(CLTConfig(n_layers=L, d_model=32, d_features=args.d_features))
    with torch.no_grad():
        clt.init_from_batch(x, y, fire_rate=args.fire_rate)
    save_clt(clt, root / "clts" / "bench")
    prompt = [0] + torch.randint(
        1, vocab, (T - 1,), generator=torch.Generator().manual_seed(1)
    ).tolist()
    run_attribute(AttributeConfig(
        model=root / "models" / "bench", clt=root / "clts" / "bench", prompt_ids=prompt,
        store_dir=root / "graphs" / "bench-5k", slug="bench-5k", bos=False, device="cpu",
        max_feature_nodes=args.max_feature_nodes, node_threshold=1.0, edge_threshold=0.98,
        attention=False,
    ))  # fmt: skip


# ----------------------------------------------------------------------------- servers


class Server:
    """A subprocess serving HTTP on loopback; stopped (SIGINT, then SIGKILL) on exit."""

    def __init__(self, argv: list[str], port: int, ready_path: str, env=None):
        self.port, self.url = port, f"http://127.0.0.1:{port}"
        self.proc = subprocess.Popen(argv, env=env, start_new_session=True)
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(self.url + ready_path, timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{argv} did not start")
            time.sleep(0.3)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def service(data: Path, env: dict, *extra: str) -> Server:
    port = free_port()
    argv = [*CLI, "serve", "--data-dir", str(data), "--port", str(port), "--log-level", "warning",
            *extra]  # fmt: skip
    return Server(argv, port, "/readyz", env)


STATIC_APP = """
import sys, uvicorn
from starlette.applications import Starlette
from starlette.routing import Mount
from starlette.staticfiles import StaticFiles
app = Starlette(routes=[Mount("/", StaticFiles(directory=sys.argv[1]))])
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[2]), log_level="warning")
"""


def static_servers(directory: Path, env: dict) -> dict[str, Server]:
    p1, p2 = free_port(), free_port()
    starlette = Server([sys.executable, "-c", STATIC_APP, str(directory), str(p1)], p1,
                       "/graph.json", env)  # fmt: skip
    plain = Server([sys.executable, "-m", "http.server", str(p2), "--bind", "127.0.0.1",
                    "--directory", str(directory)], p2, "/graph.json", env)  # fmt: skip
    return {"uvicorn StaticFiles": starlette, "python http.server": plain}


# ----------------------------------------------------------------------------- load


def load_wrk(url: str, concurrency: int, duration: float, threads: int) -> dict:
    out = subprocess.run(
        ["wrk", "-t", str(threads), "-c", str(concurrency), "-d", f"{duration:g}s", "--latency",
         "--timeout", "30s", url],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip

    def ms(text: str) -> float:
        value, unit = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text).groups()
        return float(value) * {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 6e4}[unit]

    p50 = re.search(r"^\s+50%\s+(\S+)", out, re.M).group(1)
    p99 = re.search(r"^\s+99%\s+(\S+)", out, re.M).group(1)
    total = int(re.search(r"(\d+) requests in", out).group(1))
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: (.*)", out)
    return {
        "requests_per_s": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
        "p50_ms": ms(p50), "p99_ms": ms(p99), "requests": total,
        "non_2xx": int(bad.group(1)) if bad else 0,
        "socket_errors": errors.group(1) if errors else None,
    }  # fmt: skip


def load_httpx(url: str, concurrency: int, duration: float, _threads: int) -> dict:
    async def run() -> dict:
        latencies, bad = [], 0
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        async with httpx.AsyncClient(limits=limits, timeout=30) as client:
            end = time.perf_counter() + duration

            async def one_client():
                nonlocal bad
                while time.perf_counter() < end:
                    t0 = time.perf_counter()
                    r = await client.get(url)
                    await r.aread()
                    latencies.append(time.perf_counter() - t0)
                    bad += r.status_code != 200

            t0 = time.perf_counter()
            await asyncio.gather(*(one_client() for _ in range(concurrency)))
            elapsed = time.perf_counter() - t0
        latencies.sort()
        q = lambda f: 1e3 * latencies[min(len(latencies) - 1, int(f * len(latencies)))]  # noqa: E731
        return {"requests_per_s": len(latencies) / elapsed, "p50_ms": q(0.5), "p99_ms": q(0.99),
                "requests": len(latencies), "non_2xx": bad, "socket_errors": None}  # fmt: skip

    return asyncio.run(run())


# ----------------------------------------------------------------------------- the two parts


def fetch_part(data: Path, env: dict, args, load) -> dict:
    with service(data, env, "--no-worker") as api:
        graphs = httpx.get(api.url + "/v1/graphs").json()["data"]
        graph = next(g for g in graphs if g["slug"] == "bench-5k")
        url = f"{api.url}/v1/graphs/{graph['id']}/json?node_threshold=1.0&edge_threshold=0.98"
        t0 = time.perf_counter()
        first = httpx.get(url, timeout=300)
        first.raise_for_status()
        build_s = time.perf_counter() - t0
        doc = first.json()
        static_dir = Path(tempfile.mkdtemp(prefix="bench-static-"))
        (static_dir / "graph.json").write_bytes(first.content)
        figures = {"graph": {"id": graph["id"], "nodes": len(doc["nodes"]),
                             "links": len(doc["links"]), "bytes": len(first.content),
                             "first_fetch_s": round(build_s, 3)}}  # fmt: skip
        print(f"graph: {figures['graph']}", flush=True)
        rounds: dict[str, list[dict]] = {}
        statics = static_servers(static_dir, env)
        try:
            for _ in range(args.rounds):
                for name, srv in statics.items():
                    got = load(
                        srv.url + "/graph.json", args.concurrency, args.duration, args.wrk_threads
                    )
                    rounds.setdefault(name, []).append(got)
                    print(f"{name}: {got}", flush=True)
                got = load(url, args.concurrency, args.duration, args.wrk_threads)
                rounds.setdefault("service", []).append(got)
                print(f"service: {got}", flush=True)
        finally:
            for srv in statics.values():
                srv.stop()
            shutil.rmtree(static_dir, ignore_errors=True)
        same = httpx.get(url).content == (first.content)
    median = {
        name: min(rs, key=lambda r: abs(r["requests_per_s"] - statistics.median(x["requests_per_s"] for x in rs)))
        for name, rs in rounds.items()
    }  # fmt: skip
    best_static = max(
        (n for n in median if n != "service"), key=lambda n: median[n]["requests_per_s"]
    )
    figures.update({
        "rounds": rounds, "median": median, "same_bytes": same,
        "faster_static": best_static,
        "ratio": median["service"]["requests_per_s"] / median[best_static]["requests_per_s"],
        "ratio_per_static": {n: median["service"]["requests_per_s"] / median[n]["requests_per_s"]
                             for n in median if n != "service"},
    })  # fmt: skip
    return figures


def create_part(data: Path, env: dict, args) -> dict:
    key = subprocess.run([*CLI, "keys", "create", "bench", "--data-dir", str(data)],
                         capture_output=True, text=True, check=True, env=env)  # fmt: skip
    secret = key.stdout.strip().splitlines()[-1]
    headers = {"X-API-Key": secret}
    extra = ["--inline-graph-budget-s", "0", "--concurrency", "1",
             "--max-active-jobs-per-key", str(args.create + 1)]  # fmt: skip
    with service(data, env, *extra) as api:
        models = httpx.get(api.url + "/v1/models").json()["data"]
        clts = httpx.get(api.url + "/v1/transcoders").json()["data"]
        model = next(m for m in models if m["name"] == "bench")
        clt = next(c for c in clts if c["name"] == "bench")

        async def create_all():
            async with httpx.AsyncClient(base_url=api.url, headers=headers, timeout=60) as c:
                bodies = [
                    {"model": model["id"], "transcoder": clt["id"], "max_feature_nodes": 64,
                     "prompt_ids": [0] + [(7 * i + j) % 127 + 1 for j in range(15)],
                     "slug": f"queued-{i}"}
                    for i in range(args.create)
                ]  # fmt: skip
                return await asyncio.gather(*(c.post("/v1/graphs", json=b) for b in bodies))

        t0 = time.perf_counter()
        answers = asyncio.run(create_all())
        submit_s = time.perf_counter() - t0
        statuses = [r.status_code for r in answers]
        print(f"create: statuses {statuses} in {submit_s:.2f} s", flush=True)
        queued = [r.json() for r in answers if r.status_code == 202]
        states, fetched, max_running = {}, 0, 0
        deadline = time.monotonic() + args.create_timeout
        while time.monotonic() < deadline:
            jobs = [httpx.get(f"{api.url}/v1/jobs/{q['job']['id']}").json() for q in queued]
            states = {j["id"]: j["state"] for j in jobs}
            max_running = max(max_running, sum(s == "running" for s in states.values()))
            if all(s in ("succeeded", "failed", "cancelled") for s in states.values()):
                break
            time.sleep(0.5)
        done_s = time.perf_counter() - t0
        for q in queued:
            r = httpx.get(f"{api.url}/v1/graphs/{q['graph_id']}/json", timeout=60)
            fetched += r.status_code == 200 and bool(r.json().get("nodes"))
    figures = {
        "requests": args.create, "worker_concurrency": 1, "statuses": statuses,
        "server_errors": sum(s >= 500 for s in statuses), "queued": len(queued),
        "succeeded": sum(s == "succeeded" for s in states.values()),
        "lost": args.create - sum(s == "succeeded" for s in states.values()),
        "max_running_seen": max_running, "graphs_fetched": fetched,
        "submit_s": round(submit_s, 3), "all_done_s": round(done_s, 1),
    }  # fmt: skip
    print(f"create: {figures}", flush=True)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=None, help="data dir (kept; default: temp)")
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per load round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--load", choices=["wrk", "httpx"], default=None)
    parser.add_argument("--wrk-threads", type=int, default=2)
    parser.add_argument("--positions", type=int, default=64)
    parser.add_argument("--d-features", type=int, default=512)
    parser.add_argument("--fire-rate", type=float, default=0.2)
    parser.add_argument("--max-feature-nodes", type=int, default=5000)
    parser.add_argument("--create", type=int, default=6, help="graph creation requests at once")
    parser.add_argument("--create-timeout", type=float, default=600)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "server.json")
    args = parser.parse_args()
    load_name = args.load or ("wrk" if shutil.which("wrk") else "httpx")
    load = load_wrk if load_name == "wrk" else load_httpx
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-server-"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    build_data_dir(work, args)
    build_s = time.perf_counter() - t0
    fetch = fetch_part(work, env, args, load)
    create = create_part(work, env, args)
    result = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version()},
        "load_generator": load_name, "concurrency": args.concurrency,
        "duration_s": args.duration, "rounds": args.rounds, "build_s": round(build_s, 1),
        "fetch": fetch, "create": create,
        "command": "python benchmarks/bench_server.py " + " ".join(sys.argv[1:]),
    }  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    g, m = fetch["graph"], fetch["median"]
    print(f"\ngraph JSON: {g['nodes']} nodes, {g['links']} links, {g['bytes'] / 1e6:.2f} MB; "
          f"{args.concurrency} concurrent clients, {args.duration:g} s x {args.rounds} rounds "
          f"({load_name}), median round\n")  # fmt: skip
    print("| server | requests/s | p50 ms | p99 ms | non-2xx |")
    print("|---|---|---|---|---|")
    for name, r in m.items():
        print(f"| {name} | {r['requests_per_s']:.1f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} "
              f"| {r['non_2xx']} |")  # fmt: skip
    print(f"\nservice / {fetch['faster_static']}: {fetch['ratio']:.2f} (aim >= 0.5)")
    print(f"create: {create['requests']} requests past 1 worker: statuses {create['statuses']}, "
          f"{create['succeeded']} succeeded, {create['lost']} lost, {create['server_errors']} 5xx, "
          f"all done in {create['all_done_s']} s")  # fmt: skip
    print(f"wrote {args.out}")
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
