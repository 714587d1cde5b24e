#!/usr/bin/env python3
"""Draws contrib/grafana-dashboard.json's panels from a real Prometheus into one PNG.

Grafana is not in Debian, so this is how the dashboard is looked at without
it: every panel is placed where its ``gridPos`` puts it (24 columns, rows of
30 px), each of its PromQL targets is asked of Prometheus over the last
``--minutes`` before ``--end`` (``query_range``, Grafana's variables as "All"), time series and
state timelines as lines (a state timeline as one band per state, drawn
while the state holds), stat, bar gauge and table panels as their latest
values.  It needs matplotlib (``pip install matplotlib``; the bench extra has
it) and nothing of cyclemirror::

    contrib/render-dashboard.py --prometheus http://127.0.0.1:9090 \\
        --minutes 10 --out dashboard.png

A query that fails is drawn as its error text in the panel, so a broken panel
shows as broken instead of empty, and the exit status is then 1.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

DASHBOARD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "grafana-dashboard.json")
ROW_PX = 30


def substitute(expr: str, step: float) -> str:
    window = f"{max(int(step * 4), 4)}s"
    for var, val in {"$job": ".*", "$volume": ".*", "$target": ".*",
                     "$__rate_interval": window}.items():
        expr = expr.replace(var, val)
    return expr


def query_range(base: str, expr: str, start: float, end: float, step: float) -> dict:
    url = f"{base}/api/v1/query_range?" + urllib.parse.urlencode(
        {"query": expr, "start": start, "end": end, "step": step})
    try:
        with urllib.request.urlopen(url, timeout=30) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        try:
            return json.loads(exc.read())
        except ValueError:
            return {"status": "error", "error": f"HTTP {exc.code}"}
    except OSError as exc:
        return {"status": "error", "error": str(exc)}


def label_of(metric: dict, drop=("__name__", "job", "instance")) -> str:
    parts = [f"{k}={v}" for k, v in sorted(metric.items()) if k not in drop]
    return ",".join(parts) or metric.get("__name__", "value")


def draw_panel(ax, panel: dict, base: str, start: float, end: float, step: float) -> int:
    """Draws one panel; returns how many of its queries failed."""
    ax.set_title(panel.get("title", ""), fontsize=8)
    ax.tick_params(labelsize=6)
    kind = panel["type"]
    latest = []
    states: list[str] = []
    failed = 0
    for target in panel.get("targets", []):
        result = query_range(base, substitute(target["expr"], step), start, end, step)
        if result.get("status") != "success":
            ax.text(0.02, 0.5, f"query failed: {result.get('error', result)}"[:120],
                    transform=ax.transAxes, fontsize=6, color="red", wrap=True)
            failed += 1
            continue
        for series in result["data"]["result"]:
            values = series["values"]
            xs = [(float(t) - end) / 60 for t, _ in values]
            ys = [float(v) for _, v in values]
            name = label_of(series["metric"])
            if kind == "state-timeline":  # a band per state, drawn where it holds
                states.append(name)
                level = len(states)
                # a sample is there only while the state holds (the query's "== 1")
                ax.scatter([x for x, y in zip(xs, ys, strict=True) if y], [level] * sum(1 for y in ys if y),
                           marker="|", s=30, label=name[:60])
            elif kind == "timeseries":
                ax.step(xs, ys, where="post", linewidth=0.8, label=name[:60])
            latest.append((name, ys[-1] if ys else float("nan")))
    if states:
        ax.set_yticks(range(1, len(states) + 1), [st[:40] for st in states], fontsize=5)
        ax.set_ylim(0.5, len(states) + 0.5)
    if kind in ("timeseries", "state-timeline"):
        ax.set_xlabel("minutes before now", fontsize=6)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=5, loc="upper left")
        else:
            ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center", fontsize=7)
    else:
        ax.axis("off")
        lines = [f"{name[:70]}: {value:g}" for name, value in latest[:12]] or ["no data"]
        ax.text(0.02, 0.95, "\n".join(lines), transform=ax.transAxes, va="top", fontsize=6,
                family="monospace")
    return failed


def render(base: str, minutes: float, out: str, dashboard_path: str = DASHBOARD,
           end: float | None = None) -> int:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(dashboard_path) as fh:
        dashboard = json.load(fh)
    panels = dashboard["panels"]
    bottom = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in panels)
    width_in, height_in = 24, bottom * ROW_PX / 80
    fig = plt.figure(figsize=(width_in, height_in))
    end = time.time() if end is None else end
    start = end - minutes * 60
    step = max(1.0, minutes * 60 / 300)
    failed = 0
    for panel in panels:
        g = panel["gridPos"]
        left, width = g["x"] / 24, g["w"] / 24
        top, height = 1 - g["y"] / bottom, g["h"] / bottom
        if panel["type"] == "row":
            ax = fig.add_axes([left, top - height, width, height])
            ax.axis("off")
            ax.text(0, 0.5, panel.get("title", ""), fontsize=11, weight="bold", va="center")
            continue
        # room for the title above and the tick labels below, a row each
        row = 1 / bottom
        ax = fig.add_axes([left + 0.02, top - height + 1.3 * row, width - 0.03, height - 2 * row])
        failed += draw_panel(ax, panel, base, start, end, step)
    fig.suptitle(f"{dashboard.get('title', 'dashboard')}: last {minutes:g} min from {base}",
                 fontsize=12)
    fig.savefig(out, dpi=80)
    print(f"render-dashboard: {len(panels)} panels drawn into {out}")
    if failed:
        print(f"render-dashboard: {failed} queries failed (drawn in red in their panels)",
              file=sys.stderr)
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prometheus", required=True, help="Prometheus base URL")
    parser.add_argument("--minutes", type=float, default=10.0, help="time range drawn")
    parser.add_argument("--out", default="dashboard.png", help="PNG to write")
    parser.add_argument("--dashboard", default=DASHBOARD, help="dashboard JSON")
    parser.add_argument("--end", type=float, default=None,
                        help="end of the range drawn, Unix seconds (default: now)")
    args = parser.parse_args(argv)
    if not args.minutes > 0:
        parser.error("--minutes must be above 0")
    return render(args.prometheus.rstrip("/"), args.minutes, args.out, args.dashboard, args.end)


if __name__ == "__main__":
    sys.exit(main())
