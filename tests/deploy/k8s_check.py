#!/usr/bin/env python3
"""CTest deploy_k8s: every kustomize overlay renders; every rendered object passes schema
validation for its kind (validate_k8s.mjs); and the objects agree with each other and with the
daemon: probes, ports and drain timing against the ConfigMap's config (loaded by the real
sieved), selectors against pod labels, autoscalers against their targets and roles.

    k8s_check.py SIEVED
"""
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

import yaml

import deploy_lib as d

SIEVED = sys.argv[1]
MIN_SCALE_DOWN_WINDOW_S = 300     # shorter and a burst's tail is cut (deploy/README.md)
EXIT_MARGIN_S = 10                # SIGTERM-to-exit slack beyond the drain grace
# The autoscaling signals (issue: prefill on its backlog in seconds, decode on KV page use and
# running requests), as the metric or recorded-series name each trigger's query or each HPA
# metric contains; a role scales on exactly its signals ("both" does prefill and decode).
AUTOSCALING_SIGNALS = {"prefill backlog": "sieve_prefill_backlog_seconds",
                       "KV pages in use": "sieve_kv_pages_in_use",
                       "running requests": "running_requests"}
ROLE_SIGNALS = {"prefill": {"prefill backlog"},
                "decode": {"KV pages in use", "running requests"},
                "both": {"prefill backlog", "KV pages in use", "running requests"}}


def load_config(text, where, problems):
    """Loads the config with the real daemon (--print-config, every key of every role) and
    returns the effective one; a key sieved does not know fails."""
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        f.write(text)
    try:
        r = subprocess.run([SIEVED, "--config", f.name, "--print-config"], capture_output=True,
                           text=True, cwd=d.REPO)
    finally:
        os.unlink(f.name)
    if r.returncode != 0:
        problems.append(f"{where}: sieved rejects the config:\n{r.stderr}")
        return None
    return yaml.safe_load(r.stdout)


# Where each kind's TypeScript interface lives (the same kubernetes-models packages as the
# schemas of validate_k8s.mjs).
TS_MODULES = {
    "v1": "kubernetes-models/v1",
    "apps/v1": "kubernetes-models/apps/v1",
    "policy/v1": "kubernetes-models/policy/v1",
    "autoscaling/v2": "kubernetes-models/autoscaling/v2",
    "keda.sh/v1alpha1": "@kubernetes-models/keda/keda.sh/v1alpha1",
    "monitoring.coreos.com/v1": "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1",
}
# A misspelt optional field deep in a pod template: the self-check object tsc must reject.
MISSPELT = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "self-check"},
            "spec": {"selector": {"matchLabels": {"a": "b"}},
                     "template": {"spec": {"terminationGracePeriodSecond": 30,
                                           "containers": [{"name": "c", "image": "i"}]}}}}


def check_unknown_fields(items, node_modules, problems):
    """The schemas of validate_k8s.mjs accept unknown fields, so a misspelt optional field
    (`terminationGracePeriodSecond`) would pass them and be dropped by the API server. Here
    each object is type-checked by TypeScript (Debian's node-typescript) against its kind's
    interface from the same packages: an object literal with a property its type does not
    declare is an error at any depth (excess property checking), as are wrong value types."""
    if not shutil.which("tsc"):
        d.fail("tsc is not installed (Debian package node-typescript): run scripts/install-deps.sh")
    objs = [("self-check", MISSPELT)] + [(i["where"], i["object"]) for i in items]
    imports, body, starts = {}, [], []
    for n, (where, o) in enumerate(objs):
        mod = TS_MODULES.get(o["apiVersion"])
        if mod is None:
            problems.append(f"{where}: no TypeScript interface for {o['apiVersion']} {o['kind']}")
            continue
        name = f"I{o['kind']}"
        alias = f"{name}_{re.sub(r'[^A-Za-z0-9]', '_', o['apiVersion'])}"
        imports[alias] = f'import {{ {name} as {alias} }} from "{mod}/{o["kind"]}";'
        starts.append((len(body), n))
        text = json.dumps(o, indent=1)
        body += [f"export const o{n}: {alias} = {text.splitlines()[0]}"] + text.splitlines()[1:]
        body[-1] += ";"
    head = sorted(imports.values())
    offset = len(head) + 1          # 1-based line numbers of tsc
    with tempfile.TemporaryDirectory() as tmp:
        os.symlink(node_modules, os.path.join(tmp, "node_modules"))
        with open(os.path.join(tmp, "objects.ts"), "w") as f:
            f.write("\n".join(head + body) + "\n")
        r = subprocess.run(["tsc", "--noEmit", "--strict", "--skipLibCheck", "--target", "es2020",
                            "--moduleResolution", "node", "--module", "commonjs", "objects.ts"],
                           cwd=tmp, capture_output=True, text=True)
    errors = {}
    for m in re.finditer(r"^objects\.ts\((\d+),\d+\): error (TS\d+: .*)$", r.stdout, re.M):
        line = int(m.group(1)) - offset
        n = max((k for start, k in starts if start <= line), default=None)
        errors.setdefault(n, []).append(m.group(2))
    if r.returncode != 0 and not errors:
        problems.append(f"tsc failed:\n{r.stdout}{r.stderr}")
    if 0 not in errors:
        problems.append("self-check: tsc accepted a Deployment with the misspelt field "
                        "spec.template.spec.terminationGracePeriodSecond")
    for n, errs in sorted((k, v) for k, v in errors.items() if k):
        where, o = objs[n]
        problems.append(f"{where}: {o['kind']} {o['metadata'].get('name')}: " + "; ".join(errs))
    print(f"field names and types: {len(objs) - 1} objects type-checked against their kinds' "
          f"interfaces (tsc), {len(errors) - (0 in errors)} with errors; the misspelt self-check "
          f"object {'rejected' if 0 in errors else 'ACCEPTED'}")


def matches(selector, labels):
    return all(labels.get(k) == v for k, v in selector.items())


def check_overlay(name, objs, problems):
    by_kind = {}
    for o in objs:
        by_kind.setdefault(o["kind"], []).append(o)
        if o["kind"] != "Namespace" and o["metadata"].get("namespace") != "sieve":
            problems.append(f"{name}: {o['kind']} {o['metadata']['name']} not in namespace sieve")
    deployments = {o["metadata"]["name"]: o for o in by_kind.get("Deployment", [])}
    configmaps = {o["metadata"]["name"]: o for o in by_kind.get("ConfigMap", [])}
    pvcs = {o["metadata"]["name"] for o in by_kind.get("PersistentVolumeClaim", [])}
    expected_roles = {"prefill", "decode"} if name.startswith("disaggregated") else {"both"}
    roles = {}
    for dname, dep in deployments.items():
        roles[check_deployment(name, dname, dep, configmaps, pvcs, problems)] = dname
    if set(roles) != expected_roles:
        problems.append(f"{name}: Deployment roles {sorted(roles)} != {sorted(expected_roles)}")
    for kind in ("Service", "PodDisruptionBudget"):
        for o in by_kind.get(kind, []):
            sel = o["spec"]["selector"]
            sel = sel.get("matchLabels", sel)
            hits = [n for n, dep in deployments.items() if matches(sel, dep["spec"]["template"]["metadata"]["labels"])]
            if len(hits) != 1:
                problems.append(f"{name}: {kind} {o['metadata']['name']} selects {hits}, not one Deployment")
            elif kind == "Service":
                pod_ports = {p["name"] for c in deployments[hits[0]]["spec"]["template"]["spec"]["containers"] for p in c["ports"]}
                for p in o["spec"]["ports"]:
                    if p["targetPort"] not in pod_ports:
                        problems.append(f"{name}: Service {o['metadata']['name']} targets unknown port {p['targetPort']}")
    if len([s for s in by_kind.get("Service", []) if s["spec"].get("clusterIP") == "None"]) != len(deployments):
        problems.append(f"{name}: not one headless Service per Deployment")
    check_autoscalers(name, by_kind, deployments, problems)
    check_prefill_target(name, by_kind, deployments, problems)


def check_prefill_target(name, by_kind, deployments, problems):
    """A decode Deployment's disaggregation.prefill_target is dns:/// of a rendered headless
    Service that selects the prefill pods, on their gRPC port (KvTransfer is served there)."""
    for dname, dep in deployments.items():
        cfg = dep.get("_sieve_config")
        if not cfg or cfg["server"]["role"] != "decode":
            continue
        where = f"{name}: Deployment {dname}"
        target = cfg["disaggregation"]["prefill_target"]
        m = re.fullmatch(r"dns:///([a-z0-9-]+)\.([a-z0-9-]+)\.svc\.cluster\.local:(\d+)", target)
        if not m:
            problems.append(f"{where}: prefill_target {target!r} is not dns:///SERVICE.NAMESPACE"
                            ".svc.cluster.local:PORT (round-robin over the pods needs DNS)")
            continue
        svc_name, ns, port = m.group(1), m.group(2), int(m.group(3))
        svcs = [s for s in by_kind.get("Service", []) if s["metadata"]["name"] == svc_name
                and s["metadata"].get("namespace") == ns]
        if not svcs:
            problems.append(f"{where}: prefill_target names Service {svc_name}.{ns}, not rendered")
            continue
        svc = svcs[0]
        if svc["spec"].get("clusterIP") != "None":
            problems.append(f"{where}: prefill_target Service {svc_name} is not headless: one "
                            "connection would pin each decode pod to one prefill pod")
        sel = svc["spec"]["selector"]
        hits = [dep2 for dep2 in deployments.values()
                if matches(sel, dep2["spec"]["template"]["metadata"]["labels"])]
        if len(hits) != 1 or hits[0].get("_sieve_config", {}).get("server", {}).get("role") != "prefill":
            problems.append(f"{where}: prefill_target Service {svc_name} does not select the prefill pods")
            continue
        (c,) = [c for c in hits[0]["spec"]["template"]["spec"]["containers"] if c["name"] == "sieved"]
        grpc_port = {p["name"]: p["containerPort"] for p in c["ports"]}.get("grpc")
        svc_ports = {p["port"]: p["targetPort"] for p in svc["spec"]["ports"]}
        if svc_ports.get(port) != "grpc" or port != grpc_port:
            problems.append(f"{where}: prefill_target port {port} is not the prefill pods' gRPC "
                            f"port {grpc_port} (sieve.kv.v1.KvTransfer is served there)")
        prefill_cfg = hits[0]["_sieve_config"]
        for key in ("page_size_tokens",):
            if prefill_cfg["kv_cache"][key] != cfg["kv_cache"][key]:
                problems.append(f"{where}: kv_cache.{key} differs from the prefill pods': every "
                                "transfer would fail its layout check")
        if prefill_cfg["model"]["name"] != cfg["model"]["name"]:
            problems.append(f"{where}: model.name differs from the prefill pods'")
        if prefill_cfg["server"]["auth"]["tokens_file"] and not cfg["disaggregation"]["token_file"]:
            problems.append(f"{where}: the prefill pods want a bearer token "
                            "(server.auth.tokens_file) but disaggregation.token_file is unset")


def check_deployment(name, dname, dep, configmaps, pvcs, problems):
    """Checks one Deployment against its ConfigMap's config; returns its role."""
    gpu = name != "cpu"
    where = f"{name}: Deployment {dname}"
    pod = dep["spec"]["template"]
    labels = pod["metadata"]["labels"]
    role = labels.get("sieve.dev/role")
    if not matches(dep["spec"]["selector"]["matchLabels"], labels):
        problems.append(f"{where}: selector does not match the pod labels")
    spec = pod["spec"]
    (c,) = [c for c in spec["containers"] if c["name"] == "sieved"]
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        p = c.get(probe)
        if not p or "grpc" not in p:
            problems.append(f"{where}: {probe} is not a gRPC probe")
        elif p["grpc"]["port"] != ports.get("grpc"):
            problems.append(f"{where}: {probe} port {p['grpc']['port']} is not the grpc port")
    image = c["image"]
    if gpu != image.endswith(":cuda") or (not gpu and not image.endswith(":cpu")):
        problems.append(f"{where}: image {image} is not the {'cuda' if gpu else 'cpu'} target")
    limits = c["resources"].get("limits", {})
    if gpu and str(limits.get("nvidia.com/gpu")) != "1":
        problems.append(f"{where}: no nvidia.com/gpu limit")
    if not gpu and "nvidia.com/gpu" in limits:
        problems.append(f"{where}: a GPU limit in the cpu overlay")
    sc = spec["securityContext"]
    if not sc.get("runAsNonRoot") or sc.get("runAsUser") != 65532:
        problems.append(f"{where}: not run as the image's non-root user 65532")
    for tsc in spec.get("topologySpreadConstraints", []):
        if not matches(tsc["labelSelector"]["matchLabels"], labels):
            problems.append(f"{where}: topology spread selector does not select its own pods")
    for v in spec["volumes"]:
        if "persistentVolumeClaim" in v and v["persistentVolumeClaim"]["claimName"] not in pvcs:
            problems.append(f"{where}: volume claim {v['persistentVolumeClaim']['claimName']} not rendered")
    (cm_vol,) = [v for v in spec["volumes"] if v["name"] == "config"]
    cm = configmaps.get(cm_vol["configMap"]["name"])
    if cm is None:
        problems.append(f"{where}: ConfigMap {cm_vol['configMap']['name']} not rendered")
        return role
    (mount,) = [m for m in c["volumeMounts"] if m["name"] == "config"]
    args = c["args"]
    cfg_path = args[args.index("--config") + 1]
    if os.path.dirname(cfg_path) != mount["mountPath"] or os.path.basename(cfg_path) not in cm["data"]:
        problems.append(f"{where}: --config {cfg_path} is not the mounted ConfigMap's file")
        return role
    text = cm["data"][os.path.basename(cfg_path)]
    cfg = load_config(text, f"{where} config", problems)
    if cfg is None:
        return role
    if cfg["server"]["role"] != role:
        problems.append(f"{where}: pods labelled sieve.dev/role {role} but server.role is {cfg['server']['role']}")
    dep["_sieve_config"] = cfg     # for the checks across Deployments (check_prefill_target)
    # Every credential file the config names lies in a Secret mounted into the container (a
    # directory mount: a subPath mount would never see a rotated file).
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    secrets = {v["name"]: v["secret"]["secretName"] for v in spec["volumes"] if "secret" in v}
    for section, key in (("server.auth", "tokens_file"), ("server.tls", "cert_file"),
                         ("server.tls", "key_file"), ("server.tls", "client_ca_file"),
                         ("disaggregation", "token_file"), ("disaggregation.tls", "ca_file"),
                         ("disaggregation.tls", "cert_file"), ("disaggregation.tls", "key_file")):
        node = cfg
        for part in section.split("."):
            node = node.get(part, {})
        path = node.get(key, "")
        if not path:
            continue
        m = mounts.get(os.path.dirname(path))
        if m is None or m["name"] not in secrets or "subPath" in m:
            problems.append(f"{where}: {section}.{key} {path} is not in a Secret mounted as a "
                            "directory")
    for key, port_name in (("server", "grpc"), ("metrics", "metrics")):
        port = int(cfg[key]["listen_address"].rsplit(":", 1)[1])
        if port != ports.get(port_name):
            problems.append(f"{where}: {key}.listen_address port {port} != containerPort {port_name}")
    pre = c["lifecycle"]["preStop"]["exec"]["command"]
    sleep_s = int(pre[-1]) if pre[0].endswith("sleep") else 0
    grace = cfg["server"]["drain_grace_period_s"]
    tgp = spec["terminationGracePeriodSeconds"]
    if tgp < sleep_s + grace + EXIT_MARGIN_S:
        problems.append(f"{where}: terminationGracePeriodSeconds {tgp} < preStop {sleep_s} s + "
                        f"drain grace {grace} s + {EXIT_MARGIN_S} s: the kubelet would kill requests")
    return role


def check_autoscalers(name, by_kind, deployments, problems):
    """One autoscaler per Deployment, on its role, with a slow scale-down."""
    autoscalers = by_kind.get("ScaledObject", []) + by_kind.get("HorizontalPodAutoscaler", [])
    if name.endswith("-hpa") != bool(by_kind.get("HorizontalPodAutoscaler")) or len(autoscalers) != len(deployments):
        problems.append(f"{name}: expected one {'HPA' if name.endswith('-hpa') else 'ScaledObject'} per Deployment")
    adapter = d.load_yaml(d.ADAPTER_CONFIG)
    adapter_names = {r["name"]["as"] for k in ("rules", "externalRules") for r in adapter.get(k, [])}
    for a in autoscalers:
        where = f"{name}: {a['kind']} {a['metadata']['name']}"
        target = a["spec"]["scaleTargetRef"]["name"]
        if target not in deployments:
            problems.append(f"{where}: scales {target}, which is not rendered")
            continue
        role = deployments[target]["spec"]["template"]["metadata"]["labels"]["sieve.dev/role"]
        if a["kind"] == "ScaledObject":
            behavior = a["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
            for t in a["spec"]["triggers"]:
                q = t["metadata"]["query"]
                if f'role="{role}"' not in q or 'namespace="sieve"' not in q:
                    problems.append(f"{where}: query {q!r} is not about role {role} in namespace sieve")
        else:
            behavior = a["spec"]["behavior"]
            for m in a["spec"]["metrics"]:
                metric = m[m["type"].lower()]["metric"]
                if metric["name"] not in adapter_names:
                    problems.append(f"{where}: metric {metric['name']} is not served by prometheus-adapter")
                if m["type"] == "External" and metric["selector"]["matchLabels"].get("role") != role:
                    problems.append(f"{where}: external metric not selected by role {role}")
        texts = ([t["metadata"]["query"] for t in a["spec"]["triggers"]] if a["kind"] == "ScaledObject"
                 else [m[m["type"].lower()]["metric"]["name"] for m in a["spec"]["metrics"]])
        signals = {s for s, needle in AUTOSCALING_SIGNALS.items() if any(needle in t for t in texts)}
        if signals != ROLE_SIGNALS[role]:
            problems.append(f"{where}: scales role {role} on {sorted(signals)}, not on "
                            f"{sorted(ROLE_SIGNALS[role])} (deploy/README.md, Autoscaling)")
        if behavior["scaleDown"]["stabilizationWindowSeconds"] < MIN_SCALE_DOWN_WINDOW_S:
            problems.append(f"{where}: scale-down stabilisation under {MIN_SCALE_DOWN_WINDOW_S} s")


def main():
    problems, items = [], []
    # The loader itself must reject a key sieved does not know (a misspelt key fails CI, not
    # the pod).
    bad = []
    if load_config("server:\n  role: decode\n  drain_grace_priod_s: 30\n", "self-check", bad) is not None:
        problems.append("self-check: sieved --print-config accepted the unknown key server.drain_grace_priod_s")
    rendered = d.render_overlays()
    for overlay, objs in rendered.items():
        check_overlay(overlay, objs, problems)
        # Without the check's own notes (_sieve_config): the objects as kustomize rendered them.
        items += [{"where": f"overlay {overlay}",
                   "object": {k: v for k, v in o.items() if not k.startswith("_sieve")}} for o in objs]
        print(f"rendered overlay {overlay}: {len(objs)} objects")
    for path in d.EXTRA_KUSTOMIZATIONS:
        objs = d.render(path)
        items += [{"where": str(path.relative_to(d.REPO)), "object": o} for o in objs]
        print(f"rendered {path.relative_to(d.REPO)}: {len(objs)} objects")
    alt = d.DEPLOY / "prometheus" / "operator" / "alternatives" / "servicemonitor.yaml"
    items.append({"where": str(alt.relative_to(d.REPO)), "object": d.load_yaml(alt)})
    node_modules = d.REPO / "tests" / "deploy" / "node_modules"
    if not node_modules.is_dir():
        d.fail("tests/deploy/node_modules is missing: run scripts/install-deps.sh (npm ci)")
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(items, f)
    try:
        r = subprocess.run(["node", str(d.REPO / "tests" / "deploy" / "validate_k8s.mjs"), f.name],
                           text=True, capture_output=True)
    finally:
        os.unlink(f.name)
    print(r.stdout, end="")
    if r.returncode != 0:
        problems.append(f"schema validation failed:\n{r.stderr}")
    check_unknown_fields(items, node_modules, problems)
    d.report(problems, f"deploy_k8s: {len(d.OVERLAYS)} overlays consistent, {len(items)} objects valid")


if __name__ == "__main__":
    try:
        main()
    except d.CheckFailed as e:
        print("FAIL:", e)
        sys.exit(1)
