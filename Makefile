# The README's two commands are `make demo` and `make test`.
.PHONY: demo demo-down offline-demo test generate lint cluster-up cluster-down

demo: ## The local demo: control plane, controller, agent, netns pods, real packets
	bash tests/demo.sh

demo-down: ## Stop what the demo left running
	bash tests/demo-down.sh

offline-demo: ## Effective rules and IP flow verify on the example, no cluster
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
