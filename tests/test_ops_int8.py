"""kvstore.ops INT8: quantize/dequantize and the fused paged forms, CPU, against torch."""

from __future__ import annotations

import pytest
import torch

from kvstore import InvalidArgumentError
from kvstore.ops import (
    dequantize_int8,
    dequantize_scatter,
    gather_pages,
    gather_quantize,
    quantize_int8,
    quantized_shapes,
    scatter_pages,
)
from ops_reference import (
    DTYPES, LAYOUTS, POISON, bits, make_layers, ref_dequantize, ref_gather, ref_quantize,
)

SHAPES = [(1, 64), (16, 96), (17, 128), (16, 576)]  # (block_size, head_dim)


def _random(shape, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    # magnitudes across groups vary by 1e3 so that per-group scales matter
    x = torch.randn(shape, generator=gen) * torch.rand(shape[:-1], generator=gen)[..., None] * 1e3
    return x.to(dtype)


def _bound(x: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """|x - q*scale| <= scale/2, plus fp32 rounding: of 127/amax and x*(127/amax) (|.| <= 127),
    of scale itself, and of q*scale."""
    group_size = x.shape[-1] // scales.shape[-1]
    s = scales.repeat_interleave(group_size, dim=-1)
    return s / 2 + s * 127 * 2.0 ** -22 + x.abs() * 2.0 ** -23


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group_size", [64, 96, 128, 576, 7])
def test_quantize_matches_reference_and_bound(dtype, group_size):
    x = _random((5, 3, group_size * 2), dtype)
    q, scales = quantize_int8(x, group_size)
    want_q, want_scales = ref_quantize(x, group_size)
    assert torch.equal(bits(scales), bits(want_scales))
    assert torch.equal(q, want_q)
    assert scales.shape == (5, 3, 2) and q.dtype == torch.int8
    restored = dequantize_int8(q, scales, torch.float32)
    err = (restored - x.float()).abs()
    assert torch.all(err <= _bound(x.float(), scales))
    rel = torch.linalg.vector_norm(restored - x.float()) / torch.linalg.vector_norm(x.float())
    print(f"INT8 {dtype} group {group_size}: relative Frobenius error {rel:.4%}")
    assert rel < 0.01  # ~0.6% for Gaussian groups: the error is uniform in +-scale/2


@pytest.mark.parametrize("dtype", DTYPES)
def test_dequantize_matches_reference(dtype):
    x = _random((4, 256), torch.float32, seed=1)
    q, scales = quantize_int8(x, 64)
    out = torch.full((4, 256), POISON, dtype=dtype)
    result = dequantize_int8(q, scales, dtype, out=out)
    assert result.data_ptr() == out.data_ptr()
    assert torch.equal(bits(out), bits(ref_dequantize(q, scales, dtype)))


def test_zero_groups_and_ties():
    x = torch.zeros(3, 8)
    x[1] = torch.tensor([127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -126.5, 3.0])  # scale exactly 1
    q, scales = quantize_int8(x, 8)
    assert scales.tolist() == [[0.0], [1.0], [0.0]]
    assert q[1].tolist() == [127, 0, 2, 2, 0, -2, -126, 3]  # round half to even
    assert torch.all(q[0] == 0) and torch.all(q[2] == 0)
    assert torch.all(dequantize_int8(q, scales, torch.float32)[0] == 0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_extremes_of_each_group_stay_in_range(dtype):
    """The kernels do not clamp (|x * 127/amax| < 127.5 by construction): groups spanning the
    float range, each holding +amax and -amax exactly, must still give q in [-127, 127]."""
    gen = torch.Generator().manual_seed(7)
    magnitudes = 10.0 ** torch.linspace(-30, 30, 4096)
    if dtype == torch.float16:
        magnitudes = 10.0 ** torch.linspace(-4, 4, 4096)  # fp16: finite, past subnormal
    x = torch.randn(4096, 16, generator=gen) * magnitudes[:, None]
    x[:, 3] = x.abs().amax(dim=1)
    x[:, 9] = -x[:, 3]
    x = x.to(dtype)
    q, scales = quantize_int8(x, 16)
    want_q, want_scales = ref_quantize(x, 16)
    assert torch.equal(q, want_q) and torch.equal(bits(scales), bits(want_scales))
    assert torch.all(q[:, 3] == 127) and torch.all(q[:, 9] == -127)


def test_tiny_groups_are_zeros_without_overflow():
    """127 / amax overflows for amax near the float minimum: such groups are stored as zeros."""
    x = torch.tensor([[1e-38, -2e-38, 0.0, 3e-39], [1e-36, 0.0, -4e-37, 1e-37]])
    q, scales = quantize_int8(x, 4)
    want_q, want_scales = ref_quantize(x, 4)
    assert scales[0].item() == 0.0 and torch.all(q[0] == 0)
    assert scales[1].item() > 0 and q[1].tolist() == [127, 0, -51, 13]
    assert torch.equal(q, want_q) and torch.equal(bits(scales), bits(want_scales))


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
def test_nonfinite_input_is_rejected(bad):
    x = _random((4, 64), torch.bfloat16)
    x[2, 5] = bad
    with pytest.raises(InvalidArgumentError, match="inf or NaN in 1 group"):
        quantize_int8(x, 32)
    layers = make_layers("kv_first", 2, 4, 4, 64, torch.float16)
    layers[1][1, 3, 2, 1, 7] = bad
    with pytest.raises(InvalidArgumentError, match="inf or NaN"):
        gather_quantize(layers, [0, 3])
    gather_quantize(layers, [0, 2])  # pages without the bad value still quantize


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size,head_dim", SHAPES)
def test_gather_quantize_equals_composition(layout, dtype, block_size, head_dim):
    layers = make_layers(layout, 3, 7, block_size, head_dim, dtype)
    ids = [6, 1, 4]
    q_shape, s_shape = quantized_shapes(layers, len(ids))
    q_out = torch.full(q_shape, 99, dtype=torch.int8)
    s_out = torch.full(s_shape, POISON)
    q, scales = gather_quantize(layers, torch.tensor(ids), q_out=q_out, scales_out=s_out)
    assert q.data_ptr() == q_out.data_ptr() and scales.data_ptr() == s_out.data_ptr()
    want_q, want_scales = ref_quantize(ref_gather(layers, ids, layout), head_dim)
    assert torch.equal(q, want_q)
    assert torch.equal(bits(scales), bits(want_scales))


@pytest.mark.parametrize("num_layers,block_size,num_heads,head_dim,dtype", [
    (8, 16, 8, 128, torch.bfloat16),  # 32 KiB runs: each next run is prefetched
    (2, 17, 4, 1024, torch.float32),  # 272 KiB runs, past the prefetch limit
])
def test_large_gather_quantize_equals_composition(num_layers, block_size, num_heads, head_dim,
                                                  dtype):
    """Over 8 MiB the fused gather prefetches each next run's source when runs are at most
    256 KiB; either way it writes the reference's bytes of quantize(gather(...))."""
    layers = make_layers("block_first", num_layers, 24, block_size, head_dim, dtype,
                         num_heads=num_heads)
    ids = torch.randperm(24, generator=torch.Generator().manual_seed(3))[:19]
    gathered = ref_gather(layers, ids.tolist(), "block_first")
    assert gathered.nbytes > 8 << 20
    q, scales = gather_quantize(layers, ids)
    want_q, want_scales = ref_quantize(gathered, head_dim)
    assert torch.equal(q, want_q)
    assert torch.equal(bits(scales), bits(want_scales))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size,head_dim", SHAPES)
def test_dequantize_scatter_equals_composition(layout, dtype, block_size, head_dim):
    src = make_layers(layout, 3, 7, block_size, head_dim, dtype)
    group_size = head_dim // 2 if head_dim % 2 == 0 else None  # a group smaller than head_dim
    q, scales = gather_quantize(src, [6, 1, 4], group_size=group_size)
    dst = make_layers(layout, 3, 8, block_size, head_dim, dtype, seed=5)
    want = [t.clone() for t in dst]
    dst_ids = [0, 7, 2]
    scatter_pages(ref_dequantize(q, scales, dtype), want, dst_ids)
    dequantize_scatter(q.reshape(-1), scales.reshape(-1), dst, torch.tensor(dst_ids))
    for got, expected in zip(dst, want):  # pages outside dst_ids are untouched
        assert torch.equal(bits(got), bits(expected))


def test_fused_round_trip_error_bound():
    src = make_layers("block_first", 4, 10, 16, 128, torch.float32, num_heads=8)
    ids = [9, 0, 5, 3]
    q, scales = gather_quantize(src, ids)
    dst = [torch.full_like(t, POISON) for t in src]
    dequantize_scatter(q, scales, dst, [1, 2, 3, 4])
    x, restored = gather_pages(src, ids), gather_pages(dst, [1, 2, 3, 4])
    assert torch.all((restored - x).abs() <= _bound(x, scales))
    rel = torch.linalg.vector_norm(restored - x) / torch.linalg.vector_norm(x)
    print(f"fused INT8 round trip: relative Frobenius error {rel:.4%}")
    assert rel < 0.01


@pytest.mark.parametrize("call,match", [
    (lambda x, L: quantize_int8(x, 0), "positive"),
    (lambda x, L: quantize_int8(x, 48), "divide"),
    (lambda x, L: quantize_int8(x.t(), 8), "contiguous"),
    (lambda x, L: quantize_int8(x.to(torch.int32), 8), "dtype"),
    (lambda x, L: dequantize_int8(x.to(torch.int8), torch.ones(4, 3), torch.float16), "shape"),
    (lambda x, L: dequantize_int8(x.to(torch.int8), torch.ones(4, 2), torch.int8), "dtype"),
    (lambda x, L: dequantize_int8(x.to(torch.int8), torch.ones(4, 2, dtype=torch.float16),
                                  torch.float16), "float32"),
    (lambda x, L: gather_quantize(L, [0], group_size=48), "divide"),
    (lambda x, L: gather_quantize(L, [4]), "out of range"),
    (lambda x, L: gather_quantize(L, [0], q_out=torch.empty(3, dtype=torch.int8)), "elements"),
    (lambda x, L: dequantize_scatter(*gather_quantize(L, [0, 1]), L, [2, 2]), "repeated"),
    (lambda x, L: dequantize_scatter(*gather_quantize(L, [0, 1]), L, [2]), "elements"),
    (lambda x, L: dequantize_scatter(gather_quantize(L, [0])[0], torch.ones(5), L, [2]),
     "per group"),
    (lambda x, L: dequantize_scatter(gather_quantize(L, [0])[0], torch.ones(8), L, [2]),
     "divide"),
])
def test_invalid_arguments(call, match):
    x = _random((4, 64), torch.float32)
    layers = make_layers("kv_first", 2, 4, 4, 64, torch.float16)
    before = [t.clone() for t in layers]
    with pytest.raises(InvalidArgumentError, match=match):
        call(x, layers)
    assert all(torch.equal(a, b) for a, b in zip(layers, before))


def test_opcheck():
    x = _random((3, 64), torch.bfloat16)
    q, scales = quantize_int8(x, 32)
    layers = make_layers("kv_first", 2, 4, 4, 64, torch.float16)
    gq, gs = gather_quantize(layers, [1, 3])
    ids = torch.tensor([1, 3])
    ops = torch.ops.kvstore
    torch.library.opcheck(ops.quantize_int8.default,
                          (x, torch.empty_like(q), torch.empty_like(scales)))
    torch.library.opcheck(ops.dequantize_int8.default, (q, scales, torch.empty_like(x)))
    torch.library.opcheck(ops.gather_quantize.default,
                          (layers, ids, torch.empty_like(gq), torch.empty_like(gs), None))
    torch.library.opcheck(ops.dequantize_scatter.default, (gq, gs, layers, ids, None))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_dequantize_rounding_covers_subnormal_and_overflow(dtype):
    """Every int8 value times scales that land in the subnormal range and past fp16's max:
    the kernels' own float->half/bf16 conversion must round exactly like torch."""
    q = torch.arange(-127, 128, dtype=torch.int8).repeat(6, 1)
    scales = torch.tensor([1e-9, 3e-7, 1e-3, 1.0, 600.0, 3e36]).reshape(6, 1)
    got = dequantize_int8(q, scales, dtype)
    assert torch.equal(bits(got), bits(ref_dequantize(q, scales, dtype)))
    x = got.float()[:, ::7].contiguous()  # and back: half/bf16 -> float inside quantize
    x = torch.where(torch.isfinite(x), x, torch.zeros_like(x)).to(dtype)
    q2, s2 = quantize_int8(x, x.shape[-1])
    want_q, want_s = ref_quantize(x, x.shape[-1])
    assert torch.equal(q2, want_q) and torch.equal(bits(s2), bits(want_s))


def test_int8_round_trip_through_the_store():
    """Quantize-on-send, put, get, dequantize-on-receive: equals the local round trip."""
    import kvstore

    src = make_layers("block_first", 4, 10, 16, 128, torch.bfloat16, num_heads=4)
    q, scales = gather_quantize(src, [7, 2, 9])
    with kvstore.local(dram="64MiB") as store:
        store.batch_put(["ops/int8/q", "ops/int8/scales"], [q, scales])
        q_got, scales_got = torch.full_like(q, 99), torch.full_like(scales, POISON)
        assert store.batch_get_into(["ops/int8/q", "ops/int8/scales"],
                                    [q_got, scales_got]) == [q.nbytes, scales.nbytes]
    via_store = [torch.full_like(t, POISON) for t in src]
    local = [torch.full_like(t, POISON) for t in src]
    dequantize_scatter(q_got, scales_got, via_store, [0, 1, 2])
    dequantize_scatter(q, scales, local, [0, 1, 2])
    assert all(torch.equal(bits(a), bits(b)) for a, b in zip(via_store, local))
    restored = gather_pages(via_store, [0, 1, 2]).float()  # written, and close to the source
    assert torch.all((restored - gather_pages(src, [7, 2, 9]).float()).abs() <= 0.05)
