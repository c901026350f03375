#!/usr/bin/env python3
"""Writes Sieve's Grafana dashboards (deploy/grafana/dashboards/*.json) from the panel lists
below; the JSON files are committed and a test (tests/deploy/prometheus_check.sh) fails when
they differ from what this script writes. Metric names and labels: docs/metrics.md.

    deploy/grafana/gen_dashboards.py          # rewrite the JSON files
    deploy/grafana/gen_dashboards.py DIR      # write them into DIR instead
"""
import json
import pathlib
import sys

OUT = pathlib.Path(__file__).resolve().parent / "dashboards"
DS = {"type": "prometheus", "uid": "${datasource}"}
# Series scraped from the daemon carry namespace and pod (added by the scrape), and model and
# role (both, prefill, decode: the daemon's server.role, put on every series by the daemon).
SEL = 'namespace=~"$namespace", role=~"$role", model=~"$model", pod=~"$pod"'
# Recorded series (deploy/prometheus/rules) are per role: no pod label.
RSEL = 'namespace=~"$namespace", role=~"$role", model=~"$model"'
RATE = "$__rate_interval"

PHASES = [
    ("queue", "Queue", "arrival to first scheduling"),
    ("prefill", "Prefill", "first scheduling to first token (chunks, waits, recomputation)"),
    ("time_to_first_token", "Time to first token", "arrival to first token"),
    ("inter_token_latency", "Inter-token latency", "gap between two consecutive tokens"),
    ("decode", "Decode", "first token to last token"),
    ("e2e_latency", "End to end", "arrival to finish, any outcome"),
]


def templating():
    def query_var(name, label, query, multi=True):
        return {
            "name": name, "label": label, "type": "query", "datasource": DS,
            "query": {"query": query, "refId": f"{name}-var"},
            "definition": query, "refresh": 2, "sort": 1, "multi": multi,
            "includeAll": multi, "allValue": ".*" if multi else None,
            "current": {"selected": True, "text": ["All"], "value": ["$__all"]} if multi else {},
        }
    return {"list": [
        {"name": "datasource", "label": "Data source", "type": "datasource",
         "query": "prometheus", "current": {}, "refresh": 1},
        query_var("namespace", "Namespace", "label_values(sieve_requests_total, namespace)",
                  multi=False),
        query_var("role", "Role", 'label_values(sieve_requests_total{namespace=~"$namespace"}, role)'),
        query_var("model", "Model",
                  'label_values(sieve_requests_total{namespace=~"$namespace", role=~"$role"}, model)'),
        query_var("pod", "Pod", 'label_values(sieve_requests_total{namespace=~"$namespace", '
                  'role=~"$role", model=~"$model"}, pod)'),
    ]}


class Board:
    def __init__(self, uid, title, description):
        self.uid, self.title, self.description = uid, title, description
        self.panels, self.y, self.x, self.row_h = [], 0, 0, 0

    def _place(self, w, h):
        if self.x + w > 24:
            self.x, self.y, self.row_h = 0, self.y + self.row_h, 0
        pos = {"x": self.x, "y": self.y, "w": w, "h": h}
        self.x += w
        self.row_h = max(self.row_h, h)
        return pos

    def row(self, title):
        if self.x:
            self.x, self.y, self.row_h = 0, self.y + self.row_h, 0
        self.panels.append({"id": len(self.panels) + 1, "type": "row", "title": title,
                            "collapsed": False, "gridPos": {"x": 0, "y": self.y, "w": 24, "h": 1},
                            "panels": []})
        self.y += 1

    def timeseries(self, title, description, targets, unit, w=8, h=8, stack=False):
        self.panels.append({
            "id": len(self.panels) + 1, "type": "timeseries", "title": title,
            "description": description, "datasource": DS, "gridPos": self._place(w, h),
            "fieldConfig": {"defaults": {"unit": unit, "min": 0, "custom": {
                "drawStyle": "line", "lineWidth": 1, "fillOpacity": 10 if stack else 0,
                "stacking": {"mode": "normal" if stack else "none", "group": "A"}}},
                "overrides": []},
            "options": {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
                        "tooltip": {"mode": "multi", "sort": "desc"}},
            "targets": [{"refId": chr(ord("A") + i), "datasource": DS, "expr": expr,
                         "legendFormat": legend, "range": True}
                        for i, (expr, legend) in enumerate(targets)],
        })

    def heatmap(self, title, description, expr, w=8, h=8):
        self.panels.append({
            "id": len(self.panels) + 1, "type": "heatmap", "title": title,
            "description": description, "datasource": DS, "gridPos": self._place(w, h),
            "options": {"calculate": False, "yAxis": {"unit": "s"},
                        "cellGap": 1, "color": {"mode": "scheme", "scheme": "Oranges"},
                        "rowsFrame": {"layout": "auto"}},
            "fieldConfig": {"defaults": {}, "overrides": []},
            "targets": [{"refId": "A", "datasource": DS, "expr": expr, "format": "heatmap",
                         "legendFormat": "{{le}}", "range": True}],
        })

    def text(self, title, content, w=24, h=3):
        self.panels.append({"id": len(self.panels) + 1, "type": "text", "title": title,
                            "gridPos": self._place(w, h),
                            "options": {"mode": "markdown", "content": content}})

    def json(self):
        return {
            "uid": self.uid, "title": self.title, "description": self.description,
            "tags": ["sieve"], "timezone": "browser", "editable": True, "graphTooltip": 1,
            "schemaVersion": 39, "version": 1, "refresh": "30s",
            "time": {"from": "now-1h", "to": "now"}, "timepicker": {},
            "templating": templating(), "annotations": {"list": []}, "links": [
                {"type": "dashboards", "tags": ["sieve"], "title": "Sieve", "asDropdown": True}],
            "panels": self.panels,
        }


def quantiles(metric, by):
    group = ", ".join(["le"] + by)
    legend = " ".join("{{%s}}" % b for b in by)
    return [(f"histogram_quantile(0.{q}, sum by ({group}) (rate({metric}_bucket{{{SEL}}}[{RATE}])))",
             f"{legend} p{q}".strip()) for q in ("50", "90", "99")]


def latency_board():
    b = Board("sieve-latency", "Sieve / Latency by phase",
              "Per-phase request latency (p50, p90, p99 per role, and heatmaps) from the "
              "daemon's histograms; engine step latency per worker pool.")
    for metric, title, what in PHASES:
        b.row(title)
        m = f"sieve_request_{metric}_seconds"
        b.timeseries(f"{title}: p50 / p90 / p99 by role", f"{title}: {what}.",
                     quantiles(m, ["role"]), "s", w=12)
        b.heatmap(f"{title}: distribution", f"{title}: {what}; requests per second per bucket.",
                  f"sum by (le) (rate({m}_bucket{{{SEL}}}[{RATE}]))", w=12)
    disaggregation_rows(b)
    b.row("Engine steps")
    b.timeseries("Step latency by worker pool", "One worker step (one batch) of each engine pool.",
                 quantiles("sieve_step_seconds", ["role", "pool"]), "s", w=12)
    b.heatmap("Decode step distribution", "Duration of decode-pool steps.",
              f'sum by (le) (rate(sieve_step_seconds_bucket{{{SEL}, pool="decode"}}[{RATE}]))', w=12)
    return b


def disaggregation_rows(b):
    """The KV hand-off of disaggregated serving (docs/disaggregation.md): direction is
    `received` on decode pods and `sent` on prefill pods; a role=both daemon shows zeros."""
    b.row("KV transfer: prefill to decode (disaggregated)")
    b.timeseries("KV transfer time: p50 / p90 / p99 by role",
                 "One transfer attempt: on decode pods the remote prefill plus the page stream "
                 "(part of their time to first token), on prefill pods the whole Prefill call.",
                 quantiles("sieve_kv_transfer_seconds", ["role", "direction"]), "s", w=12)
    b.heatmap("KV transfer time on decode pods: distribution",
              "Transfer attempts of decode pods per second per bucket.",
              f'sum by (le) (rate(sieve_kv_transfer_seconds_bucket{{{SEL}, direction="received"}}[{RATE}]))',
              w=12)
    b.timeseries("KV bytes per second", "Page bytes of completed transfers: received by decode "
                 "pods, sent by prefill pods.",
                 [(f"sum by (role, direction) (rate(sieve_kv_transfer_bytes_total{{{SEL}}}[{RATE}]))",
                   "{{role}} {{direction}}")], "Bps")
    b.timeseries("KV transfers in flight", "Transfers in progress per pod (decode pods: at most "
                 "disaggregation.transfer_threads).",
                 [(f"sum by (pod, direction) (sieve_kv_transfers_in_flight{{{SEL}}})",
                   "{{pod}} {{direction}}")], "short")
    b.timeseries("Transfer attempts and retries per second",
                 "Finished attempts by outcome; retries are decode pods' attempts after a failure "
                 "(alert SieveKVTransferFailing above 10% failed).",
                 [(f"sum by (role, outcome) (rate(sieve_kv_transfers_total{{{SEL}}}[{RATE}]))",
                   "{{role}} {{outcome}}"),
                  (f"sum by (role) (rate(sieve_kv_transfer_retries_total{{{SEL}}}[{RATE}]))",
                   "{{role}} retries")], "reqps")
    b.timeseries("Prefills of decode pods: remote vs local",
                 "Generate requests of decode pods by where the prompt was prefilled: remote, or "
                 "local (short prompt, all pages cached, or the fallback).",
                 [(f"sum by (location) (rate(sieve_prefills_total{{{SEL}}}[{RATE}]))", "{{location}}")],
                 "reqps", stack=True)
    b.timeseries("Remote prefill share (recorded)", "Share of decode pods' requests prefilled "
                 "remotely, 5 minutes (role:sieve_prefills_remote:ratio_rate5m).",
                 [(f"role:sieve_prefills_remote:ratio_rate5m{{{RSEL}}}", "{{role}}")], "percentunit")
    b.timeseries("Prefill daemons reachable (decode pods)",
                 "1 while a decode pod reaches a prefill daemon, checked every second; 0 for 5 "
                 "minutes fires SievePrefillUnreachable.",
                 [(f'min by (pod) (sieve_prefill_daemons_reachable{{{SEL}, role="decode"}})', "{{pod}}")],
                 "short")


def mean(metric, by):
    """The mean observation of a histogram per rate interval, by the labels `by`."""
    group = ", ".join(by)
    legend = " ".join("{{%s}}" % x for x in by)
    return (f"sum by ({group}) (rate({metric}_sum{{{SEL}}}[{RATE}])) / "
            f"sum by ({group}) (rate({metric}_count{{{SEL}}}[{RATE}]))", f"{legend} mean")


def sparse_rows(b):
    """Sparse attention (SPARSE_ATTENTION.md): the share of the dense work each step did and what
    choosing it cost. Observed only by daemons whose attention.prefill.method /
    attention.decode.method is not dense; a dense daemon's series stay empty."""
    b.row("Sparse attention")
    for metric, title, what in (
            ("sieve_prefill_attention_density", "Prefill attention density",
             "Per prefill step under a sparse prefill method (xattention, minference): the "
             "fraction of the causal (query, key) pairs attention computed, all layers and heads "
             "(1: dense)."),
            ("sieve_decode_kv_read_fraction", "Decode KV read fraction",
             "Per decode step under a sparse decode method (quest, double_sparsity): the fraction "
             "of the keys dense attention would read that the step read, all layers and heads "
             "(1: dense).")):
        b.timeseries(f"{title}: p50 / p90 / p99 and mean by role", what,
                     quantiles(metric, ["role"]) + [mean(metric, ["role"])], "percentunit", w=12)
    for metric, title, what in (
            ("sieve_prefill_sparse_index_seconds", "Sparse prefill index time per step",
             "Seconds a sparse prefill step spent building its indices (estimators and plans, "
             "all layers)."),
            ("sieve_decode_selection_seconds", "Sparse decode selection time per step",
             "Host seconds a sparse decode step spent choosing the keys it reads (page or label "
             "scoring and top-k, all layers).")):
        b.timeseries(f"{title}: p50 / p90 / p99 and mean by role", what,
                     quantiles(metric, ["role"]) + [mean(metric, ["role"])], "s", w=12)


def overview_board():
    b = Board("sieve-overview", "Sieve / Throughput and capacity",
              "Requests and tokens per second, queue and running requests, KV pages and the "
              "prefix cache, autoscaling signals, rejections, cancellations, preemptions, errors.")
    b.row("Throughput")
    b.timeseries("Finished requests per second by outcome", "length, stop, eos, cancelled, error.",
                 [(f"sum by (outcome) (rate(sieve_requests_total{{{SEL}}}[{RATE}]))", "{{outcome}}")],
                 "reqps", stack=True)
    b.timeseries("Prompt tokens per second", "Prompt tokens of finished requests, and those "
                 "served from the prefix cache.",
                 [(f"sum by (role) (rate(sieve_prompt_tokens_total{{{SEL}}}[{RATE}]))", "{{role}} prompt"),
                  (f"sum by (role) (rate(sieve_cached_prompt_tokens_total{{{SEL}}}[{RATE}]))",
                   "{{role}} from cache")], "short")
    b.timeseries("Generated tokens per second", "Tokens generated by finished requests.",
                 [(f"sum by (role) (rate(sieve_generated_tokens_total{{{SEL}}}[{RATE}]))", "{{role}}")],
                 "short")
    b.timeseries("Step tokens per second by pool", "Tokens the worker pools processed: prompt "
                 "tokens (prefill), one per sequence (decode).",
                 [(f"sum by (role, pool) (rate(sieve_step_tokens_total{{{SEL}}}[{RATE}]))",
                   "{{role}} {{pool}}")], "short")
    b.timeseries("Worker pool busy fraction", "Seconds of steps per second, per pool (1 = always busy).",
                 [(f"sum by (pod, pool) (rate(sieve_step_seconds_sum{{{SEL}}}[{RATE}]))",
                   "{{pod}} {{pool}}")], "percentunit")
    b.timeseries("gRPC calls per second by method and code", "Finished gRPC calls.",
                 [(f"sum by (method, code) (rate(sieve_grpc_requests_total{{{SEL}}}[{RATE}]))",
                   "{{method}} {{code}}")], "reqps")
    b.row("Queue and running requests")
    b.timeseries("Running requests by pool", "Requests in the prefill and decode pools.",
                 [(f"sum by (pod, pool) (sieve_running_requests{{{SEL}}})", "{{pod}} {{pool}}")],
                 "short")
    b.timeseries("Waiting requests and prompt tokens", "Queued for admission (incl. preempted).",
                 [(f"sum by (pod) (sieve_waiting_requests{{{SEL}}})", "{{pod}} requests"),
                  (f"sum by (pod) (sieve_waiting_tokens{{{SEL}}})", "{{pod}} tokens")], "short")
    b.timeseries("Prefill backlog (autoscaling signal)",
                 "Seconds one pod needs to prefill every waiting prompt token of its role "
                 "(recording rule role:sieve_prefill_backlog_seconds; KEDA target 10 s per replica).",
                 [(f"role:sieve_prefill_backlog_seconds{{{RSEL}}}", "{{role}}")], "s")
    b.timeseries("Running requests by role", "Requests in the engine pools of each role "
                 "(both, prefill, decode): the decode role's is its autoscaling signal (48 per replica).",
                 [(f"sum by (role, pool) (sieve_running_requests{{{SEL}}})", "{{role}} {{pool}}")],
                 "short")
    b.timeseries("KV transfer bytes per second (disaggregated)", "Received by decode pods, "
                 "sent by prefill pods (the latency dashboard has the rest).",
                 [(f"sum by (role, direction) (rate(sieve_kv_transfer_bytes_total{{{SEL}}}[{RATE}]))",
                   "{{role}} {{direction}}")], "Bps")
    b.timeseries("Prefill daemons reachable (decode pods)", "Per decode pod, checked every second.",
                 [(f'min by (pod) (sieve_prefill_daemons_reachable{{{SEL}, role="decode"}})', "{{pod}}")],
                 "short")
    b.row("KV cache and prefix cache")
    b.timeseries("KV pages", "Used (incl. cache-only), cache-only (evictable) and free pages.",
                 [(f"sum by (pod) (sieve_kv_pages_used{{{SEL}}})", "{{pod}} used"),
                  (f"sum by (pod) (sieve_kv_pages_cached{{{SEL}}})", "{{pod}} cache-only"),
                  (f"sum by (pod) (sieve_kv_pages_free{{{SEL}}})", "{{pod}} free")], "short")
    b.timeseries("KV pages held by requests", "Fraction per pod (cache-only pages count as free; "
                 "autoscaling target 0.75).",
                 [(f"pod:sieve_kv_pages_in_use:ratio{{{SEL}}}", "{{pod}}")], "percentunit")
    b.timeseries("Prefix-cache hit ratio", "Prompt tokens served from the prefix cache over "
                 "prompt tokens looked up, per rate interval.",
                 [(f"sum by (role) (rate(sieve_prefix_cache_hit_tokens_total{{{SEL}}}[{RATE}])) / "
                   f"sum by (role) (rate(sieve_prefix_cache_query_tokens_total{{{SEL}}}[{RATE}]))",
                   "{{role}}")], "percentunit")
    sparse_rows(b)
    b.row("Rejections, cancellations, preemptions, errors")
    b.timeseries("Rejections per second by reason", "Refused at submission: queue_full, invalid, draining.",
                 [(f"sum by (reason) (rate(sieve_rejections_total{{{SEL}}}[{RATE}]))", "{{reason}}")],
                 "reqps")
    b.timeseries("Cancellations and errors per second", "Finished requests with outcome "
                 "cancelled or error.",
                 [(f'sum by (outcome) (rate(sieve_requests_total{{{SEL}, outcome=~"cancelled|error"}}[{RATE}]))',
                   "{{outcome}}")], "reqps")
    b.timeseries("Preemptions per second", "Running requests whose KV pages were freed, to be recomputed.",
                 [(f"sum by (pod) (rate(sieve_preemptions_total{{{SEL}}}[{RATE}]))", "{{pod}}")], "reqps")
    b.timeseries("gRPC errors per second by code", "Finished gRPC calls with a code other than OK.",
                 [(f'sum by (method, code) (rate(sieve_grpc_requests_total{{{SEL}, code!="OK"}}[{RATE}]))',
                   "{{method}} {{code}}")], "reqps")
    b.timeseries("Error ratio (recorded)", "Finished requests with outcome error over all finished "
                 "requests, 5 minutes (alert SieveErrorRatioHigh above 5%).",
                 [(f"role:sieve_request_errors:ratio_rate5m{{{RSEL}}}", "{{role}}")], "percentunit")
    b.timeseries("Device faults", "Unrecoverable backend failures counted before the daemon exits.",
                 [(f"sum by (pod) (sieve_device_lost_total{{{SEL}}})", "{{pod}}")], "short")
    return b


def main():
    out = pathlib.Path(sys.argv[1]) if len(sys.argv) > 1 else OUT
    out.mkdir(exist_ok=True)
    for board in (latency_board(), overview_board()):
        path = out / f"{board.uid}.json"
        path.write_text(json.dumps(board.json(), indent=2) + "\n")


if __name__ == "__main__":
    main()
