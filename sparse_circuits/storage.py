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
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

from .io import atomic_dir, atomic_path

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
    return sorted(p for p in root.rglob("*") if p.is_file() and not p.is_symlink())


def put_dir(local: str | os.PathLike, url: str, storage_options: dict | None = None) -> dict:
    """Upload the directory `local` to the prefix `url`, manifest last; return the manifest."""
    local = Path(local)
    if not local.is_dir():
        raise StorageError(f"{local} is not a directory")
    fs, root = filesystem(url, storage_options)
    manifest_path = f"{root}/{MANIFEST}"
    if fs.exists(manifest_path):  # from now on the prefix reads as absent until the new one lands
        fs.rm_file(manifest_path)
    files = {}
    for f in _files(local):
        rel = f.relative_to(local).as_posix()
        if rel == MANIFEST:
            continue
        fs.put_file(str(f), f"{root}/{rel}")
        files[rel] = {"size": f.stat().st_size, "sha256": _sha256(f)}
    manifest = {"format": MANIFEST_FORMAT, "version": 1, "files": files}
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
    return manifest


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
    sizes = {
        p.removeprefix(root + "/"): info["size"] for p, info in fs.find(root, detail=True).items()
    }
    return all(sizes.get(rel) == info["size"] for rel, info in manifest["files"].items())


def get_dir(url: str, local: str | os.PathLike, storage_options: dict | None = None) -> Path:
    """Download the directory artifact at `url` into `local` (swapped in whole), checking every
    file against the manifest."""
    manifest = read_manifest(url, storage_options)
    if manifest is None:
        raise StorageError(f"{url} holds no complete artifact (no {MANIFEST})")
    fs, root = filesystem(url, storage_options)
    with atomic_dir(local) as tmp:
        for rel, info in manifest["files"].items():
            target = tmp / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                fs.get_file(f"{root}/{rel}", str(target))
            except FileNotFoundError:
                raise StorageError(f"{url}: {rel} is named by the manifest but missing") from None
            if target.stat().st_size != info["size"] or _sha256(target) != info["sha256"]:
                raise StorageError(f"{url}: {rel} does not match its manifest")
    return Path(local)


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
