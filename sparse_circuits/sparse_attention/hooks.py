"""Reading and overwriting a model's HookPoints for the length of a `with` block."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import contextmanager

import torch
from torch import nn

from .model import HookPoint

HookFn = Callable[[torch.Tensor], torch.Tensor | None]


def _resolve(model: nn.Module, names: Iterable[str]) -> dict[str, HookPoint]:
    points = {n: m for n, m in model.named_modules() if isinstance(m, HookPoint)}
    missing = [n for n in names if n not in points]
    if missing:
        raise KeyError(
            f"no hook point named {missing[0]!r}; known points look like {next(iter(points), '')!r}"
        )
    return {n: points[n] for n in names}


@contextmanager
def hooks(model: nn.Module, fns: dict[str, HookFn]):
    """Run `fn(value)` at each named point; a returned tensor replaces the value."""
    handles = [
        point.register_forward_hook(lambda _m, _inp, out, fn=fn: fn(out))
        for point, fn in zip(_resolve(model, fns).values(), fns.values(), strict=True)
    ]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


class StopForward(Exception):
    """Raised by `stop_after` to end a forward pass early."""


@contextmanager
def stop_after(model: nn.Module, name: str, fn: HookFn | None = None):
    """Inside the block, a forward pass of `model` ends as soon as the submodule `name` (a
    HookPoint, or any module such as "final_norm") has run and `fn(its output)` was called:
    what would come after (the logits, say) is never computed. The forward call ends the
    block, so make it the block's last statement; hooks entered before this one have run.
    The one way the stages stop a forward pass early (harvest, feature statistics, the
    frozen replacement model)."""
    module = model.get_submodule(name)

    def stop(_m: nn.Module, _inp, out: torch.Tensor) -> None:
        if fn is not None:
            fn(out)
        raise StopForward

    handle = module.register_forward_hook(stop)
    try:
        yield
    except StopForward:
        pass
    finally:
        handle.remove()


@contextmanager
def capture(model: nn.Module, names: Iterable[str], detach: bool = True):
    """Collect the values at `names` into the yielded dict."""
    names = list(names)
    store: dict[str, torch.Tensor] = {}

    def recorder(name: str) -> HookFn:
        def record(x: torch.Tensor) -> None:
            store[name] = x.detach() if detach else x

        return record

    with hooks(model, {n: recorder(n) for n in names}):
        yield store


@contextmanager
def freeze(model: nn.Module, values: dict[str, torch.Tensor]):
    """Replace each named value by a fixed tensor (no gradient flows through it)."""
    fixed = {n: v.detach() for n, v in values.items()}
    with hooks(model, {n: (lambda _x, v=v: v) for n, v in fixed.items()}):
        yield
