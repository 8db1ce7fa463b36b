"""The loss registry: build any loss from a name, a weighted sum of names, or a module.

Every loss follows one contract: ``forward(logits (B, C, H, W), target (B, H, W) long)`` returns
a scalar tensor, and pixels equal to ``ignore_index`` (default 255) contribute nothing.

Names combine into weighted sums, for example ``"ce+dice"`` or ``"balanced + 0.5 * dice"``. A
loss may also be registered under a spelling that contains ``+`` (an *alias*, such as
``"bce+dice"`` for the DLI paper's ``bce_dice``): a spec that is exactly an alias (case and
spaces aside) builds that loss instead of being parsed as a sum.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

LOSSES: dict[str, Callable[..., nn.Module]] = {}
ALIASES: dict[str, str] = {}  # whole-spec spellings (may contain '+') -> registered name

_TERM = re.compile(r"^\s*(?:(?P<weight>[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*\*\s*)?(?P<name>[A-Za-z_][\w]*)\s*$")


def _normalise(spec: str) -> str:
    return re.sub(r"\s+", "", spec).lower()


def register_loss(
    name: str, aliases: tuple[str, ...] = ()
) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Class decorator that makes a loss buildable by ``name`` (lower-case, no ``+``).

    Args:
        name: the registered name.
        aliases: other whole-spec spellings of the same loss; they may contain ``+`` (for
            example ``"bce+dice"``), and then :func:`build_loss` gives this loss for that exact
            spec rather than the sum of its parts.
    """
    if not re.fullmatch(r"[a-z_][a-z0-9_]*", name):
        raise ValueError(f"loss names are lower-case identifiers (no '+'), got {name!r}")

    def wrap(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in LOSSES and LOSSES[name] is not factory:
            raise ValueError(f"a loss named {name!r} is already registered ({LOSSES[name]})")
        for alias in aliases:
            key = _normalise(alias)
            if ALIASES.get(key, name) != name:
                raise ValueError(f"alias {alias!r} already names the loss {ALIASES[key]!r}")
        LOSSES[name] = factory
        for alias in aliases:
            ALIASES[_normalise(alias)] = name
        return factory

    return wrap


def available_losses() -> list[str]:
    """Names accepted by :func:`build_loss` (they also combine with ``+`` and ``w *``), aliases included."""
    return sorted(set(LOSSES) | set(ALIASES))


class CombinedLoss(nn.Module):
    """Weighted sum of losses: ``sum_i weight_i * loss_i(logits, target)``.

    Args:
        losses: the terms.
        weights: one weight per term.
        names: one name per term (used to log each term).
    """

    def __init__(self, losses: list[nn.Module], weights: list[float], names: list[str] | None = None) -> None:
        super().__init__()
        if len(losses) != len(weights) or not losses:
            raise ValueError(f"CombinedLoss needs as many weights as losses; got {len(losses)} and {len(weights)}")
        self.losses = nn.ModuleList(losses)
        self.weights = [float(w) for w in weights]
        self.names = list(names) if names is not None else [type(m).__name__ for m in losses]

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        total = logits.new_zeros((), dtype=torch.float32)
        terms = {}
        for name, weight, loss in zip(self.names, self.weights, self.losses):
            value = loss(logits, target)
            terms[name] = value.detach()
            total = total + weight * value
        self.last_terms = terms
        return total


def _call_factory(name: str, factory: Callable[..., nn.Module], kwargs: dict[str, Any]) -> nn.Module:
    params = inspect.signature(factory).parameters
    accepts_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    unknown = [k for k in kwargs if k not in params and not accepts_any]
    if unknown:
        choices = [p for p in params if p not in ("self",)]
        raise ValueError(f"loss {name!r} got unknown arguments {unknown}; it accepts {choices}")
    return factory(**kwargs)


def build_loss(
    spec: str | nn.Module,
    ignore_index: int = 255,
    loss_kwargs: dict[str, Any] | None = None,
    context: dict[str, Any] | None = None,
) -> nn.Module:
    """Build a loss from a name, a weighted sum of names, or pass a module through.

    Args:
        spec: a registered name (see :func:`available_losses`), a sum such as
            ``"balanced + 0.5 * dice"``, an alias such as ``"bce+dice"`` (taken as a whole),
            or an ``nn.Module`` used as it is.
        ignore_index: mask value to ignore, passed to every loss that accepts it.
        loss_kwargs: arguments of the loss. For a single name, ``{arg: value}`` or
            ``{name: {arg: value}}``; for a sum, ``{name: {arg: value}}`` per term (a flat dict
            is accepted when every key is an argument of every term).
        context: values a loss may take when its signature asks for them (``num_classes``,
            ``class_frequencies``); unused ones are dropped silently.

    Raises:
        ValueError: unknown name (the message lists the choices) or unknown argument.
    """
    if isinstance(spec, nn.Module):
        return spec
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"loss must be a registered name or an nn.Module, got {spec!r}")
    loss_kwargs = dict(loss_kwargs or {})
    context = dict(context or {})
    terms = []
    alias = ALIASES.get(_normalise(spec))
    if alias is not None:
        terms.append((1.0, alias))
        for key in list(loss_kwargs):  # {"bce+dice": {...}} means {"bce_dice": {...}}
            if _normalise(key) == _normalise(spec) and isinstance(loss_kwargs[key], dict):
                loss_kwargs[alias] = loss_kwargs.pop(key)
    for part in spec.split("+") if alias is None else []:
        match = _TERM.match(part)
        if not match:
            raise ValueError(
                f"cannot parse loss term {part.strip()!r} in {spec!r}; write names joined by '+', "
                f"each optionally weighted, e.g. 'balanced + 0.5 * dice'"
            )
        name = match.group("name").lower()
        if name not in LOSSES:
            raise ValueError(f"unknown loss {name!r} in {spec!r}; choose from {available_losses()}")
        terms.append((float(match.group("weight") or 1.0), name))
    term_names = {n for _, n in terms}
    nested = bool(loss_kwargs) and all(isinstance(v, dict) for v in loss_kwargs.values()) and (
        len(terms) > 1 or set(loss_kwargs) <= term_names
    )
    modules, weights, names = [], [], []
    for weight, name in terms:
        factory = LOSSES[name]
        kwargs = dict(loss_kwargs.get(name, {})) if nested else dict(loss_kwargs)
        params = inspect.signature(factory).parameters
        if "ignore_index" in params:
            kwargs.setdefault("ignore_index", ignore_index)
        for key, value in context.items():
            if key in params:
                kwargs.setdefault(key, value)
        modules.append(_call_factory(name, factory, kwargs))
        weights.append(weight)
        names.append(name)
    if nested:
        extra = set(loss_kwargs) - term_names
        if extra:
            raise ValueError(f"loss_kwargs names {sorted(extra)} that are not terms of {spec!r}")
    if len(modules) == 1 and weights[0] == 1.0:
        return modules[0]
    return CombinedLoss(modules, weights, names)
