"""Checks of the committed openapi/openapi.json against the schema that the app publishes.

Clients code against the committed file, so a change to the HTTP contract must show up
in it. The schema text also depends on the installed FastAPI and pydantic versions:
after upgrading them, export the schema again.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType
from typing import Any

EXPORT_SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "export_openapi.py"


def load_export_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("export_openapi", EXPORT_SCRIPT)
    assert spec is not None and spec.loader is not None, f"cannot load {EXPORT_SCRIPT}"
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def export_hint(export: ModuleType) -> str:
    return f"run '{export.EXPORT_COMMAND}' and commit openapi/openapi.json"


def schema_sections(schema: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {"paths": schema.get("paths", {}), "schemas": schema.get("components", {}).get("schemas", {})}


def differing_keys(committed: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """List the paths and component schemas whose definitions differ between two schemas."""
    committed_sections = schema_sections(committed)
    current_sections = schema_sections(current)
    differences = []
    for section, old in committed_sections.items():
        new = current_sections[section]
        for key in sorted(set(old) | set(new)):
            if old.get(key) != new.get(key):
                differences.append(f"{section}: {key}")
    return differences


def test_committed_schema_is_current() -> None:
    export = load_export_script()
    assert export.SCHEMA_PATH.exists(), f"{export.SCHEMA_PATH} is missing; {export_hint(export)}"
    committed_text = export.SCHEMA_PATH.read_text(encoding="utf-8")
    current_text = export.render_schema()

    committed = json.loads(committed_text)
    current = json.loads(current_text)
    assert committed == current, (
        f"openapi/openapi.json differs from the app's schema in {differing_keys(committed, current) or 'its metadata'}; "
        f"{export_hint(export)}"
    )
    assert committed_text == current_text, (
        f"openapi/openapi.json is not formatted as the export script writes it; {export_hint(export)}"
    )


def test_schema_lists_every_endpoint() -> None:
    schema = json.loads(load_export_script().render_schema())

    assert set(schema["paths"]) == {"/activation", "/gradient", "/jvp", "/model", "/tokenize", "/health"}
    assert set(schema["paths"]["/model"]) == {"get"}
    assert set(schema["paths"]["/health"]) == {"get"}
    for path in ("/activation", "/gradient", "/jvp", "/tokenize"):
        assert set(schema["paths"][path]) == {"post"}, path


def test_schema_error_responses_share_one_shape() -> None:
    schema = json.loads(load_export_script().render_schema())
    error_reference = "#/components/schemas/ErrorResponse"

    for path, operations in schema["paths"].items():
        for method, operation in operations.items():
            for status, response in operation["responses"].items():
                if not status.startswith(("4", "5")):
                    continue
                reference = response["content"]["application/json"]["schema"].get("$ref")
                assert reference == error_reference, f"{method.upper()} {path} {status} uses {reference}"
