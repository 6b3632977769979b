"""One pydantic config per stage, used unchanged by the CLI, the REST API and the job queue.

This module turns such a config into command-line flags (field descriptions become help)
and back: `--config FILE` (JSON or YAML) first, explicit flags over it.
"""

from __future__ import annotations

import argparse
import json
import types
import typing
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml
from pydantic import BaseModel, ValidationError

if TYPE_CHECKING:
    import torch


class ConfigError(ValueError):
    """A config that does not validate; the message names the field."""


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _scalar_type(annotation: Any) -> tuple[Any, list | None, bool]:
    """(argparse type, choices, is_list) for a field annotation."""
    origin = typing.get_origin(annotation)
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


def add_config_arguments(parser: argparse.ArgumentParser, config_cls: type[BaseModel]) -> None:
    parser.add_argument(
        "--config", type=Path, help="JSON or YAML file with this stage's config; flags override it"
    )
    for name in _fields_in_help_order(config_cls):
        field = config_cls.model_fields[name]
        help_ = field.description or ""
        if field.annotation is bool:
            parser.add_argument(
                _flag(name),
                dest=name,
                action=argparse.BooleanOptionalAction,
                default=None,
                help=help_,
            )
            continue
        type_, choices, is_list = _scalar_type(field.annotation)
        if type_ is None:
            continue
        parser.add_argument(
            _flag(name),
            dest=name,
            type=type_,
            choices=choices,
            nargs="+" if is_list else None,
            default=None,
            help=help_,
        )


def load_config_file(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    text = path.read_text()
    data = yaml.safe_load(text) if path.suffix in (".yaml", ".yml") else json.loads(text)
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


def validate_config(config_cls: type[BaseModel], data: dict):
    try:
        return config_cls.model_validate(data)
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(map(str, err['loc'])) or 'config'}: {err['msg']}" for err in e.errors()
        )
        raise ConfigError(f"invalid {config_cls.__name__}: {problems}") from None


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """A `device` setting as a torch device: "auto" picks CUDA when present; a bare "cuda"
    means this process's GPU (LOCAL_RANK under torchrun)."""
    import torch  # noqa: PLC0415  (here, so that the CLI's help needs no torch)

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} asked for but CUDA is not available")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    return device
