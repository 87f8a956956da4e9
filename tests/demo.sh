#!/usr/bin/env bash
# `make demo`: the local control plane, the controller and the node agent as host processes,
# netns pods for examples/three-tier, the example applied with kubectl, then the groups'
# status and a connectivity matrix measured with real packets next to the expected one.
# Everything keeps running for exploration; `make demo-down` stops it.
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ $(id -u) -ne 0 ]]; then
  echo "demo: needs root on a Linux machine with Debian packages (network namespaces, nftables)." >&2
  echo "demo: run 'sudo make demo'; on a machine with Docker, see tests/kind/e2e.sh instead." >&2
  exit 1
fi
state=/tmp/kube-nsg-demo
vnet=10.244.0.0/16,10.96.0.0/16
example=examples/three-tier
say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

say "Setting up (Debian packages, the control plane binaries: built once, then cached)"
bash tests/setup.sh
bash tests/cluster/up.sh
export KUBECONFIG=/tmp/kube-nsg-cluster/kubeconfig
cargo build -q --release --bin kube-nsg --example lab
bin=$PWD/target/release/kube-nsg
lab=$PWD/target/release/examples/lab
bash tests/demo-down.sh >/dev/null 2>&1 || true
mkdir -p "$state"

say "CRDs, and the example's pods as network namespaces on this machine"
kubectl apply --server-side --force-conflicts -f crds/kube-nsg.yaml
"$lab" up -f "$example"

say "Controller and node agent (logs in $state)"
"$bin" controller --no-leader-election --virtual-network "$vnet" \
  --metrics-addr 127.0.0.1:18080 >"$state/controller.log" 2>&1 &
echo $! >"$state/controller.pid"
"$bin" agent --node-name lab-node --virtual-network "$vnet" \
  --metrics-addr 127.0.0.1:19190 >"$state/agent.log" 2>&1 &
echo $! >"$state/agent.pid"

say "kubectl apply -f $example (the ASGs and the NSG)"
kubectl apply -f "$example/00-namespace.yaml" -f "$example/asgs.yaml" -f "$example/nsg.yaml"
kubectl -n three-tier wait --for=condition=Ready nsg/nsg1 --timeout=60s >/dev/null
kubectl -n three-tier wait --for=condition=DataplaneProgrammed nsg/nsg1 --timeout=60s >/dev/null

say "kubectl get nsg,asg -A"
kubectl get nsg,asg -A
say "Conditions of three-tier/nsg1"
kubectl -n three-tier get nsg nsg1 \
  -o jsonpath='{range .status.conditions[*]}{.type}={.status} ({.reason}): {.message}{"\n"}{end}'
say "Pods and the labels the controller maintains"
kubectl -n three-tier get pods -L kubensg.io/nic-nsg,asg.kubensg.io/asgweb,asg.kubensg.io/asglogic,asg.kubensg.io/asgdb
say "NetworkPolicies generated"
kubectl -n three-tier get networkpolicies -l app.kubernetes.io/managed-by=kube-nsg
say "Connectivity measured with real packets (TCP, UDP, ICMP) next to the expected verdicts"
"$lab" probe -f "$example" --ports tcp:80,tcp:1433,udp:53,icmp

say "Still running: explore with kubectl (KUBECONFIG=$KUBECONFIG), 'nft list table inet kube-nsg',"
echo "   kube-nsg verify/effective; stop it all with 'make demo-down' (the control plane: 'make cluster-down')."
