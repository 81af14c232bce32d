#!/usr/bin/env bash
# Install the RDMA user-space libraries every RDMA host has (Debian's libibverbs1 and
# ibverbs-providers), so that the NIXL tests load UCX's verbs modules the way they load on
# such a host: NIXL's wheel bundles its own libibverbs, and its UCX EFA module links the
# system's libefa (see docs/ARCHITECTURE.md, Transports, exit status). Without them the NIXL
# tests still run (UCX then skips those modules).
set -euo pipefail
bash "$(dirname "$0")/apt_install.sh" "the NIXL tests on an RDMA host's libraries" \
    "ldconfig -p | grep -q libefa.so.1" libibverbs1 ibverbs-providers
