"""The viewer's pages and static assets (no /v1 prefix).

Every page is one HTML shell naming its view; the view itself is a JavaScript module under
`static/js/` that talks to the same /v1 API as any client. Pages carry a Content-Security-Policy
whose `frame-ancestors` comes from `ServerSettings.frame_ancestors`, so who may embed the viewer
(`?embed=true`) is the server's setting.
"""

from __future__ import annotations

import html
import json
import mimetypes
from pathlib import Path
from typing import Annotated
from urllib.parse import quote

from fastapi import APIRouter, Query, Request
from fastapi import Path as PathParam
from fastapi.responses import FileResponse, HTMLResponse

from ..deps import SettingsDep
from ..problems import ProblemError

router = APIRouter(include_in_schema=False)

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"
Id = Annotated[str, PathParam(min_length=1, max_length=128)]
Embed = Annotated[bool, Query(description="No chrome: the view fits its frame.")]

# Everything is served from this origin: scripts are modules under /static, no inline script.
_CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; connect-src 'self'; frame-src 'self'; object-src 'none'; "
    "base-uri 'none'; form-action 'self'"
)
_TITLES = {
    "home": "sparse-circuits",
    "graph": "Attribution graph",
    "compare": "Compare graphs",
    "feature": "Feature",
    "artifact": "Artifact",
    "jobs": "Jobs",
}


def content_security_policy(frame_ancestors: list[str]) -> str:
    ancestors = " ".join(frame_ancestors) if frame_ancestors else "'none'"
    return f"{_CSP}; frame-ancestors {ancestors}"


# Modules each view imports, announced up front so the browser fetches them in parallel.
_COMMON = ("api.js", "shell.js")
_MODULES = {
    "home": ("pages/home.js",),
    "graph": ("pages/graph.js", "graph-canvas.js", "graph-model.js", "cards.js", "charts.js"),
    "compare": ("pages/compare.js", "graph-canvas.js", "graph-model.js", "cards.js", "charts.js"),
    "feature": ("pages/feature.js", "cards.js", "charts.js"),
    "artifact": ("pages/artifact.js", "charts.js"),
    "jobs": ("pages/jobs.js", "pages/artifact.js", "charts.js"),
}


def _preloads(view: str, fetches: tuple[str, ...]) -> str:
    links = [
        f'<link rel="modulepreload" href="/static/js/{m}">' for m in (*_COMMON, *_MODULES[view])
    ]
    links += [
        f'<link rel="preload" as="fetch" crossorigin href="{html.escape(u, quote=True)}">'
        for u in fetches
    ]
    return "".join(links)


def _page(
    settings, view: str, params: dict, embed: bool, fetches: tuple[str, ...] = ()
) -> HTMLResponse:
    title = _TITLES[view]
    data = html.escape(json.dumps(params), quote=True)
    nav = (
        ""
        if embed
        else (
            '<header class="chrome"><a class="brand" href="/">sparse-circuits</a>'
            '<nav aria-label="Main"><a href="/">Graphs</a><a href="/#artifacts">Artifacts</a>'
            '<a href="/jobs">Jobs</a></nav><span class="spacer"></span>'
            '<form class="apikey" id="api-key-form"><label>API key <input id="api-key" '
            'type="password" autocomplete="off" placeholder="for writes" size="14"></label>'
            "</form></header>"
        )
    )
    body = (
        "<!doctype html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        '<meta name="color-scheme" content="light dark">'
        # The app's middleware may rewrite the CSP header to frame-ancestors alone; the rest of
        # the policy rides in a meta tag too (which cannot carry frame-ancestors).
        f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">'
        f"<title>{html.escape(title)}</title>"
        '<link rel="icon" href="data:,">'
        '<link rel="stylesheet" href="/static/css/viewer.css">'
        '<script type="module" src="/static/js/main.js"></script>'
        f"{_preloads(view, fetches)}</head>"
        f'<body class="{"embed" if embed else "full"}" data-view="{view}" data-params="{data}">'
        f'{nav}<main id="app" tabindex="-1"><p class="loading">Loading…</p></main>'
        '<div id="announce" class="sr-only" aria-live="polite"></div></body></html>'
    )
    headers = {
        "Content-Security-Policy": content_security_policy(settings.frame_ancestors),
        "Cache-Control": "no-cache",
        "Referrer-Policy": "same-origin",
        "X-Content-Type-Options": "nosniff",
    }
    return HTMLResponse(body, headers=headers)


@router.get("/", response_class=HTMLResponse)
def home(settings: SettingsDep, embed: Embed = False):
    return _page(settings, "home", {}, embed)


@router.get("/graphs/{graph_id}", response_class=HTMLResponse)
def graph_page(graph_id: Id, request: Request, settings: SettingsDep, embed: Embed = False):
    # At the default pruning the graph JSON's URL is known here: start fetching it with the
    # modules (the page's own fetch of the same URL then takes the preloaded answer).
    fetches = ()
    if not {"node_threshold", "edge_threshold"} & set(request.query_params):
        gid = quote(graph_id, safe="")
        fetches = (f"/v1/graphs/{gid}/json?node_threshold=0.8&edge_threshold=0.98",)
    return _page(settings, "graph", {"id": graph_id}, embed, fetches)


@router.get("/compare", response_class=HTMLResponse)
def compare_page(
    settings: SettingsDep,
    a: Annotated[str, Query(min_length=1, max_length=128)],
    b: Annotated[str, Query(min_length=1, max_length=128)],
    embed: Embed = False,
):
    return _page(settings, "compare", {"a": a, "b": b}, embed)


@router.get("/transcoders/{transcoder_id}/features/{layer}/{index}", response_class=HTMLResponse)
def feature_page(
    transcoder_id: Id,
    layer: Annotated[int, PathParam(ge=0)],
    index: Annotated[int, PathParam(ge=0)],
    settings: SettingsDep,
    embed: Embed = False,
):
    params = {"transcoder": transcoder_id, "layer": layer, "index": index}
    return _page(settings, "feature", params, embed)


def _artifact_page(kind: str):
    def page(artifact_id: Id, settings: SettingsDep, embed: Embed = False):
        return _page(settings, "artifact", {"kind": kind, "id": artifact_id}, embed)

    return page


for _kind in ("models", "stores", "transcoders"):
    router.add_api_route(
        f"/{_kind}/{{artifact_id}}", _artifact_page(_kind), response_class=HTMLResponse
    )


@router.get("/jobs", response_class=HTMLResponse)
def jobs_page(settings: SettingsDep, embed: Embed = False):
    return _page(settings, "jobs", {}, embed)


@router.get("/static/{path:path}")
def static_file(path: str):
    """A file of the package's static/ folder; nothing outside it."""
    target = (STATIC_DIR / path).resolve()
    if not target.is_relative_to(STATIC_DIR) or not target.is_file():
        raise ProblemError(404, f"no static file {path!r}")
    media_type = mimetypes.guess_type(target.name)[0] or "application/octet-stream"
    if target.suffix == ".js":
        media_type = "text/javascript"
    return FileResponse(
        target,
        media_type=media_type,
        headers={"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"},
    )
