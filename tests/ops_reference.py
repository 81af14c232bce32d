"""Plain-torch references and cache factories for the kvstore.ops tests.

The references are written the obvious way (indexing, stack, torch arithmetic), independent of
the kernels' index header, so that a test comparing the two checks the header too.
"""

from __future__ import annotations

import torch

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
LAYOUTS = ("kv_first", "block_first", "mla")
POISON = 1.0e4  # never produced by randn-scaled data; shows any element a kernel skipped


def make_layers(layout: str, num_layers: int, num_blocks: int, block_size: int, head_dim: int,
                dtype: torch.dtype, *, num_heads: int = 2, device: str = "cpu",
                seed: int = 0) -> list[torch.Tensor]:
    """Random per-layer caches (head_dim is latent_dim for mla)."""
    gen = torch.Generator().manual_seed(seed)
    if layout == "kv_first":
        shape = (2, num_blocks, block_size, num_heads, head_dim)
    elif layout == "block_first":
        shape = (num_blocks, 2, block_size, num_heads, head_dim)
    else:
        shape = (num_blocks, block_size, head_dim)
    return [torch.randn(shape, generator=gen).to(dtype).to(device) for _ in range(num_layers)]


def kv_view(layer: torch.Tensor, layout: str) -> torch.Tensor:
    """The layer as [num_kv, num_blocks, page...] (a view)."""
    if layout == "kv_first":
        return layer
    if layout == "block_first":
        return layer.transpose(0, 1)
    return layer.unsqueeze(0)


def ref_gather(layers: list[torch.Tensor], ids: list[int], layout: str) -> torch.Tensor:
    idx = torch.tensor(ids, dtype=torch.int64, device=layers[0].device)
    out = torch.stack([kv_view(t, layout).index_select(1, idx) for t in layers])
    return out.squeeze(1) if layout == "mla" else out


def ref_scatter(buf: torch.Tensor, layers: list[torch.Tensor], ids: list[int], layout: str) -> None:
    if layout == "mla":
        buf = buf.unsqueeze(1)
    for i, t in enumerate(layers):
        view = kv_view(t, layout)
        for page, block_id in enumerate(ids):
            view[:, block_id] = buf[i, :, page]


def ref_quantize(x: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """scale = amax / 127, q = round-half-even(x * (127 / amax)); groups with amax < 2^-120
    (zeros): scale 0, q 0."""
    xf = x.float().reshape(-1, group_size)
    amax = xf.abs().amax(dim=1)
    nonzero = amax >= 2.0 ** -120
    scale = torch.where(nonzero, amax / 127.0, 0.0)
    # NOTE: not `127.0 / amax`: Tensor.__rtruediv__ multiplies by a reciprocal (two roundings)
    inv_scale = torch.full_like(amax, 127.0) / torch.where(nonzero, amax, torch.ones_like(amax))
    q = torch.where(nonzero[:, None], torch.round(xf * inv_scale[:, None]), 0.0).clamp(-127, 127)
    scales_shape = (*x.shape[:-1], x.shape[-1] // group_size)
    return q.to(torch.int8).reshape(x.shape), scale.reshape(scales_shape)


def ref_dequantize(q: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    group_size = q.shape[-1] // scales.shape[-1]
    x = q.float().reshape(-1, group_size) * scales.reshape(-1, 1)
    return x.to(dtype).reshape(q.shape)


def bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes, so equality is exact even for NaN and -0."""
    return t.contiguous().view(torch.uint8)
