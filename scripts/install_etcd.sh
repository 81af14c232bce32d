#!/usr/bin/env bash
# Install etcd (Debian's etcd-server, 3.4) when no `etcd` binary is on PATH: what the master HA
# tests (tests/etcd_server.py) and a local HA cluster need. Needs root (CI runs as root) or
# sudo; anywhere else it says what to do and exits 0, and the HA tests skip with that reason.
set -euo pipefail
if command -v etcd >/dev/null 2>&1; then
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "install_etcd.sh: no apt-get here; install etcd (>= 3.4) yourself to run the HA tests" >&2
    exit 0
fi
SUDO=""
if [ "$(id -u)" != 0 ]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        SUDO="sudo -n"
    else
        echo "install_etcd.sh: not root; run 'apt-get install etcd-server' as root to run the HA tests" >&2
        exit 0
    fi
fi
export DEBIAN_FRONTEND=noninteractive
# NOTE: --no-install-recommends and no service start: the tests start their own etcd on free
# ports; the package's systemd unit is not run in containers and would bind 2379 elsewhere.
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends etcd-server >/dev/null
command -v etcd >/dev/null && etcd --version | head -1
