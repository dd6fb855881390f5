#!/usr/bin/env bash
# Runs every test of the project: unit and whole-node tests (cargo), then the container tests
# (the compose testnet from this repository's Dockerfile, with real faults). Installs what the
# tests need first (idempotent), so this one command works on a fresh machine; .ci/run runs it.
#
#   scripts/test.sh                  everything
#   NYM_SKIP_CONTAINERS=1 scripts/test.sh   cargo tests only (local iteration; CI never sets it)
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-test-deps.sh
export DOCKER_CONFIG="${NYM_TOOLS_DIR:-$HOME/.cache/nym-node-tools}/docker-config"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"

# Style and lints are part of the suite: formatting, clippy (with clippy.toml's rules).
cargo fmt --all --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo test --workspace --locked "$@"

# Manifests: both Helm charts and every object the operator builds, against the Kubernetes
# schemas (and the prometheus-operator CRDs), plus promtool on the chart's alert rules.
PATH="${NYM_TOOLS_DIR:-$HOME/.cache/nym-node-tools}/bin:$PATH" \
  "${NYM_TOOLS_DIR:-$HOME/.cache/nym-node-tools}/venv/bin/python" -m pytest -q tests/k8s tests/client

if [ "${NYM_SKIP_CONTAINERS:-}" = 1 ]; then
  echo "NYM_SKIP_CONTAINERS=1: container tests NOT run"
  exit 0
fi
if ! docker info >/dev/null 2>&1; then
  echo "container tests need a Docker engine and none answers (docker info failed)" >&2
  exit 1
fi
python3 tests/compose/test_compose.py
