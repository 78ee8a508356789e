#!/usr/bin/env bash
# System packages the test suite drives (not needed to run p2pllm): Debian's chromium for the
# dashboard's browser tests (Playwright's own browser download is not reachable from CI) and
# prometheus for `promtool check rules` on docs/monitoring/. Installed only when missing and when
# we may (root with apt-get); otherwise the tests that need them skip and say why.
set -euo pipefail
missing=()
command -v chromium >/dev/null || missing+=(chromium)
command -v promtool >/dev/null || missing+=(prometheus)
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
  echo "test-deps: ${missing[*]} missing and not installable here (needs root and apt-get); their tests skip" >&2
  exit 0
fi
echo "test-deps: installing ${missing[*]} (Debian packages, about a minute)" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >/dev/null
# --no-install-recommends keeps prometheus from pulling node-exporter and friends
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
