"""The package as a user installs it: a wheel from `python -m build`, in a fresh venv.

The wheel is built from a copy of the source (the build writes `build/` and egg-info next
to its source, never into this tree) and installed with `pip install --no-deps --no-index`
into a plain `python -m venv` (no system site-packages). Its dependencies come from this
repository's `.venv`, through a folder of symlinks that a `.pth` file puts on the new
venv's path: resolving them from an index takes minutes here. The folder leaves out
dreamgen itself (its editable install) and every module of the `train` extra, so the
fresh venv is a core install: it must build on the embedded engine, and every command
that needs the extra must say so in one line.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import orjson
import pytest

ROOT = Path(__file__).resolve().parent.parent
# Top-level names (modules and their dist-info) that the core install must not have.
NOT_CORE = (
    "dreamgen", "__editable__", "torch", "functorch", "transformers", "accelerate", "gguf",
    "matplotlib", "mpl_toolkits", "datasets", "huggingface_hub", "trl", "peft", "safetensors",
)  # fmt: skip


def _run(cmd: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("build")
    src = tmp_path_factory.mktemp("src")
    shutil.copy(ROOT / "pyproject.toml", src)
    shutil.copy(ROOT / "README.md", src)
    shutil.copytree(
        ROOT / "dreamgen", src / "dreamgen", ignore=shutil.ignore_patterns("__pycache__")
    )
    dist = tmp_path_factory.mktemp("dist")
    res = _run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(dist), "."],
        cwd=src,
    )
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    (whl,) = dist.glob("dreamgen-*.whl")
    return whl


@pytest.fixture(scope="module")
def venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    home = tmp_path_factory.mktemp("venv")
    env = home / "venv"
    res = _run([sys.executable, "-m", "venv", str(env)], cwd=home)
    assert res.returncode == 0, res.stderr
    pip = [str(env / "bin" / "python"), "-m", "pip", "install", "-q", "--no-deps", "--no-index"]
    res = _run([*pip, str(wheel)], cwd=home)
    assert res.returncode == 0, res.stderr
    deps = home / "deps"
    deps.mkdir()
    site = Path(sysconfig.get_paths()["purelib"])  # this .venv's site-packages
    for entry in site.iterdir():
        if not entry.name.lower().startswith(NOT_CORE) and not entry.name.endswith(".pth"):
            (deps / entry.name).symlink_to(entry)
    (new_site,) = (env / "lib").glob("python3*/site-packages")
    (new_site / "dreamgen-test-deps.pth").write_text(f"{deps}\n")
    return env


def test_the_wheel_ships_the_card_library(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    cards = sorted(
        Path(n).name for n in names if n.startswith("dreamgen/prompts/") and n.endswith(".yaml")
    )
    shipped = sorted(p.name for p in (ROOT / "dreamgen" / "prompts").glob("*.yaml"))
    assert cards == shipped and len(cards) >= 20
    templates = {Path(n).name for n in names if n.startswith("dreamgen/prompts/templates/")}
    assert templates == {"directed.j2", "evolve.j2", "system.j2", "undirected.j2"}


def test_fresh_venv_builds_on_the_embedded_engine(venv: Path, tmp_path: Path) -> None:
    bin_ = venv / "bin"
    where = _run([str(bin_ / "python"), "-c", "import dreamgen, dreamgen.cards as c; "
                  "print(dreamgen.__file__); print(c.PROMPTS_DIR)"], cwd=tmp_path)  # fmt: skip
    module, prompts = where.stdout.split()
    assert module.startswith(str(venv)) and prompts.startswith(str(venv)), where.stdout
    assert _run([str(bin_ / "dreamgen"), "--version"], tmp_path).stdout.startswith("dreamgen ")
    shown = _run([str(bin_ / "dreamgen"), "cards", "show", "csv-parser-stdlib"], tmp_path)
    assert shown.returncode == 0 and "id: csv-parser-stdlib" in shown.stdout, shown.stderr
    checked = _run([str(bin_ / "dreamgen"), "cards", "check"], tmp_path)
    assert checked.returncode == 0 and "20 cards OK" in checked.stdout, checked.stdout
    init = _run([str(bin_ / "dreamgen"), "cards", "init", "mycards"], tmp_path)
    assert init.returncode == 0, init.stderr
    assert len(list((tmp_path / "mycards").glob("*.yaml"))) >= 20
    res = _run(
        [str(bin_ / "dreamgen"), "build", "--count", "2", "--out", "out", "--seed", "0",
         "--prompts", "mycards", "--json"],
        cwd=tmp_path, timeout=600,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    summary = orjson.loads(res.stdout.strip().splitlines()[-1])
    assert summary["total"] == 2
    lines = b"".join(p.read_bytes() for p in (tmp_path / "out" / "shards").glob("*.jsonl"))
    records = [orjson.loads(x) for x in lines.splitlines()]
    assert len([r for r in records if r["mode"] != "minimal_pair"]) == 2
    check = _run([str(bin_ / "dreamgen"), "validate", "out"], tmp_path)
    assert check.returncode == 0, check.stdout[-2000:]


@pytest.mark.parametrize(
    ("args", "module"),
    [
        (["probe", "smollm2", str(ROOT / "tests" / "data" / "dev.jsonl")], "torch"),
        (
            [
                "experiment",
                "src",
                "--heldout",
                str(ROOT / "tests" / "data" / "dev.jsonl"),
                "--out",
                "exp",
            ],
            "torch",
        ),
        (["export", "src", "--format", "hf", "--to", "hf"], "datasets"),
    ],
)
def test_a_missing_extra_is_one_line(
    venv: Path, tmp_path: Path, args: list[str], module: str
) -> None:
    res = _run([str(venv / "bin" / "python"), "-c", _STORE], cwd=tmp_path)  # a real store
    assert res.returncode == 0, res.stderr
    res = _run([str(venv / "bin" / "dreamgen"), *args], cwd=tmp_path)
    assert res.returncode == 2, res.stderr[-2000:]
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr[-2000:]
    assert "pip install 'dreamgen[train]'" in lines[0] and module in lines[0]
    assert lines[0].startswith("error: ")


# Writes one hand-made record into ./src through the installed package's own Store.
_STORE = """
from pathlib import Path
from dreamgen.store import Store
from dreamgen.record import Record
rec = {"id": "r1", "messages": [{"role": "user", "content": "Keep it in bash, please."}],
       "target": {"role": "assistant", "content": "A bash version, then."},
       "contrast": {"role": "assistant", "content": "Python would be nicer."},
       "cues": [{"message": 0, "start": 0, "end": 15, "kind": "constraint",
                 "text": "Keep it in bash"}],
       "axes": {"cue_kind": "constraint", "distractor_kind": "better_tool",
                "domain": "systems_programming", "emotion": "tired", "momentum": "executing"},
       "difficulty": 1, "group_id": "g", "provenance": {"card": "c", "prompt_hash": "h",
       "model": "m", "engine": "e", "dreamgen_version": "0", "created_at": 0.0}}
st = Store(Path("src"))
st.add(Record.model_validate(rec))
st.flush()
st.close()
"""
