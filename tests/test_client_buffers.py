"""Zero-copy views of values and output buffers (kvstore.client.values)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kvstore import InvalidArgumentError
from kvstore.client.values import as_destination, as_source, finish_bytes, new_bytes


@pytest.mark.parametrize("make", [
    lambda: b"abc\x00def",
    lambda: bytearray(b"abc\x00def"),
    lambda: memoryview(b"abc\x00def"),
])
def test_bytes_like_sources_are_viewed(make):
    view = as_source(make())
    assert view.format == "B" and view.ndim == 1
    assert bytes(view) == b"abc\x00def"


@pytest.mark.parametrize("dtype", [np.uint8, np.float16, np.float32, np.int64])
def test_numpy_source_is_a_view_of_its_bytes(dtype):
    array = np.arange(24, dtype=dtype).reshape(2, 3, 4)
    view = as_source(array)
    assert view.nbytes == array.nbytes
    assert bytes(view) == array.tobytes()
    array[0, 0, 0] = 7  # a view, not a copy: later changes show through
    assert bytes(view) == array.tobytes()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.int8,
                                   torch.bool])
def test_torch_source_of_any_dtype_is_a_view(dtype):
    tensor = torch.arange(12).reshape(3, 4).to(dtype)
    view = as_source(tensor)
    expected = tensor.view(torch.uint8).numpy().tobytes() if dtype != torch.bool else \
        tensor.numpy().tobytes()
    assert bytes(view) == expected
    tensor[0, 0] = 1
    assert bytes(view)[: tensor.element_size()] == \
        tensor.reshape(-1)[:1].view(torch.uint8).numpy().tobytes()


def test_torch_source_that_requires_grad_is_accepted():
    tensor = torch.ones(4, requires_grad=True)
    assert as_source(tensor).nbytes == 16


@pytest.mark.parametrize("value", [
    np.arange(16, dtype=np.uint8).reshape(4, 4)[:, ::2],
    torch.arange(16).reshape(4, 4).t(),
    memoryview(bytes(16)).cast("B", (4, 4))[::2],
])
def test_non_contiguous_values_are_rejected(value):
    with pytest.raises(InvalidArgumentError, match="contiguous"):
        as_source(value)


@pytest.mark.parametrize("value", ["text", 12, None, [1, 2], object()])
def test_unsupported_value_types_are_rejected(value):
    with pytest.raises(InvalidArgumentError, match="value must be"):
        as_source(value)


def test_destinations_write_into_the_callers_memory():
    array = np.zeros(8, dtype=np.float32)
    as_destination(array)[:4] = b"\x00\x00\x80\x3f"  # 1.0f little-endian
    assert array[0] == 1.0
    tensor = torch.zeros(4, dtype=torch.bfloat16)
    as_destination(tensor)[:2] = torch.tensor([2.0], dtype=torch.bfloat16).view(
        torch.uint8).numpy().tobytes()
    assert tensor[0].item() == 2.0
    buf = bytearray(3)
    as_destination(memoryview(buf))[1:2] = b"x"
    assert buf == b"\x00x\x00"


@pytest.mark.parametrize("out", [b"1234", memoryview(b"1234")])
def test_read_only_destinations_are_rejected(out):
    with pytest.raises(InvalidArgumentError, match="read-only|writable"):
        as_destination(out)


def test_read_only_numpy_destination_is_rejected():
    array = np.zeros(4, dtype=np.uint8)
    array.flags.writeable = False
    with pytest.raises(InvalidArgumentError, match="read-only"):
        as_destination(array)


@pytest.mark.parametrize("num_bytes", [0, 1, 100, 16 * 1024, 1 << 20])
def test_new_bytes_gives_filled_bytes(num_bytes):
    holder, view = new_bytes(num_bytes)
    assert view.nbytes == num_bytes
    view[:] = bytes(range(256)) * (num_bytes // 256) + bytes(range(num_bytes % 256))
    result = finish_bytes(holder)
    assert type(result) is bytes and len(result) == num_bytes
    assert result == bytes(range(256)) * (num_bytes // 256) + bytes(range(num_bytes % 256))


def test_a_torch_view_keeps_its_tensor_alive():
    import gc
    import weakref

    tensor = torch.arange(8, dtype=torch.float32)
    alive = weakref.ref(tensor)
    view = as_destination(tensor)
    del tensor
    gc.collect()
    assert alive() is not None  # the view still owns the memory it points at
    view[:4] = b"\x00\x00\x80\x3f"
    assert alive()[0].item() == 1.0
    del view
    gc.collect()
    assert alive() is None
