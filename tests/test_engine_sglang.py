"""KVStoreHiCacheStorage created by SGLang's own StorageBackendFactory (the dynamic backend) and
driven the way SGLang's HiCache controller calls its storage backend (batch_exists,
batch_set_v1, batch_get_v1 on host-pool indices), against a real kvstore cluster. Skipped
where SGLang is not installed (the main .venv): `make test-sglang` runs it in .venv-vllm."""

from __future__ import annotations

import uuid

import pytest
import torch

pytest.importorskip("sglang.srt.mem_cache.hicache_storage",
                    reason="SGLang is not installed in this virtualenv: `make test-sglang` runs "
                    "these tests in .venv-vllm (scripts/setup_vllm.sh installs SGLang too)")

from sglang.srt.mem_cache.hicache_storage import HiCacheStorage, HiCacheStorageConfig  # noqa: E402
from sglang.srt.mem_cache.storage.backend_factory import StorageBackendFactory  # noqa: E402

from client_cluster import Cluster  # noqa: E402

from kvstore import ConfigError  # noqa: E402
from kvstore.engine.sglang import KVStoreHiCacheStorage  # noqa: E402

PAGE_SIZE, NUM_LAYERS, NUM_HEADS, HEAD_DIM, DEVICE_TOKENS = 16, 2, 2, 32, 256


@pytest.fixture(scope="module")
def master():
    """A master and one daemon (64 MiB DRAM) that the master lists as registered."""
    cluster = Cluster(num_daemons=1, dram="64MiB")
    yield cluster.address
    cluster.close()


class PageFirstHostPool:
    """SGLang's MHA host KV pool in its ``page_first`` layout: ``kv_buffer`` shaped ``(2, size,
    layers, heads, head_dim)`` and ``get_page_buffer_meta`` as MHATokenToKVPoolHost computes it
    (sglang/srt/mem_cache/pool_host/mha.py). NOTE: SGLang's own class cannot be imported here:
    its module imports torchvision (sglang.srt.configs -> multimodal/internvl_utils.py), and the
    one torchvision wheel for torch 2.13 (0.28.0) is a CUDA 13 build whose ops cannot load
    beside the CPU torch (scripts/setup_vllm.sh says why in full)."""

    layout = "page_first"
    page_size = PAGE_SIZE

    def __init__(self, num_pages: int = 8):
        self.size = num_pages * PAGE_SIZE
        self.kv_buffer = torch.zeros(2, self.size, NUM_LAYERS, NUM_HEADS, HEAD_DIM)

    def get_page_buffer_meta(self, indices: torch.Tensor):
        itemsize = self.kv_buffer.element_size()
        base = self.kv_buffer.data_ptr()
        v_offset = NUM_LAYERS * self.size * NUM_HEADS * HEAD_DIM * itemsize
        ptrs = []
        for index in indices.tolist()[::PAGE_SIZE]:
            k_ptr = base + index * NUM_LAYERS * NUM_HEADS * HEAD_DIM * itemsize
            ptrs += [k_ptr, k_ptr + v_offset]
        return ptrs, [NUM_LAYERS * itemsize * PAGE_SIZE * NUM_HEADS * HEAD_DIM] * len(ptrs)


def _host_pool() -> PageFirstHostPool:
    return PageFirstHostPool()


def _config(master: str | None, model: str) -> HiCacheStorageConfig:
    extra = {"backend_name": "kvstore", "module_path": "kvstore.engine.sglang",
             "class_name": "KVStoreHiCacheStorage"}
    if master:
        extra["master"] = master
    return HiCacheStorageConfig(tp_rank=0, tp_size=1, pp_rank=0, pp_size=1, attn_cp_rank=0,
                                attn_cp_size=1, is_mla_model=False, enable_storage_metrics=False,
                                is_page_first_layout=True, model_name=model, extra_config=extra)


def _page_bytes(pool, page: int) -> bytes:
    ptrs, sizes = pool.get_page_buffer_meta(torch.arange(page * PAGE_SIZE,
                                                         (page + 1) * PAGE_SIZE))
    import ctypes
    return b"".join(ctypes.string_at(p, s) for p, s in zip(ptrs, sizes))


def _backend(master: str, model: str):
    """Created as SGLang creates it: the dynamic backend from the extra config."""
    pool = _host_pool()
    backend = StorageBackendFactory.create_backend("dynamic", _config(master, model), pool)
    assert isinstance(backend, KVStoreHiCacheStorage) and isinstance(backend, HiCacheStorage)
    backend.register_mem_pool_host(pool)
    return backend, pool


def test_pages_backed_up_by_one_engine_are_prefetched_by_another(master) -> None:
    model = f"m-{uuid.uuid4().hex[:8]}"
    writer, src = _backend(master, model)
    reader, dst = _backend(master, model)
    torch.manual_seed(0)
    src.kv_buffer.copy_(torch.randn(src.kv_buffer.shape))
    hashes = [f"h{i}-{uuid.uuid4().hex[:6]}" for i in range(4)]
    src_pages = [1, 4, 2, 7]
    src_indices = torch.cat([torch.arange(p * PAGE_SIZE, (p + 1) * PAGE_SIZE) for p in src_pages])
    # backup (write-through to storage), as the controller's backup thread calls it
    assert reader.batch_exists(hashes) == 0
    assert writer.batch_set_v1(hashes[:3], src_indices[:3 * PAGE_SIZE]) == [True] * 3
    assert reader.batch_exists(hashes) == 3  # the stored prefix; page 4 was never backed up
    assert writer.batch_set_v1(hashes, src_indices) == [True] * 4  # stored ones skipped
    # prefetch into other host pages of another engine
    dst_pages = [5, 0, 3, 6]
    dst_indices = torch.cat([torch.arange(p * PAGE_SIZE, (p + 1) * PAGE_SIZE) for p in dst_pages])
    assert reader.batch_get_v1(hashes, dst_indices) == [True] * 4
    for s, d in zip(src_pages, dst_pages):
        assert _page_bytes(dst, d) == _page_bytes(src, s)  # bytes round-trip exactly
    assert not _page_bytes(dst, 1).strip(b"\0")  # pages not loaded stay untouched
    assert reader.get_stats()["pages_loaded"] == 4


def test_missing_pages_fail_alone_and_plain_forms_round_trip(master) -> None:
    backend, pool = _backend(master, f"m-{uuid.uuid4().hex[:8]}")
    pool.kv_buffer.fill_(3.0)
    indices = torch.arange(0, 2 * PAGE_SIZE)
    assert backend.batch_set_v1(["a"], indices[:PAGE_SIZE]) == [True]
    pool.kv_buffer.zero_()
    assert backend.batch_get_v1(["a", "never"], indices) == [True, False]
    assert _page_bytes(pool, 0) == _page_bytes(pool, 0)[:4] * (len(_page_bytes(pool, 0)) // 4)
    value = torch.arange(100, dtype=torch.int32)
    assert backend.set("plain", value) and backend.exists("plain")
    out = torch.zeros(100, dtype=torch.int32)
    assert torch.equal(backend.get("plain", out), value)
    assert backend.get("nope") is None and not backend.exists("nope")
    assert backend.batch_get(["plain"])[0].numel() == 400
    backend.clear()
    assert not backend.exists("plain") and backend.batch_exists(["a"]) == 0
    with pytest.raises(Exception):
        backend.batch_set_v1(["a", "b"], indices[:PAGE_SIZE])  # 2 pages need 2 pages' indices


def test_a_missing_master_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="master"):
        KVStoreHiCacheStorage(_config(None, "m"), {})
