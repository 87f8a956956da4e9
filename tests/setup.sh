#!/usr/bin/env bash
# Installs what the tests and the demo need on a fresh Debian machine (as root) and builds
# the control-plane binaries when they are not cached. Fast when everything is there.
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(nftables iproute2 conntrack socat shellcheck jq openssl procps iputils-ping)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  if [[ $(id -u) -ne 0 ]]; then
    echo "setup: missing Debian packages ${missing[*]}; run as root or install them" >&2
    exit 1
  fi
  echo "setup: installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

command -v cargo >/dev/null || { echo "setup: cargo (Rust) is required" >&2; exit 1; }
command -v go >/dev/null || { echo "setup: go is required to build the control plane" >&2; exit 1; }
command -v kubectl >/dev/null || { echo "setup: kubectl is required" >&2; exit 1; }

bash tests/cluster/build.sh
