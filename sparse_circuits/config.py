"""One pydantic config per stage, used unchanged by the CLI, the REST API and the job queue.

This module turns such a config into command-line flags (field descriptions become help)
and back: `--config FILE` (JSON or YAML) first, explicit flags over it.
"""

from __future__ import annotations

import argparse
import json
import re
import types
import typing
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ValidationError
from pydantic_core import PydanticUndefined

from .errors import ConfigError

if TYPE_CHECKING:
    import torch

__all__ = ["ConfigError", "Device", "DEVICE_HELP", "add_config_arguments", "config_from_args"]

_DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")
DEVICE_HELP = "Torch device: auto (cuda when present, else cpu), cpu, cuda, cuda:N or mps."


def _check_device(name: str) -> str:
    if not _DEVICE.fullmatch(name):
        raise ValueError(f"device {name!r} is not one of auto, cpu, cuda, cuda:N, mps")
    return name


# The one device setting every stage takes; `resolve_device` turns it into a torch device.
Device = Annotated[str, AfterValidator(_check_device)]


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _scalar_type(annotation: Any) -> tuple[Any, list | None, bool]:
    """(argparse type, choices, is_list) for a field annotation."""
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        return _scalar_type(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _scalar_type(args[0]) if len(args) == 1 else (str, None, False)
    if origin is Literal:
        choices = list(typing.get_args(annotation))
        return type(choices[0]), choices, False
    if origin in (list, tuple):
        inner = typing.get_args(annotation)[0] if typing.get_args(annotation) else str
        return _scalar_type(inner)[0], None, True
    if annotation in (int, float, str):
        return annotation, None, False
    if annotation is Path:
        return str, None, False
    return None, None, False  # nested models and dicts: only through --config


def _fields_in_help_order(config_cls: type[BaseModel]) -> list[str]:
    """A config's fields, its own before those it inherits (so that --model and --out lead, and
    shared groups such as the data source follow)."""
    names: list[str] = []
    for cls in config_cls.__mro__:
        for name in vars(cls).get("__annotations__", {}):
            if name in config_cls.model_fields and name not in names:
                names.append(name)
    return names


def _default_text(value: Any) -> str:
    if isinstance(value, list | tuple):
        return " ".join(map(str, value)) if value else "none"
    return "none" if value is None else str(value)


_TYPES = {"int": int, "float": float, "str": str}


def flag_specs(config_cls: type[BaseModel]) -> list[dict]:
    """The command-line flags of a config, as plain data (JSON): name, kind, type, choices,
    list, help. Help is the field's description plus its default, or that it is required."""
    specs = []
    for name in _fields_in_help_order(config_cls):
        field = config_cls.model_fields[name]
        help_ = (field.description or "").strip()
        if field.is_required():
            help_ += " (required, here or in --config)"
        elif field.default is None and "default" in help_.lower():
            pass  # the description says what None stands for
        elif field.default is not PydanticUndefined:
            help_ += f" (default: {_default_text(field.default)})"
        elif field.default_factory is not None:
            help_ += f" (default: {_default_text(field.default_factory())})"
        if field.annotation is bool:
            specs.append({"name": name, "kind": "bool", "help": help_.strip()})
            continue
        type_, choices, is_list = _scalar_type(field.annotation)
        if type_ is None:
            continue
        specs.append({
            "name": name, "kind": "value", "type": type_.__name__, "choices": choices,
            "list": is_list, "help": help_.strip(),
        })  # fmt: skip
    return specs


def _escape(help_: str) -> str:
    """argparse formats help with %: a literal one (such as '5%') must be doubled."""
    return help_.replace("%", "%%")


def add_flag_arguments(parser: argparse.ArgumentParser, specs: list[dict]) -> None:
    """Add `flag_specs(...)` to a parser. Every default is None, so that only flags actually
    given override the --config file (and the config's own defaults fill the rest)."""
    parser.add_argument(
        "--config", type=Path, help="JSON or YAML file with this stage's config; flags override it"
    )
    for spec in specs:
        if spec["kind"] == "bool":
            parser.add_argument(
                _flag(spec["name"]), dest=spec["name"], action=argparse.BooleanOptionalAction,
                default=None, help=_escape(spec["help"]),
            )  # fmt: skip
            continue
        parser.add_argument(
            _flag(spec["name"]), dest=spec["name"], type=_TYPES[spec["type"]],
            choices=spec["choices"], nargs="+" if spec["list"] else None, default=None,
            help=_escape(spec["help"]),
        )  # fmt: skip


def add_config_arguments(parser: argparse.ArgumentParser, config_cls: type[BaseModel]) -> None:
    add_flag_arguments(parser, flag_specs(config_cls))


def load_config_file(path: Path) -> dict:
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"config file {path} is a directory")
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        text = path.read_text()
        if path.suffix in (".yaml", ".yml"):
            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except (yaml.YAMLError, json.JSONDecodeError, UnicodeDecodeError) as e:
        kind = "YAML" if path.suffix in (".yaml", ".yml") else "JSON"
        detail = " ".join(str(e).split())
        raise ConfigError(f"config file {path} is not valid {kind}: {detail}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of field names to values")
    return data


def config_from_args(config_cls: type[BaseModel], args: argparse.Namespace):
    data: dict = load_config_file(args.config) if getattr(args, "config", None) else {}
    for name in config_cls.model_fields:
        value = getattr(args, name, None)
        if value is not None:
            data[name] = value
    return validate_config(config_cls, data)


def validation_message(e: ValidationError) -> str:
    """A pydantic error as one line: `field: problem; field: problem` (no URLs, no input dump)."""
    return "; ".join(
        f"{'.'.join(map(str, err['loc'])) or 'config'}: {err['msg'].removeprefix('Value error, ')}"
        for err in e.errors()
    )


def validate_config(config_cls: type[BaseModel], data: dict):
    try:
        return config_cls.model_validate(data)
    except ValidationError as e:
        raise ConfigError(f"invalid {config_cls.__name__}: {validation_message(e)}") from None


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """A `device` setting as a torch device: "auto" picks CUDA when present; a bare "cuda"
    means this process's GPU (LOCAL_RANK under torchrun)."""
    import torch  # noqa: PLC0415  (here, so that the CLI's help needs no torch)

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(_check_device(str(name)))
    except (ValueError, RuntimeError) as e:
        raise ConfigError(str(e)) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} asked for but CUDA is not available")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device {name!r} asked for but MPS is not available")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    return device
