#!/usr/bin/env bash
# Runs every test of hermes-gateway. On a fresh Debian 12 machine it first installs what
# the tests need (systemd's binaries for socket activation and the real-systemd tests).
# Real-systemd tests need root; under CI=true they must run, never skip.
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
command -v systemd-socket-activate >/dev/null 2>&1 || missing+=(systemd)
[ -x /lib/systemd/systemd ] || missing+=(systemd)
command -v unshare >/dev/null 2>&1 || missing+=(util-linux)
command -v python3 >/dev/null 2>&1 || missing+=(python3)
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    echo "== installing test prerequisites: ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
  else
    echo "== missing ${missing[*]} and not root: the tests that need them will say so and skip"
  fi
fi

# Library, binary and integration tests (benches are run by `cargo bench`, not here).
cargo test --locked --lib --bins --tests -- --nocapture 2>&1
