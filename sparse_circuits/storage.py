"""Artifacts on object storage (s3:// or any fsspec URL), written whole or not at all.

Object stores have no rename, so the local rules of `io.py` (a temporary sibling renamed into
place) become:

- one file: a single PUT, which S3 makes visible whole or not at all (a multipart upload too,
  at its completion); on other fsspec stores a temporary key copied onto the final one.
- a directory (a model, a CLT, a checkpointed run): every file uploaded under the prefix,
  then `MANIFEST.json` (each file's size and SHA-256) written LAST. A prefix without a
  manifest is not an artifact; a reader that finds one checks sizes (and on download the
  hashes) against it. Replacing a directory deletes its manifest first, so a half-replaced
  prefix reads as absent, never as a mix of two versions; keys the new manifest does not
  name are deleted after it is written.

Activation stores are zarr and are read and written on S3 by zarr itself (`clt/store.py`):
whole shards per object, the store's `complete` attr last. Credentials and endpoints come
from `storage_options` or the environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
AWS_ENDPOINT_URL), never from a saved config.

A whole data dir may live under an s3:// prefix (`RemoteDataDir`): each process keeps local
copies of the artifacts it reads and writes in a cache dir, fetched whole and checked before
use and uploaded whole after, so stages, which work on local paths, run unchanged.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .io import LOCK_FILE, _is_leftover, atomic_dir, atomic_path
from .progress import progress_bar

log = logging.getLogger(__name__)

MANIFEST = "MANIFEST.json"
MANIFEST_FORMAT = "sparse-circuits-manifest"


class StorageError(RuntimeError):
    """An artifact on object storage that is absent, incomplete or does not match its manifest."""


def is_remote(url: str | os.PathLike) -> bool:
    text = str(url)
    return "://" in text and not text.startswith("file://")


def filesystem(url: str, storage_options: dict[str, Any] | None = None):
    """(fsspec filesystem, path within it) for `url`."""
    from fsspec.core import url_to_fs  # noqa: PLC0415  (local runs need no fsspec import)

    return url_to_fs(url, **(storage_options or {}))


def join(url: str, *parts: str) -> str:
    return "/".join([url.rstrip("/"), *(p.strip("/") for p in parts)])


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _is_s3(fs) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return protocol in ("s3", "s3a")


# ----------------------------------------------------------------------------- one file


def put_file(local: str | os.PathLike, url: str, storage_options: dict | None = None) -> None:
    """Upload one file so that `url` holds either its old bytes or all the new ones."""
    fs, path = filesystem(url, storage_options)
    if _is_s3(fs):
        fs.put_file(str(local), path)  # an S3 PUT (or multipart upload) is atomic
        return
    tmp = f"{path}.{uuid.uuid4().hex[:8]}.tmp"
    fs.put_file(str(local), tmp)
    try:
        fs.mv(tmp, path)
    except BaseException:
        fs.rm(tmp)
        raise


def write_bytes(url: str, data: bytes, storage_options: dict | None = None) -> None:
    fs, path = filesystem(url, storage_options)
    if _is_s3(fs):
        fs.pipe_file(path, data)
        return
    tmp = f"{path}.{uuid.uuid4().hex[:8]}.tmp"
    fs.pipe_file(tmp, data)
    fs.mv(tmp, path)


def read_bytes(url: str, storage_options: dict | None = None) -> bytes:
    fs, path = filesystem(url, storage_options)
    try:
        return fs.cat_file(path)
    except FileNotFoundError:
        raise StorageError(f"{url} does not exist") from None


def get_file(url: str, local: str | os.PathLike, storage_options: dict | None = None) -> Path:
    """Download one object to `local`, atomically."""
    fs, path = filesystem(url, storage_options)
    with atomic_path(local) as tmp:
        try:
            fs.get_file(path, str(tmp))
        except FileNotFoundError:
            raise StorageError(f"{url} does not exist") from None
    return Path(local)


# ----------------------------------------------------------------------------- directories


def _files(root: Path) -> list[Path]:
    """The files of the artifact at `root`: not a run's lock file, nor temporaries a killed
    writer left (`io.atomic_path` / `atomic_dir` siblings)."""
    return sorted(
        p
        for p in root.rglob("*")
        if p.is_file()
        and not p.is_symlink()
        and p.name != LOCK_FILE
        and not any(_is_leftover(Path(part)) for part in p.relative_to(root).parts)
    )


def dir_files(local: Path) -> dict[str, dict[str, Any]]:
    """What a manifest of the directory `local` names: each file's size and SHA-256."""
    files = {}
    for f in _files(local):
        rel = f.relative_to(local).as_posix()
        if rel != MANIFEST:
            files[rel] = {"size": f.stat().st_size, "sha256": _sha256(f)}
    return files


def put_dir(
    local: str | os.PathLike,
    url: str,
    storage_options: dict | None = None,
    extra: dict[str, Any] | None = None,
) -> dict:
    """Upload the directory `local` to the prefix `url`, manifest last; return the manifest.

    `extra` adds fields to the manifest (who wrote it, whether the artifact is partial). A file
    the previous manifest names with the same size and SHA-256, whose object is still there with
    that size, is not sent again (re-uploading a CLT after its evaluation sends metrics.json)."""
    local = Path(local)
    if not local.is_dir():
        raise StorageError(f"{local} is not a directory")
    fs, root = filesystem(url, storage_options)
    manifest_path = f"{root}/{MANIFEST}"
    previous = read_manifest(url, storage_options) or {"files": {}}
    fs.invalidate_cache(root)
    present = _remote_sizes(fs, root)
    if fs.exists(manifest_path):  # from now on the prefix reads as absent until the new one lands
        fs.rm_file(manifest_path)
    files = dir_files(local)
    to_send = [
        rel
        for rel, info in files.items()
        if previous["files"].get(rel) != info or present.get(rel) != info["size"]
    ]
    total = sum(files[rel]["size"] for rel in to_send)
    with _bytes_bar(total, f"uploading {local.name}") as bar:
        for rel in to_send:
            fs.put_file(str(local / rel), f"{root}/{rel}")
            bar.update(files[rel]["size"])
    manifest = {"format": MANIFEST_FORMAT, "version": 1, **(extra or {}), "files": files}
    fs.pipe_file(manifest_path, json.dumps(manifest, indent=1).encode())
    fs.invalidate_cache(root)
    stale = [
        p for p in fs.find(root) if p != manifest_path and p.removeprefix(root + "/") not in files
    ]
    if stale:
        log.info(
            "removing %d object(s) under %s that the new manifest does not name", len(stale), url
        )
        fs.rm(stale)
    log.debug("%s: %d of %d file(s) sent", url, len(to_send), len(files))
    return manifest


def _remote_sizes(fs, root: str) -> dict[str, int]:
    """Every object under `root` (relative key -> size); {} when there is none."""
    try:
        found = fs.find(root, detail=True)
    except FileNotFoundError:
        return {}
    return {p.removeprefix(root + "/"): info["size"] for p, info in found.items()}


def read_manifest(url: str, storage_options: dict | None = None) -> dict | None:
    """The manifest of the directory artifact at `url`, or None when it is absent or incomplete."""
    fs, root = filesystem(url, storage_options)
    try:
        manifest = json.loads(fs.cat_file(f"{root}/{MANIFEST}"))
    except FileNotFoundError:
        return None
    if manifest.get("format") != MANIFEST_FORMAT:
        raise StorageError(f"{url}/{MANIFEST} is not a sparse-circuits manifest")
    return manifest


def dir_complete(url: str, storage_options: dict | None = None) -> bool:
    """Whether `url` holds a whole directory artifact: a manifest, and every file it names
    present with its size."""
    manifest = read_manifest(url, storage_options)
    if manifest is None:
        return False
    fs, root = filesystem(url, storage_options)
    fs.invalidate_cache(root)
    sizes = _remote_sizes(fs, root)
    return all(sizes.get(rel) == info["size"] for rel, info in manifest["files"].items())


def get_dir(url: str, local: str | os.PathLike, storage_options: dict | None = None) -> Path:
    """Download the directory artifact at `url` into `local` (swapped in whole), checking every
    file against the manifest."""
    manifest = read_manifest(url, storage_options)
    if manifest is None:
        raise StorageError(f"{url} holds no complete artifact (no {MANIFEST})")
    return _get_dir(url, local, manifest, storage_options)


def _get_dir(url: str, local: str | os.PathLike, manifest: dict, storage_options: dict | None):
    fs, root = filesystem(url, storage_options)
    total = sum(info["size"] for info in manifest["files"].values())
    with atomic_dir(local) as tmp, _bytes_bar(total, f"fetching {Path(local).name}") as bar:
        for rel, info in manifest["files"].items():
            target = tmp / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                fs.get_file(f"{root}/{rel}", str(target))
            except FileNotFoundError:
                raise StorageError(f"{url}: {rel} is named by the manifest but missing") from None
            if target.stat().st_size != info["size"] or _sha256(target) != info["sha256"]:
                raise StorageError(f"{url}: {rel} does not match its manifest")
            bar.update(info["size"])
    return Path(local)


def _bytes_bar(total: int, desc: str):
    """A progress bar over bytes moved (inside a job it reports, and a cancel stops it)."""
    return progress_bar(total=total, unit="B", unit_scale=True, desc=desc, leave=False)


def put_artifact(local: str | os.PathLike, url: str, storage_options: dict | None = None) -> None:
    """A file or a directory, uploaded whole."""
    if Path(local).is_dir():
        put_dir(local, url, storage_options)
    else:
        put_file(local, url, storage_options)


def get_artifact(url: str, local: str | os.PathLike, storage_options: dict | None = None) -> Path:
    """The artifact at `url` downloaded to `local`: a manifest directory, else one object."""
    if read_manifest(url, storage_options) is not None:
        return get_dir(url, local, storage_options)
    local = Path(local)
    if local.is_dir():
        shutil.rmtree(local)
    return get_file(url, local, storage_options)


# ----------------------------------------------------------------------------- a data dir on S3

SYNCED_DIR = ".synced"  # in a cache dir: the remote state each local copy was last synced with
DATA_URL_SCHEMES = ("s3://",)


def check_data_url(url: str) -> str:
    """`url` if it names a bucket (and prefix) on an S3-protocol store; else a clear error."""
    if not url.startswith(DATA_URL_SCHEMES) or not url.split("://", 1)[1].strip("/"):
        raise ValueError(
            f"{url!r}: a shared data dir is an s3://bucket/prefix URL (any S3-protocol store: "
            "set AWS_ENDPOINT_URL for one that is not AWS)"
        )
    return url.rstrip("/")


def default_cache_dir(url: str) -> Path:
    """Where a process keeps its copies of the data dir at `url` unless told otherwise."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "sparse-circuits" / "data" / url.split("://", 1)[1].strip("/")


def split_data_dir(values: Any) -> Any:
    """For the server's and the worker's configs (a `mode="before"` validator): a `data_dir`
    given as an s3:// prefix becomes `data_url`, and `data_dir` the default local cache of it.
    `data_url` given with a local `data_dir` names the cache explicitly."""
    if not isinstance(values, dict):
        return values
    data_dir = values.get("data_dir")
    if isinstance(data_dir, str) and "://" in data_dir:
        if values.get("data_url"):
            raise ValueError(
                "data_dir is an URL and data_url is given too: give the s3:// prefix once, as "
                "data_url, and data_dir as this machine's cache of it"
            )
        url = check_data_url(data_dir)
        values = {**values, "data_url": url, "data_dir": default_cache_dir(url)}
    elif values.get("data_url"):
        values = {**values, "data_url": check_data_url(str(values["data_url"]))}
    return values


class RemoteDataDir:
    """A data dir under the prefix `url`, and this machine's copies of its artifacts in `local`.

    Processes work on local paths (`local / rel`); `fetch(rel)` brings the copy of `url/rel` up
    to date (a directory whole and checked against its manifest, one object, or a plain folder
    of objects), `upload(rel)` sends it back whole (manifest last). `local/.synced/` records the
    remote state each copy was last synced with: a copy whose remote state has not changed since
    is not fetched again; a remote state that changed (a later attempt of a job, run elsewhere,
    uploaded it) replaces the local copy, and a local copy whose remote one never changed keeps
    what was written here since (a run killed here before it could upload resumes from it).
    Two processes syncing one path of one cache take turns (a file lock per path)."""

    def __init__(
        self, url: str, local: str | os.PathLike, storage_options: dict | None = None
    ) -> None:
        self.url = check_data_url(url)
        self.local = Path(local).resolve()
        self.storage_options = storage_options

    def __repr__(self) -> str:
        return f"RemoteDataDir({self.url!r}, cache {str(self.local)!r})"

    def url_of(self, rel: str) -> str:
        return join(self.url, _checked_rel(rel))

    def remote_state(self, rel: str) -> dict | None:
        """What `url/rel` holds: a manifest, one object's size and ETag, or a plain folder's
        listing; None when nothing is there."""
        url = self.url_of(rel)
        manifest = read_manifest(url, self.storage_options)
        if manifest is not None:
            return {"manifest": manifest}
        fs, path = filesystem(url, self.storage_options)
        fs.invalidate_cache(path)
        try:
            info = fs.info(path)
        except FileNotFoundError:
            return None
        if info["type"] != "directory":
            return {"object": _object_state(info)}
        listing = {
            p.removeprefix(path + "/"): _object_state(i)
            for p, i in fs.find(path, detail=True).items()
        }
        return {"folder": listing} if listing else None

    def synced_state(self, rel: str) -> dict | None:
        try:
            return json.loads(self._synced_file(rel).read_text())
        except (OSError, ValueError):
            return None

    def fetch(self, rel: str, *, folders: bool = False) -> Path | None:
        """The local copy of `rel`, brought up to date with the prefix; None when the prefix
        holds nothing there (a local copy, if any, is left as it is). A prefix with objects but
        no manifest is an upload that did not finish: a StorageError, unless `folders` (a
        corpus folder uploaded by hand) takes its objects as they are."""
        local = self.local / _checked_rel(rel)
        with self._lock(rel):
            remote = self.remote_state(rel)
            if remote is None:
                return None
            if "folder" in remote and not folders:
                raise StorageError(
                    f"{self.url_of(rel)} holds objects but no {MANIFEST}: an upload that did not "
                    "finish (or files put there by hand), not an artifact"
                )
            if (local.exists() or local.is_symlink()) and self.synced_state(rel) == remote:
                return local
            url = self.url_of(rel)
            log.info("fetching %s into %s", url, local)
            if "manifest" in remote:
                if local.is_file():
                    local.unlink()
                _get_dir(url, local, remote["manifest"], self.storage_options)
            elif "object" in remote:
                if local.is_dir():
                    shutil.rmtree(local)
                get_file(url, local, self.storage_options)
            else:
                self._get_folder(url, local, remote["folder"])
            self._record(rel, remote)
        return local

    def upload(self, rel: str, extra: dict[str, Any] | None = None) -> dict | None:
        """Send the local copy of `rel` to the prefix whole (a directory with its manifest, which
        carries `extra`); returns the remote state now, None when there is no local copy."""
        local = self.local / _checked_rel(rel)
        with self._lock(rel):
            if local.is_dir():
                state = {"manifest": put_dir(local, self.url_of(rel), self.storage_options, extra)}
            elif local.is_file():
                put_file(local, self.url_of(rel), self.storage_options)
                state = self.remote_state(rel)
            else:
                return None
            self._record(rel, state)
        log.info("uploaded %s to %s", local, self.url_of(rel))
        return state

    def changed_here(self, rel: str) -> bool:
        """Whether the local copy of `rel` differs from the prefix's (a directory by its files'
        sizes and hashes; one file: whenever the prefix lacks it)."""
        local = self.local / _checked_rel(rel)
        remote = self.remote_state(rel)
        if local.is_dir():
            return remote is None or remote.get("manifest", {}).get("files") != dir_files(local)
        return local.is_file() and remote is None

    def glob(self, pattern: str) -> list[str]:
        """The paths (relative to the prefix) of the objects matching `pattern` there."""
        fs, root = filesystem(self.url, self.storage_options)
        fs.invalidate_cache(root)
        found = fs.glob(f"{root}/{_checked_rel(pattern)}")
        return sorted(p.removeprefix(root + "/") for p in found)

    def _get_folder(self, url: str, local: Path, listing: dict[str, dict]) -> None:
        """Objects uploaded by hand under one prefix (a corpus folder): no manifest to check."""
        fs, root = filesystem(url, self.storage_options)
        if local.is_file():
            local.unlink()
        with atomic_dir(local) as tmp:
            for rel in listing:
                target = tmp / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                fs.get_file(f"{root}/{rel}", str(target))

    def _synced_file(self, rel: str) -> Path:
        return self.local / SYNCED_DIR / f"{_checked_rel(rel)}.json"

    def _record(self, rel: str, state: dict | None) -> None:
        path = self._synced_file(rel)
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(state))

    @contextmanager
    def _lock(self, rel: str) -> Iterator[None]:
        path = self.local / SYNCED_DIR / f"{_checked_rel(rel)}.lock"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)


def _object_state(info: dict) -> dict:
    etag = info.get("ETag") or info.get("etag") or info.get("mtime") or info.get("LastModified")
    return {"size": info.get("size"), "etag": str(etag).strip('"') if etag is not None else None}


def _checked_rel(rel: str) -> str:
    """`rel` as a path inside the data dir; a path that could leave it is a bug upstream."""
    parts = Path(rel).parts
    if not rel or Path(rel).is_absolute() or ".." in parts or "://" in rel:
        raise StorageError(f"{rel!r} is not a path inside the data dir")
    return Path(rel).as_posix()
