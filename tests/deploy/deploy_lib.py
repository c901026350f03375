"""Shared helpers of the deployment checks (tests/deploy/*): rendering the kustomize overlays,
collecting every PromQL expression that the deployment assets contain (dashboards, recording
rules, alerts, KEDA ScaledObjects, prometheus-adapter rules) and the metric names they use,
and the metrics the daemon defines (server/metrics.cc, docs/metrics.md)."""
import json
import pathlib
import re
import subprocess
import sys

import yaml

REPO = pathlib.Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"
OVERLAYS = ["cpu", "gpu", "gpu-hpa", "disaggregated", "disaggregated-hpa"]
# Other kustomizations that render objects a cluster applies.
EXTRA_KUSTOMIZATIONS = [K8S / "prometheus-adapter", DEPLOY / "prometheus" / "operator",
                        DEPLOY / "grafana"]
RULE_FILES = [DEPLOY / "prometheus" / "rules" / "sieve-recording.yml",
              DEPLOY / "prometheus" / "rules" / "sieve-alerts.yml"]
DASHBOARDS = sorted((DEPLOY / "grafana" / "dashboards").glob("*.json"))
ADAPTER_CONFIG = K8S / "prometheus-adapter" / "adapter-config.yaml"
# Labels a scrape adds to every series (deploy/prometheus: namespace, pod, node from the pod; job
# and instance by Prometheus) and histogram buckets' le. `role` is not one: the daemon puts it
# on every series itself (CONSTANT_LABELS), and a scrape label of that name would rename it.
SCRAPE_LABELS = {"namespace", "pod", "node", "job", "instance", "le"}
# Labels the daemon puts on every series (docs/metrics.md: "Every series carries the constant
# labels `model` ... and `role`"; server/metrics.cc builds them), whatever the table lists.
CONSTANT_LABELS = {"model", "role"}
# Grafana's variables, as the checks substitute them (every value matches).
GRAFANA_VARS = {"$__rate_interval": "1m", "$__interval": "15s", "$namespace": ".*",
                "$role": ".*", "$model": ".*", "$pod": ".*"}


class CheckFailed(Exception):
    pass


def fail(msg):
    raise CheckFailed(msg)


def render(path):
    """kubectl kustomize PATH, as a list of objects."""
    try:
        out = subprocess.run(["kubectl", "kustomize", str(path)], check=True, text=True,
                             capture_output=True).stdout
    except FileNotFoundError:
        fail("kubectl is not installed: it renders the kustomize overlays "
             "(scripts/install-deps.sh says where to get it)")
    except subprocess.CalledProcessError as e:
        fail(f"kubectl kustomize {path} failed:\n{e.stderr}")
    return [o for o in yaml.safe_load_all(out) if o]


def render_overlays():
    """{overlay: objects} of every overlay, rendered in parallel."""
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(len(OVERLAYS)) as pool:
        return dict(zip(OVERLAYS, pool.map(lambda o: render(K8S / "overlays" / o), OVERLAYS)))


def load_yaml(path):
    with open(path) as f:
        return yaml.safe_load(f)


# ---------------------------------------------------------------------------------------------
# The daemon's metrics.

def defined_metrics():
    """{name: (type, labels)} from docs/metrics.md's table, cross-checked against the names
    registered in server/metrics.cc (the two must list the same metrics)."""
    table = {}
    for line in (REPO / "docs" / "metrics.md").read_text().splitlines():
        m = re.match(r"\|\s*(sieve_[a-z0-9_]+)\s*\|\s*(counter|gauge|histogram)\s*\|\s*([a-z_, ]+)\|", line)
        if m:
            table[m.group(1)] = (m.group(2), {l.strip() for l in m.group(3).split(",") if l.strip()})
    source_text = (REPO / "server" / "metrics.cc").read_text()
    source = set(re.findall(r'"(sieve_[a-z0-9_]+)"', source_text))
    for label in CONSTANT_LABELS:
        if not re.search(rf'\{{"{label}",\s*[a-z_]+\}}', source_text):
            fail(f"server/metrics.cc no longer builds the constant label {label!r} that every "
                 "series is assumed to carry (tests/deploy/deploy_lib.py CONSTANT_LABELS)")
    table = {name: (kind, labels | CONSTANT_LABELS) for name, (kind, labels) in table.items()}
    if not table or set(table) != source:
        fail(f"docs/metrics.md and server/metrics.cc disagree: only in the docs "
             f"{sorted(set(table) - source)}, only in the source {sorted(source - set(table))}")
    return table


def series_names(defined):
    """Every series name the daemon exports: histograms as _bucket, _sum and _count."""
    names = {}
    for name, (kind, labels) in defined.items():
        if kind == "histogram":
            names[name + "_bucket"] = labels | {"le"}
            names[name + "_sum"] = labels
            names[name + "_count"] = labels
        else:
            names[name] = labels
    return names


# ---------------------------------------------------------------------------------------------
# PromQL: the expressions of the deployment assets.

PROMQL_KEYWORDS = {"sum", "min", "max", "avg", "count", "by", "without", "on", "ignoring",
                   "group_left", "group_right", "and", "or", "unless", "bool", "offset",
                   "rate", "irate", "increase", "delta", "deriv", "histogram_quantile",
                   "max_over_time", "min_over_time", "avg_over_time", "clamp_min", "clamp_max",
                   "label_values", "vector", "scalar", "le", "topk", "bottomk", "quantile",
                   "abs", "changes", "resets"}


def strip_strings(expr):
    """The expression with each string literal's contents blanked (same length)."""
    return re.sub(r'"(?:[^"\\]|\\.)*"', lambda m: '"' + "_" * (len(m.group(0)) - 2) + '"', expr)


def metric_names(expr):
    """Metric names an expression selects (sieve_*, recorded level:name:op names, up)."""
    text = strip_strings(expr)
    text = re.sub(r"\{[^}]*\}", "", text)               # label matchers
    text = re.sub(r"\[[^\]]*\]", "", text)              # range selectors
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)
    names = set()
    for tok in re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", text):
        if tok in PROMQL_KEYWORDS:
            continue
        if tok.startswith("sieve_") or ":" in tok or tok == "up":
            names.add(tok)
        else:
            fail(f"unexpected identifier {tok!r} in {expr!r}")
    return names


def matchers(expr):
    """(metric, label) pairs of the label matchers in an expression."""
    out = []
    for metric, body in re.findall(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\s*\{([^}]*)\}", expr):
        for label in re.findall(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)", strip_strings(body)):
            out.append((metric, label))
    return out


def split_comparison(expr):
    """The operands of an alert expression's top-level comparisons and set operators (each
    must return data on a healthy daemon; the comparison itself may rightly return nothing).
    Numeric literals are dropped."""
    parts, depth, start, i = [], 0, 0, 0
    s = strip_strings(expr)
    ops = re.compile(r"(>=|<=|==|!=|>|<|\band\b|\bor\b|\bunless\b)")
    while i < len(s):
        c = s[i]
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        elif depth == 0:
            m = ops.match(s, i)
            if m:
                parts.append(expr[start:i])
                i = m.end()
                start = i
                continue
        i += 1
    parts.append(expr[start:])
    out = []
    for p in parts:
        p = p.strip()
        if not p or re.fullmatch(r"[-+0-9.eE]+", p):
            continue
        out.append(re.sub(r"^bool\s+", "", p))
    return out


def grafana_expr(expr):
    for var, value in GRAFANA_VARS.items():
        expr = expr.replace(var, value)
    return expr


def dashboard_queries():
    """(where, expr) of every dashboard target and query variable."""
    out = []
    for path in DASHBOARDS:
        board = json.loads(path.read_text())
        for panel in board["panels"]:
            for t in panel.get("targets", []):
                out.append((f"{path.name}: panel {panel['title']!r} {t['refId']}", grafana_expr(t["expr"])))
        for var in board["templating"]["list"]:
            if var["type"] == "query":
                q = var["query"]["query"]
                m = re.fullmatch(r"label_values\((.*),\s*([a-z_]+)\)", q)
                if not m:
                    fail(f"{path.name}: variable {var['name']}: not label_values(selector, label): {q}")
                out.append((f"{path.name}: variable {var['name']}", grafana_expr(m.group(1))))
    return out


def rule_queries():
    """(where, expr, is_alert) of every recording rule and alert."""
    out = []
    for path in RULE_FILES:
        for group in load_yaml(path)["groups"]:
            for rule in group["rules"]:
                name = rule.get("record") or rule.get("alert")
                out.append((f"{path.name}: {name}", rule["expr"], "alert" in rule))
    return out


def recorded_names():
    names = set()
    for path in RULE_FILES:
        for group in load_yaml(path)["groups"]:
            names.update(r["record"] for r in group["rules"] if "record" in r)
    return names


def autoscaler_queries(rendered=None):
    """(where, expr) of every KEDA trigger in the rendered overlays and every
    prometheus-adapter rule (templates filled in the way the adapter does)."""
    out = []
    rendered = rendered or render_overlays()
    for overlay in OVERLAYS:
        for o in rendered[overlay]:
            if o["kind"] == "ScaledObject":
                for i, t in enumerate(o["spec"]["triggers"]):
                    out.append((f"overlay {overlay}: ScaledObject {o['metadata']['name']} trigger {i}",
                                t["metadata"]["query"]))
    cfg = load_yaml(ADAPTER_CONFIG)
    for kind in ("rules", "externalRules"):
        for rule in cfg.get(kind, []):
            series = re.match(r"[a-zA-Z_:][a-zA-Z0-9_:]*", rule["seriesQuery"].strip("'")).group(0)
            q = (rule["metricsQuery"].replace("<<.Series>>", series)
                 .replace("<<.LabelMatchers>>", 'namespace="sieve"')
                 .replace("<<.GroupBy>>", "pod" if kind == "rules" else "namespace"))
            out.append((f"prometheus-adapter {kind}: {rule['name']['as']}", q))
    return out


def all_queries(rendered=None):
    """Every expression whose metric names must exist: (where, expr)."""
    return (dashboard_queries() + [(w, e) for w, e, _ in rule_queries()]
            + autoscaler_queries(rendered))


def check_names(queries, exported, recorded):
    """Every metric an expression names is exported by the daemon or recorded by the rules, and
    every label matcher on a daemon metric names one of its labels or a scrape label."""
    problems = []
    for where, expr in queries:
        for name in metric_names(expr):
            if name not in exported and name not in recorded and name != "up":
                problems.append(f"{where}: metric {name} is neither exported by sieved nor recorded")
        for metric, label in matchers(expr):
            if metric in exported and label not in exported[metric] | SCRAPE_LABELS:
                problems.append(f"{where}: {metric} has no label {label!r}")
    return problems


def report(problems, ok_message):
    if problems:
        for p in problems:
            print("FAIL:", p)
        sys.exit(1)
    print(ok_message)
