#!/usr/bin/env bash
# Everything CI checks, in order: setup, format, lint, every test (unit, property, CLI,
# real control plane, real nftables and packets), shell scripts. Fails on the first error.
set -euo pipefail
cd "$(dirname "$0")/.."

# shellcheck source=cluster/env.sh source-path=SCRIPTDIR
source tests/cluster/env.sh
# The tests start the local control plane when they need it and share it; stop it at the
# end unless it was running before (`make demo`, `make cluster-up`).
if [[ ! -d "$KUBE_NSG_STATE" ]]; then
  trap 'bash tests/cluster/down.sh >/dev/null || true' EXIT
fi

bash tests/setup.sh
cargo fmt --check
cargo clippy --all-targets -- -D warnings
shellcheck -x tests/*.sh tests/*/*.sh .ci/run
cargo build --release --bins
bash tests/image.sh
bash tests/helm.sh
# Benchmarks are built by clippy above and run by `cargo bench`, not here: their figures
# need a release build and a quiet machine. Test binaries run one at a time (they share the
# local control plane and the host's network); tests inside one use their own namespaces.
cargo test --lib --bins --tests --examples -- --test-threads=2
