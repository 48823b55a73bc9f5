#!/usr/bin/env bash
# Install headless Chromium (Debian's `chromium` package) for the Prefect UI test
# (tests/test_server_ui.py). Idempotent: does nothing when a chromium binary is on PATH.
#
#   deployments/ui/install-chromium.sh        # prints the binary's path on success
#
# Needs root (or sudo) and apt; on other systems install Chromium/Chrome yourself and set
# STAMP_CHROMIUM=/path/to/binary for the test.
set -euo pipefail

find_chromium() {
    local c
    for c in "${STAMP_CHROMIUM:-}" chromium chromium-browser google-chrome; do
        [[ -n $c ]] && command -v "$c" >/dev/null 2>&1 && {
            command -v "$c"
            return 0
        }
    done
    return 1
}

if find_chromium; then
    exit 0
fi

SUDO=""
if [[ $(id -u) -ne 0 ]]; then
    command -v sudo >/dev/null || {
        echo "install-chromium.sh: need root or sudo to run apt-get install chromium" >&2
        exit 1
    }
    SUDO="sudo"
fi
command -v apt-get >/dev/null || {
    echo "install-chromium.sh: no apt-get here; install Chromium and set STAMP_CHROMIUM" >&2
    exit 1
}
LOG=${TMPDIR:-/tmp}/stamp-chromium-apt.log
export DEBIAN_FRONTEND=noninteractive
if ! $SUDO apt-get install -y -q --no-install-recommends chromium fonts-dejavu-core >"$LOG" 2>&1; then
    $SUDO apt-get update -q >>"$LOG" 2>&1
    $SUDO apt-get install -y -q --no-install-recommends chromium fonts-dejavu-core >>"$LOG" 2>&1 || {
        echo "install-chromium.sh: apt-get install chromium failed; see $LOG" >&2
        exit 1
    }
fi
find_chromium || {
    echo "install-chromium.sh: chromium installed but not on PATH; see $LOG" >&2
    exit 1
}
