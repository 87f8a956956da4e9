# shellcheck shell=bash
# Shared settings for the local control plane scripts; sourced, not run.
# Every value can be overridden from the environment.

# Newest v1.35 patch the Go proxy serves (v1.35.8; note `go list -m -versions`
# only lists v1.35.4, later patches resolve when asked for by name).
KUBE_NSG_K8S_VERSION="${KUBE_NSG_K8S_VERSION:-v1.35.8}"

# Built binaries live outside the repo, keyed by version, so they survive
# `git clean` and are shared between checkouts.
KUBE_NSG_CACHE="${KUBE_NSG_CACHE:-/var/cache/kube-nsg}"
KUBE_NSG_K8S_DIR="$KUBE_NSG_CACHE/k8s-$KUBE_NSG_K8S_VERSION"
KUBE_NSG_BIN="$KUBE_NSG_K8S_DIR/bin"

# Runtime state (certs, kubeconfigs, logs, pid files).
KUBE_NSG_STATE="${KUBE_NSG_STATE:-/tmp/kube-nsg-cluster}"
# etcd data on tmpfs: fast fsyncs, and nothing survives a reboot by design.
KUBE_NSG_ETCD_DATA="${KUBE_NSG_ETCD_DATA:-/dev/shm/kube-nsg-etcd}"

# Loopback only, uncommon ports so we do not collide with a real cluster.
KUBE_NSG_APISERVER_PORT="${KUBE_NSG_APISERVER_PORT:-16443}"
KUBE_NSG_ETCD_CLIENT_PORT="${KUBE_NSG_ETCD_CLIENT_PORT:-12379}"
KUBE_NSG_ETCD_PEER_PORT="${KUBE_NSG_ETCD_PEER_PORT:-12380}"
# kube-controller-manager's own secure port (default 10257) moved off too.
KUBE_NSG_KCM_PORT="${KUBE_NSG_KCM_PORT:-12257}"
KUBE_NSG_APISERVER_URL="https://127.0.0.1:$KUBE_NSG_APISERVER_PORT"

# Admin kubeconfig (system:masters) for tests, kubectl and helm.
KUBECONFIG_PATH="$KUBE_NSG_STATE/kubeconfig"

export KUBE_NSG_K8S_VERSION KUBE_NSG_CACHE KUBE_NSG_K8S_DIR KUBE_NSG_BIN \
  KUBE_NSG_STATE KUBE_NSG_ETCD_DATA KUBE_NSG_APISERVER_PORT \
  KUBE_NSG_ETCD_CLIENT_PORT KUBE_NSG_ETCD_PEER_PORT KUBE_NSG_KCM_PORT \
  KUBE_NSG_APISERVER_URL KUBECONFIG_PATH
