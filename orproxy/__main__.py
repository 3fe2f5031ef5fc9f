"""Command line: arguments → config → logging → run. The only reader of argv and the
environment, and the only place that decides the exit status."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys

from orproxy import __version__
from orproxy.app import App, StartError
from orproxy.config import ConfigError, load_config
from orproxy.observe.logs import setup_logging


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="orproxy", description=__doc__)
    parser.add_argument("--config", "-c", metavar="PATH",
                        help="YAML config file (default ./config.yml; optional when "
                             "OPENROUTER_KEYS and ORPROXY_ACCESS_KEY are set)")
    parser.add_argument("--check", action="store_true",
                        help="validate the configuration and exit")
    parser.add_argument("--version", action="version", version=f"orproxy {__version__}")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config, os.environ)
    except ConfigError as exc:
        print("orproxy: configuration error:", file=sys.stderr)
        for problem in exc.problems:
            print(f"  - {problem}", file=sys.stderr)
        return 2
    if args.check:
        print(f"configuration OK: {len(config.openrouter.keys)} key(s)")
        return 0
    setup_logging(config.server.log_level, config.server.http_log_level,
                  config.server.log_format)
    try:
        asyncio.run(App(config, reload=lambda: load_config(args.config, os.environ)).serve())
    except StartError as exc:
        logging.getLogger("orproxy").error("cannot start: %s", exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
