#!/usr/bin/env bash
# Build etcd, kube-apiserver and kube-controller-manager from the Go module
# k8s.io/kubernetes at $KUBE_NSG_K8S_VERSION into $KUBE_NSG_BIN.
# No-op (seconds) when all three binaries are already cached.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=env.sh source-path=SCRIPTDIR
source "$here/env.sh"

version="$KUBE_NSG_K8S_VERSION"
bins=(etcd kube-apiserver kube-controller-manager)

have_all() {
  local b
  for b in "${bins[@]}"; do [[ -x "$KUBE_NSG_BIN/$b" ]] || return 1; done
}

if have_all; then
  echo "build.sh: k8s $version binaries cached in $KUBE_NSG_BIN"
  exit 0
fi

mkdir -p "$KUBE_NSG_CACHE"
# Two test runs starting at once must not both spend 20 minutes building.
exec 9>"$KUBE_NSG_CACHE/.build-$version.lock"
flock 9
if have_all; then
  echo "build.sh: k8s $version binaries cached in $KUBE_NSG_BIN (built concurrently)"
  exit 0
fi

start=$SECONDS
# Work dir inside the cache so the final mv is a same-filesystem rename.
work="$(mktemp -d "$KUBE_NSG_CACHE/.build-$version.XXXXXX")"
trap 'rm -rf "$work"' EXIT

# -mod=mod: the wrapper's go.mod/go.sum are written by `go get`, never vendored.
# GOTOOLCHAIN=local: use the installed Go, never download another toolchain.
export GOFLAGS=-mod=mod GOWORK=off GOTOOLCHAIN=local

echo "build.sh: building k8s $version (cold build: 10-25 min on 2 cores)"

# k8s.io/kubernetes requires its staging modules at v0.0.0 and resolves them
# with local replace lines that do not apply to a consumer; derive the list
# from this exact version's go.mod and point each at its published v0.X.Y.
kube_gomod="$(go mod download -json "k8s.io/kubernetes@$version" |
  awk -F'"' '$2 == "GoMod" { print $4 }')"
staging_version="v0.${version#v1.}"
mapfile -t staging < <(awk '$1 ~ /^k8s\.io\// && $2 == "v0.0.0" { print $1 }' "$kube_gomod")
if ((${#staging[@]} == 0)); then
  echo "build.sh: no staging modules found in $kube_gomod" >&2
  exit 1
fi
go_directive="$(awk '$1 == "go" { print $2; exit }' "$kube_gomod")"

{
  echo "module kube-nsg.local/k8s-build"
  echo
  echo "go $go_directive"
  echo
  echo "require k8s.io/kubernetes $version"
  echo
  echo "replace ("
  for m in "${staging[@]}"; do printf '\t%s => %s %s\n' "$m" "$m" "$staging_version"; done
  echo ")"
} >"$work/go.mod"

cd "$work"
go get -tool "k8s.io/kubernetes/cmd/kube-apiserver@$version" \
  "k8s.io/kubernetes/cmd/kube-controller-manager@$version"
# etcd at the version kubernetes already links (its own go.mod has replace
# lines, so `go install` of it fails; building it here works).
etcd_version="$(go list -m -f '{{.Version}}' go.etcd.io/etcd/server/v3)"
go get -tool "go.etcd.io/etcd/server/v3@$etcd_version"

resolved="$(go list -m -f '{{.Version}}' k8s.io/kubernetes)"
if [[ "$resolved" != "$version" ]]; then
  echo "build.sh: module graph moved k8s.io/kubernetes to $resolved" >&2
  exit 1
fi

# Without these the servers report v0.0.0-master, which breaks version
# checks (helm kubeVersion, client skew warnings). Same keys as hack/lib/version.sh.
minor="${version#v1.}"
minor="${minor%%.*}"
ldflags=""
for pkg in k8s.io/client-go/pkg/version k8s.io/component-base/version; do
  ldflags+=" -X $pkg.gitVersion=$version -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
  ldflags+=" -X $pkg.gitTreeState=clean"
done

mkdir -p "$work/bin"
go build -trimpath -pgo=off -ldflags "$ldflags" -o "$work/bin/" \
  k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager
go build -trimpath -pgo=off -o "$work/bin/etcd" go.etcd.io/etcd/server/v3

# Keep the derived go.mod/go.sum next to the binaries for provenance.
mkdir -p "$work/wrapper"
cp go.mod go.sum "$work/wrapper/"
echo "etcd $etcd_version" >"$work/wrapper/versions"
echo "kubernetes $version" >>"$work/wrapper/versions"

# Publish atomically: an interrupted build leaves only the temp dir (removed
# by the trap), never a half-filled bin/.
mkdir -p "$KUBE_NSG_K8S_DIR"
rm -rf "$KUBE_NSG_BIN" "$KUBE_NSG_K8S_DIR/wrapper"
mv "$work/wrapper" "$KUBE_NSG_K8S_DIR/wrapper"
mv "$work/bin" "$KUBE_NSG_BIN"

echo "build.sh: built k8s $version + etcd $etcd_version into $KUBE_NSG_BIN in $((SECONDS - start))s"
