#!/usr/bin/env bash
# Stops what `make demo` left running: the controller and the agent, the agent's nftables
# table, and the lab's network namespaces. The control plane stays (make cluster-down).
set -euo pipefail
cd "$(dirname "$0")/.."
# The agent's cleanup also removes the node's Lease: it needs the demo's cluster.
export KUBECONFIG="${KUBECONFIG:-/tmp/kube-nsg-cluster/kubeconfig}"
state=/tmp/kube-nsg-demo
for p in controller agent; do
  if [[ -f $state/$p.pid ]]; then
    kill "$(cat "$state/$p.pid")" 2>/dev/null || true
    rm -f "$state/$p.pid"
  fi
done
if [[ -x target/release/kube-nsg ]]; then
  target/release/kube-nsg agent --cleanup --node-name lab-node || true
fi
if [[ -x target/release/examples/lab ]]; then
  target/release/examples/lab down || true
fi
echo "demo stopped"
