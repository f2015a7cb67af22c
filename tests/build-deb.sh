#!/usr/bin/env bash
# Builds the Debian package from the committed tree into target/deb/ and checks it with
# lintian (no errors, no warnings). Usage: tests/build-deb.sh [VERSION-SUFFIX]
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
out="$root/target/deb"
work=$(mktemp -d -t hermes-deb.XXXXXX)
trap 'rm -rf "$work"' EXIT
mkdir -p "$out" "$work/src"
# Only what git tracks (as staged): the package is built from the source tree, not from
# leftovers in the work tree.
git checkout-index -a --prefix="$work/src/"
(
  cd "$work/src"
  CARGO_TARGET_DIR="$root/target/deb-build" dpkg-buildpackage -us -uc -b >"$work/build.log" 2>&1 ||
    { tail -n 60 "$work/build.log"; exit 1; }
)
rm -f "$out"/*.deb
cp "$work"/*.deb "$out/"
deb=$(ls "$out"/hermes-gateway_*.deb | grep -v dbgsym)
echo "== built $deb"
lintian --fail-on error,warning "$deb"
echo "== lintian: no errors, no warnings"
