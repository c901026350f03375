#!/usr/bin/env python3
"""CTest deploy_static: the Grafana dashboards parse and are well formed (unique ids, panels on
the 24-column grid without overlaps, data source and variables defined, every phase with
p50/p90/p99 and a heatmap), and every metric that a dashboard, recording rule, alert, KEDA
trigger or prometheus-adapter rule names is one the daemon defines (docs/metrics.md, kept equal
to server/metrics.cc) or a recording rule records, with only the labels it has.
The live check (live_check.sh) runs the same expressions against a real daemon's data."""
import json
import re
import sys

import deploy_lib as d

PHASES = ["queue", "prefill", "time_to_first_token", "inter_token_latency", "decode", "e2e_latency"]
VARIABLES = {"datasource", "namespace", "role", "model", "pod"}
BUILTINS = {"__rate_interval", "__interval"}
# The overview must show these (issue 14): each is a metric some panel reads.
OVERVIEW_METRICS = ["sieve_requests_total", "sieve_prompt_tokens_total", "sieve_generated_tokens_total",
                    "sieve_kv_pages_used", "sieve_kv_pages_free", "sieve_prefix_cache_hit_tokens_total",
                    "sieve_rejections_total", "sieve_preemptions_total", "sieve_running_requests",
                    "sieve_waiting_requests", "sieve_device_lost_total", "sieve_grpc_requests_total"]

# The KV hand-off of disaggregated serving (issue 13): every metric of it has a latency panel.
DISAGGREGATION_METRICS = ["sieve_kv_transfer_seconds_bucket", "sieve_kv_transfer_bytes_total",
                          "sieve_kv_transfers_in_flight", "sieve_kv_transfers_total",
                          "sieve_kv_transfer_retries_total", "sieve_prefills_total",
                          "sieve_prefill_daemons_reachable"]

# Sparse attention (issues 9, 10, 14): the overview reads each of its metrics.
SPARSE_METRICS = ["sieve_prefill_attention_density_bucket", "sieve_decode_kv_read_fraction_bucket",
                  "sieve_prefill_sparse_index_seconds_bucket", "sieve_decode_selection_seconds_bucket"]


def check_board(path, problems):
    board = json.loads(path.read_text())
    where = path.name
    names = {v["name"] for v in board["templating"]["list"]}
    if not VARIABLES <= names:
        problems.append(f"{where}: variables {sorted(VARIABLES - names)} missing")
    ids, cells = set(), set()
    exprs = []
    for p in board["panels"]:
        if p["id"] in ids:
            problems.append(f"{where}: duplicate panel id {p['id']}")
        ids.add(p["id"])
        g = p["gridPos"]
        if g["x"] < 0 or g["x"] + g["w"] > 24 or g["w"] <= 0 or g["h"] <= 0:
            problems.append(f"{where}: panel {p['title']!r} off the grid {g}")
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                if (x, y) in cells:
                    problems.append(f"{where}: panel {p['title']!r} overlaps another at {x},{y}")
                cells.add((x, y))
        if p["type"] in ("row", "text"):
            continue
        if p.get("datasource", {}).get("uid") != "${datasource}":
            problems.append(f"{where}: panel {p['title']!r} does not use the $datasource variable")
        refs = [t["refId"] for t in p["targets"]]
        if not p["targets"] or len(set(refs)) != len(refs):
            problems.append(f"{where}: panel {p['title']!r} has no targets or duplicate refIds")
        for t in p["targets"]:
            exprs.append((p, t["expr"]))
            for var in re.findall(r"\$\{?(\w+)", t["expr"]):
                if var not in names and var not in BUILTINS:
                    problems.append(f"{where}: panel {p['title']!r} uses undefined variable ${var}")
    return board, exprs


def main():
    problems = []
    boards = {}
    for path in d.DASHBOARDS:
        boards[path.stem] = check_board(path, problems)
    if set(boards) != {"sieve-latency", "sieve-overview"}:
        problems.append(f"dashboards {sorted(boards)}")
    _, latency = boards["sieve-latency"]
    for phase in PHASES:
        metric = f"sieve_request_{phase}_seconds_bucket"
        quants = {q for p, e in latency if metric in e and p["type"] == "timeseries"
                  for q in re.findall(r"histogram_quantile\((0\.\d+)", e)}
        heat = [p for p, e in latency if metric in e and p["type"] == "heatmap"]
        if quants != {"0.50", "0.90", "0.99"} or not heat:
            problems.append(f"sieve-latency: phase {phase}: quantiles {sorted(quants)}, {len(heat)} heatmaps")
        if not any(metric in e and "by (le, role)" in e for _, e in latency):
            problems.append(f"sieve-latency: phase {phase} is not split by role")
    for metric in DISAGGREGATION_METRICS:
        if not any(re.search(rf"\b{metric}\b", e) for _, e in latency):
            problems.append(f"sieve-latency: no panel reads {metric}")
    _, overview = boards["sieve-overview"]
    for metric in OVERVIEW_METRICS + SPARSE_METRICS:
        if not any(re.search(rf"\b{metric}\b", e) for _, e in overview):
            problems.append(f"sieve-overview: no panel reads {metric}")

    exported = d.series_names(d.defined_metrics())
    recorded = d.recorded_names()
    # The checker itself must catch a wrong name and a wrong label.
    if len(d.check_names([("self-check", 'rate(sieve_request_qeue_seconds_bucket[1m])'),
                          ("self-check", 'sieve_running_requests{pol="decode"}')], exported, recorded)) != 2:
        problems.append("self-check: check_names accepted a misspelled metric or label")
    queries = d.all_queries()
    problems += d.check_names(queries, exported, recorded)
    used = set().union(*(d.metric_names(e) for _, e in queries))
    d.report(problems, f"deploy_static: {len(d.DASHBOARDS)} dashboards well formed; {len(queries)} "
             f"expressions name {len(used)} metrics, all defined by sieved or the recording rules")


if __name__ == "__main__":
    try:
        main()
    except d.CheckFailed as e:
        print("FAIL:", e)
        sys.exit(1)
