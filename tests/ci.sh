#!/usr/bin/env bash
# Everything CI checks, in order: setup, format, lint, every test (unit, property, CLI,
# real control plane, real nftables and packets), shell scripts. Fails on the first error.
set -euo pipefail
cd "$(dirname "$0")/.."

bash tests/setup.sh
cargo fmt --check
cargo clippy --all-targets -- -D warnings
shellcheck -x tests/*.sh tests/*/*.sh .ci/run
cargo build --release --bins
bash tests/image.sh
# One test binary at a time shares the one local control plane; tests inside a binary
# use their own namespaces.
cargo test --all-targets -- --test-threads=2
