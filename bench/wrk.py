"""wrk driver: writes the Lua script (method, body, headers), runs wrk, parses its output.

Numbers come from wrk's text output (``Requests/sec``, ``Transfer/sec``,
``--latency`` distribution, error lines); the script's ``done()`` hook also
prints exact values (microsecond percentiles, byte and error counts) on a
``BENCH_WRK`` line, which take precedence when present.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path


def _lua_string(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n") + "'"


_DONE_HOOK = """
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "BENCH_WRK requests=%d bytes=%d duration_us=%d p50_us=%.1f p99_us=%.1f "
    .. "connect=%d read=%d write=%d status=%d timeout=%d\\n",
    summary.requests, summary.bytes, summary.duration,
    latency:percentile(50.0), latency:percentile(99.0),
    e.connect, e.read, e.write, e.status, e.timeout))
end
"""


def write_script(path: Path, method: str, body: bytes, headers: dict[str, str]) -> Path:
    """Write a wrk Lua script sending ``method`` with ``body`` and ``headers``."""
    lines = [f"wrk.method = {_lua_string(method)}"]
    if body:
        lines.append(f"wrk.body = {_lua_string(body.decode())}")
    for name, value in headers.items():
        lines.append(f"wrk.headers[{_lua_string(name)}] = {_lua_string(value)}")
    path.write_text("\n".join(lines) + "\n" + _DONE_HOOK)
    return path


def command(
    url: str, script: Path, connections: int, duration_s: float, threads: int = 1
) -> list[str]:
    return [
        "wrk",
        f"-t{threads}",
        f"-c{connections}",
        f"-d{max(1, round(duration_s))}s",
        "--latency",
        "--timeout",
        "5s",
        "-s",
        str(script),
        url,
    ]


@dataclass
class WrkResult:
    requests: int = 0
    duration_s: float = 0.0
    rps: float = 0.0
    bytes_per_s: float = 0.0
    latency_ms: dict[str, float] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)

    @property
    def error_total(self) -> int:
        return sum(self.errors.values())


_UNITS_TIME = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}
_UNITS_SIZE = {"B": 1, "KB": 1024, "MB": 1024**2, "GB": 1024**3, "TB": 1024**4}


def _time_ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", text)
    if not m:
        raise ValueError(f"bad wrk time {text!r}")
    return float(m.group(1)) * _UNITS_TIME[m.group(2)]


def _size_bytes(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)([KMGT]?B)", text)
    if not m:
        raise ValueError(f"bad wrk size {text!r}")
    return float(m.group(1)) * _UNITS_SIZE[m.group(2)]


def parse(output: str) -> WrkResult:
    """Parse wrk's stdout (with ``--latency`` and the BENCH_WRK hook line)."""
    res = WrkResult()
    m = re.search(r"^Requests/sec:\s+([\d.]+)", output, re.M)
    if not m:
        raise ValueError("no Requests/sec in wrk output:\n" + output[-2000:])
    res.rps = float(m.group(1))
    m = re.search(r"^Transfer/sec:\s+(\S+)", output, re.M)
    if m:
        res.bytes_per_s = _size_bytes(m.group(1))
    m = re.search(r"^\s*(\d+) requests in ([\d.]+\w+),", output, re.M)
    if m:
        res.requests = int(m.group(1))
        res.duration_s = _time_ms(m.group(2)) / 1e3
    for pct, value in re.findall(r"^\s+(50|99)%\s+(\S+)\s*$", output, re.M):
        res.latency_ms[f"p{pct}"] = _time_ms(value)
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output)
    if m:
        for key, value in zip(("connect", "read", "write", "timeout"), m.groups(), strict=True):
            res.errors[key] = int(value)
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    if m:
        res.errors["status"] = int(m.group(1))
    hook = re.search(r"^BENCH_WRK (.*)$", output, re.M)
    if hook:
        vals = dict(item.split("=", 1) for item in hook.group(1).split())
        res.requests = int(vals["requests"])
        res.duration_s = int(vals["duration_us"]) / 1e6
        if res.duration_s > 0:
            res.bytes_per_s = int(vals["bytes"]) / res.duration_s
        res.latency_ms["p50"] = float(vals["p50_us"]) / 1e3
        res.latency_ms["p99"] = float(vals["p99_us"]) / 1e3
        for key in ("connect", "read", "write", "status", "timeout"):
            res.errors[key] = int(vals[key])
    res.errors = {k: v for k, v in res.errors.items() if v}
    return res
