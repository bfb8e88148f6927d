"""The template sandbox for seed cards: a card is data a user can share and edit, never code.

Jinja2's own sandbox blocks underscore attributes, but still lets a template call any
method of any object it can reach; a pydantic model in the context was enough to unpickle
a payload (``card.parse_raw(..., proto="pickle")``). This sandbox is narrower:

- the context holds **plain values only** (str, int, float, bool, None, lists, dicts built
  for the render: ``plain`` converts models and enums and refuses anything else);
- attribute access reads a mapping's keys and nothing else (no methods on str, list or
  dict), plus the documented fields of ``loop`` and the macros of an imported library file;
- the only callables are the template's own macros, ``loop.cycle``/``loop.changed`` and the
  helpers below (``describe``, a bounded ``range``); Jinja's other globals are gone;
- filters come from an allow-list, each checked for the size of what it would build;
- a render has a budget: loop iterations plus calls (``MAX_STEPS``), call depth
  (``MAX_DEPTH``), bytes produced along the way (``MAX_WORK``), any single value
  (``MAX_VALUE``) and the final text (``MAX_OUTPUT``);
- templates load only from the card library's ``templates/`` folder, by a constant name,
  up to ``MAX_TEMPLATE_BYTES``, strict UTF-8; include/import cycles and recursive loops are
  refused when the template is parsed.

Every refusal is a ``TemplateError`` whose message is one line.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.environment import TemplateModule
from jinja2.runtime import LoopContext, Macro, Undefined
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.visitor import NodeTransformer

from dreamgen.sandbox_limits import (
    ALLOWED_FILTERS,
    BUDGET,
    LOOP_FIELDS,
    MAX_DEPTH,
    MAX_INCLUDE_DEPTH,
    MAX_INT_BITS,
    MAX_OUTPUT,
    MAX_TEMPLATE_BYTES,
    Budget,
    TemplateLimitError,
    ahead,
    bounded_range,
    checked,
    concat_guard,
    current_budget,
    finalize,
    guarded,
    loop_guard,
    plain,
    size_of,
)

_NAME = re.compile(
    r"^[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)*(?:/[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)*)*$"
)

# -- the parse-time policy ----------------------------------------------------------------


def _literal_bytes(body: Iterable[nodes.Node]) -> int:
    """Template text a loop body writes per iteration (nested loops charge their own)."""
    total = 0
    for node in body:
        if isinstance(node, nodes.TemplateData):
            total += len(node.data)
        elif not isinstance(node, (nodes.For, nodes.Macro, nodes.CallBlock)):
            total += _literal_bytes(node.iter_child_nodes())
    return total


class _Guard(NodeTransformer):
    """Rewrites a parsed template: loops and ``~`` go through the budget."""

    def visit_For(self, node: nodes.For) -> nodes.Node:
        self.generic_visit(node)
        body = _literal_bytes(node.body)
        node.iter = nodes.Call(
            nodes.EnvironmentAttribute("loop_guard", lineno=node.lineno),
            [node.iter, nodes.Const(body, lineno=node.lineno)],
            [],
            None,
            None,
            lineno=node.lineno,
        )
        return node

    def visit_Concat(self, node: nodes.Concat) -> nodes.Node:
        self.generic_visit(node)
        target = nodes.EnvironmentAttribute("concat_guard", lineno=node.lineno)
        return nodes.Call(target, list(node.nodes), [], None, None, lineno=node.lineno)


def _referenced(ast: nodes.Template) -> list[tuple[nodes.Node, nodes.Expr]]:
    found: list[tuple[nodes.Node, nodes.Expr]] = []
    found += [(n, n.template) for n in ast.find_all(nodes.Include)]
    found += [(n, n.template) for n in ast.find_all(nodes.Import)]
    found += [(n, n.template) for n in ast.find_all(nodes.FromImport)]
    found += [(n, n.template) for n in ast.find_all(nodes.Extends)]
    return found


class CardLoader(jinja2.BaseLoader):
    """Templates from one folder only: a plain relative name, bounded size, strict UTF-8."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def get_source(
        self, environment: jinja2.Environment, template: str
    ) -> tuple[str, str, Callable[[], bool]]:
        if not _NAME.match(template) or ".." in template.split("/"):
            raise jinja2.TemplateNotFound(template, f"not a template name: {template[:80]!r}")
        path = self.root / template
        try:
            real, base = path.resolve(), self.root.resolve()
            if not real.is_relative_to(base):  # a symlink out of the card library
                raise jinja2.TemplateNotFound(template, f"{path} points outside {self.root}")
            size = real.stat().st_size
            if not real.is_file():
                raise jinja2.TemplateNotFound(template)
            if size > MAX_TEMPLATE_BYTES:
                raise TemplateLimitError(
                    f"{path}: {size} bytes, over the template limit of {MAX_TEMPLATE_BYTES}"
                )
            data = real.read_bytes()[: MAX_TEMPLATE_BYTES + 1]
        except FileNotFoundError as exc:
            raise jinja2.TemplateNotFound(template) from exc
        except OSError as exc:
            raise TemplateLimitError(f"{path}: cannot read: {exc.strerror or exc}") from exc
        try:
            source = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise TemplateLimitError(
                f"{path}: not UTF-8 (byte {exc.start}: {data[exc.start : exc.start + 1]!r})"
            ) from exc
        mtime = real.stat().st_mtime
        return source, str(path), lambda: real.exists() and real.stat().st_mtime == mtime


class CardSandbox(ImmutableSandboxedEnvironment):
    """The Jinja2 environment card templates render in (see the module docstring)."""

    intercepted_binops = frozenset({"+", "-", "*", "/", "//", "%", "**"})

    def __init__(self, templates: Path, helpers: dict[str, Callable[..., Any]]) -> None:
        super().__init__(
            loader=CardLoader(templates),
            undefined=jinja2.StrictUndefined,
            autoescape=False,
            keep_trailing_newline=True,
            trim_blocks=True,
            lstrip_blocks=True,
            finalize=finalize,
            # A template is read once: an edit on disk applies on the next load (a daemon's
            # SIGHUP, which lints it first), never half-way through a run.
            auto_reload=False,
            cache_size=-1,
        )
        self.globals.clear()  # range, dict, lipsum, cycler, joiner, namespace
        self.globals.update({"range": bounded_range, **helpers})
        kept = {k: guarded(k, f) for k, f in self.filters.items() if k in ALLOWED_FILTERS}
        self.filters.clear()
        self.filters.update(kept)
        for name, func in helpers.items():
            self.filters[name] = guarded(name, func)
        self.loop_guard = loop_guard
        self.concat_guard = concat_guard
        self._callable = frozenset({bounded_range, loop_guard, concat_guard, *helpers.values()})
        self._checking: list[str] = []  # names being parsed: an include cycle shows here

    def loader_source(self, name: str) -> str:
        """A template's source through the card loader (its name, size and UTF-8 rules)."""
        assert isinstance(self.loader, CardLoader)
        return self.loader.get_source(self, name)[0]

    # Parsing: the static rules, then the rewrite that puts loops and ``~`` on the budget.
    def _parse(self, source: str, name: str | None, filename: str | None) -> nodes.Template:
        ast = super()._parse(source, name, filename)
        for loop in ast.find_all(nodes.For):
            if loop.recursive:
                self._refuse("recursive loops are not allowed", loop, name, filename)
        for node, target in _referenced(ast):
            value = target.value if isinstance(target, nodes.Const) else None
            if not isinstance(value, str):
                self._refuse("include/import needs a constant template name", node, name, filename)
            self._check_reference(str(value), node, name, filename)
        result = _Guard().visit(ast)
        assert isinstance(result, nodes.Template)
        return result

    def _check_reference(
        self, target: str, node: nodes.Node, name: str | None, filename: str | None
    ) -> None:
        if target == name or target in self._checking:
            self._refuse(f"{target!r} includes itself (a cycle)", node, name, filename)
        if len(self._checking) >= MAX_INCLUDE_DEPTH:
            self._refuse(f"includes nest deeper than {MAX_INCLUDE_DEPTH}", node, name, filename)
        assert self.loader is not None
        try:
            source, path, _ = self.loader.get_source(self, target)
        except jinja2.TemplateNotFound:
            self._refuse(f"no template {target!r} in the card library", node, name, filename)
        self._checking.append(name or "")
        try:
            self._parse(source, target, path)
        finally:
            self._checking.pop()

    @staticmethod
    def _refuse(message: str, node: nodes.Node, name: str | None, filename: str | None) -> Any:
        raise jinja2.TemplateSyntaxError(message, node.lineno, name, filename)

    # Runtime: what a template can reach.
    def getattr(self, obj: Any, attribute: str) -> Any:
        if isinstance(obj, dict):
            if attribute in obj:
                return obj[attribute]
            return self.undefined(
                hint=f"no field {attribute!r} (fields: {', '.join(map(str, obj))[:200]})"
            )
        if isinstance(obj, Undefined):  # a missing field's fields: still that missing field
            return obj
        if isinstance(obj, LoopContext) and attribute in LOOP_FIELDS:
            return getattr(obj, attribute)
        if isinstance(obj, TemplateModule) and not attribute.startswith("_"):
            value = getattr(obj, attribute, None)
            if isinstance(value, Macro):
                return value
        raise TemplateLimitError(
            f"attribute {attribute[:60]!r} of a {type(obj).__name__} is not allowed: "
            "card templates read fields of their data, nothing else"
        )

    def getitem(self, obj: Any, argument: Any) -> Any:
        if isinstance(obj, dict):
            if isinstance(argument, (str, int)) and argument in obj:
                return obj[argument]
            return self.undefined(obj=obj, name=str(argument))
        if isinstance(obj, Undefined):
            return obj
        if isinstance(obj, (list, tuple, str, range)):
            if isinstance(argument, int) and not isinstance(argument, bool):
                try:
                    return obj[argument]
                except IndexError:
                    return self.undefined(obj=obj, name=str(argument))
            if isinstance(argument, slice) and all(
                p is None or (isinstance(p, int) and not isinstance(p, bool))
                for p in (argument.start, argument.stop, argument.step)
            ):
                return checked(obj[argument], "a slice")
        raise TemplateLimitError(
            f"indexing a {type(obj).__name__} with {type(argument).__name__} is not allowed"
        )

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(__obj, Undefined):
            return __obj()  # StrictUndefined: raises "... is undefined" with its hint
        ok = (
            isinstance(__obj, Macro)
            or __obj in __self._callable
            or (
                isinstance(getattr(__obj, "__self__", None), LoopContext)
                and getattr(__obj, "__name__", "") in ("cycle", "changed")
            )
        )
        if not ok:
            what = getattr(__obj, "__name__", type(__obj).__name__)
            raise TemplateLimitError(
                f"calling {str(what)[:60]!r} is not allowed in a card template"
            )
        spend = current_budget()
        spend.step()
        spend.depth += 1
        try:
            if spend.depth > MAX_DEPTH:
                raise TemplateLimitError(f"macro calls nest deeper than {MAX_DEPTH}")
            result = __context.call(__obj, *args, **kwargs)
        finally:
            spend.depth -= 1
        if __obj is concat_guard or __obj is loop_guard:  # they charge for themselves
            return result
        return checked(result, "a call's result")

    def call_binop(self, context: Any, operator_: str, left: Any, right: Any) -> Any:
        ints = all(isinstance(x, int) for x in (left, right))
        if operator_ == "**" and ints:
            if right > 64 or left.bit_length() * max(right, 0) > MAX_INT_BITS:
                raise TemplateLimitError(f"{left} ** {right} is too large")
        elif operator_ == "*":
            seq, n = (left, right) if isinstance(right, int) else (right, left)
            if isinstance(seq, (str, list, tuple)) and isinstance(n, int):
                ahead(len(seq) * n, "a repeated value (*)")
            elif ints and left.bit_length() + right.bit_length() > MAX_INT_BITS:
                raise TemplateLimitError("an integer product that large is not allowed")
        elif operator_ == "+" and isinstance(left, (str, list, tuple)):
            ahead(size_of(left) + size_of(right), "a sum (+)")
        elif operator_ == "%" and isinstance(left, str):
            raise TemplateLimitError("printf-style formatting (%) is not allowed; use filters")
        try:
            result = _BINOPS[operator_](left, right)
        except (ArithmeticError, TypeError, ValueError) as exc:
            raise TemplateLimitError(
                f"{operator_!r} on {left!r:.40} and {right!r:.40}: {exc}"
            ) from exc
        return checked(result, f"the result of {operator_!r}")


_BINOPS: dict[str, Callable[[Any, Any], Any]] = {
    "+": operator.add,
    "-": operator.sub,
    "*": operator.mul,
    "/": operator.truediv,
    "//": operator.floordiv,
    "%": operator.mod,
    "**": operator.pow,
}


def render(env: CardSandbox, name: str, context: dict[str, Any]) -> str:
    """Render template ``name`` with plain copies of ``context``, inside a fresh budget."""
    data = {k: plain(v, k) for k, v in context.items()}
    token = BUDGET.set(Budget())
    try:
        template = env.get_template(name)
        parts: list[str] = []
        total = 0
        for chunk in template.generate(**data):
            total += len(chunk)
            if total > MAX_OUTPUT:
                raise TemplateLimitError(f"rendered text is over {MAX_OUTPUT} characters")
            parts.append(chunk)
    except jinja2.TemplateError:
        raise
    except RecursionError as exc:  # nesting the parser or a guard did not bound
        raise TemplateLimitError("template nests or recurses too deep") from exc
    except Exception as exc:  # a filter or operator on the wrong data: the template's error
        raise TemplateLimitError(f"{type(exc).__name__}: {one_line(exc, 200)}") from exc
    finally:
        BUDGET.reset(token)
    return "".join(parts)


def one_line(exc: object, limit: int = 300) -> str:
    """An error's message on one bounded line."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"
