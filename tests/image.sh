#!/usr/bin/env bash
# The container image cannot be built here (no Docker engine), so this checks what matters
# about it: the release binary runs with only what the image holds. It bootstraps the
# image's base (Debian bookworm, minbase, plus nftables, as the Dockerfile installs) once
# into a cache, copies the binary in as the Dockerfile does, and runs it there under chroot.
set -euo pipefail
cd "$(dirname "$0")/.."

cache="${KUBE_NSG_CACHE:-/var/cache/kube-nsg}"
rootfs="$cache/rootfs-bookworm-nftables"
if [[ ! -x "$rootfs/usr/sbin/nft" ]]; then
  command -v debootstrap >/dev/null || {
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null
  }
  rm -rf "$rootfs.tmp"
  echo "image: bootstrapping $rootfs (once)"
  debootstrap --variant=minbase --include=nftables bookworm "$rootfs.tmp" http://deb.debian.org/debian >/dev/null
  mv "$rootfs.tmp" "$rootfs"
fi

cargo build -q --release --bin kube-nsg
install -D -m 0755 target/release/kube-nsg "$rootfs/usr/local/bin/kube-nsg"
in_image() { chroot --userspec=65532:65532 "$rootfs" /usr/local/bin/kube-nsg "$@"; }

in_image --version
in_image crds | cmp - crds/kube-nsg.yaml
cp -r examples "$rootfs/tmp/examples"
in_image verify -f /tmp/examples/three-tier --pod three-tier/web1 --direction Inbound \
  --protocol Tcp --remote-ip 198.18.0.10 --local-port 80 --remote-port 40000 -o json \
  | grep -q '"access": "Allow"'
rm -rf "$rootfs/tmp/examples"
echo "image: the binary runs in the image's filesystem"
