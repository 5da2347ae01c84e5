#!/usr/bin/env bash
# Sets up and runs the whole test suite (unit, multi-process, Hugging Face parity).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
# tests/observability.rs opens the status page in Debian's headless Chromium; install it once.
if [ ! -x /usr/bin/chromium ]; then
    echo "test: installing Debian's chromium package for the status-page test"
    sudo=; [ "$(id -u)" = 0 ] || sudo=sudo
    $sudo apt-get update -qq
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi
# tests/multihost.rs makes simulated hosts with iproute2's `ip` and `tc`.
if ! command -v ip >/dev/null || ! command -v tc >/dev/null; then
    echo "test: installing Debian's iproute2 package for the multi-host tests"
    sudo=; [ "$(id -u)" = 0 ] || sudo=sudo
    $sudo apt-get update -qq
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq iproute2 >/dev/null
fi
# tests/deploy_manifests.rs runs deploy/make-certs.sh, the deployments' certificate step.
if ! command -v openssl >/dev/null; then
    echo "test: installing Debian's openssl package for the certificate-step test"
    sudo=; [ "$(id -u)" = 0 ] || sudo=sudo
    $sudo apt-get update -qq
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openssl >/dev/null
fi
export FERRY_DATA_DIR=${FERRY_DATA_DIR:-$(cd .. && pwd)/shared/data}
cargo test --release --workspace "$@"
