#!/usr/bin/env bash
# Renders deploy/kube-nsg.yaml (plain manifests: the namespace, the CRDs and the chart with its
# default values) from charts/kube-nsg, to stdout.
set -euo pipefail
cd "$(dirname "$0")/.."
helm="$(bash tests/cluster/helm.sh)"
cat <<'YAML'
# Rendered from charts/kube-nsg by `make generate`; do not edit. Install with:
#   kubectl apply --server-side -f deploy/kube-nsg.yaml
apiVersion: v1
kind: Namespace
metadata:
  name: kube-nsg
YAML
"$helm" template kube-nsg charts/kube-nsg --namespace kube-nsg --include-crds
