"""Benchmark harness for orproxy: fake upstream, load clients, runner and report.

Run it with ``python -m bench`` (see bench/README.md). Nothing here is part of
the test suite.
"""
