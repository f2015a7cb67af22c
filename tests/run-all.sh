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
python3 -c 'import ensurepip, venv' >/dev/null 2>&1 || missing+=(python3-venv)
# The package test builds the .deb (debhelper) and checks it (lintian).
command -v dh >/dev/null 2>&1 || missing+=(debhelper)
command -v lintian >/dev/null 2>&1 || missing+=(lintian)
command -v curl >/dev/null 2>&1 || missing+=(curl)
# tests/metrics.rs: promtool checks a scrape and the alert rules, and a real Prometheus
# scrapes the gateway. Installed apart, without its recommends (node exporters) and
# without starting its service: a policy-rc.d refuses that for the install's duration.
if ! command -v promtool >/dev/null 2>&1 || ! command -v prometheus >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then
    echo "== installing prometheus (promtool, and a server the metrics test starts itself)"
    policy=/usr/sbin/policy-rc.d
    own_policy=
    if [ ! -e "$policy" ]; then
      printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod +x "$policy" && own_policy=1
    fi
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus
    if [ -n "$own_policy" ]; then rm -f "$policy"; fi
  else
    echo "== prometheus missing and not root: tests/metrics.rs will say so and skip its Prometheus checks"
  fi
fi
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    echo "== installing test prerequisites: ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
  else
    echo "== missing ${missing[*]} and not root: the tests that need them will say so and skip"
  fi
fi

# The official `openai` Python client for tests/api_conformance.rs, in a venv of its own.
venv=target/conformance-venv
pin=$(grep -v '^#' tests/conformance/requirements.txt | head -n 1)
if ! "$venv/bin/pip" freeze 2>/dev/null | grep -ixF "$pin" >/dev/null; then
  echo "== creating $venv ($pin) for the conformance test"
  # Anew: a cached venv moved or left by another Python has scripts that no longer run.
  rm -rf "$venv"
  { python3 -m venv "$venv" && "$venv/bin/pip" install -q -r tests/conformance/requirements.txt; } ||
    echo "== could not create $venv: the conformance test will say so"
fi

# The chat platforms' own libraries (python-telegram-bot, …) for the platform tests.
pvenv=target/platforms-venv
# Every pin must be installed, not only the first (pip freeze spells names its own way:
# slack_sdk for slack-sdk, so both sides are compared in one spelling).
pfrozen=$("$pvenv/bin/pip" freeze 2>/dev/null | tr 'A-Z_.' 'a-z--' || true)
pmissing=""
while read -r pin; do
  case "$pin" in '' | '#'*) continue ;; esac
  norm=$(printf '%s' "$pin" | tr 'A-Z_.' 'a-z--')
  grep -qxF -- "$norm" <<<"$pfrozen" || pmissing="$pmissing $pin"
done <tests/platforms/requirements.txt
if [ -n "$pmissing" ]; then
  echo "== creating $pvenv (missing:$pmissing) for the platform tests"
  rm -rf "$pvenv"
  { python3 -m venv "$pvenv" && "$pvenv/bin/pip" install -q -r tests/platforms/requirements.txt; } ||
    echo "== could not create $pvenv: the platform tests that need it will say so"
fi

# The upstream hermes API server's own client (tests/api_hermes_client.rs) needs
# Python >= 3.13: python3.13 on PATH, else pyenv's (this machine kind has one).
venv=target/hermes-client-venv
pin=$(grep -v '^#' tests/hermes_client/requirements.txt | head -n 1)
if ! "$venv/bin/pip" freeze 2>/dev/null | grep -ixF "$pin" >/dev/null; then
  # A candidate counts only if it runs: pyenv's shim for python3.13 exists (and fails)
  # when 3.13 is installed but not the selected version.
  py313=""
  for p in "$(command -v python3.13 || true)" \
    "$(pyenv root 2>/dev/null || echo "$HOME/.pyenv")"/versions/3.1[3-9]*/bin/python3; do
    if [ -n "$p" ] && [ -x "$p" ] && "$p" -c 'import sys; assert sys.version_info >= (3, 13)' 2>/dev/null; then
      py313=$p
      break
    fi
  done
  if [ -n "$py313" ]; then
    echo "== creating $venv ($pin, $("$py313" --version)) for the hermes client test"
    rm -rf "$venv"
    { "$py313" -m venv "$venv" && "$venv/bin/pip" install -q -r tests/hermes_client/requirements.txt; } ||
      echo "== could not create $venv: the hermes client test will say so"
  else
    echo "== no Python >= 3.13: the hermes client test will say so"
  fi
fi

# The real hermes agent (PyPI hermes-agent with its sms extra, which brings aiohttp for
# its API server) for tests/hermes_agent.rs: about 240 MB, so cached like the others.
venv=target/hermes-agent-venv
pin=$(grep -v '^#' tests/hermes_agent/requirements.txt | head -n 1)
if ! "$venv/bin/pip" freeze 2>/dev/null | grep -ixF "${pin%%\[*}==${pin##*==}" >/dev/null; then
  echo "== creating $venv ($pin) for the real-agent test"
  rm -rf "$venv"
  { python3 -m venv "$venv" && "$venv/bin/pip" install -q -r tests/hermes_agent/requirements.txt; } ||
    echo "== could not create $venv: the real-agent test will say so"
fi

# The Debian package for tests/package.rs (needs root for the test itself anyway).
if [ "$(id -u)" = 0 ] && command -v dh >/dev/null 2>&1; then
  ./tests/build-deb.sh
  HERMES_DEB=$(ls "$PWD"/target/deb/hermes-gateway_*.deb | grep -v dbgsym)
  export HERMES_DEB
fi

# Library, binary and integration tests (benches are run by `cargo bench`, not here).
# --no-fail-fast: one failing test binary does not hide what the others would say.
cargo test --locked --no-fail-fast --lib --bins --tests -- --nocapture 2>&1
