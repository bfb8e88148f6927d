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
