#!/usr/bin/env bash
# Runs every test of the project. Installs what the tests need first (idempotent), so this
# one command works on a fresh machine; .ci/run calls exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-test-deps.sh

export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
cargo test --workspace --locked "$@"
