#!/usr/bin/env node
// Offline schema validation of Istio manifests with the kubernetes-models classes.
//
//   node validate-istio.mjs [--istio-only | --operator-only] FILE.yaml...
//
// Each YAML document is checked three ways:
//   1. `new Model(doc).validate()` with the model class for its apiVersion and kind:
//      @kubernetes-models/istio for *.istio.io groups (types, required fields, enums and
//      oneOf rules of Istio's CRD schemas), @kubernetes-models/prometheus-operator for
//      monitoring.coreos.com (PodMonitor, PrometheusRule), kubernetes-models for the core kinds
//      (a second opinion beside kubernetes-validate). validate() throws on a bad document.
//   2. Unknown fields. These schemas do not forbid extra properties, so a typo such as
//      `retryon:` would pass (1) and be silently pruned by the API server. Every field is
//      therefore probed: its value is swapped for one of another JSON type and the document
//      validated again. A field the schema knows now fails; one it does not know still
//      passes, and is reported.
//   3. Durations (`timeout: 2s`...) in Istio documents, which the schemas type as strings.
// A document with no model class (a typo'd kind or apiVersion) is an error. With
// --istio-only, a document outside the *.istio.io groups is an error too (with
// --operator-only, one outside monitoring.coreos.com), and at least one such document must be
// there.
// Exit status: 0 when every document passed, 1 otherwise, 2 on usage errors.

import { readFileSync } from "node:fs";
import { parseAllDocuments } from "yaml";

const ISTIO_GROUP = /^[a-z0-9.-]+\.istio\.io$/;
const OPERATOR_GROUP = "monitoring.coreos.com";
// Fields that Istio reads as google.protobuf.Duration.
const DURATION_FIELDS = new Set([
  "timeout",
  "perTryTimeout",
  "connectTimeout",
  "idleTimeout",
  "interval",
  "baseEjectionTime",
  "maxConnectionDuration",
  "time",
  "maxStreamDuration",
  "tcpKeepaliveTime",
  "tcpKeepaliveInterval",
  "terminationDrainDuration",
  "retryBudget",
]);
const DURATION = /^(\d+(\.\d+)?(h|m|s|ms|us|µs|ns))+$/;

function isIstio(apiVersion) {
  return typeof apiVersion === "string" && ISTIO_GROUP.test(apiVersion.split("/")[0]);
}

function isOperator(apiVersion) {
  return typeof apiVersion === "string" && apiVersion.split("/")[0] === OPERATOR_GROUP;
}

async function modelClass(apiVersion, kind) {
  if (typeof apiVersion !== "string" || typeof kind !== "string") return null;
  // "v1" is the core group; "apps/v1", "networking.istio.io/v1" name theirs.
  const [group, version] = apiVersion.includes("/") ? apiVersion.split("/") : ["", apiVersion];
  if (!/^[A-Za-z0-9]+$/.test(kind) || !/^v\w+$/.test(version) || !/^[a-z0-9.-]*$/.test(group)) {
    return null;
  }
  const pkg = isIstio(apiVersion)
    ? "@kubernetes-models/istio"
    : isOperator(apiVersion)
      ? "@kubernetes-models/prometheus-operator"
      : "kubernetes-models";
  try {
    const mod = await import(`${pkg}/${group ? `${group}/` : ""}${version}/${kind}`);
    return mod[kind] ?? null;
  } catch {
    return null;
  }
}

function validationError(Cls, doc) {
  try {
    new Cls(doc).validate();
    return null;
  } catch (err) {
    return err instanceof Error ? err : new Error(String(err));
  }
}

function formatPath(path) {
  return path
    .map((p, i) => (typeof p === "number" ? `[${p}]` : i === 0 ? p : `.${p}`))
    .join("");
}

// Every object key in the document, as a path from the root (apiVersion/kind excluded).
function* fieldPaths(value, path = []) {
  if (Array.isArray(value)) {
    for (let i = 0; i < value.length; i++) yield* fieldPaths(value[i], [...path, i]);
  } else if (value !== null && typeof value === "object") {
    for (const [key, child] of Object.entries(value)) {
      if (path.length === 0 && (key === "apiVersion" || key === "kind")) continue;
      yield [[...path, key], child];
      yield* fieldPaths(child, [...path, key]);
    }
  }
}

function withValue(doc, path, value) {
  const copy = structuredClone(doc);
  let node = copy;
  for (const p of path.slice(0, -1)) node = node[p];
  node[path.at(-1)] = value;
  return copy;
}

function unknownFields(Cls, doc) {
  const unknown = [];
  for (const [path, value] of fieldPaths(doc)) {
    // A value of a different JSON type: any field the schema types must now fail.
    const probe = value !== null && typeof value === "object" ? 424242 : { probe: [true] };
    if (validationError(Cls, withValue(doc, path, probe)) === null) unknown.push(formatPath(path));
  }
  return unknown;
}

function badDurations(doc) {
  const bad = [];
  for (const [path, value] of fieldPaths(doc)) {
    const key = path.at(-1);
    if (typeof key !== "string" || !DURATION_FIELDS.has(key)) continue;
    if (path[0] === "metadata") continue;
    if (typeof value === "string" && !DURATION.test(value)) {
      bad.push(`${formatPath(path)}: ${JSON.stringify(value)} is not a duration (e.g. 500ms, 2s, 1m)`);
    }
  }
  return bad;
}

async function checkDocument(doc, where, only) {
  if (typeof doc !== "object" || Array.isArray(doc)) return [`${where}: not a mapping`];
  const name = `${doc.kind}/${doc.metadata?.name ?? "?"}`;
  if (only === "istio" && !isIstio(doc.apiVersion)) {
    return [`${where} ${name}: apiVersion ${JSON.stringify(doc.apiVersion)} is not an Istio group`];
  }
  if (only === "operator" && !isOperator(doc.apiVersion)) {
    return [`${where} ${name}: apiVersion ${JSON.stringify(doc.apiVersion)} is not ${OPERATOR_GROUP}`];
  }
  const Cls = await modelClass(doc.apiVersion, doc.kind);
  if (Cls === null) return [`${where} ${name}: no model class for ${doc.apiVersion} ${doc.kind}`];
  const err = validationError(Cls, doc);
  if (err !== null) return [`${where} ${name}: ${err.message}`];
  const problems = [
    ...unknownFields(Cls, doc).map((p) => `${where} ${name}: unknown field ${p}`),
    ...(isIstio(doc.apiVersion) ? badDurations(doc) : []).map((p) => `${where} ${name}: ${p}`),
  ];
  if (problems.length === 0) console.log(`ok   ${where} ${name}`);
  return problems;
}

async function main(argv) {
  const flags = { "--istio-only": "istio", "--operator-only": "operator" };
  const chosen = argv.filter((a) => a in flags);
  const only = chosen.length === 1 ? flags[chosen[0]] : null;
  const files = argv.filter((a) => !(a in flags));
  if (files.length === 0 || chosen.length > 1 || files.some((f) => f.startsWith("--"))) {
    console.error("usage: node validate-istio.mjs [--istio-only | --operator-only] FILE.yaml...");
    return 2;
  }
  const problems = [];
  let checked = 0;
  let istio = 0;
  let operator = 0;
  for (const file of files) {
    let text;
    try {
      text = readFileSync(file, "utf8");
    } catch (err) {
      problems.push(`${file}: ${err.message}`);
      continue;
    }
    const docs = parseAllDocuments(text, { prettyErrors: true, uniqueKeys: true });
    if (!Array.isArray(docs)) {
      problems.push(`${file}: no YAML documents`);
      continue;
    }
    for (const [i, doc] of docs.entries()) {
      const where = `${file}#${i + 1}`;
      if (doc.errors.length > 0) {
        problems.push(...doc.errors.map((e) => `${where}: YAML: ${e.message}`));
        continue;
      }
      const value = doc.toJS();
      if (value === null || value === undefined) continue; // empty document
      checked++;
      if (isIstio(value?.apiVersion)) istio++;
      if (isOperator(value?.apiVersion)) operator++;
      problems.push(...(await checkDocument(value, where, only)));
    }
  }
  for (const p of problems) console.error(`FAIL ${p}`);
  // An Istio run must find Istio resources, an operator run its CRs, a rendered kustomization
  // (base: Istio; monitoring: the operator's) one of the two.
  if (problems.length === 0 && only === "istio" && istio === 0) {
    console.error("FAIL no Istio document found");
    return 1;
  }
  if (problems.length === 0 && only === null && istio + operator === 0) {
    console.error(`FAIL no Istio or ${OPERATOR_GROUP} document found`);
    return 1;
  }
  if (problems.length === 0 && only === "operator" && operator === 0) {
    console.error(`FAIL no ${OPERATOR_GROUP} document found`);
    return 1;
  }
  console.log(
    `${checked} document(s) checked (${istio} Istio, ${operator} ${OPERATOR_GROUP}), ` +
      `${problems.length} problem(s)`,
  );
  return problems.length === 0 ? 0 : 1;
}

process.exitCode = await main(process.argv.slice(2));
