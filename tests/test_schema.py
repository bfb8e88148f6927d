from __future__ import annotations

import orjson

from dreamgen import schema_files
from dreamgen.record import Record
from dreamgen.scenario import SCHEMAS, Scenario, response_format
from dreamgen.validate import label


def test_checked_in_schemas_match_models() -> None:
    assert schema_files.drift() == [], "run: dreamgen schema"


def test_every_string_and_list_is_bounded() -> None:
    def walk(node: object, path: str) -> None:
        if isinstance(node, dict):
            if node.get("type") == "string" and "enum" not in node:
                assert "maxLength" in node, f"unbounded string at {path}"
            if node.get("type") == "array":
                assert "maxItems" in node, f"unbounded list at {path}"
            for k, v in node.items():
                walk(v, f"{path}.{k}")
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, f"{path}[{i}]")

    for name in SCHEMAS:
        walk(response_format(name)["json_schema"]["schema"], name)


def test_scenario_round_trip(scenario: Scenario) -> None:
    again = Scenario.model_validate_json(scenario.model_dump_json())
    assert again == scenario


def test_record_round_trip(scenario: Scenario, cards) -> None:  # type: ignore[no-untyped-def]
    from dreamgen.config import PlanConfig
    from dreamgen.planner import Planner

    request = Planner(cards, PlanConfig(seed=1), target=10).next()
    record = label(scenario, request)
    line = orjson.dumps(record.model_dump(mode="json"))
    assert Record.model_validate_json(line) == record


def test_one_schema_source_two_renderings() -> None:
    """vLLM gets the schema without string lengths; llama.cpp keeps them; nothing else
    differs, and pydantic still enforces the bounds on what comes back."""
    import orjson
    import pytest
    from pydantic import ValidationError

    from dreamgen.engines.base import Engine
    from dreamgen.engines.offline import OfflineEngine
    from dreamgen.scenario import SCHEMAS, schema_for

    def strip(node: object) -> object:
        if isinstance(node, dict):
            return {k: strip(v) for k, v in node.items() if k not in ("maxLength", "minLength")}
        if isinstance(node, list):
            return [strip(v) for v in node]
        return node

    for name, model in SCHEMAS.items():
        bounded, unbounded = schema_for(name, "bounded"), schema_for(name, "unbounded")
        assert b"maxLength" in orjson.dumps(bounded)
        assert b"maxLength" not in orjson.dumps(unbounded)
        assert b"maxItems" in orjson.dumps(unbounded)  # list bounds stay: they are cheap
        assert unbounded == strip(bounded) and bounded == model.model_json_schema()
    assert Engine.schema_dialect == "bounded" and OfflineEngine.schema_dialect == "unbounded"
    too_long = {"opening": "x" * 5000}
    with pytest.raises(ValidationError):
        SCHEMAS["scenario"].model_validate(too_long)
