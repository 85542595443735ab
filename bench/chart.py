#!/usr/bin/env python3
"""Draws the freshness lag of a bench/run results file as an SVG chart (standard library only;
no plotting library is needed, so no PNG): p50 and p99 per contender and scenario, log scale.

    python3 bench/chart.py bench/results/<date>-<scale>.json > bench/results/<date>-<scale>.svg
"""
import json
import math
import sys

NAMES = {
    "pg_cron": "pg_cron every minute",
    "mvrefresh_seedlike": "mvrefresh concurrently, seed settings",
    "mvrefresh_tuned": "mvrefresh concurrently, tuned",
    "mvrefresh_incremental": "mvrefresh incremental",
    "mvrefresh_partitioned": "mvrefresh partitioned",
    "mvrefresh_partitioned-serial": "mvrefresh partitioned, concurrency 1",
}


def name(contender):
    """A contender's short name; a baseline contender (`<twin>-base`) is its twin's."""
    if contender.endswith("-base") and contender[:-5] in NAMES:
        return NAMES[contender[:-5]] + ", baseline build"
    return NAMES.get(contender, contender)


SCEN = {"burst": "bursts 50/20 s", "steady2": "steady 2/s", "steady20": "steady 20/s"}
COLORS = {"pg_cron": "#c0392b", "mvrefresh_seedlike": "#e67e22", "mvrefresh_tuned": "#2980b9",
          "mvrefresh_incremental": "#27ae60", "mvrefresh_partitioned": "#8e44ad",
          "mvrefresh_partitioned-serial": "#b39ddb"}


def main(path):
    r = json.load(open(path))
    rows = r["lag"]
    lo, hi = 0.05, 300.0
    left, width, bar, gap = 330, 560, 9, 8
    x = lambda v: left + width * (math.log10(max(min(v, hi), lo)) - math.log10(lo)) / (math.log10(hi) - math.log10(lo))
    y = 50
    out = []
    for sc in SCEN:
        out.append(f'<text x="10" y="{y + 12}" font-weight="bold">{SCEN[sc]}</text>')
        y += 20
        for row in [q for q in rows if q["scenario"] == sc]:
            c = row["contender"]
            out.append(f'<text x="20" y="{y + 2 * bar - 2}" font-size="12">{name(c)}</text>')
            for i, (k, op) in enumerate((("lag_p50_s", 1.0), ("lag_p99_s", 0.45))):
                v = row.get(k)
                if v is None:
                    continue
                out.append(f'<rect x="{left}" y="{y + i * bar}" width="{x(v) - left:.1f}" height="{bar - 1}" '
                           f'fill="{COLORS.get(c, "#888")}" fill-opacity="{op}"/>')
                out.append(f'<text x="{x(v) + 4:.1f}" y="{y + i * bar + bar - 2}" font-size="10">'
                           f'{"p50" if i == 0 else "p99"} {v:.2f} s</text>')
            if row.get("not_visible"):
                out.append(f'<text x="{left + width + 60}" y="{y + bar}" font-size="10" fill="#c0392b">'
                           f'{row["not_visible"]} not visible</text>')
            y += 2 * bar + gap
        y += 10
    ticks = []
    for t in (0.1, 0.3, 1, 3, 10, 30, 100, 300):
        ticks.append(f'<line x1="{x(t):.1f}" y1="40" x2="{x(t):.1f}" y2="{y}" stroke="#ddd"/>'
                     f'<text x="{x(t):.1f}" y="{y + 14}" font-size="10" text-anchor="middle">{t:g} s</text>')
    d = r["data"]
    title = (f"Commit-to-visible lag, {d['submissions']:,} submissions / {d['challenges']} challenges "
             f"(p50 solid, p99 light; log scale)")
    svg = [f'<svg xmlns="http://www.w3.org/2000/svg" width="1000" height="{y + 30}" font-family="sans-serif">',
           '<rect width="100%" height="100%" fill="white"/>',
           f'<text x="10" y="22" font-size="15" font-weight="bold">{title}</text>', *ticks, *out, "</svg>"]
    print("\n".join(svg))


if __name__ == "__main__":
    main(sys.argv[1])
