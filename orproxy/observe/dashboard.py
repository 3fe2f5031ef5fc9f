"""The HTML dashboard at /metrics: snapshot in, bytes out.

Pure rendering of the snapshots of the key pool and the proxy's totals at this moment;
it never reads the metrics registry. Every value is escaped.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from typing import TYPE_CHECKING

from orproxy.keys import KeyView

if TYPE_CHECKING:
    from orproxy.observe.metrics import Totals

_STYLE = ("body{font:14px system-ui,sans-serif;margin:2em;color:#222}"
          "table{border-collapse:collapse}td,th{padding:4px 10px;border-bottom:1px solid #ddd;"
          "text-align:left}.available{color:#080}.cooling{color:#b60}.disabled{color:#b00}")


def render(keys: Sequence[KeyView], totals: Totals) -> bytes:
    rows = "".join(
        f"<tr><td><code>{html.escape(k.id)}</code></td><td>{html.escape(k.masked)}</td>"
        f"<td>{html.escape(k.account or '')}</td>"
        f"<td class='{k.state.value}'>{k.state.value}</td>"
        f"<td>{k.cooling_seconds:.0f}</td><td>{html.escape(k.reason)}</td><td>{k.uses}</td></tr>"
        for k in keys
    )
    import psutil  # only the dashboard needs it: not loaded until the first page view

    proc = psutil.Process()
    with proc.oneshot():
        rss = proc.memory_info().rss / 1e6
        cpu = sum(proc.cpu_times()[:2])
    summary = [
        ("Open client connections", f"{totals.open_connections}"),
        ("Body bytes relayed", f"{totals.body_bytes}"),
        ("Process RSS", f"{rss:.1f} MB"),
        ("Process CPU", f"{cpu:.1f} s"),
    ]
    facts = "".join(f"<tr><th>{html.escape(a)}</th><td>{html.escape(b)}</td></tr>"
                    for a, b in summary)
    page = (
        "<!doctype html><html><head><meta charset='utf-8'><title>orproxy</title>"
        f"<meta http-equiv='refresh' content='10'><style>{_STYLE}</style></head><body>"
        "<h1>orproxy</h1><h2>Keys</h2><table><tr><th>id</th><th>key</th><th>account</th>"
        "<th>state</th><th>cooldown s</th><th>reason</th><th>uses</th></tr>"
        f"{rows}</table><h2>Process</h2><table>{facts}</table>"
        "<p><a href='/metrics/raw'>Prometheus metrics</a> · <a href='/health'>health</a></p>"
        "</body></html>"
    )
    return page.encode()
