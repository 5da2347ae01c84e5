#!/usr/bin/env bash
# Sets up and runs the whole test suite (unit, multi-process, Hugging Face parity).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
export FERRY_DATA_DIR=${FERRY_DATA_DIR:-$(cd .. && pwd)/shared/data}
cargo test --release --workspace "$@"
