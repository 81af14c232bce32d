"""kvstore.ops: kernels that move KV pages between an engine's paged cache and contiguous
transfer buffers, with optional INT8 quantize-on-send.

Each op runs where its tensors live: the CPU library (C++, multi-threaded) for CPU tensors,
the CUDA library (loaded on first use, on the caller's current stream) for CUDA tensors. Both
compute addresses through one shared header, so they move the same bytes. The ops are also
registered as torch operators under ``torch.ops.kvstore`` (see ``_torch_ops``).
Thread safety: calls hold no shared state; concurrent calls on disjoint outputs are safe.
"""

from kvstore.ops.int8 import (
    dequantize_int8,
    dequantize_scatter,
    gather_quantize,
    quantize_int8,
    quantized_shapes,
)
from kvstore.ops.paged import gather_pages, gathered_nbytes, gathered_shape, scatter_pages
from kvstore.ops.rows import (gather_pages_to_rows, gather_tokens_to_rows, row_nbytes,
                              scatter_rows_to_pages, scatter_rows_to_tokens)

__all__ = sorted([
    "dequantize_int8",
    "dequantize_scatter",
    "gather_pages",
    "gather_pages_to_rows",
    "gather_tokens_to_rows",
    "gather_quantize",
    "gathered_nbytes",
    "gathered_shape",
    "quantize_int8",
    "quantized_shapes",
    "row_nbytes",
    "scatter_pages",
    "scatter_rows_to_pages",
    "scatter_rows_to_tokens",
])
