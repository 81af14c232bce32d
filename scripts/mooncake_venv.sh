#!/usr/bin/env bash
# Make .venv-mooncake: Mooncake Store 0.3.13 (CPU build, TCP transport) for
# bench/tcp_compare_bench.py. Its master links libibverbs even for TCP, so Debian's
# libibverbs1 is installed when missing (root only; otherwise the script says so).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! ldconfig -p | grep -q libibverbs.so.1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        apt-get update -qq && apt-get install -y -qq libibverbs1
    else
        echo "mooncake_venv.sh: libibverbs1 is missing (apt-get install libibverbs1)" >&2
        exit 1
    fi
fi
python3 -m venv .venv-mooncake
.venv-mooncake/bin/python -m pip install -q -r requirements-mooncake.txt
echo "made .venv-mooncake"
