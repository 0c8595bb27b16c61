#!/bin/sh
# Browser tests drive Debian's Chromium (Playwright's own download does not work here).
set -e
if [ -x /usr/bin/chromium ]; then exit 0; fi
echo "Installing chromium from apt (needed by the browser tests)..."
SUDO=""
if [ "$(id -u)" != "0" ]; then SUDO="sudo"; fi
$SUDO apt-get update -q >/dev/null
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q chromium >/dev/null
/usr/bin/chromium --version
