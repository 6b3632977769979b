"""`quickstart`: the whole pipeline on the addition toy, in one data dir, then serve it.

train-toy → sparsify → harvest → train-clt → eval-clt → attribute (two prompts). Before each
stage quickstart asks whether that stage's artifact is complete (each stage writes its
completion marker last): a complete one is skipped, an incomplete one resumed, so rerunning
the command continues a killed run.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

from pydantic import BaseModel, ConfigDict, Field, model_validator

from .config import DEVICE_HELP, Device
from .errors import RunDirError
from .io import acquire_lock, read_json, released_locks, run_complete, write_json

log = logging.getLogger(__name__)

PROMPTS = ("36+47=", "58+67=")  # graphs of the first answer digit: 0 (083) and 1 (125)
LAYOUT_FILE = "quickstart.json"  # marks a data dir as a quickstart's
LAYOUT = {LAYOUT_FILE, ".lock", "models", "activations", "clts", "graphs"}
LAYOUT_FORMAT = "sparse-circuits-quickstart"


class QuickstartConfig(BaseModel):
    """`quickstart`: train the toy model, sparsify it, record activations, train and evaluate a
    CLT on them, compute two attribution graphs, then serve the data dir."""

    model_config = ConfigDict(extra="forbid")
    data_dir: Path = Field(
        Path("sparse-circuits-data"),
        description="Where every stage writes its artifact (new, empty, or a quickstart's own).",
    )
    serve: bool = Field(True, description="Serve the results when the pipeline is done.")
    host: str = Field("127.0.0.1", description="Address to serve on.")
    port: int = Field(8000, gt=0, lt=65536, description="Port to serve on.")
    device: Device = Field("auto", description=DEVICE_HELP)

    @model_validator(mode="before")
    @classmethod
    def _no_serve(cls, data: Any) -> Any:
        """`no_serve: true` (the older spelling, in config files and jobs) means serve: false."""
        if isinstance(data, dict) and "no_serve" in data:
            data = dict(data)
            data.setdefault("serve", not data.pop("no_serve"))
        return data


class Paths(NamedTuple):
    root: Path
    dense: Path
    sparse: Path
    acts: Path
    clt: Path
    graphs: tuple[Path, ...]


def paths(root: Path) -> Paths:
    return Paths(
        root=root,
        dense=root / "models" / "addition-dense",
        sparse=root / "models" / "addition-sparse",
        acts=root / "activations" / "addition-sparse.zarr",
        clt=root / "clts" / "addition-sparse",
        graphs=tuple(root / "graphs" / f"addition-{p.rstrip('=')}.json" for p in PROMPTS),
    )


def claim_data_dir(root: Path) -> None:
    """Refuse a data dir that holds anything but a quickstart's layout; mark and lock it."""
    if root.exists() and not root.is_dir():
        raise RunDirError(f"--data-dir {root} is a file; name a directory")
    if root.is_dir():
        marker = root / LAYOUT_FILE
        foreign = sorted(p.name for p in root.iterdir() if p.name not in LAYOUT)
        if foreign or (marker.exists() and read_json(marker).get("format") != LAYOUT_FORMAT):
            what = ", ".join(foreign[:5]) or LAYOUT_FILE
            raise RunDirError(
                f"--data-dir {root} holds something other than a quickstart's data ({what}); "
                "choose a new or empty directory"
            )
    root.mkdir(parents=True, exist_ok=True)
    acquire_lock(root / ".lock")
    if not (root / LAYOUT_FILE).exists():
        write_json(root / LAYOUT_FILE, {"format": LAYOUT_FORMAT, "version": 1})


class Step(NamedTuple):
    title: str
    estimate: str  # on 2 idle CPU cores
    done: Callable[[], bool]
    run: Callable[[], object]


def _steps(p: Paths, device: str) -> list[Step]:
    # Stage imports are heavy: only this command pays for all of them.
    from .attribution.attribute import AttributeConfig, is_graph_json, run_attribute  # noqa: PLC0415
    from .clt.evaluate import EvalCLTConfig, eval_clt  # noqa: PLC0415
    from .clt.harvest import HarvestConfig, harvest  # noqa: PLC0415
    from .clt.store import store_complete  # noqa: PLC0415
    from .clt.train import DEFAULT_EXPANSION, DEFAULT_K, TrainCLTConfig, train_clt  # noqa: PLC0415
    from .sparse_attention.sparsify import SparsifyConfig, sparsify  # noqa: PLC0415
    from .sparse_attention.train import ToyTrainConfig, train_toy  # noqa: PLC0415

    def evaluated() -> bool:
        return run_complete(p.clt) and "spliced_ce_delta" in read_json(p.clt / "metrics.json")

    def attribute_all() -> None:
        for prompt, graph in zip(PROMPTS, p.graphs, strict=True):
            if not is_graph_json(graph):
                run_attribute(
                    AttributeConfig(model=p.sparse, clt=p.clt, prompt=prompt, out=graph, device=device)
                )  # fmt: skip

    return [
        Step("train-toy: a dense 4-layer model on 2-digit addition", "~3 min",
             lambda: run_complete(p.dense),
             lambda: train_toy(ToyTrainConfig(out=p.dense, device=device))),
        Step("sparsify: sparse attention post-training", "~6-9 min",
             lambda: run_complete(p.sparse),
             lambda: sparsify(SparsifyConfig(model=p.dense, out=p.sparse, device=device))),
        Step("harvest: the sparsified model's MLP inputs and outputs into zarr", "<1 min",
             lambda: store_complete(str(p.acts)),
             lambda: harvest(HarvestConfig(model=p.sparse, out=str(p.acts), device=device))),
        Step(f"train-clt: a cross-layer transcoder (defaults: BatchTopK, k = {DEFAULT_K}, "
             f"up to {DEFAULT_EXPANSION} × d_model features a layer)", "~3 min",
             lambda: run_complete(p.clt),
             lambda: train_clt(TrainCLTConfig(activations=str(p.acts), out=p.clt, device=device))),
        Step("eval-clt: reconstruction, and the model with its MLPs replaced", "<1 min",
             evaluated,
             lambda: eval_clt(EvalCLTConfig(clt=p.clt, model=p.sparse, device=device))),
        Step(f"attribute: graphs of {' and '.join(PROMPTS)}", "<1 min",
             lambda: all(is_graph_json(g) for g in p.graphs),
             attribute_all),
    ]  # fmt: skip


def _minutes(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min"


def summary(p: Paths, seconds: float) -> list[str]:
    """The closing lines: what was made, its key figures, and what to try next."""
    sparse, clt = read_json(p.sparse / "metrics.json"), read_json(p.clt / "metrics.json")
    dense = read_json(p.dense / "metrics.json")

    def f(d: dict, key: str, fmt: str = "{:.3f}") -> str:
        return fmt.format(d[key]) if isinstance(d.get(key), int | float) else "?"

    pct = "{:.1%}"
    return [
        f"quickstart done in {_minutes(seconds)}; everything is under {p.root}",
        f"  dense model     {p.dense}: held-out accuracy {f(dense, 'accuracy', pct)}",
        f"  sparse model    {p.sparse}: accuracy {f(sparse, 'accuracy', pct)}, connectivity "
        f"{f(sparse, 'connectivity', '{:.2%}')} of causal pairs, "
        f"{f(sparse, 'keys_per_query', '{:.2f}')} keys per query",
        f"  attention       {p.sparse / 'attention_patterns.png'} (dense against sparse)",
        f"  CLT             {p.clt}: FVU {f(clt, 'fvu')}, L0 {f(clt, 'l0', '{:.1f}')}, "
        f"spliced CE delta {f(clt, 'spliced_ce_delta', '{:.4f}')}",
        *(f"  graph           {g}" for g in p.graphs),
        "next: a graph of your own sum (two 2-digit numbers, then '='; BOS is added for you):",
        f'  sparse-circuits attribute --model {p.sparse} --clt {p.clt} --prompt "12+34=" '
        f"--out {p.root / 'graphs' / 'addition-12+34.json'}",
    ]


def serve(root: Path, host: str, port: int) -> None:
    try:
        from .server.cli import serve_data_dir  # noqa: PLC0415  (the service is optional here)
    except ImportError as e:
        log.warning(
            "the server is not installed (%s): start it later with `sparse-circuits serve "
            "--data-dir %s`",
            e,
            root,
        )
        return
    log.info("serving %s on http://%s:%d (Ctrl-C stops)", root, host, port)
    try:
        serve_data_dir(root, host, port)
    except KeyboardInterrupt:
        pass
    log.info("stopped serving; `sparse-circuits serve --data-dir %s` serves it again", root)


def quickstart(cfg: QuickstartConfig) -> Path:
    p = paths(cfg.data_dir)
    started = time.perf_counter()
    with released_locks():
        claim_data_dir(p.root)
        steps = _steps(p, cfg.device)
        log.info(
            "quickstart into %s: %d stages, ~12 min on 2 idle CPU cores (less on a GPU); "
            "Ctrl-C and rerun to resume",
            p.root,
            len(steps),
        )
        for k, step in enumerate(steps, 1):
            head = f"stage {k}/{len(steps)}: {step.title}"
            if step.done():
                log.info("%s: already done, skipping", head)
                continue
            log.info("%s (%s on 2 idle CPU cores)", head, step.estimate)
            t0 = time.perf_counter()
            step.run()
            log.info("stage %d/%d done in %s", k, len(steps), _minutes(time.perf_counter() - t0))
    for line in summary(p, time.perf_counter() - started):
        log.info("%s", line)
    if cfg.serve:
        serve(p.root, cfg.host, cfg.port)
    return p.root
