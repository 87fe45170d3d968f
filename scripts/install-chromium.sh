#!/usr/bin/env bash
# Install the headless browser used by tests/test_report_browser.py (Debian/Ubuntu packages).
#   chromium         -> /usr/bin/chromium
#   chromium-driver  -> /usr/bin/chromedriver (matches the chromium package version)
# Idempotent: does nothing when both binaries are present. Needs root (or sudo) for apt-get.
set -euo pipefail

if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then
    echo "chromium: $(/usr/bin/chromium --version 2>/dev/null || echo present)"
    echo "chromedriver: $(/usr/bin/chromedriver --version 2>/dev/null || echo present)"
    exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then
        SUDO="sudo"
    else
        echo "install-chromium.sh: not root and no sudo; install the Debian packages 'chromium' and 'chromium-driver' yourself" >&2
        exit 1
    fi
fi

export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update
$SUDO apt-get install -y chromium chromium-driver

/usr/bin/chromium --version
/usr/bin/chromedriver --version
