"""Command line: `python -m service --host H --port P [--model SOURCE] ...`."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from types import FrameType
from typing import Any

import uvicorn
from pydantic import ValidationError
from pydantic_settings import SettingsError

from service.api.app import create_app
from service.api.middleware import RequestIdFilter
from service.settings import Settings


def parse_arguments(argv: list[str] | None) -> dict[str, Any]:
    """Read flags; a flag that is not given leaves the setting to its SERVICE_* variable or default."""
    parser = argparse.ArgumentParser(prog="python -m service", description="Serve the attribution service.")
    for name, field in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        help_text = f"{field.description} Environment variable: SERVICE_{name.upper()}."
        if name in ("cors_origins", "autoencoders"):
            parser.add_argument(flag, nargs="*", metavar="VALUE", help=help_text)
        else:
            parser.add_argument(flag, help=help_text)
    arguments = vars(parser.parse_args(argv))
    return {name: value for name, value in arguments.items() if value is not None}


def configure_logging(level: str) -> None:
    handler = logging.StreamHandler()
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def exit_after_signal(signum: int, frame: FrameType | None) -> None:
    logging.getLogger(__name__).info("stopped on signal %d", signum)
    raise SystemExit(0)


def main(argv: list[str] | None = None) -> int:
    try:
        settings = Settings(**parse_arguments(argv))
    except ValidationError as error:
        for item in error.errors():
            where = ".".join(str(part) for part in item["loc"]) or "settings"
            print(f"invalid setting {where}: {item['msg']}", file=sys.stderr)
        return 2
    except SettingsError as error:
        # pydantic-settings reads list settings from the environment as JSON.
        print(f"invalid setting: {error}; list settings take a JSON list, e.g. '[\"x\"]'", file=sys.stderr)
        return 2
    configure_logging(settings.log_level)

    failures: list[BaseException] = []
    server: uvicorn.Server | None = None

    def stop_on_failure(error: BaseException) -> None:
        failures.append(error)
        if server is not None:
            server.should_exit = True

    # uvicorn shuts down gracefully on SIGTERM, then raises the signal again under the handler
    # that was installed before it started. Exiting with status 0 there marks the stop as clean.
    signal.signal(signal.SIGTERM, exit_after_signal)

    app = create_app(settings, on_load_failure=stop_on_failure)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_config=None, access_log=False)
    server = uvicorn.Server(config)
    server.run()
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
