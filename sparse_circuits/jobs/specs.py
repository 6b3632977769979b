"""A job's spec: `kind` names a stage, `config` is exactly that stage's config.

`validate_job` checks both and confines every path in the config to the data dir: a path is
resolved (symlinks followed) under the data dir and refused when it leads outside it (`..`,
an absolute path elsewhere, a symlink out), naming the field. Paths come back relative to the
data dir, so a job record means the same on every worker, whatever its mount point; a worker
runs the stage with the data dir as working directory. `s3://` URLs, the `stdlib` corpus and
a hub dataset name pass through unchanged. The API calls it at submission (a 422 naming the
field), the worker again before running.
"""

from __future__ import annotations

import types
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

from pydantic import BaseModel, ValidationError

from ..errors import StageError
from ..stages import STAGES

# str-typed fields that hold a path or URL (fields annotated Path are paths anyway)
PATH_FIELDS = frozenset({"out", "model", "clt", "activations", "tokens_file"})
# fields holding a list of corpus entries: files, folders, globs, "stdlib" or a hub name
CORPUS_FIELDS = frozenset({"corpus", "data"})
STDLIB = "stdlib"
GLOB_CHARS = frozenset("*?[")
# what each path is to its stage, for a data dir on object storage (`remote.py`): activation
# stores are zarr, read and written on the object store itself; a stage's out / store_dir is
# what it writes; a few stages write into an input too; every other path is read
STORE_FIELDS = {"harvest": ("out",), "train-clt": ("activations",), "eval-clt": ("activations",)}
OUTPUT_FIELDS = frozenset({"out", "store_dir"})
WRITES_INTO = {"eval-clt": ("clt",), "feature-stats": ("clt",)}

Loc = tuple[str | int, ...]


class JobSpecError(StageError):
    """A job spec that does not validate; `errors` name each field at fault."""

    def __init__(self, errors: list[dict[str, Any]]):
        self.errors = errors
        super().__init__("; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in errors))


class JobPaths(NamedTuple):
    """The paths of a validated job config (relative to the data dir), by what the stage does
    with them; s3:// URLs, 'stdlib' and hub names are in none."""

    inputs: list[str]  # files and directories it reads
    corpus: list[str]  # corpus entries it reads: files, folders or globs
    outputs: list[str]  # what it writes (and resumes from)
    stores: list[Loc]  # where in the config an activation store's path is


def job_paths(kind: str, config: dict[str, Any]) -> JobPaths:
    """The paths of `config` (validated by `validate_job`) sorted by what `kind` does with them."""
    model = STAGES[kind].config_class().model_validate(config)
    found = JobPaths([], [], [], [])
    writes = OUTPUT_FIELDS | set(WRITES_INTO.get(kind, ()))
    for loc, value, n_entries in path_values(model):
        if "://" in value:
            continue
        if len(loc) == 1 and loc[0] in STORE_FIELDS.get(kind, ()):
            found.stores.append(loc)
        elif n_entries is not None:
            if value != STDLIB:
                found.corpus.append(value)
        elif len(loc) == 1 and loc[0] in writes:
            found.outputs.append(value)
        else:
            found.inputs.append(value)
    return found


def validate_job(kind: str, config: dict[str, Any], data_dir: str | Path) -> BaseModel:
    """`config` validated with `kind`'s config class, its paths relative to the data dir."""
    stage = STAGES.get(kind)
    if stage is None:
        raise JobSpecError(
            [{"loc": ("kind",), "msg": f"unknown stage {kind!r}; one of {', '.join(STAGES)}"}]
        )
    config_cls = stage.config_class()
    model = _validate(config_cls, config)
    errors: list[dict[str, Any]] = []
    confined = _confine_model(model, Path(data_dir).resolve(), ("config",), errors)
    if errors:
        raise JobSpecError(errors)
    return _validate(config_cls, confined)


def _validate(config_cls: type[BaseModel], data: Any) -> BaseModel:
    if not isinstance(data, dict):
        raise JobSpecError([{"loc": ("config",), "msg": "config must be an object"}])
    try:
        return config_cls.model_validate(data)
    except ValidationError as e:
        raise JobSpecError(
            [{"loc": ("config", *err["loc"]), "msg": err["msg"]} for err in e.errors()]
        ) from None


def _confine_model(
    model: BaseModel, root: Path, loc: Loc, errors: list[dict[str, Any]]
) -> dict[str, Any]:
    """The model as JSON with every path field confined to `root` (errors collected)."""
    out = model.model_dump(mode="json")
    for here, value, n_entries in path_values(model):
        if n_entries is None:
            confined = _confined(_path, root, value, (*loc, *here), errors)
        else:
            confined = _confined(_corpus_entry, root, value, (*loc, *here), errors, n_entries)
        _set(out, here, confined)
    return out


def path_values(model: BaseModel, loc: Loc = ()) -> Iterator[tuple[Loc, str, int | None]]:
    """(where, value, n_entries) of every path in a config: `where` its field names (and list
    index), `n_entries` the length of the corpus list it is an entry of (None: a path field)."""
    for name, field in type(model).model_fields.items():
        value = getattr(model, name)
        if value is None:
            continue
        here = (*loc, name)
        if isinstance(value, BaseModel):
            yield from path_values(value, here)
        elif name in CORPUS_FIELDS and isinstance(value, list):
            for i, entry in enumerate(value):
                yield (*here, i), str(entry), len(value)
        elif name in PATH_FIELDS or _is_path(field.annotation):
            yield here, str(value), None


def _set(out: dict[str, Any], loc: Loc, value: Any) -> None:
    for key in loc[:-1]:
        out = out[key]
    out[loc[-1]] = value


def _confined(check, root: Path, value: str, loc: Loc, errors: list, *args) -> str:
    try:
        return check(root, value, *args)
    except ValueError as e:
        errors.append({"loc": loc, "msg": str(e)})
        return value


def _is_path(annotation: Any) -> bool:
    if annotation is Path:
        return True
    if typing.get_origin(annotation) in (typing.Union, types.UnionType, list, tuple):
        return any(_is_path(a) for a in typing.get_args(annotation))
    return False


def _path(root: Path, value: str) -> str:
    """`value` (relative to `root` or absolute) as a path relative to `root`; s3:// unchanged."""
    if value.startswith("s3://"):
        return value
    if "://" in value:
        raise ValueError(f"{value!r}: only paths in the data dir and s3:// URLs are accepted")
    path = Path(value)
    full = (path if path.is_absolute() else root / path).resolve()
    if not full.is_relative_to(root):
        raise ValueError(f"{value!r} leads outside the data dir")
    return full.relative_to(root).as_posix()


def _corpus_entry(root: Path, value: str, n_entries: int) -> str:
    """A corpus entry: 'stdlib', a hub dataset name, a glob or a path, confined to `root`."""
    if value == STDLIB or value.startswith("s3://"):
        return value
    parts = Path(value).parts
    globbed = [i for i, part in enumerate(parts) if GLOB_CHARS & set(part)]
    if globbed:
        first = globbed[0]
        if ".." in parts[first:]:
            raise ValueError(f"{value!r}: '..' after a wildcard may lead outside the data dir")
        prefix = _path(root, str(Path(*parts[:first])) if first else ".")
        return (Path(prefix) / Path(*parts[first:])).as_posix()
    if _is_hub_name(root, value, n_entries):
        return value
    return _path(root, value)


def _is_hub_name(root: Path, value: str, n_entries: int) -> bool:
    """'user/name' alone, not a path in the data dir: a hub dataset (as the data loader reads it)."""
    return (
        n_entries == 1
        and value.count("/") == 1
        and not value.startswith((".", "/"))
        and not (root / value).exists()
    )
