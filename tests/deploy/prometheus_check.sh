#!/usr/bin/env bash
# CTest deploy_prometheus: promtool checks the rule files and the scrape configs and unit-tests
# the alerts (deploy/prometheus/tests); the generated PrometheusRule and Grafana dashboards equal
# what their generators write now.
set -euo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
cd "$repo/deploy/prometheus"
if ! command -v promtool >/dev/null; then
  echo "FAIL: promtool is not installed (Debian package prometheus): run scripts/install-deps.sh"
  exit 1
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

promtool check rules rules/sieve-recording.yml rules/sieve-alerts.yml
promtool check config local/prometheus.yml

# The in-cluster config uses kubernetes_sd_configs, which Debian's Prometheus is built without;
# everything else in it (relabelling, rule files) is checked with the discovery block swapped
# for a static target.
yq -y --arg rules "$PWD/rules" '
  .rule_files |= map($rules + "/" + (split("/") | last)) |
  .scrape_configs |= map(del(.kubernetes_sd_configs) + {static_configs: [{targets: ["127.0.0.1:9090"]}]})
' prometheus.yml > "$tmp/prometheus.yml"
grep -q kubernetes_sd_configs prometheus.yml
promtool check config "$tmp/prometheus.yml"

promtool test rules tests/sieve-alerts.test.yml

./gen-prometheusrule.sh "$tmp/prometheusrule.yaml"
if ! diff -u operator/prometheusrule.yaml "$tmp/prometheusrule.yaml"; then
  echo "FAIL: operator/prometheusrule.yaml is stale: run deploy/prometheus/gen-prometheusrule.sh"
  exit 1
fi
/usr/bin/python3 "$repo/deploy/grafana/gen_dashboards.py" "$tmp/dashboards"
if ! diff -ru "$repo/deploy/grafana/dashboards" "$tmp/dashboards"; then
  echo "FAIL: deploy/grafana/dashboards is stale: run deploy/grafana/gen_dashboards.py"
  exit 1
fi
echo "deploy_prometheus: rules, configs and alert unit tests pass; generated files are current"
