"""vLLM's CPU cache layout (``head_major``: ``[num_blocks, heads, block_size, 2 * head_dim]``,
K rows then V rows per head) stores the same block form as the kernels' layouts: blocks saved
from one load into the other, exactly (raw) or within the INT8 bound."""

from __future__ import annotations

import pytest
import torch

import kvstore
from kvstore import InvalidArgumentError
from kvstore.engine import KeyNamespace, PagedKVConnector

NUM_LAYERS, NUM_BLOCKS, BLOCK_SIZE, HEADS, HEAD_DIM = 2, 6, 32, 2, 8
TOKENS = list(range(3 * BLOCK_SIZE + 5))  # 3 full blocks


@pytest.fixture(scope="module")
def store():
    with kvstore.local(dram="64MiB") as s:
        yield s


def _head_major(seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(NUM_BLOCKS, HEADS, BLOCK_SIZE, 2 * HEAD_DIM, generator=gen)
            for _ in range(NUM_LAYERS)]


def _as_kv_first(layer: torch.Tensor) -> torch.Tensor:
    """The same KV as ``[2, num_blocks, block_size, heads, head_dim]`` (what K and V are in
    vLLM's CPU cache: per head, the first block_size rows of the [2*bs, hd] view are K)."""
    per_head = layer.view(NUM_BLOCKS, HEADS, 2, BLOCK_SIZE, HEAD_DIM)
    return per_head.permute(2, 0, 3, 1, 4).contiguous()


def _connector(store, layers, layout=None, quantize=None, model="hm") -> PagedKVConnector:
    return PagedKVConnector(store, layers, block_size=BLOCK_SIZE, quantize=quantize,
                            namespace=KeyNamespace(model=model), layout=layout)


@pytest.mark.parametrize("quantize", [None, "int8"])
def test_head_major_blocks_load_into_a_kv_first_cache_and_back(store, quantize) -> None:
    src = _head_major(1)
    cpu = _connector(store, src, "head_major", quantize, model=f"hm-{quantize}")
    assert cpu.namespace.layout == f"L2BHD{BLOCK_SIZE}"  # the kernels' stored form
    assert cpu.save_blocks(TOKENS, [4, 1, 2]).num_blocks_stored == 3

    kv_first = [torch.zeros(2, NUM_BLOCKS, BLOCK_SIZE, HEADS, HEAD_DIM) for _ in src]
    gpu_like = _connector(store, kv_first, quantize=quantize, model=f"hm-{quantize}")
    assert gpu_like.namespace == cpu.namespace  # same keys: they share blocks
    assert gpu_like.load(TOKENS, [0, 3, 5]) == 3 * BLOCK_SIZE
    tol = {} if quantize is None else {"atol": 0.05, "rtol": 0.02}
    for s, d in zip(src, kv_first):
        want = _as_kv_first(s)
        for src_id, dst_id in zip([4, 1, 2], [0, 3, 5]):
            torch.testing.assert_close(d[:, dst_id], want[:, src_id], **({"atol": 0, "rtol": 0}
                                                                         | tol))

    back = [torch.zeros_like(s) for s in src]
    again = _connector(store, back, "head_major", quantize, model=f"hm-{quantize}")
    assert again.load(TOKENS, [5, 0, 3]) == 3 * BLOCK_SIZE
    for s, b in zip(src, back):
        for src_id, dst_id in zip([4, 1, 2], [5, 0, 3]):
            torch.testing.assert_close(b[dst_id], s[src_id], **({"atol": 0, "rtol": 0} | tol))
        assert not b[1].any() and not b[2].any() and not b[4].any()  # untouched pages


def test_head_major_rejects_bad_caches(store) -> None:
    with pytest.raises(InvalidArgumentError, match="2 \\* head_dim"):
        _connector(store, [torch.zeros(NUM_BLOCKS, HEADS, BLOCK_SIZE, 2 * HEAD_DIM + 1)],
                   "head_major")
    with pytest.raises(InvalidArgumentError, match="contiguous"):
        layer = torch.zeros(NUM_BLOCKS, BLOCK_SIZE, HEADS, 2 * HEAD_DIM).transpose(1, 2)
        _connector(store, [layer], "head_major")
    with pytest.raises(InvalidArgumentError, match="differs"):
        _connector(store, [torch.zeros(NUM_BLOCKS, HEADS, BLOCK_SIZE, 2 * HEAD_DIM),
                           torch.zeros(NUM_BLOCKS + 1, HEADS, BLOCK_SIZE, 2 * HEAD_DIM)],
                   "head_major")
    cpu = _connector(store, _head_major(2), "head_major", model="hm-bad")
    with pytest.raises(InvalidArgumentError):
        cpu.save_blocks(TOKENS, [0, 1, NUM_BLOCKS])  # a page id out of range
    assert cpu.num_stored_tokens(TOKENS) == 0  # nothing was stored by the failed call
