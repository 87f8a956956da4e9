#!/usr/bin/env bash
# The Helm chart and the plain manifests against the real API server: lint, render, the
# committed copies in sync, install / upgrade / uninstall with Helm, and kubectl apply of
# deploy/. Every object must be accepted by the real kube-apiserver (pods stay Pending: there
# is no kubelet).
set -euo pipefail
cd "$(dirname "$0")/.."
helm="$(bash tests/cluster/helm.sh)"
bash tests/cluster/up.sh >/dev/null
export KUBECONFIG=/tmp/kube-nsg-cluster/kubeconfig
ns=kube-nsg-helm-$$
fail() { echo "helm test: $*" >&2; exit 1; }
cleanup() {
  "$helm" uninstall kube-nsg -n "$ns" >/dev/null 2>&1 || true
  kubectl delete ns "$ns" kube-nsg --ignore-not-found --wait=false >/dev/null 2>&1 || true
}
trap cleanup EXIT

"$helm" lint --strict charts/kube-nsg
cmp -s crds/kube-nsg.yaml charts/kube-nsg/crds/kube-nsg.yaml ||
  fail "charts/kube-nsg/crds differs from crds/: run make generate"
bash tests/render-deploy.sh | cmp -s - deploy/kube-nsg.yaml ||
  fail "deploy/kube-nsg.yaml is stale: run make generate"
# The values schema rejects what the chart cannot use.
if "$helm" template x charts/kube-nsg --set controller.mode=lenient >/dev/null 2>&1; then
  fail "values.schema.json accepted controller.mode=lenient"
fi
"$helm" template x charts/kube-nsg --set serviceMonitor.enabled=true | grep -q "kind: ServiceMonitor" ||
  fail "serviceMonitor.enabled renders no ServiceMonitor"

kubectl create namespace "$ns" >/dev/null
# Other tests applied the CRDs with kubectl: take them over.
"$helm" install kube-nsg charts/kube-nsg -n "$ns" --force-conflicts --set virtualNetwork='{10.244.0.0/16,10.96.0.0/16}'
kubectl -n "$ns" get deployment/kube-nsg-controller daemonset/kube-nsg-agent >/dev/null
# No ReplicaSet or DaemonSet controller runs here: a server-side dry run admits one pod of
# each template (priority class, service account, security context).
for workload in deployment/kube-nsg-controller daemonset/kube-nsg-agent; do
  kubectl -n "$ns" get "$workload" -o json |
    jq '{apiVersion: "v1", kind: "Pod", metadata: (.spec.template.metadata + {name: "dry-run"}), spec: .spec.template.spec}' |
    kubectl -n "$ns" create --dry-run=server -f - >/dev/null ||
    fail "the API server does not admit a pod of $workload"
done
# The budget covers exactly the Deployment's pods (the local control plane runs no
# disruption controller to count them).
budget=$(kubectl -n "$ns" get pdb kube-nsg-controller -o jsonpath='{.spec.selector.matchLabels}')
pods=$(kubectl -n "$ns" get deployment kube-nsg-controller -o jsonpath='{.spec.selector.matchLabels}')
[[ $budget == "$pods" ]] || fail "the PodDisruptionBudget selects $budget, the Deployment $pods"
"$helm" upgrade kube-nsg charts/kube-nsg -n "$ns" --set controller.mode=permissive --set controller.replicas=1
[[ $(kubectl -n "$ns" get deployment kube-nsg-controller -o jsonpath='{.spec.template.spec.containers[0].args}') == *--mode=permissive* ]] ||
  fail "upgrade did not change the controller's mode"
# A budget over one replica would block every node drain: the upgrade to one removed it.
if kubectl -n "$ns" get pdb kube-nsg-controller >/dev/null 2>&1; then
  fail "the PodDisruptionBudget outlived the upgrade to one replica"
fi
"$helm" uninstall kube-nsg -n "$ns" --wait
left=$(kubectl get clusterrole,clusterrolebinding -o name | grep kube-nsg || true)
[[ -z $left ]] || fail "uninstall left $left"
# Helm keeps CRDs on uninstall by design (see README: upgrading CRDs).
kubectl get crd networksecuritygroups.kubensg.io >/dev/null

# deploy/ installs into the namespace kube-nsg; wait out a previous run's deletion of it.
kubectl wait --for=delete namespace/kube-nsg --timeout=120s >/dev/null 2>&1 || true
kubectl apply --server-side --force-conflicts -f deploy/kube-nsg.yaml >/dev/null
kubectl -n kube-nsg get deployment/kube-nsg-controller daemonset/kube-nsg-agent >/dev/null
# Remove what deploy/ created except the CRDs: deleting those would delete every group of
# the cluster, and other tests share this control plane.
kubectl delete clusterrole,clusterrolebinding -l app.kubernetes.io/instance=kube-nsg >/dev/null
kubectl delete namespace kube-nsg --wait=false >/dev/null
echo "helm test: lint, render, install, upgrade, uninstall and deploy/ all accepted"
