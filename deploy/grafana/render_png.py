#!/usr/bin/env python3
"""Draws a Grafana dashboard JSON's panels as one PNG from a Prometheus, headless and without
Grafana (Grafana is not packaged in Debian): each timeseries and heatmap panel's queries run as
range queries over the last SECONDS and are plotted at the panel's grid position. Variables are
set to match everything. Used for the dashboard pictures in deploy/README.md
(deploy/local/observe.sh --png). Needs python3-matplotlib. Names every panel that drew no data
and then exits with status 1 (the picture is still written).

    render_png.py --prometheus http://127.0.0.1:9091 --seconds 120 --out x.png DASHBOARD.json
"""
import argparse
import json
import math
import time
import urllib.parse
import urllib.request

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

UNIT_H = 0.42        # inches per grid row
COL_W = 0.75         # inches per grid column (24 columns)


def query_range(base, expr, start, end, step):
    url = f"{base}/api/v1/query_range?" + urllib.parse.urlencode(
        {"query": expr, "start": start, "end": end, "step": step})
    with urllib.request.urlopen(url, timeout=30) as r:
        return json.load(r)["data"]["result"]


def legend(fmt, metric):
    out = fmt
    for k, v in metric.items():
        out = out.replace("{{%s}}" % k, v)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--prometheus", required=True)
    ap.add_argument("--seconds", type=int, default=120)
    ap.add_argument("--rate-interval", default="20s")
    ap.add_argument("--out", required=True)
    ap.add_argument("dashboard")
    args = ap.parse_args()
    board = json.load(open(args.dashboard))
    subs = {"$__rate_interval": args.rate_interval, "$namespace": ".*", "$role": ".*",
            "$model": ".*", "$pod": ".*"}
    end = time.time()
    start = end - args.seconds
    step = max(1, args.seconds // 120)
    height = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in board["panels"])
    fig = plt.figure(figsize=(24 * COL_W, (height + 2.0) * UNIT_H))
    H = height + 2.0
    OFF = 1.0        # grid rows above the first panel: the title
    fig.suptitle(f"{board['title']}  (last {args.seconds} s, rendered from Prometheus by "
                 f"deploy/grafana/render_png.py)", fontsize=13, x=0.01, y=1 - 0.3 / H, ha="left")

    def axes(g, pad_top=0.9):
        left = g["x"] / 24 + 0.035
        width = g["w"] / 24 - 0.05
        bottom = 1 - (g["y"] + OFF + g["h"] + 0.4) / H + 0.03
        h = (g["h"] - pad_top) / H - 0.03
        return fig.add_axes([left, bottom, width, h])

    empty = []
    for p in board["panels"]:
        g = p["gridPos"]
        if p["type"] == "row":
            fig.text(0.01, 1 - (g["y"] + OFF + 1.1) / H, p["title"], fontsize=12, weight="bold")
            continue
        if p["type"] == "text":
            fig.text(0.02, 1 - (g["y"] + OFF + 1.3) / H, p["title"] + ": " + p["options"]["content"],
                     fontsize=8, style="italic", wrap=True)
            continue
        ax = axes(g)
        ax.set_title(p["title"], fontsize=9, loc="left")
        ax.tick_params(labelsize=7)
        unit = p.get("fieldConfig", {}).get("defaults", {}).get("unit", "")
        if p["type"] == "timeseries":
            for t in p["targets"]:
                expr = t["expr"]
                for k, v in subs.items():
                    expr = expr.replace(k, v)
                for series in query_range(args.prometheus, expr, start, end, step):
                    xs = [float(v[0]) - end for v in series["values"]]
                    ys = [float(v[1]) for v in series["values"]]
                    if unit == "s":
                        ys = [y * 1000 for y in ys]
                    ax.plot(xs, ys, linewidth=1, label=legend(t["legendFormat"], series["metric"]))
            ax.set_ylabel("ms" if unit == "s" else unit, fontsize=7)
            if ax.lines:
                ax.legend(fontsize=6, loc="upper left", ncol=3)
            else:
                empty.append(p["title"])
        elif p["type"] == "heatmap":
            expr = p["targets"][0]["expr"]
            for k, v in subs.items():
                expr = expr.replace(k, v)
            series = query_range(args.prometheus, expr, start, end, step)
            series.sort(key=lambda s: float(s["metric"]["le"]))
            les = [float(s["metric"]["le"]) for s in series]
            if series:
                n = min(len(s["values"]) for s in series)
                xs = [float(v[0]) - end for v in series[0]["values"][:n]]
                cum = [[float(v[1]) if not math.isnan(float(v[1])) else 0.0 for v in s["values"][:n]]
                       for s in series]
                rows = [[c - (cum[i - 1][j] if i else 0) for j, c in enumerate(row)]
                        for i, row in enumerate(cum)]
                keep = [i for i, le in enumerate(les) if not math.isinf(le)]
                labels = [f"{les[i] * 1000:g}" for i in keep]
                ax.imshow([rows[i] for i in keep], aspect="auto", origin="lower", cmap="Oranges",
                          extent=[xs[0], xs[-1], -0.5, len(keep) - 0.5], interpolation="nearest")
                ax.set_yticks(range(len(keep)))
                ax.set_yticklabels(labels, fontsize=5)
                ax.set_ylabel("bucket le (ms)", fontsize=7)
            else:
                empty.append(p["title"])
        ax.set_xlabel("seconds", fontsize=7)
        ax.grid(alpha=0.3)
    fig.savefig(args.out, dpi=80)
    print(f"render_png: wrote {args.out}")
    if empty:
        print(f"render_png: {len(empty)} panels without data: {empty}")
        raise SystemExit(1)


if __name__ == "__main__":
    main()
