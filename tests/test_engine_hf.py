"""The transformers adapter and the PD flow with a real (tiny, random) Llama and a real store:
disaggregated generation equals single-process generation token for token (lossless), and
INT8 stays within a stated first-step logit error."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import DynamicCache

import kvstore
from kvstore import InvalidArgumentError
from kvstore.demo.generate import extend, prefill_schedule, reference_generate
from kvstore.demo.model import ModelSpec, build_model, kv_shape_of
from kvstore.demo.pd_worker import run_decode, run_prefill
from kvstore.engine import KeyNamespace, PagedKVConnector, loadable_tokens
from kvstore.engine.hf_cache import PagedCache, cache_length, cache_to_pages, pages_to_cache
from kvstore.engine.hf_connector import DynamicCacheConnector

BLOCK_SIZE = 16
MHA = ModelSpec(num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=4,
                intermediate_size=128, vocab_size=512, max_positions=512, seed=3)
GQA = ModelSpec(num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=2,
                intermediate_size=128, vocab_size=512, max_positions=512, seed=4)
# INT8 bound for these models: ||logits_int8 - logits|| / ||logits|| on the first decode step.
INT8_REL_ERROR_BOUND = 0.02


@pytest.fixture(scope="module")
def store():
    with kvstore.local(dram="256MiB") as s:
        yield s


def _side(spec: ModelSpec, store, quantize, prefix: str):
    """One engine: its own model instance and connector."""
    model = build_model(spec)
    num_layers, num_kv_heads, head_dim = kv_shape_of(model)
    connector = DynamicCacheConnector(
        store, num_layers=num_layers, num_kv_heads=num_kv_heads, head_dim=head_dim,
        dtype=torch.float32, block_size=BLOCK_SIZE, quantize=quantize,
        namespace=KeyNamespace(model=spec.tag, prefix=prefix))
    return model, connector


def _pd(spec, store, requests, tmp_path, quantize=None):
    job = {"block_size": BLOCK_SIZE, "requests": requests}
    # the namespace is all the two sides agree on besides the tokens; fresh per test
    prefix = tmp_path.name.replace("[", "-").replace("]", "")
    model_a, conn_a = _side(spec, store, quantize, prefix)
    model_b, conn_b = _side(spec, store, quantize, prefix)
    prefill = run_prefill(job, model_a, conn_a, tmp_path)
    decode = run_decode(job, model_b, conn_b, tmp_path)
    return prefill, decode


def _prompt(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(512) for _ in range(n)]


def test_cache_to_pages_and_back_is_exact() -> None:
    model = build_model(GQA)
    cache = DynamicCache(config=model.config)
    tokens = _prompt(45, 0)
    extend(model, cache, tokens, 0, [45])
    num_layers, heads, head_dim = kv_shape_of(model)
    paged = PagedCache(num_layers=num_layers, num_blocks=5, block_size=BLOCK_SIZE,
                       num_kv_heads=heads, head_dim=head_dim)
    assert cache_to_pages(cache, paged.layers, [4, 0, 2], block_size=BLOCK_SIZE) == 2
    rebuilt = pages_to_cache(paged.layers, [4, 0], num_tokens=32)
    for original, copy in zip(cache.layers, rebuilt.layers):
        assert torch.equal(original.keys[:, :, :32], copy.keys)
        assert torch.equal(original.values[:, :, :32], copy.values)
    with pytest.raises(InvalidArgumentError):
        cache_to_pages(cache, paged.layers, [0, 1], block_size=BLOCK_SIZE, num_tokens=20)
    with pytest.raises(InvalidArgumentError):
        cache_to_pages(cache, paged.layers, [0], block_size=BLOCK_SIZE, num_tokens=32)
    with pytest.raises(InvalidArgumentError):
        pages_to_cache(paged.layers, [0], num_tokens=17)


def test_dynamic_cache_blocks_interoperate_with_paged_engines(store) -> None:
    """Both ways: transformers saves and a paged engine loads, a paged engine saves and
    transformers rebuilds the cache; the bytes equal the original cache's."""
    model = build_model(GQA)
    cache = DynamicCache(config=model.config)
    tokens = _prompt(45, 9)
    extend(model, cache, tokens, 0, [45])
    num_layers, heads, head_dim = kv_shape_of(model)
    ns = KeyNamespace(model="interop")
    hf = DynamicCacheConnector(store, num_layers=num_layers, num_kv_heads=heads,
                               head_dim=head_dim, dtype=torch.float32, block_size=BLOCK_SIZE,
                               namespace=ns)
    saved = hf.save_blocks(cache, tokens)
    assert (saved.num_blocks_stored, saved.failed_keys) == (2, [])
    # a paged engine loads them: same pages as a direct copy of the cache
    expected = PagedCache(num_layers=num_layers, num_blocks=4, block_size=BLOCK_SIZE,
                          num_kv_heads=heads, head_dim=head_dim)
    cache_to_pages(cache, expected.layers, [0, 1], block_size=BLOCK_SIZE)
    paged = PagedCache(num_layers=num_layers, num_blocks=4, block_size=BLOCK_SIZE,
                       num_kv_heads=heads, head_dim=head_dim)
    connector = PagedKVConnector(store, paged.layers, block_size=BLOCK_SIZE, namespace=ns)
    assert hf.keys_for(tokens) == connector.keys_for(tokens)
    assert connector.load(tokens, [3, 2]) == 32
    for got, want in zip(paged.layers, expected.layers):
        assert torch.equal(got[:, 3], want[:, 0]) and torch.equal(got[:, 2], want[:, 1])
    # and the cache rebuilt from the store equals the original's first 32 tokens
    rebuilt, loaded = hf.load_cache(tokens)
    assert (loaded.num_tokens_loaded, loaded.failed_keys) == (32, [])
    for original, copy in zip(cache.layers, rebuilt.layers):
        assert torch.equal(original.keys[:, :, :32], copy.keys)
        assert torch.equal(original.values[:, :, :32], copy.values)
    # the other way: a paged engine saves its pages, the transformers side rebuilds them
    ns_paged = KeyNamespace(model="interop-from-paged")
    paged_writer = PagedKVConnector(store, expected.layers, block_size=BLOCK_SIZE,
                                    namespace=ns_paged)
    assert paged_writer.save(tokens, [0, 1]) == 2
    hf_reader = DynamicCacheConnector(store, num_layers=num_layers, num_kv_heads=heads,
                                      head_dim=head_dim, dtype=torch.float32,
                                      block_size=BLOCK_SIZE, namespace=ns_paged)
    from_paged, loaded = hf_reader.load_cache(tokens)
    assert (loaded.num_tokens_loaded, loaded.failed_keys) == (32, [])
    for original, copy in zip(cache.layers, from_paged.layers):
        assert torch.equal(original.keys[:, :, :32], copy.keys)
        assert torch.equal(original.values[:, :, :32], copy.values)
    empty, nothing = hf.load_cache(_prompt(45, 10))
    assert nothing.num_tokens_loaded == 0 and cache_length(empty) == 0
    with pytest.raises(InvalidArgumentError):
        hf.save_blocks(cache, _prompt(64, 11))  # 4 full blocks, the cache holds 45 tokens
    with pytest.raises(InvalidArgumentError):
        DynamicCacheConnector(store, num_layers=2, num_kv_heads=heads + 1, head_dim=head_dim,
                              dtype=torch.float32, block_size=BLOCK_SIZE,
                              namespace=ns).save_blocks(cache, tokens)


def test_loaded_cache_owns_its_tensors_and_grows(store) -> None:
    """The rebuilt cache holds fresh contiguous tensors (never views of the connector's
    staging rows, which the next load overwrites), and later tokens append after them."""
    model = build_model(GQA)
    num_layers, heads, head_dim = kv_shape_of(model)
    hf = DynamicCacheConnector(store, num_layers=num_layers, num_kv_heads=heads,
                               head_dim=head_dim, dtype=torch.float32, block_size=BLOCK_SIZE,
                               namespace=KeyNamespace(model="owns-tensors"))
    caches, prompts = [], [_prompt(48, 21), _prompt(48, 22)]
    for tokens in prompts:
        cache = DynamicCache(config=model.config)
        extend(model, cache, tokens, 0, [48])
        assert hf.save_blocks(cache, tokens).failed_keys == []
        caches.append(cache)
    first, loaded = hf.load_cache(prompts[0], config=model.config)
    assert loaded.num_tokens_loaded == 48
    hf.load_cache(prompts[1], config=model.config)   # reuses the same staging rows
    for original, copy in zip(caches[0].layers, first.layers):
        assert copy.keys.is_contiguous() and copy.values.is_contiguous()
        assert torch.equal(original.keys, copy.keys)
        assert torch.equal(original.values, copy.values)
    new_k = torch.randn(1, heads, 3, head_dim)
    keys, _ = first.update(new_k, torch.randn(1, heads, 3, head_dim), 0)
    assert keys.shape[2] == 51 and torch.equal(keys[:, :, 48:], new_k)
    assert torch.equal(keys[:, :, :48], caches[0].layers[0].keys)


def test_prefill_schedule_leaves_the_last_token_to_compute() -> None:
    assert loadable_tokens(48, 16) == 32 and loadable_tokens(45, 16) == 32
    assert prefill_schedule(48, 16) == [32, 48] and prefill_schedule(10, 16) == [10]
    assert prefill_schedule(48, 16, start=32) == [48]
    with pytest.raises(InvalidArgumentError):
        loadable_tokens(0, 16)


@pytest.mark.parametrize("spec", [MHA, GQA], ids=["mha", "gqa"])
@pytest.mark.parametrize("num_tokens", [48, 45], ids=["block-multiple", "partial-block"])
def test_disaggregated_generation_equals_single_process(store, tmp_path, spec, num_tokens) -> None:
    tokens = _prompt(num_tokens, seed=num_tokens)
    requests = [{"name": "r", "token_ids": tokens, "decode_tokens": 12}]
    (prefill,), (decode,) = _pd(spec, store, requests, tmp_path)
    assert decode["loaded_tokens"] == loadable_tokens(num_tokens, BLOCK_SIZE) == 32
    assert prefill["failed_keys"] == decode["failed_keys"] == []
    independent = reference_generate(build_model(spec), tokens, block_size=BLOCK_SIZE,
                                     num_decode_tokens=12)
    assert decode["tokens"] == prefill["reference_tokens"] == independent.tokens
    first = torch.load(tmp_path / "r-decode-logits.pt")
    assert torch.equal(first, independent.first_logits)


def test_second_request_reuses_the_shared_prefix(store, tmp_path) -> None:
    first = _prompt(64, seed=1)
    second = first[:32] + _prompt(32, seed=2)
    requests = [{"name": "a", "token_ids": first, "decode_tokens": 6},
                {"name": "b", "token_ids": second, "decode_tokens": 6,
                 "reference_prefix_tokens": 32}]
    prefill, decode = _pd(GQA, store, requests, tmp_path)
    assert [p["prefix_hit_tokens"] for p in prefill] == [0, 32]
    assert prefill[1]["bytes_written"] < prefill[0]["bytes_written"]  # shared blocks not re-put
    for p, d in zip(prefill, decode):
        assert d["tokens"] == p["reference_tokens"]


def test_int8_first_step_logits_within_bound(store, tmp_path) -> None:
    tokens = _prompt(80, seed=5)
    requests = [{"name": "q", "token_ids": tokens, "decode_tokens": 8}]
    (prefill,), (decode,) = _pd(GQA, store, requests, tmp_path, quantize="int8")
    reference = torch.load(tmp_path / "q-reference-logits.pt")
    first = torch.load(tmp_path / "q-decode-logits.pt")
    rel_error = float((first - reference).norm() / reference.norm())
    assert 0 < rel_error < INT8_REL_ERROR_BOUND, rel_error
    assert decode["tokens"][0] == prefill["reference_tokens"][0]


def test_generation_passes_the_cache_under_the_keyword_the_model_declares() -> None:
    import warnings

    model = build_model(GQA)
    tokens = [random.Random(7).randrange(GQA.vocab_size) for _ in range(3 * BLOCK_SIZE + 1)]
    with warnings.catch_warnings():
        # transformers warns (FutureWarning) when the cache comes as past_key_values
        warnings.simplefilter("error")
        generation = reference_generate(model, tokens, block_size=BLOCK_SIZE, num_decode_tokens=3,
                                        prefix_tokens=BLOCK_SIZE)
    assert len(generation.tokens) == 3
