"""The checked-in JSON Schemas under ``schemas/``, generated from the pydantic models."""

from __future__ import annotations

from pathlib import Path

import orjson
from pydantic import BaseModel

from dreamgen.cards import Card
from dreamgen.config import Config
from dreamgen.labelled import Labelled
from dreamgen.record import Record
from dreamgen.scenario import SCHEMAS

SCHEMA_DIR = Path(__file__).resolve().parent.parent / "schemas"


def render() -> dict[str, bytes]:
    """File name → schema JSON, for every contract dreamgen publishes."""
    models: dict[str, type[BaseModel]] = {
        "record": Record,
        "card": Card,
        "config": Config,
        "labelled": Labelled,
        **SCHEMAS,
    }
    return {
        f"{name}.schema.json": orjson.dumps(
            model.model_json_schema(), option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS
        )
        + b"\n"
        for name, model in models.items()
    }


def write(folder: Path = SCHEMA_DIR) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, data in render().items():
        path = folder / name
        path.write_bytes(data)
        paths.append(path)
    return paths


def drift(folder: Path = SCHEMA_DIR) -> list[str]:
    """Names of schema files that are missing or differ from the models."""
    return [
        name
        for name, data in render().items()
        if not (folder / name).exists() or (folder / name).read_bytes() != data
    ]
