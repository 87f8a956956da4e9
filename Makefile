# The README's two commands are `make demo` and `make test`.
.PHONY: demo test generate lint e2e cluster-up cluster-down offline-demo

demo: ## The local demo (offline evaluation until the cluster demo lands)
	bash tests/offline-demo.sh

test: ## Everything CI runs: setup, fmt, clippy, all tests
	bash tests/ci.sh

generate: ## Regenerate the committed CRDs (and the chart's copy) and deploy/ from the sources
	cargo run -q -- crds > crds/kube-nsg.yaml
	cp crds/kube-nsg.yaml charts/kube-nsg/crds/kube-nsg.yaml
	bash tests/render-deploy.sh > deploy/kube-nsg.yaml

lint:
	cargo fmt --check
	cargo clippy --all-targets -- -D warnings
	shellcheck -x tests/*.sh tests/*/*.sh .ci/run

cluster-up: ## Start the local control plane (builds it once)
	bash tests/cluster/up.sh

cluster-down:
	bash tests/cluster/down.sh
