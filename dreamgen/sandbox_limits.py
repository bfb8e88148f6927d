"""Budgets for one card-template render, and the guarded operations that charge them.

``dreamgen.sandbox`` wires these into its Jinja2 environment: every loop, call, ``~``,
arithmetic operator, filter and ``{{ … }}`` output goes through a function here, which
refuses (``TemplateLimitError``, one line) before it builds something over a limit.
The budget of the render in progress sits in a context variable.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from enum import Enum
from typing import Any

from jinja2.runtime import Undefined
from jinja2.sandbox import SecurityError
from pydantic import BaseModel

MAX_TEMPLATE_BYTES = 64 * 1024
MAX_OUTPUT = 256 * 1024  # a rendered prompt; real ones are a few KB
MAX_VALUE = 256 * 1024  # any one string or list made during a render
MAX_WORK = 8 * 1024 * 1024  # bytes produced by every operation of one render, summed
MAX_STEPS = 20_000  # loop iterations plus calls in one render
MAX_DEPTH = 20  # nested macro calls
MAX_RANGE = 1000  # items of one range()
MAX_INCLUDE_DEPTH = 8
MAX_INT_BITS = 4096

LOOP_FIELDS = frozenset(
    {"index", "index0", "revindex", "revindex0", "first", "last", "length"}
    | {"depth", "depth0", "previtem", "nextitem", "cycle", "changed"}
)
# Filters a card template may use; every one is bounded by its input (or checked below).
ALLOWED_FILTERS = frozenset(
    {"abs", "batch", "capitalize", "center", "count", "d", "default", "dictsort"}
    | {"first", "float", "groupby", "indent", "int", "items", "join", "last", "length"}
    | {"list", "lower", "map", "max", "min", "reject", "rejectattr", "replace", "reverse"}
    | {"round", "select", "selectattr", "slice", "sort", "string", "sum", "title"}
    | {"tojson", "trim", "truncate", "unique", "upper", "wordcount"}
)


class TemplateLimitError(SecurityError):
    """A template tried something a card may not do, or went over a render budget."""


def plain(value: Any, path: str = "context") -> Any:
    """``value`` as plain data (dicts, lists, str, int, float, bool, None) for a template.

    Models are dumped to JSON-mode dicts and enums become their values, so a template never
    holds an object with methods. Anything else is a programming error: TypeError.
    """
    if isinstance(value, BaseModel):  # JSON mode yields only dicts, lists and scalars
        return value.model_dump(mode="json")
    if isinstance(value, Enum):
        return plain(value.value, path)
    if value is None or type(value) in (bool, int, float, str):
        return value
    if isinstance(value, str):  # a str subclass: only its text
        return str(value)
    if isinstance(value, (list, tuple)):
        return [plain(v, f"{path}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            if not isinstance(k, (str, int)):
                raise TypeError(f"{path}: template data keys must be str or int, not {k!r}")
            key = plain(k, path)
            out[key] = plain(v, f"{path}.{key}")
        return out
    raise TypeError(f"{path}: templates see plain data only, not {type(value).__name__}")


# -- the per-render budget --------------------------------------------------------------


@dataclass
class Budget:
    """What one render may still spend; charged by every guarded operation."""

    steps: int = 0
    work: int = 0
    depth: int = 0

    def step(self, n: int = 1) -> None:
        self.steps += n
        if self.steps > MAX_STEPS:
            raise TemplateLimitError(
                f"template runs too long: over {MAX_STEPS} loop iterations and calls"
            )

    def produce(self, n: int) -> None:
        self.work += n
        if self.work > MAX_WORK:
            raise TemplateLimitError(f"template builds too much text: over {MAX_WORK} bytes")


BUDGET: ContextVar[Budget | None] = ContextVar("dreamgen_template_budget", default=None)


def current_budget() -> Budget:
    # Outside a render (Jinja folds constants at compile time) only per-value checks apply.
    return BUDGET.get() or Budget()


def size_of(value: Any) -> int:
    if isinstance(value, (str, list, tuple, dict)):
        return len(value)
    if isinstance(value, int):
        return value.bit_length() // 8
    return 1


def checked(value: Any, what: str) -> Any:
    """Charge ``value`` to the budget; refuse one over ``MAX_VALUE``."""
    n = size_of(value)
    if n > MAX_VALUE:
        raise TemplateLimitError(f"{what} would be {n} long (limit {MAX_VALUE})")
    current_budget().produce(n)
    return value


def ahead(n: int, what: str) -> None:
    """Refuse before building: ``n`` is an estimate of the size about to be made."""
    if n > MAX_VALUE:
        raise TemplateLimitError(f"{what} would be {n} long (limit {MAX_VALUE})")


# -- helpers a template may call ----------------------------------------------------------


def bounded_range(*args: int) -> range:
    """``range`` for templates: at most ``MAX_RANGE`` items."""
    if not all(isinstance(a, int) and not isinstance(a, bool) for a in args):
        raise TemplateLimitError("range() takes integers")
    rng = range(*args)
    if len(rng) > MAX_RANGE:
        raise TemplateLimitError(f"range() of {len(rng)} items (limit {MAX_RANGE})")
    return rng


def loop_guard(iterable: Any, body_bytes: int) -> Iterable[Any]:
    """Wraps every ``{% for %}``: charges its iterations (and its literal text) up front."""
    if isinstance(iterable, Undefined):
        return iterable  # iterating it raises the usual "is undefined"
    if isinstance(iterable, (list, tuple, dict, str, range)):
        spend = current_budget()
        spend.step(len(iterable))
        spend.produce(len(iterable) * body_bytes)
        return iterable
    return _counted(iter(iterable), body_bytes)


def _counted(it: Iterator[Any], body_bytes: int) -> Iterator[Any]:
    for item in it:
        spend = current_budget()
        spend.step()
        spend.produce(body_bytes)
        yield item


def concat_guard(*parts: Any) -> str:
    """``a ~ b``: the joined text, refused when too long before it is built."""
    texts = [str(p) for p in parts]
    ahead(sum(map(len, texts)), "a joined string (~)")
    return str(checked("".join(texts), "a joined string (~)"))


def finalize(value: Any) -> Any:
    """Every ``{{ … }}`` output, at any level (macro bodies and set blocks included)."""
    if isinstance(value, str):
        checked(value, "an output value")
    else:
        checked(str(value), "an output value")
    return value


# -- filters ----------------------------------------------------------------------------


def _str_len(value: Any) -> int:
    return len(value) if isinstance(value, str) else len(str(value))


def _precheck(name: str, value: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """Estimate what a size-taking filter would build, before it builds it."""
    arg = args[0] if args else None
    if name == "center":
        width = kwargs.get("width", arg if arg is not None else 80)
        ahead(int(width) if isinstance(width, int) else 0, "|center")
    elif name == "indent":
        width = kwargs.get("width", arg if arg is not None else 4)
        unit = len(width) if isinstance(width, str) else int(width) if isinstance(width, int) else 0
        text = value if isinstance(value, str) else str(value)
        ahead(len(text) + (text.count("\n") + 1) * unit, "|indent")
    elif name == "replace":
        old = kwargs.get("old", arg)
        new = kwargs.get("new", args[1] if len(args) > 1 else "")
        text = value if isinstance(value, str) else str(value)
        hits = (len(text) + 1) if old == "" else text.count(str(old)) if old is not None else 0
        ahead(len(text) + hits * _str_len(new), "|replace")
    elif name == "join" and isinstance(value, (list, tuple, str, range)):
        sep = kwargs.get("d", arg if arg is not None else "")
        items = sum(_str_len(x) for x in value) if not isinstance(value, str) else len(value)
        ahead(items + len(value) * _str_len(sep), "|join")
    elif name in ("slice", "batch"):
        n = kwargs.get("slices", kwargs.get("linecount", arg))
        if isinstance(n, int) and not 0 < n <= MAX_RANGE:
            raise TemplateLimitError(f"|{name}({n}): the count must be 1..{MAX_RANGE}")


def guarded(name: str, func: Callable[..., Any]) -> Callable[..., Any]:
    # Filters that take the environment/context get it first; the value comes after.
    skip = 1 if getattr(func, "jinja_pass_arg", None) is not None else 0

    @functools.wraps(func)  # keeps ``jinja_pass_arg``, so Jinja passes the same arguments
    def run(*args: Any, **kwargs: Any) -> Any:
        if len(args) > skip:
            _precheck(name, args[skip], args[skip + 1 :], kwargs)
        return checked(func(*args, **kwargs), f"|{name}")

    return run
