#!/usr/bin/env bash
# Stop the local control plane started by up.sh and delete its state.
# Idempotent: safe to run when nothing is running.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=env.sh source-path=SCRIPTDIR
source "$here/env.sh"

# stop NAME: TERM, wait up to 10s, then KILL. Only a pid whose executable is
# still NAME is signalled, so a stale pid file never hits a reused pid.
stop() {
  local name="$1" pidfile="$KUBE_NSG_STATE/pids/$1.pid" pid i
  pid="$(cat "$pidfile" 2>/dev/null)" || return 0
  [[ "$(readlink "/proc/$pid/exe" 2>/dev/null)" == */"$name" ]] || return 0
  kill -TERM "$pid" 2>/dev/null || return 0
  for ((i = 0; i < 50; i++)); do
    kill -0 "$pid" 2>/dev/null || { echo "down.sh: stopped $name"; return 0; }
    sleep 0.2
  done
  echo "down.sh: $name ignored TERM, killing"
  kill -KILL "$pid" 2>/dev/null || true
}

# Reverse start order: clients first, etcd last.
for c in kube-controller-manager kube-apiserver etcd; do stop "$c"; done

rm -rf "${KUBE_NSG_STATE:?}" "${KUBE_NSG_ETCD_DATA:?}"
echo "down.sh: cluster down, removed $KUBE_NSG_STATE and $KUBE_NSG_ETCD_DATA"
