"""The graph page in headless Chromium: time to first render and frame time while panning, for
pruned graphs of 500, 2,000 and 5,000 nodes (ten links per node: 5k, 20k, 50k links).

The graphs are synthetic graph JSON v1 documents (12 layers, 32 positions, errors, embeddings,
logits, head loadings on cross-position links), served by the real page routes and static
assets with the two /v1 graph reads answered from memory, so the figures are the viewer's own:
HTML, modules, the JSON fetch and parse, layout and drawing.

    first render   navigation start to the end of the first complete canvas draw
    CPU time       what chromium's processes and the server used over that span: near the
                   wall time an idle machine would see (this one is shared: see load avg)
    draw           time of one draw() (every link and node) while the mouse pans the graph
    frame          interval between animation frames while panning (60 Hz = 16.7 ms)

Run from the repository root (Debian's chromium at /usr/bin/chromium):
    python benchmarks/bench_viewer.py [--sizes 500 2000 5000] [--repeats 3]
Writes benchmarks/results/bench_viewer.json and prints a markdown table. Aim: first render
<= 1 s at 2,000 nodes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import socket
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import uvicorn  # noqa: E402
from fastapi import FastAPI  # noqa: E402

from sparse_circuits.server.routes import pages  # noqa: E402
from sparse_circuits.server.settings import ServerSettings  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]  # fmt: skip
L, T, H, LINKS_PER_NODE = 12, 32, 8, 10


def synthetic_graph(n_nodes: int, seed: int = 0) -> dict:
    """A graph JSON v1 document of n_nodes nodes and 10 * n_nodes links."""
    rng = random.Random(seed)
    tokens = [f"tok{p}" for p in range(T)]
    nodes = []

    def node(node_id, feature, layer, pos, kind, **extra):
        nodes.append({"node_id": node_id, "feature": feature, "layer": layer, "ctx_idx": pos,
                      "feature_type": kind, "jsNodeId": node_id, "clerp": "",
                      "influence": rng.random(), **extra})  # fmt: skip

    for p in range(T):
        node(f"E_{p}_{p}", p, "E", p, "embedding")
    for k in range(5):
        node(f"{L + 1}_{k}_{T - 1}", k, str(L + 1), T - 1, "logit", clerp=f'Output "t{k}" (p=0.1)')
    for layer in range(L):
        for p in range(T):
            node(f"{layer}_-1_{p}", -1, str(layer), p, "mlp reconstruction error")
    index = 0
    while len(nodes) < n_nodes:
        layer = rng.randrange(L)
        pos = min(T - 1, int(T * rng.random() ** 0.5))  # later positions hold more
        node(f"{layer}_{index}_{pos}", index, str(layer), pos, "cross layer transcoder",
             activation=rng.random() * 3)  # fmt: skip
        index += 1

    def row(n):
        if n["layer"] == "E":
            return -1
        return int(n["layer"])

    by_row: dict[int, list[dict]] = {}
    for n in nodes:
        by_row.setdefault(row(n), []).append(n)
    links, seen = [], set()
    targets = [n for n in nodes if n["layer"] != "E"]
    while len(links) < LINKS_PER_NODE * n_nodes:
        t = rng.choice(targets)
        r = rng.randrange(-1, min(row(t), L))
        cands = by_row.get(r)
        if not cands:
            continue
        s = rng.choice(cands)
        if s["ctx_idx"] > t["ctx_idx"] or (s["node_id"], t["node_id"]) in seen:
            continue
        seen.add((s["node_id"], t["node_id"]))
        w = round(rng.gauss(0, 1) * rng.random() ** 2, 6)
        link = {"source": s["node_id"], "target": t["node_id"], "weight": w}
        if s["ctx_idx"] != t["ctx_idx"]:
            a = round(w * rng.random(), 6)
            link["head_loadings"] = [[rng.randrange(L), rng.randrange(H), a],
                                     [rng.randrange(L), rng.randrange(H), round(w - a, 6)]]  # fmt: skip
        links.append(link)
    meta = {"slug": f"synthetic-{n_nodes}", "scan": "synthetic", "prompt": "".join(tokens),
            "prompt_tokens": tokens, "schema_version": 1}  # fmt: skip
    qparams = {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "", "sg_pos": ""}
    return {"metadata": meta, "qParams": qparams, "nodes": nodes, "links": links}


def make_app(docs: dict[str, dict]) -> FastAPI:
    app = FastAPI()
    app.state.settings = ServerSettings(data_dir=Path("/nonexistent"))
    app.include_router(pages.router)
    bodies = {k: json.dumps(v, separators=(",", ":")) for k, v in docs.items()}

    @app.get("/v1/graphs/{graph_id}")
    def graph(graph_id: str):
        m = docs[graph_id]["metadata"]
        return {"id": graph_id, "slug": m["slug"], "prompt": m["prompt"], "transcoder_id": None}

    @app.get("/v1/graphs/{graph_id}/subgraphs")
    def subgraphs(graph_id: str):
        return []

    @app.get("/v1/graphs/{graph_id}/json")
    def graph_json(graph_id: str):
        from fastapi.responses import Response  # noqa: PLC0415

        return Response(bodies[graph_id], media_type="application/json")

    return app


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(app: FastAPI) -> tuple[uvicorn.Server, str]:
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    return server, f"http://127.0.0.1:{port}"


def chromium_cpu_s() -> float:
    """CPU seconds used so far by the chromium processes under this one (Linux /proc)."""
    parent, stat = {}, {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            text = (d / "stat").read_text()
        except OSError:
            continue
        comm = text[text.index("(") + 1 : text.rindex(")")]
        fields = text[text.rindex(")") + 2 :].split()
        parent[int(d.name)] = int(fields[1])
        stat[int(d.name)] = (comm, (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK"))
    me, total = os.getpid(), 0.0
    for pid, (comm, cpu) in stat.items():
        p = pid
        while p in parent and p not in (me, 0, 1):
            p = parent[p]
        if p == me and comm.startswith(("chrom", "headless")):
            total += cpu
    return total


def measure(page, base: str, graph_id: str, n_nodes: int, pan_steps: int) -> dict:
    cpu0, own0 = chromium_cpu_s(), time.process_time()
    page.goto(f"{base}/graphs/{graph_id}", wait_until="commit")
    page.wait_for_function(
        "() => window.__viewer && window.__viewer.ready && window.__viewer.stats.firstDrawAt"
    )
    cpu = chromium_cpu_s() - cpu0 + time.process_time() - own0
    first = page.evaluate("() => window.__viewer.stats.firstDrawAt")
    marks = page.evaluate("""() => { const n = performance.getEntriesByType("navigation")[0];
      const out = {html: n.responseEnd, dom: n.domContentLoadedEventEnd};
      for (const m of performance.getEntriesByType("mark")) if (m.name.startsWith("viewer:")) out[m.name.slice(7)] = m.startTime;
      return out; }""")  # fmt: skip
    drawn = page.evaluate("() => window.__viewer.drawn")
    assert drawn["nodes"] == n_nodes, drawn
    box = page.evaluate("() => { const r = window.__viewer.page.canvas.canvas.getBoundingClientRect(); return [r.left, r.top, r.width, r.height]; }")  # fmt: skip
    page.evaluate("""() => { const v = window.__viewer; v.stats.drawMs.length = 0; window.__frames = [];
      let last = performance.now(); window.__panning = true;
      const tick = (t) => { window.__frames.push(t - last); last = t; if (window.__panning) requestAnimationFrame(tick); };
      requestAnimationFrame(tick); }""")  # fmt: skip
    x0, y0 = (
        box[0] + box[2] * 0.35,
        box[1] + box[3] * 0.1,
    )  # above the nodes' rows: a pan, not a click
    page.mouse.move(x0, y0)
    page.mouse.down()
    for i in range(1, pan_steps + 1):
        page.mouse.move(x0 + 300 * (i / pan_steps), y0 + 40 * ((i % 10) / 10))
    page.mouse.up()
    page.wait_for_timeout(100)
    draws, frames = page.evaluate(
        "() => { window.__panning = false; return [window.__viewer.stats.drawMs.slice(), window.__frames.slice(2)]; }"
    )
    return {
        "nodes": n_nodes,
        "links": page.evaluate("() => window.__viewer.linkCount"),
        "first_render_ms": round(first, 1),
        "first_render_cpu_ms": round(1000 * cpu, 1),
        "phases_ms": {k: round(v, 1) for k, v in marks.items()},
        "draws": len(draws),
        "draw_ms_median": round(statistics.median(draws), 2),
        "draw_ms_p95": round(sorted(draws)[int(0.95 * (len(draws) - 1))], 2),
        "frame_ms_median": round(statistics.median(frames), 2) if frames else None,
        "frame_ms_p95": round(sorted(frames)[int(0.95 * (len(frames) - 1))], 2) if frames else None,
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[500, 2000, 5000])
    ap.add_argument("--repeats", type=int, default=3, help="Page loads per size (median kept).")
    ap.add_argument("--pan-steps", type=int, default=120, help="Mouse moves in one pan.")
    args = ap.parse_args(argv)
    from playwright.sync_api import sync_playwright  # noqa: PLC0415

    if not Path(CHROMIUM).exists():
        sys.exit(f"{CHROMIUM} not found: apt-get install chromium")
    docs = {f"g{n}": synthetic_graph(n) for n in args.sizes}
    server, base = serve(make_app(docs))
    rows = []
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            measure(page, base, f"g{args.sizes[0]}", args.sizes[0], 10)  # warm the caches
            for n in args.sizes:
                runs = [
                    measure(page, base, f"g{n}", n, args.pan_steps) for _ in range(args.repeats)
                ]
                best = sorted(runs, key=lambda r: r["first_render_ms"])[len(runs) // 2]
                best["json_bytes"] = len(json.dumps(docs[f"g{n}"], separators=(",", ":")))
                best["first_render_ms_all"] = [r["first_render_ms"] for r in runs]
                best["first_render_cpu_ms_all"] = [r["first_render_cpu_ms"] for r in runs]
                best["load_average"] = os.getloadavg()[0]
                rows.append(best)
                print(f"{n} nodes: {best}", file=sys.stderr)
            version = browser.version
            browser.close()
    finally:
        server.should_exit = True
    result = {
        "chromium": version,
        "machine": platform.platform(),
        "viewport": [1280, 800],
        "rows": rows,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "bench_viewer.json").write_text(json.dumps(result, indent=1))
    print(f"Chromium {version}, viewport 1280x800, headless, software rendering\n")
    print("| nodes | links | JSON | first render (wall) | its CPU time (chromium + server) | load avg | "
          "draw (median / p95) | frame while panning (median / p95) |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['nodes']:,} | {r['links']:,} | {r['json_bytes'] / 1e6:.1f} MB | {r['first_render_ms']:.0f} ms | "
              f"{r['first_render_cpu_ms']:.0f} ms | {r['load_average']:.1f} | "
              f"{r['draw_ms_median']:.1f} / {r['draw_ms_p95']:.1f} ms | {r['frame_ms_median']} / {r['frame_ms_p95']} ms |")  # fmt: skip
    return result


if __name__ == "__main__":
    main()
