#!/usr/bin/env bash
# Sets up a fresh checkout: a project-local venv with the pinned torch wheel (libtorch for
# tch), then builds `ferry`. Idempotent: a second run only checks and takes seconds.
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    echo "setup: creating .venv with $($python --version)"
    "$python" -m venv .venv
fi
# Reinstall only when the pinned requirements change.
if ! cmp -s scripts/requirements.txt .venv/.ferry-requirements; then
    echo "setup: installing scripts/requirements.txt into .venv (torch is ~4.7 GB, a few minutes)"
    .venv/bin/python -m pip install --quiet --upgrade pip
    .venv/bin/python -m pip install --quiet -r scripts/requirements.txt
    cp scripts/requirements.txt .venv/.ferry-requirements
fi
# .cargo/config.toml points LIBTORCH at .venv/libtorch, whatever Python version made the venv.
torch_dir=$(.venv/bin/python -c 'import os, torch; print(os.path.dirname(torch.__file__))')
ln -sfn "$torch_dir" .venv/libtorch

echo "setup: building ferry (the first build compiles tch against libtorch: ~5 minutes)"
# ferry-coordinator: `ferry coordinator` without libtorch, for hosts that only run the control plane.
cargo build --release -p ferry -p ferry-coordinator --bins
echo "setup: done; the binaries are target/release/ferry and target/release/ferry-coordinator"
