#!/usr/bin/env bash
# scripts/apt_install.sh WHAT CHECK PACKAGE...: install Debian PACKAGEs (no recommends, no
# service started) unless the shell command CHECK already succeeds. Needs root (CI runs as
# root) or passwordless sudo; anywhere else it says what to do and exits 0, so that the
# tests needing WHAT skip (or run without it) with their own reason.
set -euo pipefail
what="$1"; check="$2"; shift 2
if bash -c "$check" >/dev/null 2>&1; then
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "apt_install.sh: no apt-get here; install $* yourself for $what" >&2
    exit 0
fi
SUDO=""
if [ "$(id -u)" != 0 ]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        SUDO="sudo -n"
    else
        echo "apt_install.sh: not root; run 'apt-get install $*' as root for $what" >&2
        exit 0
    fi
fi
export DEBIAN_FRONTEND=noninteractive
# NOTE: an update only when the package lists do not have the packages (a fresh image has
# none; a second install script in the same run then needs no update)
if ! apt-cache show "$@" >/dev/null 2>&1; then
    $SUDO apt-get update -qq
fi
$SUDO apt-get install -y -qq --no-install-recommends "$@" >/dev/null
