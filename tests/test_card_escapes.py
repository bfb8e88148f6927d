"""Cards are data: template escapes and memory bombs, each refused in one line, nothing run.

The first attack is issue 18's: a template that called a pydantic method on the card to
unpickle a payload, which ran a shell command during `cards check`, `cards list` and
`build`. The payload here touches a marker file; before the sandbox was narrowed it was
created by all three commands (see the CHANGELOG), and now it must never appear.

Every attack is one card with its own template (or one card file), so a single library
holds them all and each real `dreamgen` subprocess meets every attack at once; the
subprocess runs under an address-space limit so a regression fails here instead of
taking the machine's memory, and its peak RSS and time are checked.
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from dreamgen.cards import PROMPTS_DIR, CardError, CardSet, lint

ROOT = Path(__file__).resolve().parent.parent
CARD = """id: {id}
title: An attack card
situation: Someone wants a sentence trimmed and nothing else changed at all.
domains: [writing_editing]
cue_kinds: [explicit_instruction]
distractor_kinds: [scope_creep]
template: {template}
"""


def pickle_payload(marker: Path) -> str:
    """The issue's attack: pydantic's parse_raw unpickles, and the pickle runs a command."""
    pickle = f"cos\\nsystem\\n(S'touch {marker}'\\ntR."
    return '{{ card.parse_raw("' + pickle + '", proto="pickle", allow_pickle=True) }}'


def shell(marker: Path) -> str:
    return f"touch {marker}"


# (name, template source or None for a YAML attack, what the one line must say)
TEMPLATE_ATTACKS: dict[str, tuple[str, str]] = {
    "pickle": ("{pickle}", "no field 'parse_raw'"),
    "class-mro": ("{{{{ ''.__class__.__mro__ }}}}", "not allowed"),
    "subclasses": ("{{{{ ''.__class__.__mro__[1].__subclasses__() }}}}", "not allowed"),
    "card-class": ("{{{{ card.__class__.__init__.__globals__ }}}}", "no field '__class__'"),
    "cycler": (
        "{{{{ cycler.__init__.__globals__.os.system('{shell}') }}}}",
        "variable 'cycler'",
    ),
    "lipsum": ("{{{{ lipsum.__globals__['os'].system('{shell}') }}}}", "variable 'lipsum'"),
    "joiner": ("{{{{ joiner.__init__.__globals__ }}}}", "variable 'joiner'"),
    "namespace": ("{{% set ns = namespace(x=1) %}}{{{{ ns }}}}", "variable 'namespace'"),
    "attr-filter": ("{{{{ card|attr('parse_raw') }}}}", "No filter named 'attr'"),
    "str-format": ("{{{{ '{{0.__class__}}'.format(card) }}}}", "not allowed"),
    "format-pad": ("{{{{ '{{:>999999999}}'.format(1) }}}}", "not allowed"),
    "printf": ("{{{{ '%999999999s' % 'x' }}}}", "printf-style"),
    "model-validate": (
        "{{{{ axes.model_validate_json('{{}}') }}}}",
        "no field 'model_validate_json'",
    ),
    "model-copy": ("{{{{ card.model_copy() }}}}", "no field 'model_copy'"),
    "copy": ("{{{{ card.copy() }}}}", "no field 'copy'"),
    "parse-obj": ("{{{{ card.parse_obj({{}}) }}}}", "no field 'parse_obj'"),
    "dict-method": ("{{{{ card.items() }}}}", "no field 'items'"),
    "str-method": ("{{{{ card.situation.upper() }}}}", "not allowed"),
    "template-ref": ("{{{{ self._TemplateReference__context }}}}", "not allowed"),
    "range-huge": ("{{{{ range(10**9)|list }}}}", "range()"),
    "nested-loops": (
        "{{% for a in range(1000) %}}{{% for b in range(1000) %}}{{% for c in range(1000) %}}"
        "x{{% endfor %}}{{% endfor %}}{{% endfor %}}",
        "too long",
    ),
    "recursive-macro": (
        "{{% macro f(n) %}}{{{{ f(n) }}}}{{% endmacro %}}{{{{ f(1) }}}}",
        "nest deeper",
    ),
    "doubling": (
        "{{% macro d(s, n) %}}{{% if n %}}{{{{ d(s ~ s, n - 1) }}}}{{% endif %}}{{% endmacro %}}"
        "{{{{ d('ab', 18) }}}}",
        "limit",
    ),
    "repeat": ("{{{{ 'a' * 10**9 }}}}", "limit"),
    "power": ("{{{{ 2 ** (10**8) }}}}", "too large"),
    "center": ("{{{{ 'x'|center(1000000000) }}}}", "|center"),
    "replace": ("{{{{ card.situation|replace('', card.situation * 3000) }}}}", "limit"),
    "slice": ("{{{{ [1]|slice(10**9)|list }}}}", "|slice"),
    "output": (
        "{{% for i in range(1000) %}}{{{{ card.situation * 1000 }}}}{{% endfor %}}",
        "rendered text is over",
    ),
    "set-block": (
        "{{% set x %}}{{% for i in range(1000) %}}{{{{ card.situation * 200 }}}}{{% endfor %}}"
        "{{% endset %}}{{{{ x|length }}}}",
        "too much text",
    ),
    "type-error": ("{{{{ card|sum }}}}", "TypeError"),
    "deep-parens": ("{{{{ " + "(" * 5000 + "1" + ")" * 5000 + " }}}}", "too deep"),
    "self-include": ("{{% include '{template}' %}}", "includes itself"),
    "escape-include": ("{{% include '../../etc/passwd' %}}", "no template"),
    "dynamic-include": ("{{% include card.template %}}", "constant template name"),
    "recursive-loop": (
        "{{% for x in card.domains recursive %}}{{{{ loop(card.domains) }}}}{{% endfor %}}",
        "recursive loops",
    ),
}

LAUGHS = "\n".join(
    ["id: {id}", "title: Laughs", "situation: Someone wants a sentence trimmed and nothing else."]
    + ["a0: &a0 [writing_editing, writing_editing, writing_editing, writing_editing]"]
    + [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 10)]
    + ["domains: *a9", "template: directed.j2", ""]
)
YAML_ATTACKS: dict[str, tuple[bytes, str]] = {
    "billion-laughs": (LAUGHS.encode(), "YAML nodes"),
    "huge-card": (b"id: {id}\nexamples:\n" + b"  - x\n" * 100_000, "over the card limit"),
    "deep-card": (b"id: {id}\ndomains: " + b"[" * 200 + b"]" * 200 + b"\n", "nested deeper"),
    "latin1-card": (CARD.encode().replace(b"An attack", b"Caf\xe9"), "not UTF-8"),
}


@dataclass
class Ran:
    rc: int
    stdout: str
    stderr: str
    rss_mb: float
    seconds: float


def run(*args: str, cwd: Path = ROOT) -> Ran:
    """A real `dreamgen` subprocess under a 4 GiB address-space cap; its own peak RSS."""

    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))

    t0 = time.monotonic()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "dreamgen", *args],
            stdout=out,
            stderr=err,
            text=True,
            cwd=cwd,
            preexec_fn=cap,
        )
        # wait4, not Popen.wait: it gives this child's own peak RSS.
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    rss = usage.ru_maxrss
    return Ran(proc.returncode, stdout, stderr, rss / 1024, time.monotonic() - t0)


def build_library(root: Path, marker: Path, names: list[str] | None = None) -> dict[str, str]:
    """The shipped templates plus one card per attack; returns attack → the file it lives in."""
    import shutil

    shutil.copytree(PROMPTS_DIR / "templates", root / "templates")
    where: dict[str, str] = {}
    for name, (source, _) in TEMPLATE_ATTACKS.items():
        if names is not None and name not in names:
            continue
        template = f"attack-{name}.j2"
        text = source.format(pickle=pickle_payload(marker), shell=shell(marker), template=template)
        if name == "pickle":
            text = pickle_payload(marker)  # no format escapes in the issue's own payload
        (root / "templates" / template).write_text(text + "\n", encoding="utf-8")
        (root / f"attack-{name}.yaml").write_text(
            CARD.format(id=f"attack-{name}", template=template), encoding="utf-8"
        )
        where[name] = str(root / "templates" / template)
    for name, (data, _) in YAML_ATTACKS.items():
        if names is not None and name not in names:
            continue
        path = root / f"yaml-{name}.yaml"
        path.write_bytes(data.replace(b"{id}", f"yaml-{name}".encode()))
        where[name] = str(path)
    return where


def expected(name: str) -> str:
    if name in TEMPLATE_ATTACKS:
        return TEMPLATE_ATTACKS[name][1]
    return YAML_ATTACKS[name][1]


def assert_one_line_each(lines: list[str], where: dict[str, str]) -> None:
    """Exactly one line per attack, naming its file and saying why."""
    assert len(lines) == len(where), "\n".join(lines)
    for name, path in where.items():
        mine = [ln for ln in lines if f"{path}:" in ln or ln.startswith(f"{path} ")]
        assert len(mine) == 1, (name, lines)
        assert expected(name) in mine[0], (name, mine[0])
        assert len(mine[0]) < 600, (name, len(mine[0]))


def test_the_issue_pickle_payload_runs_nothing(tmp_path: Path) -> None:
    """Issue 18's reproduction, alone: before the fix `cards check` created the marker."""
    marker = tmp_path / "pwned"
    lib = tmp_path / "lib"
    where = build_library(lib, marker, ["pickle"])
    ran = run("cards", "check", "--prompts", str(lib))
    assert not marker.exists()
    assert ran.rc == 1 and "Traceback" not in ran.stderr, ran.stderr
    assert_one_line_each(ran.stdout.splitlines(), where)


def test_every_attack_refused_by_cards_check_list_and_build(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    lib = tmp_path / "lib"
    where = build_library(lib, marker)

    ran = run("cards", "check", "--prompts", str(lib))
    assert ran.rc == 1 and ran.stderr == "", ran.stderr
    assert_one_line_each(ran.stdout.splitlines(), where)
    assert not marker.exists()
    assert ran.rss_mb < 400 and ran.seconds < 60, (ran.rss_mb, ran.seconds)

    ran = run("cards", "list", "--prompts", str(lib))
    assert ran.rc == 2 and ran.stdout == "" and "Traceback" not in ran.stderr, ran.stderr
    lines = ran.stderr.splitlines()
    assert lines[0].startswith("error: ")
    lines[0] = lines[0].removeprefix("error: ")
    assert_one_line_each(lines, where)
    assert not marker.exists()

    out = tmp_path / "out"
    config = tmp_path / "dreamgen.toml"
    config.write_text(f'prompts = "{lib}"\nout = "{out}"\n', encoding="utf-8")
    # No server listens on port 9: the cards are refused before anything is asked of one.
    ran = run("build", "--config", str(config), "--server", "http://127.0.0.1:9/v1", "--model", "m")
    assert ran.rc == 2 and "Traceback" not in ran.stderr, ran.stderr
    lines = [ln for ln in ran.stderr.splitlines() if ln.strip()]
    assert lines[0].startswith("error: ")
    lines[0] = lines[0].removeprefix("error: ")
    assert_one_line_each(lines, where)
    assert not marker.exists()
    assert not out.exists()  # the store was never opened


@pytest.mark.parametrize("name", sorted([*TEMPLATE_ATTACKS, *YAML_ATTACKS]))
def test_each_attack_alone_in_the_library_api(tmp_path: Path, name: str) -> None:
    """The library path (`CardSet.load`, what `build` and the daemon call): one problem."""
    marker = tmp_path / "pwned"
    where = build_library(tmp_path / "lib", marker, [name])
    problems = lint(tmp_path / "lib")
    assert_one_line_each(problems, where)
    with pytest.raises(CardError):
        CardSet.load(tmp_path / "lib")
    assert not marker.exists()


def test_a_card_set_that_skipped_the_check_still_renders_sandboxed(tmp_path: Path) -> None:
    """`CardSet.render` itself refuses (a CardError, one line), not only `cards check`."""
    marker = tmp_path / "pwned"
    lib = tmp_path / "lib"
    build_library(lib, marker, ["pickle"])
    cards = CardSet([], lib)
    from dreamgen.cards import Card

    card = Card.model_validate({"id": "x", "title": "t", "situation": "a long enough situation"})
    with pytest.raises(CardError) as info:
        cards.render("attack-pickle.j2", card=card)
    assert "\n" not in str(info.value) and "no field 'parse_raw'" in str(info.value)
    # Jinja's default globals are gone from the environment, not only flagged by the lint.
    for name in ("cycler", "lipsum", "joiner", "namespace", "dict"):
        (lib / "templates" / f"g-{name}.j2").write_text(f"{{{{ {name}() }}}}")
        with pytest.raises(CardError, match=f"'{name}' is undefined"):
            cards.render(f"g-{name}.j2")
    assert not marker.exists()


def test_the_shipped_prompts_render_as_before() -> None:
    """Plain data renders the shipped templates exactly as the models did (same prompts)."""
    from dreamgen.record import Axes
    from dreamgen.taxonomy import DIFFICULTY, describe

    cards = CardSet.load()
    card = cards.by_id["train-trip"]
    axes = Axes(
        cue_kind=card.cue_kinds[0],
        distractor_kind=card.distractor_kinds[0],
        domain=card.domains[0],
        emotion=card.emotions[0],
        momentum=card.momentum[0],
    )
    text = cards.render(
        "directed.j2", card=card, axes=axes, difficulty=2, difficulty_text=DIFFICULTY[2]
    )
    # Written out by hand from directed.j2, not by the code under test.
    assert text.startswith(f"Topic: {card.situation.strip()}\n")
    assert f"Setting: {axes.domain} ({describe(str(axes.domain))}).\n" in text
    assert f"Difficulty 2 of 5: {DIFFICULTY[2]}.\n" in text
    assert text.endswith("Write this conversation as JSON.\n")
