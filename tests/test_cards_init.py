"""`dreamgen cards init DIR`: a copy of the shipped library to edit, then `--prompts DIR`."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from dreamgen.cards import PROMPTS_DIR, CardSet
from dreamgen.cli import app


def test_init_copies_a_library_that_loads_and_refuses_a_full_folder(tmp_path: Path) -> None:
    runner = CliRunner()
    dest = tmp_path / "mycards"
    res = runner.invoke(app, ["cards", "init", str(dest)])
    assert res.exit_code == 0, res.output
    shipped = sorted(p.name for p in PROMPTS_DIR.glob("*.yaml"))
    assert sorted(p.name for p in dest.glob("*.yaml")) == shipped
    assert (dest / "templates" / "directed.j2").read_bytes() == (
        PROMPTS_DIR / "templates" / "directed.j2"
    ).read_bytes()
    assert len(CardSet.load(dest).cards) == len(shipped)
    # An edit in the copy is what `--prompts DIR` then builds from.
    card = dest / shipped[0]
    card.write_text(card.read_text().replace("title:", "title: EDITED", 1))
    listed = runner.invoke(app, ["cards", "list", "--prompts", str(dest)])
    assert listed.exit_code == 0 and "EDITED" in listed.output
    again = runner.invoke(app, ["cards", "init", str(dest)])
    assert again.exit_code == 2
    assert again.output.strip().startswith("error: ") and "not empty" in again.output
    assert "EDITED" in card.read_text()  # nothing overwritten
