// Validates Kubernetes objects against their kinds' OpenAPI schemas (the kubernetes-models
// packages: core kinds, KEDA, prometheus-operator), installed from tests/deploy/package-lock.json
// by scripts/install-deps.sh. Input: a JSON file holding [{"where": ..., "object": {...}}, ...].
// Every object must be of a known kind and valid; an unknown kind is an error, not a skip.
// The schemas check types, required fields and enums; they do not reject unknown fields (k8s_check.py
// type-checks the same objects with tsc against the packages' interfaces for that).
//
//   node tests/deploy/validate_k8s.mjs objects.json
import { createRequire } from "node:module";
import { readFileSync } from "node:fs";

const require = createRequire(import.meta.url);
const packages = {
  "v1": "kubernetes-models/v1",
  "apps/v1": "kubernetes-models/apps/v1",
  "policy/v1": "kubernetes-models/policy/v1",
  "autoscaling/v2": "kubernetes-models/autoscaling/v2",
  "keda.sh/v1alpha1": "@kubernetes-models/keda/keda.sh/v1alpha1",
  "monitoring.coreos.com/v1": "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1",
};

function modelFor(apiVersion, kind) {
  const pkg = packages[apiVersion];
  if (!pkg) return null;
  let mod;
  try {
    mod = require(pkg);
  } catch (e) {
    console.error(`cannot load ${pkg}: ${e.message}\nrun scripts/install-deps.sh (npm ci in tests/deploy)`);
    process.exit(2);
  }
  return mod[kind] ?? null;
}

function validate(obj) {
  const Model = modelFor(obj.apiVersion, obj.kind);
  if (!Model) return `no schema for ${obj.apiVersion} ${obj.kind}`;
  try {
    new Model(obj).validate();
    return null;
  } catch (e) {
    return e.message;
  }
}

// The validator must be able to fail: a Deployment with a string containerPort and a
// ScaledObject without scaleTargetRef are rejected.
const broken = [
  { apiVersion: "apps/v1", kind: "Deployment", metadata: { name: "x" },
    spec: { selector: { matchLabels: { a: "b" } }, template: { spec: { containers: [
      { name: "c", image: "i", ports: [{ containerPort: "grpc" }] }] } } } },
  { apiVersion: "keda.sh/v1alpha1", kind: "ScaledObject", metadata: { name: "x" },
    spec: { triggers: [] } },
];
for (const b of broken) {
  if (validate(b) === null) {
    console.error(`self-check failed: a broken ${b.kind} passed validation`);
    process.exit(1);
  }
}

const items = JSON.parse(readFileSync(process.argv[2], "utf8"));
let failed = 0;
const kinds = new Map();
for (const { where, object } of items) {
  const err = validate(object);
  const key = `${object.apiVersion} ${object.kind}`;
  kinds.set(key, (kinds.get(key) ?? 0) + 1);
  if (err) {
    failed++;
    console.log(`FAIL: ${where}: ${object.kind} ${object.metadata?.name}: ${err}`);
  }
}
console.log(`schema validation: ${items.length - failed} of ${items.length} objects valid`);
for (const [k, n] of [...kinds].sort()) console.log(`  ${n} x ${k}`);
process.exit(failed ? 1 : 0);
