"""How a user's options are declared and checked, once for all of atx.

* :class:`Choice`: the base of every option with a fixed set of values (an ``Enum`` whose
  members are also their strings), so the schema refuses a bad value while Hydra composes.
* :func:`did_you_mean`: the one close-match hint of every "unknown ..." error.
* :func:`check_call`: keyword options checked against what a callable accepts (names, types,
  required ones): every ``_target_`` class and every model family goes through it.
* :func:`check_number`: a finite number above a bound.
"""

from __future__ import annotations

import difflib
import inspect
import math
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from enum import Enum
from typing import Any

from atx.errors import AtxError


class Choice(str, Enum):
    """An option with a fixed set of values; a member equals (and prints as) its string."""

    def __str__(self) -> str:
        return str(self.value)

    def __format__(self, spec: str) -> str:
        return format(str(self.value), spec)

    @classmethod
    def values(cls) -> list[str]:
        return [m.value for m in cls]


def did_you_mean(word: str, options: Iterable[str], prefix: str = "", n: int = 1) -> str:
    """`` (did you mean '<prefix><closest>'?)`` (up to ``n`` matches), or "" when none is close."""
    close = [c for c in difflib.get_close_matches(str(word), list(options), n=n) if c != word]
    names = [f"'{prefix}{c}'" for c in close]
    if not names:
        return ""
    listed = names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"
    return f" (did you mean {listed}?)"


def unknown_option(key: str, allowed: Iterable[str], where: str) -> AtxError:
    prefix = f"{where}." if where else ""
    return AtxError(
        f"unknown option '{prefix}{key}'{did_you_mean(key, allowed, prefix)};"
        f" valid options: {', '.join(sorted(allowed))}"
    )


def accepted_kwargs(fn: Callable[..., Any]) -> set[str] | None:
    """Keyword names ``fn(...)`` accepts (a class: following ``**kwargs`` up the MRO);
    None = any."""
    names: set[str] = set()
    if isinstance(fn, type):
        inits = [vars(k)["__init__"] for k in fn.__mro__ if "__init__" in vars(k)]
    else:
        inits = [fn]
    for init in inits:
        params = inspect.signature(init).parameters.values()
        names |= {p.name for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
        if not any(p.kind == p.VAR_KEYWORD for p in params):
            return names - {"self"}
    return None


def check_keys(keys: Iterable[str], allowed: set[str] | None, where: str) -> None:
    """The first key not in ``allowed`` (None: any key) is an error, with a close match."""
    if allowed is not None:
        bad = next((k for k in keys if k not in allowed), None)
        if bad is not None:
            raise unknown_option(bad, allowed, where)


def _type_ok(value: Any, annotation: Any) -> bool:
    """``value`` fits ``annotation`` as far as plain scalars go (other annotations pass)."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return any(_type_ok(value, a) for a in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation in (bool, str):
        return isinstance(value, annotation)
    return True


def _type_name(annotation: Any) -> str:
    if isinstance(annotation, type):
        return annotation.__name__
    return str(annotation).replace("NoneType", "None")


def check_call(
    fn: Callable[..., Any], kwargs: Mapping[str, Any], where: str, given: Iterable[str] = ()
) -> None:
    """``fn(**kwargs, **<given>)`` would bind: every key known, of the annotated type, and every
    required option set (``given``: names atx passes itself, e.g. ``num_classes``)."""
    allowed = accepted_kwargs(fn)
    given = set(given)
    check_keys(kwargs, None if allowed is None else allowed - given, where)
    target = fn.__init__ if isinstance(fn, type) else fn
    try:
        hints = typing.get_type_hints(target)
    except Exception:  # an annotation that cannot be evaluated: names are checked, types not
        hints = {}
    params = inspect.signature(target).parameters
    for key, value in kwargs.items():
        annotation = hints.get(key, inspect.Parameter.empty)
        if not _type_ok(value, annotation):
            raise AtxError(
                f"{where}.{key} must be {_type_name(annotation)}, got {type(value).__name__}"
                f" {value!r}"
            )
    for name, p in params.items():
        required = p.default is inspect.Parameter.empty and p.kind in (
            p.POSITIONAL_OR_KEYWORD,
            p.KEYWORD_ONLY,
        )
        if required and name not in ("self", *given) and name not in kwargs:
            raise AtxError(f"{where}.{name} is not set: pass {where}.{name}=<value>")


def check_number(value: float, key: str, low: float, strict: bool = False, hint: str = "") -> None:
    """``value`` must be finite and ``>= low`` (``> low`` when ``strict``)."""
    if not math.isfinite(value) or value < low or (strict and value == low):
        op = ">" if strict else ">="
        raise AtxError(f"{key}={value} must be a finite number {op} {low:g}{hint}")


def check_milestones(milestones: Iterable[int], key: str) -> None:
    """Epoch milestones: strictly increasing integers >= 0."""
    ms = list(milestones)
    if any(m < 0 for m in ms) or any(b <= a for a, b in zip(ms, ms[1:], strict=False)):
        raise AtxError(f"{key}={ms} must be strictly increasing epochs >= 0, e.g. [60,120,160]")
