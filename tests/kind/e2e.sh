#!/usr/bin/env bash
# End-to-end on kind, for machines with Docker (CI: .github/workflows/kind-e2e.yaml). Creates
# a kind cluster, builds and loads the image, installs the chart, applies examples/three-tier
# with real pods, and checks TCP, UDP and ICMP between every pair of pods against the verdicts
# of `kube-nsg verify` on the cluster's own objects: the reference evaluator the local
# end-to-end tests (tests/agent_e2e.rs, make demo) compare real packets with.
set -euo pipefail
cd "$(dirname "$0")/../.."
for tool in docker kind kubectl helm cargo; do
  command -v "$tool" >/dev/null || { echo "kind e2e: needs $tool" >&2; exit 1; }
done
cluster=${KIND_CLUSTER:-kube-nsg-e2e}
image=kube-nsg:e2e
work=$(mktemp -d)
trap '[[ -n ${KEEP_CLUSTER:-} ]] || kind delete cluster --name "$cluster"; rm -rf "$work"' EXIT

kind create cluster --name "$cluster" --config tests/kind/cluster.yaml --wait 120s
docker build -t "$image" .
kind load docker-image "$image" --name "$cluster"
helm install kube-nsg charts/kube-nsg -n kube-nsg --create-namespace --wait --timeout 180s \
  --set image.repository=kube-nsg --set image.tag=e2e --set image.pullPolicy=Never \
  --set virtualNetwork='{10.244.0.0/16,10.96.0.0/16}'

ex=examples/three-tier
kubectl apply -f "$ex/00-namespace.yaml" -f "$ex/asgs.yaml" -f tests/kind/pods.yaml
kubectl -n three-tier wait --for=condition=Ready pod --all --timeout=120s
kubectl apply -f "$ex/nsg.yaml"
kubectl -n three-tier wait --for=condition=Ready nsg/nsg1 --timeout=60s
kubectl -n three-tier wait --for=condition=DataplaneProgrammed nsg/nsg1 --timeout=60s
kubectl get nsg,asg -A

# The oracle: the reference evaluator on the cluster's own objects.
kubectl get nsg,asg,servicetags,namespaces,pods -A -o yaml >"$work/cluster.yaml"
nodes=$(kubectl get nodes -o jsonpath='{.items[*].status.addresses[?(@.type=="InternalIP")].address}' | tr ' ' ',')
cargo build -q --release --bin kube-nsg
verify() { # POD DIRECTION PROTO REMOTE [LOCAL_PORT REMOTE_PORT] -> Allow|Deny
  local ports=()
  [[ $3 == Icmp ]] || ports=(--local-port "$5" --remote-port "$6")
  target/release/kube-nsg verify -f "$work/cluster.yaml" --virtual-network 10.244.0.0/16,10.96.0.0/16 \
    --node-ips "$nodes" --pod "three-tier/$1" --direction "$2" --protocol "$3" --remote-ip "$4" \
    "${ports[@]}" -o json | sed -n 's/^  "access": "\(.*\)",$/\1/p'
}
probe() { # SRC DST_IP PROTO PORT -> Allow|Deny, measured
  local cmd
  case $3 in
    Tcp) cmd="nc -w 2 $2 $4 </dev/null | grep -q ok" ;;
    Udp) cmd="echo x | nc -u -w 2 $2 $4 | grep -q ok" ;;
    Icmp) cmd="ping -c 1 -W 2 $2 >/dev/null" ;;
  esac
  if kubectl -n three-tier exec "$1" -- sh -c "$cmd" >/dev/null 2>&1; then echo Allow; else echo Deny; fi
}

pods=(web1 web2 logic1 db1)
declare -A ip
for p in "${pods[@]}"; do ip[$p]=$(kubectl -n three-tier get pod "$p" -o jsonpath='{.status.podIP}'); done
mismatches=0
printf '%-8s %-8s %-10s %-8s %-8s\n' FROM TO FLOW EXPECTED MEASURED
for src in "${pods[@]}"; do
  for dst in "${pods[@]}"; do
    [[ $src != "$dst" ]] || continue
    for flow in Tcp:80 Tcp:1433 Udp:53 Icmp:0; do
      proto=${flow%%:*} port=${flow##*:}
      out=$(verify "$src" Outbound "$proto" "${ip[$dst]}" 40000 "$port")
      in=$(verify "$dst" Inbound "$proto" "${ip[$src]}" "$port" 40000)
      expected=Deny
      [[ $out == Allow && $in == Allow ]] && expected=Allow
      measured=$(probe "$src" "${ip[$dst]}" "$proto" "$port")
      mark=""
      [[ $expected == "$measured" ]] || { mark="  MISMATCH"; mismatches=$((mismatches + 1)); }
      printf '%-8s %-8s %-10s %-8s %-8s%s\n' "$src" "$dst" "$flow" "$expected" "$measured" "$mark"
    done
  done
done
echo "kind e2e: $mismatches mismatches"
[[ $mismatches -eq 0 ]]
