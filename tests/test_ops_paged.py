"""kvstore.ops.gather_pages / scatter_pages on CPU against a plain torch reference."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import kvstore
from kvstore import InvalidArgumentError
from kvstore.ops import gather_pages, gathered_nbytes, gathered_shape, scatter_pages
from ops_reference import DTYPES, LAYOUTS, POISON, make_layers, ref_gather, ref_scatter

SHAPES = [(1, 64), (16, 96), (17, 128), (16, 576), (17, 64)]  # (block_size, head_dim)
IDS = [5, 0, 3, 6]  # out of order, first and last block included


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size,head_dim", SHAPES)
def test_gather_matches_reference(layout, dtype, block_size, head_dim):
    layers = make_layers(layout, 3, 7, block_size, head_dim, dtype)
    out = torch.full(gathered_shape(layers, len(IDS)), POISON, dtype=dtype)
    result = gather_pages(layers, torch.tensor(IDS, dtype=torch.int32), out=out)
    assert result.data_ptr() == out.data_ptr()
    assert torch.equal(result, ref_gather(layers, IDS, layout))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size,head_dim", SHAPES)
def test_scatter_matches_reference(layout, dtype, block_size, head_dim):
    src = make_layers(layout, 3, 7, block_size, head_dim, dtype, seed=1)
    buf = ref_gather(src, IDS, layout).contiguous()
    dst = make_layers(layout, 3, 9, block_size, head_dim, dtype, seed=2)
    expected = [t.clone() for t in dst]
    dst_ids = [8, 2, 1, 4]
    ref_scatter(buf, expected, dst_ids, layout)
    scatter_pages(buf, dst, torch.tensor(dst_ids))
    for got, want in zip(dst, expected):  # written pages equal buf, the others are untouched
        assert torch.equal(got, want)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_round_trip_into_other_blocks_is_exact(layout):
    src = make_layers(layout, 4, 12, 16, 128, torch.bfloat16, seed=3)
    dst = [torch.full_like(t, POISON) for t in src]
    src_ids, dst_ids = [11, 2, 7, 0, 5], [0, 1, 9, 3, 10]
    scatter_pages(gather_pages(src, src_ids), dst, dst_ids)
    for s, d in zip(src, dst):
        for a, b in zip(src_ids, dst_ids):
            page_s = s[:, a] if layout == "kv_first" else s[a]
            page_d = d[:, b] if layout == "kv_first" else d[b]
            assert torch.equal(page_s, page_d)
    assert torch.equal(gather_pages(dst, dst_ids), gather_pages(src, src_ids))


def test_repeated_ids_allowed_for_gather():
    layers = make_layers("kv_first", 2, 5, 4, 64, torch.float16)
    assert torch.equal(gather_pages(layers, [3, 3, 1]), ref_gather(layers, [3, 3, 1], "kv_first"))


def test_strided_view_of_block_first_allocation():
    """vLLM may allocate [num_blocks, 2, ...] and hand out a permuted [2, num_blocks, ...]."""
    base = make_layers("block_first", 3, 6, 16, 64, torch.float32)
    views = [t.transpose(0, 1) for t in base]
    assert not views[0].is_contiguous()
    got = gather_pages(views, [4, 1], layout="kv_first")
    assert torch.equal(got, ref_gather(base, [4, 1], "block_first"))


def test_copies_past_the_thread_and_streaming_store_thresholds_are_exact():
    """A gather/scatter over 8 MiB (where the CPU kernel splits runs over threads and uses
    non-temporal stores) moves exactly the reference's bytes. Which path ran is not
    observable from Python: this proves the bytes of the sizes that take it, not the path."""
    layers = make_layers("block_first", 8, 40, 16, 128, torch.bfloat16, num_heads=8)
    ids = torch.randperm(40, generator=torch.Generator().manual_seed(4))[:33]
    out = gather_pages(layers, ids)
    assert out.nbytes > 8 << 20  # several threads' share, and past the non-temporal threshold
    assert torch.equal(out, ref_gather(layers, ids.tolist(), "block_first"))
    dst = [torch.full_like(t, POISON) for t in layers]
    dst_ids = list(range(40))[::-1][:33]
    scatter_pages(out, dst, dst_ids)
    expected = [torch.full_like(t, POISON) for t in layers]
    ref_scatter(out, expected, dst_ids, "block_first")
    assert all(torch.equal(a, b) for a, b in zip(dst, expected))


@pytest.mark.parametrize("layout,num_layers,block_size,num_heads,head_dim,dtype", [
    ("kv_first", 8, 16, 8, 128, torch.bfloat16),  # 32 KiB runs: each next run is prefetched
    ("block_first", 2, 17, 4, 1024, torch.float32),  # 272 KiB runs, past the prefetch limit
])
def test_copies_on_both_sides_of_the_prefetch_run_limit_are_exact(layout, num_layers, block_size,
                                                                   num_heads, head_dim, dtype):
    """Gathers over 8 MiB prefetch the next run's source while copying one when runs are at
    most 256 KiB (csrc/cpu/stream_copy.h); on either side of that limit the bytes are the
    reference's, thread boundaries included (last run of a thread: nothing to prefetch)."""
    num_blocks = 24
    layers = make_layers(layout, num_layers, num_blocks, block_size, head_dim, dtype,
                         num_heads=num_heads)
    ids = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(7))[:19]
    out = torch.full(gathered_shape(layers, len(ids)), POISON, dtype=dtype)
    gather_pages(layers, ids, out=out)
    assert out.nbytes > 8 << 20  # past the non-temporal (and prefetching) threshold
    assert torch.equal(out, ref_gather(layers, ids.tolist(), layout))
    dst = [torch.full_like(t, POISON) for t in layers]
    scatter_pages(out, dst, ids)
    expected = [torch.full_like(t, POISON) for t in layers]
    ref_scatter(out, expected, ids.tolist(), layout)
    assert all(torch.equal(a, b) for a, b in zip(dst, expected))


def test_out_may_be_a_larger_byte_buffer():
    layers = make_layers("kv_first", 2, 5, 16, 64, torch.bfloat16)
    need = gathered_nbytes(layers, 3)
    assert need == 2 * 2 * 3 * 16 * 2 * 64 * 2
    raw = torch.full((need + 100,), 0xAB, dtype=torch.uint8)
    result = gather_pages(layers, [4, 0, 2], out=raw)
    assert torch.equal(result, ref_gather(layers, [4, 0, 2], "kv_first"))
    assert torch.all(raw[need:] == 0xAB)  # nothing past the gathered bytes
    dst = [torch.zeros_like(t) for t in layers]
    scatter_pages(raw[:need], dst, [0, 1, 2])
    assert torch.equal(gather_pages(dst, [0, 1, 2]), result)


def test_empty_block_ids():
    layers = make_layers("mla", 2, 5, 16, 576, torch.float16)
    assert gather_pages(layers, []).shape == (2, 0, 16, 576)


def test_ambiguous_layout_needs_explicit_argument():
    layers = make_layers("kv_first", 2, 2, 4, 64, torch.float16)  # shape [2, 2, ...]
    with pytest.raises(InvalidArgumentError, match="layout="):
        gather_pages(layers, [0])
    got = gather_pages(layers, [1], layout="block_first")
    assert torch.equal(got, ref_gather(layers, [1], "block_first"))


def _errors_case():
    layers = make_layers("kv_first", 2, 5, 4, 64, torch.float16)
    buf = gather_pages(layers, [0, 1])
    return layers, buf


@pytest.mark.parametrize("call,match", [
    (lambda L, b: gather_pages(L, [0, 5]), "out of range"),
    (lambda L, b: gather_pages(L, [-1]), "out of range"),
    (lambda L, b: gather_pages(L, torch.tensor([0.0])), "int32 or int64"),
    (lambda L, b: gather_pages(L, torch.tensor([[0]])), "1-D"),
    (lambda L, b: gather_pages([L[0], L[1].float()], [0]), "differs"),
    (lambda L, b: gather_pages([t.to(torch.int16) for t in L], [0]), "dtype"),
    (lambda L, b: gather_pages([t.transpose(3, 4) for t in L], [0]), "not contiguous"),
    (lambda L, b: gather_pages(L[0], [0]), "list"),
    (lambda L, b: gather_pages(L, [0], out=torch.empty(10, dtype=torch.float16)), "at least"),
    (lambda L, b: gather_pages(L, [0], out=b.float()), "dtype"),
    (lambda L, b: gather_pages(L, [0], layout="nhd"), "layout"),
    (lambda L, b: gather_pages(L, [0], layout="mla"), "does not fit"),
    (lambda L, b: scatter_pages(b, L, [1, 1]), "repeated"),
    (lambda L, b: scatter_pages(b, L, [1, 9]), "out of range"),
    (lambda L, b: scatter_pages(b.reshape(-1)[:-1], L, [1, 2]), "exactly"),
    (lambda L, b: scatter_pages(b.transpose(0, 1), L, [1, 2]), "contiguous"),
    (lambda L, b: scatter_pages(b.to(torch.bfloat16), L, [1, 2]), "dtype"),
    (lambda L, b: scatter_pages(b, L, [1, 2, 3]), "exactly"),
])
def test_invalid_arguments_raise_before_writing(call, match):
    layers, buf = _errors_case()
    before = [t.clone() for t in layers]
    with pytest.raises(InvalidArgumentError, match=match):
        call(layers, buf)
    assert all(torch.equal(a, b) for a, b in zip(layers, before))


def test_device_mix_is_rejected():
    layers, buf = _errors_case()
    meta = [torch.empty_like(layers[0], device="meta")] + layers[1:]
    with pytest.raises(InvalidArgumentError, match="differs"):
        gather_pages(meta, [0])
    with pytest.raises(InvalidArgumentError, match="on meta"):
        scatter_pages(buf.to("meta"), layers, [0, 1])


def test_torch_ops_validate_too():
    """A direct torch.ops call cannot skip the checks of the public wrapper."""
    layers, buf = _errors_case()
    with pytest.raises(InvalidArgumentError, match="out of range"):
        torch.ops.kvstore.gather_pages(layers, torch.tensor([7]), buf.view(-1)[: buf.numel() // 2],
                                       None)
    with pytest.raises(InvalidArgumentError, match="elements"):
        torch.ops.kvstore.scatter_pages(buf.view(-1)[:7], layers, torch.tensor([0, 1]), None)


def test_opcheck():
    layers = make_layers("block_first", 2, 5, 4, 64, torch.float32)
    ids = torch.tensor([3, 0])
    out = torch.empty(gathered_shape(layers, 2).numel())
    torch.library.opcheck(torch.ops.kvstore.gather_pages.default, (layers, ids, out, None))
    torch.library.opcheck(torch.ops.kvstore.scatter_pages.default,
                          (out, [t.clone() for t in layers], ids, "block_first"))


def test_public_names():
    assert set(kvstore.ops.__all__) >= {"gather_pages", "scatter_pages", "quantize_int8",
                                        "dequantize_int8", "gather_quantize", "dequantize_scatter"}
    assert all(callable(getattr(kvstore.ops, name)) for name in kvstore.ops.__all__)


@settings(max_examples=60, deadline=None)
@given(data=st.data(), layout=st.sampled_from(LAYOUTS), dtype=st.sampled_from(DTYPES),
       num_layers=st.integers(1, 3), num_blocks=st.integers(1, 6),
       block_size=st.integers(1, 5), head_dim=st.integers(1, 9))
def test_property_gather_then_scatter(data, layout, dtype, num_layers, num_blocks, block_size,
                                      head_dim):
    """Any shape, any ids: gather equals the reference, and scattering the result into
    distinct pages of another cache writes exactly those pages."""
    layers = make_layers(layout, num_layers, num_blocks, block_size, head_dim, dtype, num_heads=3)
    ids = data.draw(st.lists(st.integers(0, num_blocks - 1), max_size=8))
    got = gather_pages(layers, ids, layout=layout)
    assert torch.equal(got, ref_gather(layers, ids, layout))
    dst_ids = data.draw(st.permutations(range(num_blocks)))[: len(set(ids))]
    unique_ids = list(dict.fromkeys(ids))
    buf = gather_pages(layers, unique_ids, layout=layout)
    dst = [torch.full_like(t, POISON) for t in layers]
    expected = [t.clone() for t in dst]
    scatter_pages(buf, dst, dst_ids, layout=layout)
    ref_scatter(buf, expected, dst_ids, layout)
    assert all(torch.equal(a, b) for a, b in zip(dst, expected))
