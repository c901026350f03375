#!/usr/bin/env python3
"""Runs every PromQL expression of the deployment assets against a Prometheus that scrapes a
real daemon under load (deploy/local/observe.sh --check): each dashboard query, recording
rule, KEDA trigger and prometheus-adapter query must return data, and so must each operand of
each alert's comparisons (the alert itself rightly returns nothing on a healthy daemon); the
sparse attention panels must show real observations (a finite value) with a mean density and KV
read fraction below 1. Every
rule group must evaluate without error, and every sieve_ metric the expressions name must be in
the daemon's /metrics output.

    query_check.py --prometheus http://127.0.0.1:9091 --metrics http://127.0.0.1:9090/metrics
"""
import argparse
import json
import math
import sys
import urllib.parse
import urllib.request

import deploy_lib as d


# The sparse attention metrics (docs/metrics.md), observed only under a sparse method.
SPARSE_METRICS = ("sieve_prefill_attention_density", "sieve_prefill_sparse_index_seconds",
                  "sieve_decode_kv_read_fraction", "sieve_decode_selection_seconds")


def get(url):
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.read().decode()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--prometheus", required=True)
    ap.add_argument("--metrics", required=True, action="append",
                    help="a daemon's /metrics URL; repeat it for each daemon (each role)")
    args = ap.parse_args()
    problems = []

    exported = set()
    for url in args.metrics:
        for line in get(url).splitlines():
            if line and not line.startswith("#"):
                exported.add(line.split("{")[0].split(" ")[0])

    queries = d.dashboard_queries() + d.autoscaler_queries()
    for where, expr, is_alert in d.rule_queries():
        if is_alert:
            queries += [(f"{where} operand {i}", op) for i, op in enumerate(d.split_comparison(expr))]
        else:
            queries.append((where, expr))

    for where, expr in queries:
        for name in d.metric_names(expr):
            if name.startswith("sieve_") and name not in exported:
                problems.append(f"{where}: {name} is not in the daemon's /metrics")
        url = f"{args.prometheus}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        try:
            body = json.loads(get(url))
        except Exception as e:  # an HTTP 400 is a bad expression
            problems.append(f"{where}: query failed ({e}): {expr}")
            continue
        if body.get("status") != "success" or not body["data"]["result"]:
            problems.append(f"{where}: no data: {expr}")

    def value(expr):
        body = json.loads(get(f"{args.prometheus}/api/v1/query?" + urllib.parse.urlencode({"query": expr})))
        result = body["data"]["result"] if body.get("status") == "success" else []
        return float(result[0]["value"][1]) if result else None

    # observe.sh runs XAttention prefill and Quest decode: the sparse panels' queries must show
    # real observations (a finite value; a histogram nobody observed answers NaN), and the
    # daemons must have computed or read less than dense attention would.
    for where, expr in queries:
        if not any(m in expr for m in SPARSE_METRICS):
            continue
        body = json.loads(get(f"{args.prometheus}/api/v1/query?" + urllib.parse.urlencode({"query": expr})))
        values = [float(r["value"][1]) for r in body["data"]["result"]] if body.get("status") == "success" else []
        if not any(math.isfinite(v) for v in values):
            problems.append(f"{where}: no observation (values {values}): {expr}")
    for metric in ("sieve_prefill_attention_density", "sieve_decode_kv_read_fraction"):
        expr = f"sum({metric}_sum) / sum({metric}_count)"
        v = value(expr)
        if v is None or not 0 < v < 1:
            problems.append(f"sparse attention: {expr} is {v}, want in (0, 1)")

    # The daemon labels every series with its role; a scrape label of that name would have
    # renamed it to exported_role.
    if value('count({__name__=~"sieve_.+", exported_role!=""})') is not None:
        problems.append("series carry exported_role: the scrape config sets a role label")
    roles = json.loads(get(f"{args.prometheus}/api/v1/label/role/values"))["data"]
    if len(args.metrics) > 1:
        # With a prefill and a decode daemon (observe.sh --check): every role is seen, the
        # decode daemon reached the prefill daemon and prefilled prompts there.
        if not {"both", "prefill", "decode"} <= set(roles):
            problems.append(f"role label values {roles}, not both, prefill and decode")
        for expr, want, ok in (
                ('max(sieve_prefill_daemons_reachable{role="decode"})', "1", lambda v: v == 1),
                ('sum(sieve_prefills_total{role="decode", location="remote"})', "> 0", lambda v: v > 0),
                ('sum(sieve_kv_transfer_bytes_total{role="prefill", direction="sent"})', "> 0",
                 lambda v: v > 0)):
            v = value(expr)
            if v is None or not ok(v):
                problems.append(f"disaggregated daemons: {expr} is {v}, want {want}")

    rules = json.loads(get(f"{args.prometheus}/api/v1/rules"))["data"]["groups"]
    names = {g["name"] for g in rules}
    if names != {"sieve-latency", "sieve-load", "sieve-disaggregation", "sieve-alerts"}:
        problems.append(f"rule groups loaded: {sorted(names)}")
    for g in rules:
        for r in g["rules"]:
            if r.get("health") != "ok":
                problems.append(f"rule {r['name']}: health {r.get('health')}: {r.get('lastError')}")
            # Alerts with a `for` may rightly be pending on a loaded machine; a device fault
            # (no `for`) must not show on a healthy daemon.
            if r["name"] == "SieveDeviceFault" and r["state"] != "inactive":
                problems.append(f"alert {r['name']} is {r['state']} on a healthy daemon")
    d.report(problems, f"query_check: {len(queries)} expressions return data; "
             f"{sum(len(g['rules']) for g in rules)} rules evaluate cleanly")


if __name__ == "__main__":
    try:
        main()
    except d.CheckFailed as e:
        print("FAIL:", e)
        sys.exit(1)
