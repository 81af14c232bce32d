"""The CUDA kernel library: built wherever nvcc is, and (on a GPU) bit-identical to the CPU
kernels, which test_ops_paged / test_ops_int8 check against torch."""

from __future__ import annotations

import shutil

import pytest
import torch

from kvstore import InvalidArgumentError
from kvstore.ops import (
    dequantize_int8,
    dequantize_scatter,
    gather_pages,
    gather_quantize,
    quantize_int8,
    scatter_pages,
)
from kvstore.ops import _lib
from ops_reference import DTYPES, LAYOUTS, POISON, bits, make_layers

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(),
                               reason="no CUDA GPU here: CUDA kernels compiled but not run")
SHAPES = [(1, 64), (16, 96), (17, 128), (16, 576)]  # (block_size, head_dim)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH: no CUDA build")
def test_cuda_module_is_built_when_nvcc_is_present():
    path = _lib.module_path("_kvops_cuda")
    assert path is not None, "nvcc is present but kvstore.ops._kvops_cuda was not built"
    assert _lib.cuda_lib().kvops_abi_version() == _lib.ABI_VERSION  # loads without a GPU


@needs_gpu
@pytest.mark.cuda
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size,head_dim", SHAPES)
def test_cuda_matches_cpu(layout, dtype, block_size, head_dim):
    cpu = make_layers(layout, 3, 7, block_size, head_dim, dtype)
    gpu = [t.cuda() for t in cpu]
    ids = [5, 0, 3, 6]
    want = gather_pages(cpu, ids)
    out = torch.full(want.shape, POISON, dtype=dtype, device="cuda")
    assert torch.equal(gather_pages(gpu, torch.tensor(ids, device="cuda"), out=out).cpu(), want)

    dst_cpu = make_layers(layout, 3, 9, block_size, head_dim, dtype, seed=2)
    dst_gpu = [t.cuda() for t in dst_cpu]
    scatter_pages(want, dst_cpu, [8, 2, 1, 4])
    scatter_pages(want.cuda(), dst_gpu, [8, 2, 1, 4])
    assert all(torch.equal(a, b.cpu()) for a, b in zip(dst_cpu, dst_gpu))

    q, s = gather_quantize(cpu, ids)
    q_gpu, s_gpu = gather_quantize(gpu, ids)
    assert torch.equal(q, q_gpu.cpu()) and torch.equal(bits(s), bits(s_gpu.cpu()))
    q2, s2 = quantize_int8(want.cuda(), head_dim)
    assert torch.equal(q, q2.cpu()) and torch.equal(bits(s), bits(s2.cpu()))
    assert torch.equal(bits(dequantize_int8(q, s, dtype)),
                       bits(dequantize_int8(q_gpu, s_gpu, dtype).cpu()))
    dequantize_scatter(q, s, dst_cpu, [0, 7, 2, 3])
    dequantize_scatter(q_gpu, s_gpu, dst_gpu, [0, 7, 2, 3])
    assert all(torch.equal(bits(a), bits(b.cpu())) for a, b in zip(dst_cpu, dst_gpu))


@needs_gpu
@pytest.mark.cuda
def test_cuda_unaligned_and_many_layers():
    """More layers than one launch carries (64), and a group size that defeats 16-byte access."""
    cpu = make_layers("kv_first", 70, 5, 3, 20, torch.float16)
    gpu = [t.cuda() for t in cpu]
    assert torch.equal(gather_pages(gpu, [4, 1]).cpu(), gather_pages(cpu, [4, 1]))
    q, s = gather_quantize(cpu, [4, 1], group_size=5)
    q_gpu, s_gpu = gather_quantize(gpu, [4, 1], group_size=5)
    assert torch.equal(q, q_gpu.cpu()) and torch.equal(bits(s), bits(s_gpu.cpu()))


@needs_gpu
@pytest.mark.cuda
def test_cuda_runs_on_the_callers_stream():
    cpu = make_layers("block_first", 4, 64, 16, 128, torch.bfloat16, num_heads=8)
    gpu = [t.cuda() for t in cpu]
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        out = gather_pages(gpu, list(range(0, 64, 2)))
        copy = out.clone()  # same stream: ordered after the gather
    stream.synchronize()
    assert torch.equal(copy.cpu(), gather_pages(cpu, list(range(0, 64, 2))))


@needs_gpu
@pytest.mark.cuda
def test_cuda_errors():
    gpu = [t.cuda() for t in make_layers("kv_first", 2, 5, 4, 64, torch.float16)]
    with pytest.raises(InvalidArgumentError, match="cache is on"):
        gather_pages(gpu, [0], out=torch.empty(2 * 2 * 4 * 2 * 64, dtype=torch.float16))
    with pytest.raises(InvalidArgumentError, match="differs"):
        gather_pages([gpu[0], gpu[1].cpu()], [0])
    with pytest.raises(InvalidArgumentError, match="out of range"):
        gather_pages(gpu, torch.tensor([5], device="cuda"))
    bad = gpu[0].clone()
    bad[0, 1, 0, 0, 0] = float("nan")
    with pytest.raises(InvalidArgumentError, match="inf or NaN"):
        gather_quantize([bad, gpu[1]], [1])


@needs_gpu
@pytest.mark.cuda
def test_cuda_opcheck():
    gpu = [t.cuda() for t in make_layers("block_first", 2, 5, 4, 64, torch.bfloat16)]
    ids = torch.tensor([3, 0])
    out = gather_pages(gpu, ids).reshape(-1)
    torch.library.opcheck(torch.ops.kvstore.gather_pages.default, (gpu, ids, out, None))
    q, s = gather_quantize(gpu, ids)
    torch.library.opcheck(torch.ops.kvstore.dequantize_scatter.default, (q, s, gpu, ids, None))
