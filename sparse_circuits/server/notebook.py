"""Graphs inline in Jupyter: the viewer's embedded graph page in an iframe.

    from sparse_circuits.server.notebook import GraphView
    GraphView("http://127.0.0.1:8000", graph_id)          # a server URL and a graph id
    GraphView(client, graph)                               # or the Python client and its graph

The notebook's origin (e.g. http://localhost:8888) must be among the server's frame ancestors
(`ServerSettings.frame_ancestors`), or the browser refuses the frame. Only the standard library
is imported here, so the client can import it cheaply.
"""

from __future__ import annotations

import html
from typing import Any
from urllib.parse import quote, urlencode


def _base_url(source: Any) -> str:
    """A server's base URL from a string, or an object with `base_url` (our client, httpx)."""
    if isinstance(source, str):
        return source.rstrip("/")
    for attr in ("base_url", "url"):
        value = getattr(source, attr, None)
        if value is not None:
            return str(value).rstrip("/")
    client = getattr(source, "client", None) or getattr(source, "_client", None)
    if client is not None and client is not source:
        return _base_url(client)
    raise TypeError(f"cannot find a server URL in {type(source).__name__}: pass base_url")


def _graph_id(graph: Any) -> str:
    """A graph id from a string, a mapping with "id", or an object with `.id`."""
    if isinstance(graph, str):
        return graph
    if isinstance(graph, dict) and "id" in graph:
        return str(graph["id"])
    value = getattr(graph, "id", None)
    if value is None:
        raise TypeError(f"cannot find a graph id in {type(graph).__name__}")
    return str(value)


class GraphView:
    """The viewer's graph page (`/graphs/{id}?embed=true`) as an iframe; Jupyter shows it inline.

    server: base URL string, or the client (anything with `base_url`). graph: its id, or a
    graph object / dict with an id. View state (thresholds, selected and pinned nodes) goes in
    the URL, as the page keeps it."""

    def __init__(
        self,
        server: Any,
        graph: Any,
        *,
        height: int = 640,
        width: str = "100%",
        node_threshold: float | None = None,
        edge_threshold: float | None = None,
        selected: str | None = None,
        pinned: list[str] | None = None,
    ):
        self.base_url = _base_url(server)
        self.graph_id = _graph_id(graph)
        self.height, self.width = int(height), width
        self.state = {
            "node_threshold": node_threshold,
            "edge_threshold": edge_threshold,
            "selected": selected,
            "pinned": ",".join(pinned) if pinned else None,
        }

    @property
    def url(self) -> str:
        query = {"embed": "true", **{k: v for k, v in self.state.items() if v is not None}}
        return f"{self.base_url}/graphs/{quote(self.graph_id, safe='')}?{urlencode(query)}"

    def _repr_html_(self) -> str:
        width = f"{self.width}px" if isinstance(self.width, int) else self.width
        return (
            f'<iframe src="{html.escape(self.url, quote=True)}" '
            f'title="attribution graph {html.escape(self.graph_id, quote=True)}" '
            f'style="width:{html.escape(str(width), quote=True)};height:{self.height}px;'
            'border:1px solid #8884;border-radius:6px" loading="lazy"></iframe>'
        )

    def __repr__(self) -> str:
        return f"GraphView({self.url!r})"


def graph_view(server: Any, graph: Any, **kwargs: Any) -> GraphView:
    """`GraphView(server, graph, **kwargs)`: for `_repr_html_` on a client's graph object."""
    return GraphView(server, graph, **kwargs)
