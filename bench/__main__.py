"""Entry point for ``python -m bench``: delegates to :func:`bench.cli.main`."""

from bench.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
