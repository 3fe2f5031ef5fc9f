"""Command line: arguments → config → logging → run. The only reader of argv and the
environment, and the only place that decides the exit status.

    orproxy [serve] [--config PATH] [--host H] [--port P] [--log-level L]
    orproxy check [--config PATH] [--probe]        (also: orproxy --check)
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from typing import Any

from orproxy import __version__
from orproxy.app import App, StartError
from orproxy.cli import report, run_probe
from orproxy.config import LOG_LEVELS, ConfigError, Flags, load
from orproxy.observe.logs import setup_logging


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="orproxy", description="An HTTP/1.1 reverse proxy that spreads OpenRouter "
        "traffic over many API keys.")
    parser.add_argument("command", nargs="?", choices=("serve", "check"), default="serve",
                        help="serve (the default) or check the configuration")
    parser.add_argument("--config", "-c", metavar="PATH",
                        help="YAML config file (default ./config.yml; optional when "
                             "OPENROUTER_KEYS and ORPROXY_ACCESS_KEY are set)")
    parser.add_argument("--check", action="store_true", help="same as the check command")
    parser.add_argument("--probe", action="store_true",
                        help="with check: ask OpenRouter about each key (GET /api/v1/key)")
    parser.add_argument("--host", help="listen on this address (overrides server.host)")
    parser.add_argument("--port", type=int, help="listen on this port (overrides server.port)")
    parser.add_argument("--log-level", type=str.upper, choices=LOG_LEVELS,
                        help="overrides server.log_level")
    parser.add_argument("--version", action="version", version=f"orproxy {__version__}")
    return parser.parse_args(argv)


def flags_of(args: argparse.Namespace) -> Flags:
    server: dict[str, Any] = {}
    if args.host is not None:
        server["host"] = args.host
    if args.port is not None:
        server["port"] = args.port
    if args.log_level is not None:
        server["log_level"] = args.log_level
    return {"server": server} if server else {}


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    flags = flags_of(args)
    try:
        loaded = load(args.config, os.environ, flags)
    except ConfigError as exc:
        print("orproxy: configuration error:", file=sys.stderr)
        for problem in exc.problems:
            print(f"  - {problem}", file=sys.stderr)
        return 2
    config = loaded.config
    if args.command == "check" or args.check:
        print("\n".join(report(loaded)))
        if not args.probe:
            return 0
        table, usable = run_probe(config)
        print("\n" + "\n".join(table))
        return 0 if usable else 1
    setup_logging(config.server.log_level, config.server.http_log_level,
                  config.server.log_format)
    app = App(config, reload=lambda: load(args.config, os.environ, flags).config)
    try:
        asyncio.run(app.serve())
    except StartError as exc:
        logging.getLogger("orproxy").error("cannot start: %s", exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
