"""prefix_keys: deterministic, chained, namespaced keys; stable across processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvstore import InvalidArgumentError
from kvstore.engine import KeyNamespace, canonical_token_bytes, prefix_keys

NS = KeyNamespace(model="m")
# Golden value: pins the hash scheme. If this changes, bump HASH_SCHEME (old keys must not match).
GOLDEN_FIRST_TWO = [
    "kv/m/L2BHD-float32-raw/tp0of1/b2v1c16/c68756ff8c9a455ade233fbe6b674039",
    "kv/m/L2BHD-float32-raw/tp0of1/b2v1c16/4159bd3d35f7b443645786ed305574f1",
]


def test_golden_keys_pin_the_scheme() -> None:
    assert prefix_keys(list(range(40)), chunk_size=16, namespace=NS) == GOLDEN_FIRST_TWO


def test_partial_trailing_chunk_is_left_out_unless_asked() -> None:
    assert len(prefix_keys(list(range(47)), chunk_size=16, namespace=NS)) == 2
    assert len(prefix_keys(list(range(48)), chunk_size=16, namespace=NS)) == 3
    keys = prefix_keys(list(range(47)), chunk_size=16, namespace=NS, include_partial=True)
    assert len(keys) == 3 and keys[:2] == GOLDEN_FIRST_TWO[:2] and keys[2].endswith("-p15")
    assert prefix_keys([], chunk_size=16, namespace=NS) == []


def test_one_changed_token_changes_keys_from_its_chunk_on() -> None:
    tokens = list(range(100, 228))
    base = prefix_keys(tokens, chunk_size=16, namespace=NS)
    changed = list(tokens)
    changed[40] += 1  # chunk 2
    other = prefix_keys(changed, chunk_size=16, namespace=NS)
    assert other[:2] == base[:2]
    assert all(a != b for a, b in zip(other[2:], base[2:]))


def test_keys_chain_over_the_prefix_not_just_the_chunk() -> None:
    a = prefix_keys([1] * 16 + [7] * 16, chunk_size=16, namespace=NS)
    b = prefix_keys([2] * 16 + [7] * 16, chunk_size=16, namespace=NS)
    assert a[1] != b[1]  # same second chunk, different history


def test_namespace_fields_separate_keys() -> None:
    tokens = list(range(32))
    variants = [NS, KeyNamespace(model="m2"), KeyNamespace(model="m", dtype="float16"),
                KeyNamespace(model="m", quantization="int8"),
                KeyNamespace(model="m", tp_rank=1, tp_size=2), KeyNamespace(model="m", layout="X")]
    firsts = {prefix_keys(tokens, chunk_size=16, namespace=ns)[0] for ns in variants}
    assert len(firsts) == len(variants)
    assert "/tp1of2/" in prefix_keys(tokens, chunk_size=16, namespace=variants[4])[0]
    # chunk size is part of the chain: 32 tokens as one chunk never equals two chunks of 16
    assert prefix_keys(tokens, chunk_size=32, namespace=NS)[0] not in firsts


def test_token_containers_agree() -> None:
    tokens = [5, 0, 2**31 - 1, 77] * 8
    expected = prefix_keys(tokens, chunk_size=8, namespace=NS)
    assert prefix_keys(np.array(tokens, dtype=np.int64), chunk_size=8, namespace=NS) == expected
    assert prefix_keys(torch.tensor(tokens), chunk_size=8, namespace=NS) == expected
    assert prefix_keys(np.array(tokens, dtype=">i4"), chunk_size=8, namespace=NS) == expected
    assert canonical_token_bytes([1, 256]) == b"\x01\x00\x00\x00\x00\x01\x00\x00"


@pytest.mark.parametrize("bad", [[-1, 2], [2**31], [[1, 2]], [1.5, 2.0]])
def test_bad_tokens_raise(bad: list) -> None:
    with pytest.raises(InvalidArgumentError):
        prefix_keys(bad, chunk_size=1, namespace=NS)


@pytest.mark.parametrize("chunk_size", [0, -16, 1.5, True])
def test_bad_chunk_size_raises(chunk_size: object) -> None:
    with pytest.raises(InvalidArgumentError):
        prefix_keys([1, 2], chunk_size=chunk_size, namespace=NS)  # type: ignore[arg-type]


@pytest.mark.parametrize("kwargs", [{"model": ""}, {"model": "a/b"}, {"model": "a b"},
                                    {"model": "m", "tp_rank": 2, "tp_size": 2},
                                    {"model": "m", "tp_size": 0},
                                    {"model": "m", "quantization": ""}])
def test_bad_namespace_raises(kwargs: dict) -> None:
    with pytest.raises(InvalidArgumentError):
        KeyNamespace(**kwargs)


@pytest.mark.parametrize("namespace", ["", "a//b", "a /b", 5])
def test_bad_string_namespace_raises(namespace: object) -> None:
    with pytest.raises(InvalidArgumentError):
        prefix_keys([1], chunk_size=1, namespace=namespace)  # type: ignore[arg-type]


_CHILD = """
import json, sys
from kvstore.engine import KeyNamespace, prefix_keys
ns = KeyNamespace(model="llama", dtype="float16", tp_rank=1, tp_size=4, quantization="int8")
print(json.dumps(prefix_keys(list(range(3, 3 + 70)), chunk_size=16, namespace=ns)))
"""


def test_keys_are_stable_across_processes_and_hash_seeds() -> None:
    ns = KeyNamespace(model="llama", dtype="float16", tp_rank=1, tp_size=4, quantization="int8")
    expected = prefix_keys(list(range(3, 73)), chunk_size=16, namespace=ns)
    for seed in ("1", "4242"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        out = subprocess.run([sys.executable, "-c", _CHILD], env=env, capture_output=True,
                             text=True, check=True, timeout=120)
        assert json.loads(out.stdout) == expected


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 50_000), min_size=0, max_size=80),
       st.lists(st.integers(0, 50_000), min_size=0, max_size=80), st.integers(1, 9))
def test_shared_prefix_means_shared_keys(head: list[int], tail: list[int], chunk_size: int) -> None:
    a = prefix_keys(head + tail, chunk_size=chunk_size, namespace=NS)
    b = prefix_keys(head + [t + 1 for t in tail], chunk_size=chunk_size, namespace=NS)
    num_shared = len(head) // chunk_size
    assert a[:num_shared] == b[:num_shared]
    assert all(x != y for x, y in zip(a[num_shared:], b[num_shared:]))


def test_engine_public_names_resolve() -> None:
    import kvstore.engine

    for name in kvstore.engine.__all__:
        assert getattr(kvstore.engine, name) is not None
    assert kvstore.engine.__all__ == sorted(kvstore.engine.__all__)
    assert kvstore.engine.PagedKVConnector.__module__ == "kvstore.engine.connector"
