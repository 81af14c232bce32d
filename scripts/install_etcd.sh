#!/usr/bin/env bash
# Install etcd (Debian's etcd-server, 3.4) when no `etcd` binary is on PATH: what the master HA
# tests (tests/etcd_server.py) and a local HA cluster need; where it cannot be installed the
# HA tests skip with that reason. NOTE: no service is started: the tests start their own etcd
# on free ports (the package's systemd unit is not run in containers and would bind 2379).
set -euo pipefail
bash "$(dirname "$0")/apt_install.sh" "the master HA tests" "command -v etcd" etcd-server
if command -v etcd >/dev/null; then etcd --version | head -1; fi
