#!/usr/bin/env bash
# One setup command: ryla with its test tools, and Chromium for the browser test where this
# machine can install it (root with apt-get); elsewhere that one test is skipped, with a reason.
set -euo pipefail
cd "$(dirname "$0")"
python3 -m pip install -e ".[dev]"
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } \
    || echo "setup: Chromium could not be installed; the browser test will be skipped" >&2
fi
