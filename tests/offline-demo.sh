#!/usr/bin/env bash
# The offline walk-through: effective rules and IP flow verify on examples/three-tier,
# with no cluster.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build -q --release --bin kube-nsg
nsg=target/release/kube-nsg
ex=examples/three-tier
ranges=(--virtual-network 10.244.0.0/16 --node-ips 172.18.0.2)

echo "== Effective security rules of three-tier/db1"
"$nsg" effective -f "$ex" --pod three-tier/db1 "${ranges[@]}"
echo
echo "== IP flow verify"
# The first line of each answer: the verdict and the deciding rule.
verify() {
  local out
  out=$("$nsg" verify -f "$ex" "${ranges[@]}" "$@")
  echo "${out%%$'\n'*}"
}
verify --pod three-tier/web1 --direction Inbound --protocol Tcp --remote-ip 198.18.0.10 --local-port 80 --remote-port 50000
verify --pod three-tier/logic1 --direction Inbound --protocol Tcp --remote-ip 198.18.0.10 --local-port 80 --remote-port 50000
verify --pod three-tier/db1 --direction Inbound --protocol Tcp --remote-ip 10.244.1.21 --local-port 1433 --remote-port 50000
verify --pod three-tier/db1 --direction Inbound --protocol Tcp --remote-ip 10.244.1.11 --local-port 1433 --remote-port 50000
verify --pod three-tier/logic1 --direction Inbound --protocol Icmp --remote-ip 10.244.1.11
verify --pod three-tier/web1 --direction Outbound --protocol Udp --remote-ip 198.51.100.53 --local-port 40000 --remote-port 53
