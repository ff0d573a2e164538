#!/usr/bin/env bash
# Offline validation of the Kubernetes and Istio manifests under deploy/.
#
#   deploy/validate/validate.sh
#
#   1. kubernetes-validate --strict (schemas shipped inside the Python package, no cluster,
#      no network) on every core-kind file in deploy/base/ (all *.yaml but
#      kustomization.yaml and istio-*.yaml): unknown fields, wrong types and missing
#      required fields fail; so does a kind/apiVersion it has no schema for.
#   2. validate-istio.mjs on deploy/base/istio-*.yaml: kubernetes-models'
#      @kubernetes-models/istio classes (validate() throws on a bad document) plus an
#      unknown-field and duration check. `npm ci` runs first when node_modules is missing
#      or older than package-lock.json.
#   3. validate-istio.mjs --operator-only on deploy/monitoring/*.yaml that are Prometheus
#      Operator resources (PodMonitor, PrometheusRule: @kubernetes-models/prometheus-operator),
#      and `promtool check rules` on the plain rules file when promtool is on PATH.
#   4. When kustomize or kubectl is on PATH: the rendered `kustomize build` of deploy/base, of
#      each deploy/overlays/* (generated ConfigMap, labels, image tag, the MLflow overlay's
#      patch) and of deploy/monitoring (the dashboard ConfigMap) through both validators again.
#
# Every step runs; the exit status is non-zero if any of them failed.
# Environment: K8S_VERSION (default 1.33.0), KUBERNETES_VALIDATE (command to run instead of
# the repo's .venv/bin/kubernetes-validate or the one on PATH).
set -uo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
deploy="$(dirname "$here")"
repo="$(dirname "$deploy")"
cd "$repo" || exit 1
base="deploy/base"
k8s_version="${K8S_VERSION:-1.33.0}"
failed=0

fail() {
  echo "FAIL $*" >&2
  failed=1
}

if [[ -n "${KUBERNETES_VALIDATE:-}" ]]; then
  read -r -a kv <<<"$KUBERNETES_VALIDATE"
elif [[ -x "$repo/.venv/bin/kubernetes-validate" ]]; then
  kv=("$repo/.venv/bin/kubernetes-validate")
elif command -v kubernetes-validate >/dev/null 2>&1; then
  kv=(kubernetes-validate)
else
  echo "FAIL kubernetes-validate not found: install the project's dev dependencies" >&2
  exit 1
fi

# kubernetes-validate exits 0 when it has no schema for a kind (it only warns), so any
# WARN line counts as a failure here; Istio and Prometheus Operator kinds (checked by
# validate-istio.mjs instead) are allowed to warn in rendered output.
run_kubernetes_validate() {
  local allow_crds="$1"
  shift
  local out rc
  out="$("${kv[@]}" --strict --quiet -k "$k8s_version" "$@" 2>&1)"
  rc=$?
  if [[ "$allow_crds" == yes ]]; then
    out="$(grep -Ev '^WARN .* with api version ([a-z0-9.-]+\.istio\.io|monitoring\.coreos\.com)/' <<<"$out")"
  fi
  if [[ -n "$out" ]]; then
    echo "$out" >&2
  fi
  if [[ $rc -ne 0 ]] || grep -Eq '^(WARN|ERROR|FATAL)' <<<"$out"; then
    return 1
  fi
  return 0
}

# 1. Core kinds, file by file.
core_files=()
for f in "$base"/*.yaml; do
  case "$(basename "$f")" in
    kustomization.yaml | istio-*.yaml) ;;
    *) core_files+=("$f") ;;
  esac
done
if [[ ${#core_files[@]} -eq 0 ]]; then
  fail "no core-kind manifests in $base"
elif run_kubernetes_validate no "${core_files[@]}"; then
  echo "ok   kubernetes-validate --strict (Kubernetes $k8s_version): ${#core_files[@]} file(s)"
else
  fail "kubernetes-validate on deploy/base"
fi

# 2. Istio resources with kubernetes-models.
if ! command -v node >/dev/null 2>&1; then
  fail "node not found: the Istio validator needs Node.js"
else
  if [[ ! -d "$here/node_modules" || "$here/package-lock.json" -nt "$here/node_modules/.package-lock.json" ]]; then
    echo "npm ci in deploy/validate"
    (cd "$here" && npm ci --no-audit --no-fund --loglevel=error) || fail "npm ci in deploy/validate"
  fi
  istio_files=("$base"/istio-*.yaml)
  node "$here/validate-istio.mjs" --istio-only "${istio_files[@]}" || fail "Istio manifests in deploy/base"
fi

# 3. The Prometheus Operator resources and the plain rules file.
monitoring="deploy/monitoring"
if command -v node >/dev/null 2>&1 && [[ -d "$here/node_modules" ]]; then
  node "$here/validate-istio.mjs" --operator-only "$monitoring/podmonitor.yaml" \
    "$monitoring/prometheusrule.yaml" || fail "Prometheus Operator manifests in $monitoring"
fi
if command -v promtool >/dev/null 2>&1; then
  promtool check rules "$monitoring/prometheus-rules.yaml" || fail "promtool check rules"
else
  echo "skip promtool check rules (promtool not on PATH: make system-deps)"
fi

# 4. The rendered kustomizations: the base, each overlay (overlays/mlflow: the MLflow registry)
#    and the monitoring resources.
render=()
if command -v kustomize >/dev/null 2>&1; then
  render=(kustomize build)
elif command -v kubectl >/dev/null 2>&1; then
  render=(kubectl kustomize)
fi
if [[ ${#render[@]} -eq 0 ]]; then
  echo "skip kustomize build (neither kustomize nor kubectl on PATH)"
else
  rendered="$(mktemp --suffix=.yaml)"
  trap 'rm -f "$rendered"' EXIT
  for target in "$base" "$deploy"/overlays/*/ "$monitoring"; do
    [[ -f "$target/kustomization.yaml" ]] || continue
    target="${target%/}"
    target="${target#"$repo"/}"
    if "${render[@]}" "$target" >"$rendered"; then
      echo "ok   ${render[*]} $target"
      if run_kubernetes_validate yes "$rendered"; then
        echo "ok   kubernetes-validate --strict on the rendered $target"
      else
        fail "kubernetes-validate on the rendered $target"
      fi
      if command -v node >/dev/null 2>&1 && [[ -d "$here/node_modules" ]]; then
        node "$here/validate-istio.mjs" "$rendered" || fail "kubernetes-models on the rendered $target"
      fi
    else
      fail "${render[*]} $target"
    fi
  done
fi

if [[ $failed -ne 0 ]]; then
  echo "deploy validation FAILED" >&2
  exit 1
fi
echo "deploy validation passed"
