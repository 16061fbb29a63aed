# Shortcuts for the commands the README describes. `make help` lists them.
CARGO_TARGET_DIR ?= $(HOME)/.cache/bruno-target
export CARGO_TARGET_DIR

.PHONY: help dev test lint bench render validate

help: ## List the targets
	@grep -E '^[a-z]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-10s %s\n", $$1, $$2}'

dev: ## Run every part in one process (bruno dev)
	cargo run -p bruno-cli --bin bruno -- dev

test: ## The README's test command (RabbitMQ running, model fetched)
	cargo test --workspace

lint: ## fmt, clippy, hadolint, actionlint
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets --locked -- -D warnings
	hadolint Dockerfile
	actionlint .github/workflows/*.yml

bench: ## The benchmarks, release profile
	cargo bench -p bruno-system-tests
	cargo bench -p bruno-embed --bench embed
	cargo bench -p bruno-backup --bench backup

render: ## Render every overlay into deploy/rendered/
	python3 deploy/validate.py --dump deploy/rendered

validate: ## Schemas, policies and checkov over the rendered overlays
	python3 deploy/validate.py --dump deploy/rendered
	checkov -d deploy/rendered --framework kubernetes --compact --quiet
	checkov -f Dockerfile --compact --quiet
	checkov -d .github/workflows --framework github_actions --compact --quiet
