#!/usr/bin/env bash
# Start a local control plane: etcd + kube-apiserver + kube-controller-manager,
# all on loopback, in the background. Returns once the API answers and the
# controller manager has created the `default` service account.
# Idempotent: exits 0 at once if the cluster is already up and healthy.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=env.sh source-path=SCRIPTDIR
source "$here/env.sh"

t0=$EPOCHREALTIME
state="$KUBE_NSG_STATE"
pki="$state/pki"
components=(etcd kube-apiserver kube-controller-manager)
kc=(kubectl --kubeconfig "$KUBECONFIG_PATH" --request-timeout=5s)

running() { # component name -> true if its pid file names a live process
  local pid
  pid="$(cat "$state/pids/$1.pid" 2>/dev/null)" || return 1
  kill -0 "$pid" 2>/dev/null
}

healthy() {
  local c
  for c in "${components[@]}"; do running "$c" || return 1; done
  "${kc[@]}" get --raw /readyz >/dev/null 2>&1 &&
    "${kc[@]}" -n default get serviceaccount default >/dev/null 2>&1
}

if healthy; then
  echo "up.sh: cluster already up: KUBECONFIG=$KUBECONFIG_PATH"
  exit 0
fi
# Leftovers of a half-dead cluster would fight the new one for ports and data.
if [[ -d "$state" || -d "$KUBE_NSG_ETCD_DATA" ]]; then
  echo "up.sh: stale or unhealthy cluster state found, cleaning it first"
  "$here/down.sh"
fi

"$here/build.sh"
bin="$KUBE_NSG_BIN"

for port in "$KUBE_NSG_ETCD_CLIENT_PORT" "$KUBE_NSG_ETCD_PEER_PORT" \
  "$KUBE_NSG_APISERVER_PORT" "$KUBE_NSG_KCM_PORT"; do
  if [[ -n "$(ss -Hltn "sport = :$port")" ]]; then
    echo "up.sh: port $port is already in use by another process" >&2
    exit 1
  fi
done

umask 077 # private keys and kubeconfigs are readable by root only
mkdir -p "$pki" "$state/logs" "$state/pids" "$KUBE_NSG_ETCD_DATA"

# --- certificates (ECDSA P-256: fast to generate, accepted everywhere here) --
newkey() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$pki/$1.key"; }

# sign NAME SUBJECT EXTENSIONS: key + certificate signed by the test CA.
sign() {
  newkey "$1"
  openssl req -new -key "$pki/$1.key" -subj "$2" |
    openssl x509 -req -CA "$pki/ca.crt" -CAkey "$pki/ca.key" -CAcreateserial \
      -days 3650 -out "$pki/$1.crt" -extfile <(printf '%s\n' "$3") 2>>"$state/logs/pki.log"
}

newkey ca
openssl req -x509 -new -key "$pki/ca.key" -subj "/CN=kube-nsg-test-ca" -days 3650 \
  -addext "basicConstraints=critical,CA:TRUE" \
  -addext "keyUsage=critical,keyCertSign,cRLSign" -out "$pki/ca.crt"

# 10.96.0.1 is the `kubernetes` service ClusterIP (first IP of the range).
sign apiserver "/CN=kube-apiserver" "$(printf '%s\n' \
  "subjectAltName=IP:127.0.0.1,IP:10.96.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local" \
  "extendedKeyUsage=serverAuth" "keyUsage=critical,digitalSignature")"
sign admin "/O=system:masters/CN=kube-nsg-admin" \
  "$(printf '%s\n' "extendedKeyUsage=clientAuth" "keyUsage=critical,digitalSignature")"
# With --use-service-account-credentials=false every controller acts as this
# user; the stock system:kube-controller-manager role lacks the deletes the
# garbage collector and namespace controller need, hence system:masters.
sign kcm "/O=system:masters/CN=system:kube-controller-manager" \
  "$(printf '%s\n' "extendedKeyUsage=clientAuth" "keyUsage=critical,digitalSignature")"
newkey sa
openssl pkey -in "$pki/sa.key" -pubout -out "$pki/sa.pub"

# write_kubeconfig FILE USER: kubeconfig with certs embedded, so it can be
# copied anywhere (helm, tests in other dirs) without the pki dir.
write_kubeconfig() {
  cat >"$1" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: kube-nsg
  cluster:
    server: $KUBE_NSG_APISERVER_URL
    certificate-authority-data: $(base64 -w0 "$pki/ca.crt")
users:
- name: $2
  user:
    client-certificate-data: $(base64 -w0 "$pki/$2.crt")
    client-key-data: $(base64 -w0 "$pki/$2.key")
contexts:
- name: kube-nsg
  context: {cluster: kube-nsg, user: $2}
current-context: kube-nsg
EOF
}
write_kubeconfig "$KUBECONFIG_PATH" admin
write_kubeconfig "$state/kcm.kubeconfig" kcm

# --- processes ---------------------------------------------------------------
# start NAME ARGS...: setsid detaches it from our process group, so the
# cluster outlives this script and a Ctrl-C in the caller's terminal.
start() {
  local name="$1"
  shift
  setsid "$bin/$name" "$@" >"$state/logs/$name.log" 2>&1 </dev/null &
  echo $! >"$state/pids/$name.pid"
}

fail() { # component message
  echo "up.sh: $2; last 40 lines of $state/logs/$1.log:" >&2
  tail -n 40 "$state/logs/$1.log" >&2 || true
  echo "up.sh: run $here/down.sh to clean up" >&2
  exit 1
}

# wait_for COMPONENT SECONDS CMD...: poll CMD, failing early if the process died.
wait_for() {
  local name="$1" timeout="$2" deadline=$((SECONDS + $2))
  shift 2
  until "$@" >/dev/null 2>&1; do
    running "$name" || fail "$name" "$name exited"
    ((SECONDS < deadline)) || fail "$name" "$name not ready after ${timeout}s"
    sleep 0.2
  done
}

etcd_url="http://127.0.0.1:$KUBE_NSG_ETCD_CLIENT_PORT"
peer_url="http://127.0.0.1:$KUBE_NSG_ETCD_PEER_PORT"
# Plain http is fine: etcd listens on loopback only and only the apiserver talks to it.
start etcd --name=kube-nsg --data-dir="$KUBE_NSG_ETCD_DATA" \
  --listen-client-urls="$etcd_url" --advertise-client-urls="$etcd_url" \
  --listen-peer-urls="$peer_url" --initial-advertise-peer-urls="$peer_url" \
  --initial-cluster="kube-nsg=$peer_url" --initial-cluster-state=new
wait_for etcd 30 curl -sf "$etcd_url/health"

# endpoint-reconciler none: the `kubernetes` Service's endpoints may not be a
# loopback IP (the apiserver would log a rejection every 10s), and pods here
# cannot reach a loopback apiserver anyway; the Service itself is still created.
start kube-apiserver \
  --etcd-servers="$etcd_url" \
  --bind-address=127.0.0.1 --advertise-address=127.0.0.1 \
  --endpoint-reconciler-type=none \
  --secure-port="$KUBE_NSG_APISERVER_PORT" \
  --tls-cert-file="$pki/apiserver.crt" --tls-private-key-file="$pki/apiserver.key" \
  --client-ca-file="$pki/ca.crt" \
  --authorization-mode=Node,RBAC \
  --service-cluster-ip-range=10.96.0.0/16 \
  --service-account-issuer=https://kubernetes.default.svc.cluster.local \
  --service-account-key-file="$pki/sa.pub" \
  --service-account-signing-key-file="$pki/sa.key" \
  --allow-privileged=true \
  --cert-dir="$state/apiserver-certs"
wait_for kube-apiserver 90 "${kc[@]}" get --raw /readyz
"${kc[@]}" get ns default >/dev/null || fail kube-apiserver "kubectl get ns default failed"

start kube-controller-manager \
  --kubeconfig="$state/kcm.kubeconfig" \
  --authentication-kubeconfig="$state/kcm.kubeconfig" \
  --authorization-kubeconfig="$state/kcm.kubeconfig" \
  --controllers=namespace-controller,garbage-collector-controller,serviceaccount-controller,serviceaccount-token-controller,root-ca-certificate-publisher-controller \
  --use-service-account-credentials=false \
  --leader-elect=false \
  --service-account-private-key-file="$pki/sa.key" \
  --root-ca-file="$pki/ca.crt" \
  --bind-address=127.0.0.1 --secure-port="$KUBE_NSG_KCM_PORT" \
  --cert-dir="$state/kcm-certs"
# The default service account only appears if kcm is up and its controllers run.
wait_for kube-controller-manager 60 "${kc[@]}" -n default get serviceaccount default

elapsed="$(awk -v a="$t0" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }')"
echo "up.sh: cluster up in ${elapsed}s (k8s $KUBE_NSG_K8S_VERSION)"
echo "up.sh: export KUBECONFIG=$KUBECONFIG_PATH"
