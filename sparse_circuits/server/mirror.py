"""With an s3:// data dir, the server's cache kept in step with the artifacts the database records.

The routes read artifacts from local paths under `settings.data_dir`, which is then this
server's cache of the prefix; workers on other machines upload what they write to the prefix
and record it in the shared database. `ArtifactMirror`, which `serve` starts beside the API,
reads the artifact records every `mirror_poll_s` and fetches into the cache each model,
transcoder and graph whose record is new or changed (its job, state, metrics or meta), each one
not fetched yet (a graph whose job still runs), and all of them every RECHECK_S (one small read
of each one's manifest; nothing is downloaded again unless it changed). A graph or transcoder
fetched anew is dropped from the graph services' caches. Activation stores are read on the
object store itself and never fetched.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from typing import Any

from fastapi import FastAPI
from sqlalchemy import select

from ..jobs.db import Artifact
from ..storage import RemoteDataDir
from .settings import ServerSettings

log = logging.getLogger(__name__)

MIRRORED_KINDS = ("model", "transcoder", "graph")
RECHECK_S = 300.0


class ArtifactMirror:
    """Fetches what the database records into the server's cache; `sync()` is one pass."""

    def __init__(self, app: FastAPI, *, recheck_s: float = RECHECK_S) -> None:
        settings: ServerSettings = app.state.settings
        if settings.data_url is None:
            raise ValueError("the artifact mirror is for an s3:// data dir (data_url)")
        self.app, self.poll_s, self.recheck_s = app, settings.mirror_poll_s, recheck_s
        self.remote = RemoteDataDir(settings.data_url, settings.data_dir)
        self.seen: dict[str, tuple] = {}  # artifact id -> its record's fingerprint, once fetched
        self.last_recheck = time.monotonic()
        self.stop_event = threading.Event()
        self.thread: threading.Thread | None = None

    def sync(self) -> list[str]:
        """Fetch every artifact whose record is new or changed (or all, when a recheck is
        due); return the paths whose local copy changed."""
        recheck = time.monotonic() - self.last_recheck > self.recheck_s
        if recheck:
            self.last_recheck = time.monotonic()
        with self.app.state.sessionmaker() as session:
            rows = session.execute(
                select(Artifact.id, Artifact.kind, Artifact.path, Artifact.state,
                       Artifact.job_id, Artifact.metrics, Artifact.meta)
                .where(Artifact.kind.in_(MIRRORED_KINDS))
            ).all()  # fmt: skip
        changed = []
        for row in rows:
            if "://" in row.path:
                continue
            fingerprint = _fingerprint(row)
            if not recheck and self.seen.get(row.id) == fingerprint:
                continue
            try:
                before = self.remote.synced_state(row.path)
                if self.remote.fetch(row.path) is None:
                    continue  # not uploaded yet (its job runs): look again next pass
            except Exception as e:  # the store away for a moment, or a torn upload: next pass
                log.warning("could not fetch %s %s: %s", row.kind, row.path, e)
                continue
            self.seen[row.id] = fingerprint
            if self.remote.synced_state(row.path) != before:
                changed.append(row.path)
                self._forget(row.id, row.kind)
        if changed:
            log.info("fetched from %s: %s", self.remote.url, ", ".join(changed))
        return changed

    def start(self) -> ArtifactMirror:
        self.thread = threading.Thread(target=self._loop, name="artifact-mirror", daemon=True)
        self.thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self.stop_event.set()
        if self.thread is not None:
            self.thread.join(timeout)

    def _loop(self) -> None:
        while not self.stop_event.is_set():
            try:
                self.sync()
            except Exception:  # the database away for a moment: the next pass tries again
                log.exception("artifact mirror pass failed")
            self.stop_event.wait(self.poll_s)

    def _forget(self, artifact_id: str, kind: str) -> None:
        """Loaded copies of an artifact fetched anew are stale (graph services: per app)."""
        services = getattr(self.app.state, "graphs", None)
        if services is None:
            return
        if kind == "graph":
            services.forget(artifact_id)
        else:  # a model or transcoder loaded for QK attributions
            services.models.drop(lambda key: True)


def _fingerprint(row: Any) -> tuple:
    return (
        row.state, row.job_id, json.dumps(row.metrics, sort_keys=True),
        json.dumps(row.meta, sort_keys=True),
    )  # fmt: skip
