"""The viewer in a real browser: Debian's chromium driven by Playwright against a live uvicorn
server (create_app on a data dir made here: a dense and a sparsified tiny model over the
addition toy's vocabulary, a CLT for each with feature statistics, two graphs of one prompt
made through the API). No stand-ins for the server: every page reads the same /v1 API.

The browser tests are skipped only when /usr/bin/chromium is absent (CI installs it). With SC_VIEWER_SCREENSHOTS=DIR
the tests also write the README's screenshots into DIR.
"""

from __future__ import annotations

import http.server
import math
import os
import socket
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from sparse_circuits.cli import main as cli_main
from sparse_circuits.clt.cltdir import save_clt
from sparse_circuits.clt.model import CLTConfig, CrossLayerTranscoder
from sparse_circuits.server.notebook import GraphView
from sparse_circuits.sparse_attention.hooks import capture
from sparse_circuits.sparse_attention.model import GateConfig, ModelConfig, Transformer
from sparse_circuits.sparse_attention.modeldir import save_model
from sparse_circuits.sparse_attention.toy import addition_tokenizer

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]  # fmt: skip
PROMPT = "<bos>12+34="
SHOTS = os.environ.get("SC_VIEWER_SCREENSHOTS")
WAIT_MS = 30_000  # generous: CI machines and this one are shared


# ----------------------------------------------------------------------------- data dir


def tiny_model(sparse: bool, vocab: int) -> Transformer:
    torch.manual_seed(3)
    cfg = ModelConfig(
        family="gpt2", vocab_size=vocab, n_layers=3, d_model=16, n_heads=2, d_mlp=32,
        context_length=12, bias=True, gate=GateConfig(offset=0.0) if sparse else None,
    )  # fmt: skip
    model = Transformer(cfg)
    with torch.no_grad():  # large weights: peaked patterns, some gates closed
        for name, p in model.named_parameters():
            if p.ndim > 1:
                p.mul_(15.0)
            elif "bias" in name:
                p.normal_(0, 0.1)
    return model.eval()


def tiny_clt(
    model: Transformer, tokens: torch.Tensor, d_features: int = 32
) -> CrossLayerTranscoder:
    """Random weights; encoder biases set from the model's own MLP inputs so features fire."""
    L, M = model.cfg.n_layers, model.cfg.d_model
    torch.manual_seed(4)
    clt = CrossLayerTranscoder(CLTConfig(n_layers=L, d_model=M, d_features=d_features))
    hooks = [f"blocks.{li}.hook_mlp_in" for li in range(L)]
    with torch.no_grad(), capture(model, hooks) as got:
        model(tokens)
    inputs = torch.stack([got[h].flatten(0, 1) for h in hooks], dim=1)  # N,L,M
    with torch.no_grad():
        clt.W_enc.normal_(0, 1 / math.sqrt(M))
        clt.init_from_batch(inputs, inputs, fire_rate=0.4)
        clt.log_threshold.copy_(torch.empty(L, d_features).uniform_(0.05, 0.5).log())
        for W in clt.W_dec:
            W.normal_(0, 0.3)
    return clt


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("viewer")
    tok = addition_tokenizer()
    vocab = tok.get_vocab_size()
    rng = np.random.default_rng(0)
    seqs = rng.integers(1, vocab, size=(24, 12))
    seqs[:, 0] = 0
    np.save(root / "tokens.npy", seqs)
    info = {"feature_input_hook": "blocks.{layer}.hook_mlp_in",
            "feature_output_hook": "blocks.{layer}.hook_mlp_out"}  # fmt: skip
    for name, sparse in (("dense", False), ("sparse", True)):
        model = tiny_model(sparse, vocab)
        save_model(model, root / "models" / name, tokenizer=tok)
        clt = tiny_clt(model, torch.from_numpy(seqs[:8]))
        clt_dir = save_clt(clt, root / "clts" / name, info=info)
        if name == "dense":
            continue  # the feature cards the tests open are the sparse model's
        rc = cli_main(["feature-stats", "--clt", str(clt_dir), "--model", str(root / "models" / name),
                       "--tokens-file", str(root / "tokens.npy"), "--batch-size", "8", "--top-k", "5",
                       "--window", "4", "--histogram-bins", "8", "--device", "cpu"])  # fmt: skip
        assert rc == 0
    return root


# ----------------------------------------------------------------------------- servers


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class HostPages:
    """A second origin (another loopback address) serving host pages that embed the viewer."""

    def __init__(self, host: str):
        pages: dict[str, str] = {}
        self.pages = pages

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                body = pages.get(self.path.split("?")[0], "").encode()
                self.send_response(200 if body else 404)
                self.send_header("Content-Type", "text/html; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer((host, 0), Handler)
        self.origin = f"http://{host}:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def hosts():
    allowed, blocked = HostPages("127.0.0.2"), HostPages("127.0.0.3")
    yield allowed, blocked
    allowed.close()
    blocked.close()


@pytest.fixture(scope="module")
def server(data_dir, hosts):
    import uvicorn

    from sparse_circuits.server.app import create_app
    from sparse_circuits.server.keys import create_key
    from sparse_circuits.server.settings import ServerSettings

    allowed, _ = hosts
    settings = ServerSettings(data_dir=data_dir, frame_ancestors=["'self'", allowed.origin])
    app = create_app(settings)
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not srv.started:
        assert time.time() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.05)
    with app.state.sessionmaker() as session:
        _, secret = create_key(session, name="viewer-test")
    base = f"http://127.0.0.1:{port}"
    api = httpx.Client(base_url=base, headers={"X-API-Key": secret}, timeout=60)
    yield {"base": base, "key": secret, "api": api, "app": app}
    api.close()
    srv.should_exit = True
    thread.join(10)


def _artifact(api: httpx.Client, plural: str, name: str) -> str:
    items = api.get(f"/v1/{plural}").raise_for_status().json()["data"]
    return next(a["id"] for a in items if a["name"] == name)


@pytest.fixture(scope="module")
def graphs(server):
    """The dense and the sparsified model's graphs of one prompt, made through the API."""
    api = server["api"]
    ids = {}
    for name in ("dense", "sparse"):
        body = {"model": _artifact(api, "models", name), "transcoder": _artifact(api, "transcoders", name),
                "prompt": PROMPT, "slug": f"addition-{name}", "qk_edges": 2}  # fmt: skip
        r = api.post("/v1/graphs", json=body)
        assert r.status_code in (201, 202), r.text
        doc = r.json()
        if r.status_code == 202:
            pytest.fail("the tiny graph should fit the inline budget")
        ids[name] = doc["id"]
    return ids


def pruned(server, graph_id: str, node_threshold: float = 0.8, edge_threshold: float = 0.98):
    r = server["api"].get(f"/v1/graphs/{graph_id}/json",
                          params={"node_threshold": node_threshold, "edge_threshold": edge_threshold})  # fmt: skip
    return r.raise_for_status().json()


# ----------------------------------------------------------------------------- browser


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        pytest.skip("Debian's chromium is not installed (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    pg = context.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    pg.set_default_timeout(WAIT_MS)
    yield pg
    context.close()
    assert not errors, errors


def open_graph(page, server, graph_id: str, query: str = ""):
    page.goto(f"{server['base']}/graphs/{graph_id}{query}")
    page.wait_for_function(
        "() => window.__viewer && window.__viewer.ready && window.__viewer.stats.firstDrawAt"
    )


def shot(page, name: str):
    if SHOTS:
        Path(SHOTS).mkdir(parents=True, exist_ok=True)
        page.mouse.move(1, 1)  # no hover tooltip in the picture
        page.wait_for_timeout(300)
        page.screenshot(path=str(Path(SHOTS) / name))


def click_link(page, source: str, target: str):
    """A real mouse click on a point of link source→target that hits it and nothing else."""
    point = page.evaluate(
        """([s, t]) => { for (let k = 1; k < 40; k++) { const f = 0.5 + (k % 2 ? 1 : -1) * Math.floor(k / 2) * 0.02;
             const p = window.__viewer.linkPoint(s, t, f); const h = window.__viewer.hitTest(p.x, p.y);
             if (h && h.link && h.link[0] === s && h.link[1] === t) return p; } return null; }""",
        [source, target],
    )  # fmt: skip
    assert point, f"no point of link {source} -> {target} hits it alone"
    page.mouse.click(point["x"], point["y"])


# ----------------------------------------------------------------------------- tests


def test_graph_page_draws_every_node_and_link_of_the_pruned_json(page, server, graphs):
    doc = pruned(server, graphs["sparse"])
    open_graph(page, server, graphs["sparse"])
    drawn = page.evaluate("() => window.__viewer.drawn")
    assert drawn == {"nodes": len(doc["nodes"]), "links": len(doc["links"])}
    assert page.locator("canvas").get_attribute("data-nodes") == str(len(doc["nodes"]))
    # hovering a node highlights it with its inputs and outputs and names it
    node = next(n for n in doc["nodes"] if n["feature_type"] == "cross layer transcoder")
    p = page.evaluate("(id) => window.__viewer.nodePoint(id)", node["node_id"])
    page.mouse.move(p["x"], p["y"])
    page.locator(".graph-canvas .tip:not([hidden])").wait_for()
    hovered = page.evaluate(
        "() => { const c = window.__viewer.page.canvas; return c.model.nodes[c.hover].node_id; }"
    )
    assert hovered == node["node_id"]
    # the theme follows the system setting
    light = page.evaluate("() => getComputedStyle(document.body).backgroundColor")
    page.emulate_media(color_scheme="dark")
    dark = page.evaluate("() => getComputedStyle(document.body).backgroundColor")
    assert light == "rgb(255, 255, 255)" and dark != light


def test_a_lower_node_threshold_draws_fewer_nodes_and_goes_in_the_url(page, server, graphs):
    gid = graphs["sparse"]
    open_graph(page, server, gid)
    before = page.evaluate("() => window.__viewer.drawn.nodes")
    loads = page.evaluate("() => window.__viewer.loads")
    page.fill("#node-threshold-n", "0.4")
    page.press("#node-threshold-n", "Enter")
    page.wait_for_function(f"() => window.__viewer.loads > {loads} && window.__viewer.ready")
    after = page.evaluate("() => window.__viewer.drawn.nodes")
    expected = len(pruned(server, gid, node_threshold=0.4)["nodes"])
    assert after == expected < before
    assert "node_threshold=0.4" in page.url
    # the URL is the view: reopening it restores the threshold
    page.goto(page.url)
    page.wait_for_function("() => window.__viewer && window.__viewer.ready")
    assert page.evaluate("() => window.__viewer.drawn.nodes") == expected


def test_clicking_a_feature_opens_its_card_with_top_contexts(page, server, graphs):
    gid = graphs["sparse"]
    doc = pruned(server, gid)
    open_graph(page, server, gid)
    feature = next(n for n in doc["nodes"] if n["feature_type"] == "cross layer transcoder")
    p = page.evaluate("(id) => window.__viewer.nodePoint(id)", feature["node_id"])
    page.mouse.click(p["x"], p["y"])
    card = page.locator(f'.node-card[data-node="{feature["node_id"]}"]')
    card.wait_for()
    contexts = card.locator(".top-contexts .context")
    contexts.first.wait_for()
    assert contexts.count() >= 1
    assert card.locator(".tok.active").count() >= 1  # activating tokens highlighted
    assert "% of tokens" in card.locator(".frequency").inner_text()
    assert "selected=" in page.url
    shot(page, "graph-page.png")


def test_a_cross_position_link_shows_head_loadings_summing_to_its_weight(page, server, graphs):
    gid = graphs["sparse"]
    doc = pruned(server, gid)
    link = max(
        (lk for lk in doc["links"] if lk.get("head_loadings")), key=lambda lk: abs(lk["weight"])
    )
    open_graph(page, server, gid)
    click_link(page, link["source"], link["target"])
    card = page.locator(
        f'.link-card[data-source="{link["source"]}"][data-target="{link["target"]}"]'
    )
    card.wait_for()
    values = [float(v) for v in card.locator(".head-loadings .bar-row").evaluate_all("rs => rs.map(r => r.dataset.value)")]  # fmt: skip
    assert len(values) == len(link["head_loadings"])
    assert sum(values) == pytest.approx(link["weight"], rel=1e-3, abs=1e-5)
    assert float(card.get_attribute("data-weight")) == pytest.approx(link["weight"])
    shot(page, "graph-link.png")
    # its heads: a head's card with its share of the graph and the links it carries
    layer, head = link["head_loadings"][0][:2]
    card.locator(".head-loadings button.bar-label").first.click()
    head_card = page.locator(f'.head-card[data-layer="{layer}"][data-head="{head}"]')
    head_card.locator(".head-share").wait_for()
    assert head_card.locator(".bar-row").count() >= 1
    assert page.locator(".heads .bar-row").count() >= 1  # the graph's heads, largest share first


def test_qk_on_demand_and_a_saved_subgraph_with_a_supernode(page, server, graphs):
    gid = graphs["sparse"]
    doc = pruned(server, gid)
    open_graph(page, server, gid)
    page.evaluate("(k) => localStorage.setItem('sparse-circuits.apiKey', k)", server["key"])
    # QK for the head carrying most of a cross-position link, computed on demand
    computed = {(q["layer"], q["head"], q["query_pos"], q["key_pos"]) for q in doc.get("attention", {}).get("qk", [])}  # fmt: skip
    pos = {n["node_id"]: n["ctx_idx"] for n in doc["nodes"]}
    link = next(
        lk for lk in doc["links"]
        if lk.get("head_loadings")
        and (*lk["head_loadings"][0][:2], pos[lk["target"]], pos[lk["source"]]) not in computed
    )  # fmt: skip
    click_link(page, link["source"], link["target"])
    layer, head = link["head_loadings"][0][:2]
    page.locator(f'.compute-qk[data-layer="{layer}"][data-head="{head}"]').click()
    # the first QK loads the graph's model and transcoder on the server
    page.locator(f'.qk[data-layer="{layer}"][data-head="{head}"]').wait_for(timeout=3 * WAIT_MS)
    assert page.locator(".qk .qk-terms tbody tr").count() >= 1
    # pin two nodes, group them, save; a fresh page loads them back
    ids = [n["node_id"] for n in doc["nodes"] if n["feature_type"] == "cross layer transcoder"][:2]
    for node_id in ids:
        page.evaluate("(id) => window.__viewer.page.selectNode(id)", node_id)
        page.locator(f'.node-card[data-node="{node_id}"] button.pin').click()
    page.fill("#supernode-name", "carry")
    page.get_by_role("button", name="Group ungrouped pins").click()
    page.fill("#subgraph-name", "mine")
    page.click("#save-subgraph")
    page.locator(".sg-msg", has_text="Saved").wait_for()
    saved = server["api"].get(f"/v1/graphs/{gid}/subgraphs/mine").raise_for_status().json()
    assert set(saved["pinnedIds"]) == set(ids) and saved["supernodes"] == [["carry", *ids]]
    open_graph(page, server, gid)
    page.fill("#subgraph-name", "mine")
    page.click("#load-subgraph")
    page.locator(".sg-msg", has_text="Loaded").wait_for()
    assert set(page.evaluate("() => window.__viewer.state().pinnedIds")) == set(ids)
    assert page.locator('.supernodes li[data-label="carry"]').count() == 1


def test_keyboard_moves_between_nodes(page, server, graphs):
    open_graph(page, server, graphs["sparse"])
    page.locator("canvas").focus()
    page.keyboard.press("ArrowRight")
    first = page.evaluate("() => window.__viewer.state().selected")
    assert first and first.startswith("E_")  # the bottom row: embeddings
    page.keyboard.press("ArrowRight")
    second = page.evaluate("() => window.__viewer.state().selected")
    page.keyboard.press("ArrowUp")
    third = page.evaluate("() => window.__viewer.state().selected")
    assert len({first, second, third}) == 3 and not third.startswith("E_")
    page.locator(f'.node-card[data-node="{third}"]').wait_for()


HOST_PAGE = """<!doctype html><meta charset="utf-8"><title>host</title>
<iframe id="viewer" src="{src}" style="width:900px;height:600px;border:0"></iframe>
<script>
  window.messages = [];
  window.addEventListener("message", (e) => {{ if (e.data && e.data.source === "sparse-circuits") window.messages.push({{origin: e.origin, ...e.data}}); }});
  window.send = (msg) => document.getElementById("viewer").contentWindow.postMessage(msg, "{origin}");
</script>"""


def test_embedded_on_another_origin_posts_events_and_takes_commands(page, server, graphs, hosts):
    allowed, _ = hosts
    gid = graphs["sparse"]
    doc = pruned(server, gid)
    src = f"{server['base']}/graphs/{gid}?embed=true"
    allowed.pages["/host.html"] = HOST_PAGE.format(src=src, origin=server["base"])
    page.goto(f"{allowed.origin}/host.html")
    page.wait_for_function("() => window.messages.some(m => m.type === 'ready')")
    ready = page.evaluate("() => window.messages.find(m => m.type === 'ready')")
    assert ready["origin"] == server["base"] and ready["nodes"] == len(doc["nodes"])
    frame = page.frame_locator("#viewer")
    assert frame.locator("header.chrome").count() == 0  # no chrome when embedded
    viewer = next(f for f in page.frames if f.url.startswith(server["base"]))
    # a click inside the frame reaches the host as node-selected
    node_id = next(
        n["node_id"] for n in doc["nodes"] if n["feature_type"] == "cross layer transcoder"
    )
    p = viewer.evaluate("(id) => window.__viewer.nodePoint(id)", node_id)
    box = page.locator("#viewer").bounding_box()
    page.mouse.click(box["x"] + p["x"], box["y"] + p["y"])
    page.wait_for_function("() => window.messages.some(m => m.type === 'node-selected')")
    selected = page.evaluate("() => window.messages.find(m => m.type === 'node-selected')")
    assert selected["node_id"] == node_id and selected["graph"] == gid
    # the same messages are commands: the host moves the thresholds and selects a node
    loads = viewer.evaluate("() => window.__viewer.loads")
    page.evaluate("() => window.send({type: 'thresholds-changed', node_threshold: 0.5})")
    viewer.wait_for_function(f"() => window.__viewer.loads > {loads} && window.__viewer.ready")
    assert viewer.evaluate("() => window.__viewer.thresholds.node") == 0.5
    assert viewer.evaluate("() => window.__viewer.drawn.nodes") == len(
        pruned(server, gid, 0.5)["nodes"]
    )
    # the host hands over its key; the frame (whose storage is partitioned) can then write
    page.evaluate("(k) => window.send({type: 'api-key', key: k})", server["key"])
    viewer.fill("#subgraph-name", "from-the-host")
    viewer.click("#save-subgraph")
    viewer.locator(".sg-msg", has_text="Saved").wait_for()
    other = next(n["node_id"] for n in doc["nodes"] if n["feature_type"] == "embedding")
    page.evaluate("(id) => window.send({type: 'node-selected', node_id: id})", other)
    viewer.wait_for_function("(id) => window.__viewer.state().selected === id", arg=other)
    # the user's own threshold change is announced
    viewer.fill("#edge-threshold-n", "0.9")
    viewer.press("#edge-threshold-n", "Enter")
    page.wait_for_function("() => window.messages.some(m => m.type === 'thresholds-changed' && m.edge_threshold === 0.9)")  # fmt: skip


def test_a_frame_ancestor_not_allowed_is_refused(page, server, graphs, hosts):
    _, blocked = hosts
    gid = graphs["sparse"]
    r = server["api"].get(f"/graphs/{gid}?embed=true")
    assert "frame-ancestors" in r.headers["content-security-policy"]
    assert blocked.origin not in r.headers["content-security-policy"]
    src = f"{server['base']}/graphs/{gid}?embed=true"
    blocked.pages["/host.html"] = HOST_PAGE.format(src=src, origin=server["base"])
    page.goto(f"{blocked.origin}/host.html")
    # Chromium refuses the response and shows its error page in the frame instead
    deadline = time.time() + WAIT_MS / 1000
    while not (len(page.frames) > 1 and page.frames[1].url.startswith("chrome-error:")):
        assert time.time() < deadline, [f.url for f in page.frames]
        page.wait_for_timeout(50)
    page.wait_for_timeout(300)
    assert page.evaluate("() => window.messages.length") == 0  # no viewer ran in it


def test_compare_view_shows_both_graphs_with_their_figures(page, server, graphs):
    a, b = graphs["dense"], graphs["sparse"]
    page.goto(f"{server['base']}/compare?a={a}&b={b}")
    page.wait_for_function("() => window.__viewer && window.__viewer.ready")
    figures = page.evaluate("() => window.__viewer.figures")
    for side, gid in (("a", a), ("b", b)):
        doc = pruned(server, gid)
        assert figures[side]["nodes"] == len(doc["nodes"])
        assert 1 <= figures[side]["edges80"] <= len(doc["links"])
    assert page.locator('[data-figure="heads for 80 %"] dd').count() == 2
    shot(page, "compare.png")


def test_feature_and_artifact_pages(page, server, graphs):
    api = server["api"]
    tid = _artifact(api, "transcoders", "sparse")
    doc = pruned(server, graphs["sparse"])
    layer, index, _ = map(int, next(n["node_id"] for n in doc["nodes"] if n["feature_type"] == "cross layer transcoder").split("_"))  # fmt: skip
    page.goto(f"{server['base']}/transcoders/{tid}/features/{layer}/{index}")
    page.locator(".top-contexts .context").first.wait_for()
    page.goto(f"{server['base']}/transcoders/{tid}")
    page.wait_for_function("() => window.__viewer && window.__viewer.ready")
    assert page.locator("h1").inner_text().startswith("transcoder")
    # lineage forwards: the graphs made with it
    page.locator(f'a[href="/graphs/{graphs["sparse"]}"]').wait_for()
    page.goto(f"{server['base']}/models/{_artifact(api, 'models', 'dense')}")
    page.locator(f'a[href="/graphs/{graphs["dense"]}"]').wait_for()


def test_jobs_page_follows_the_queue_live_and_cancels_with_a_key(page, server):
    from sparse_circuits.jobs.queue import claim_job, finish_job, heartbeat

    api, sessions = server["api"], server["app"].state.sessionmaker

    def submit(out):
        body = {"kind": "train-toy", "config": {"out": out, "steps": 200}}
        return api.post("/v1/jobs", json=body).raise_for_status().json()

    page.goto(f"{server['base']}/jobs")
    page.wait_for_function("() => window.__viewer && window.__viewer.ready")
    page.locator(".live", has_text="live").wait_for()
    # a worker's progress (the queue's own heartbeat) shows up live
    running, failed = submit("models/a"), submit("models/b")
    with sessions() as session:
        for job, step in ((running, 50), (failed, 10)):
            claimed = claim_job(session, worker_id="w1", lease_s=600)
            assert claimed.id == job["id"]
            heartbeat(session, job_id=job["id"], worker_id="w1", attempt=1, lease_s=600, step=step, total=200,
                      desc="steps", log_tail=f"step {step}/200 loss 0.{step}")  # fmt: skip
        finish_job(session, job_id=failed["id"], worker_id="w1", attempt=1, state="failed",
                   error="ValueError: the loss became NaN at step 10")  # fmt: skip
    page.locator(f'tr[data-job="{running["id"]}"] progress[value="25.0"]').wait_for()
    with sessions() as session:
        heartbeat(
            session,
            job_id=running["id"],
            worker_id="w1",
            attempt=1,
            lease_s=600,
            step=150,
            total=200,
        )
    page.locator(f'tr[data-job="{running["id"]}"] progress[value="75.0"]').wait_for()
    page.locator(f'tr[data-job="{failed["id"]}"][data-state="failed"] button.retry').wait_for()
    job = submit("models/c")
    row = page.locator(f'tr[data-job="{job["id"]}"]')
    row.wait_for()  # arrived by the event stream, no reload
    row.locator("button.cancel").click()
    page.locator(".notice", has_text="API key").wait_for()  # no key yet: nothing sent
    page.fill("#api-key", server["key"])
    page.press("#api-key", "Tab")
    row.locator("button.cancel").click()
    page.locator(f'tr[data-job="{job["id"]}"][data-state="cancelled"]').wait_for()
    page.locator(f'tr[data-job="{failed["id"]}"] button.retry').click()
    page.locator(f'tr[data-job="{failed["id"]}"][data-state="queued"]').wait_for()
    page.locator(f'tr[data-job="{running["id"]}"] button.mono').click()
    page.locator(".job-detail pre", has_text="step 50/200").wait_for()
    shot(page, "jobs.png")


def test_graph_view_for_notebooks_is_an_iframe_of_the_embedded_page(server, graphs):
    from sparse_circuits.client import Client

    with Client(server["base"]) as client:
        graph = client.graph(graphs["sparse"])
        view = GraphView(client, graph, node_threshold=0.6, pinned=["a", "b"])
    assert (
        view.url
        == f"{server['base']}/graphs/{graphs['sparse']}?embed=true&node_threshold=0.6&pinned=a%2Cb"
    )
    html = view._repr_html_()
    assert html.startswith("<iframe") and "embed=true" in html
    r = httpx.get(view.url)
    assert r.status_code == 200 and 'class="embed"' in r.text


def test_pages_are_html_shells_with_the_frame_policy_and_static_files_stay_inside(server, graphs):
    base, gid = server["base"], graphs["sparse"]
    for path in ("/", f"/graphs/{gid}", f"/compare?a={gid}&b={gid}", "/jobs", "/transcoders/x/features/0/1",
                 "/models/x", "/stores/x", "/transcoders/x"):  # fmt: skip
        r = httpx.get(base + path)
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html"), path
        assert "frame-ancestors 'self' http://127.0.0.2:" in r.headers["content-security-policy"]
        assert '<script type="module" src="/static/js/main.js">' in r.text
    embedded = httpx.get(f"{base}/graphs/{gid}?embed=true").text
    assert 'class="embed"' in embedded and "chrome" not in embedded.split("<body", 1)[1]
    js = httpx.get(f"{base}/static/js/main.js")
    assert js.status_code == 200 and js.headers["content-type"].startswith("text/javascript")
    for bad in ("/static/js/nope.js", "/static/%2e%2e/routes/pages.py", "/static/..%2f..%2fapp.py"):
        assert httpx.get(base + bad).status_code == 404, bad
