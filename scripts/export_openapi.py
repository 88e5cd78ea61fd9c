"""Write the app's OpenAPI schema to openapi/openapi.json, or check that the file is current.

Usage, from the repository root:

    .venv/bin/python scripts/export_openapi.py           # rewrite openapi/openapi.json
    .venv/bin/python scripts/export_openapi.py --check   # exit 1 if the file is out of date

Building the schema does not load the model: the app loads it in its lifespan, which
never runs here.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from service.api.app import create_app
from service.settings import Settings

SCHEMA_PATH = Path(__file__).resolve().parent.parent / "openapi" / "openapi.json"
EXPORT_COMMAND = ".venv/bin/python scripts/export_openapi.py"


def render_schema() -> str:
    """Render the app's OpenAPI schema as the committed file stores it."""
    schema = create_app(Settings()).openapi()
    return json.dumps(schema, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write the app's OpenAPI schema to openapi/openapi.json.")
    parser.add_argument(
        "--check",
        action="store_true",
        help=f"compare {SCHEMA_PATH.name} with the app's schema instead of writing it; exit 1 if they differ",
    )
    arguments = parser.parse_args(argv)
    rendered = render_schema()

    if arguments.check:
        committed = SCHEMA_PATH.read_text(encoding="utf-8") if SCHEMA_PATH.exists() else None
        if committed == rendered:
            return 0
        problem = "is missing" if committed is None else "differs from the app's schema"
        print(f"{SCHEMA_PATH} {problem}; run '{EXPORT_COMMAND}' and commit the result", file=sys.stderr)
        return 1

    SCHEMA_PATH.parent.mkdir(parents=True, exist_ok=True)
    SCHEMA_PATH.write_text(rendered, encoding="utf-8")
    print(f"wrote {SCHEMA_PATH}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
