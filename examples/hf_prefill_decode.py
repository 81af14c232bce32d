"""Prefill in one process, decode in another, with a transformers model and a kvstore cluster.

    python examples/hf_prefill_decode.py

Starts `kvstore master` and `kvstore daemon` on loopback, then two spawned processes that
share only the master's address, the prompt's token ids and the key namespace. The prefill
process saves the prompt's KV; the decode process loads it into its own DynamicCache, computes
the last prompt token and generates. (`kvstore demo` is the measured version of this.)
"""

import multiprocessing as mp

BLOCK_SIZE = 16
SPEC = dict(num_layers=2, hidden_size=128, num_heads=4, num_kv_heads=2, intermediate_size=256,
            vocab_size=1024, seed=0)


def engine(role: str, master: str, tokens: list[int], queue) -> None:
    import kvstore
    from kvstore.demo.generate import decode, extend, prefill_schedule
    from kvstore.demo.model import ModelSpec, build_model, kv_shape_of
    from kvstore.engine import KeyNamespace, PagedKVConnector, loadable_tokens
    from kvstore.engine.hf_cache import PagedCache, cache_to_pages, pages_to_cache
    from transformers import DynamicCache

    spec = ModelSpec(**SPEC)
    model = build_model(spec)
    num_layers, num_kv_heads, head_dim = kv_shape_of(model)
    pages = PagedCache(num_layers=num_layers, num_blocks=16, block_size=BLOCK_SIZE,
                       num_kv_heads=num_kv_heads, head_dim=head_dim)
    block_ids = list(range(16))
    with kvstore.connect(master) as store:
        connector = PagedKVConnector(store, pages.layers, block_size=BLOCK_SIZE,
                                     namespace=KeyNamespace(model=spec.tag))
        if role == "prefill":
            cache = DynamicCache(config=model.config)
            extend(model, cache, tokens, 0, prefill_schedule(len(tokens), BLOCK_SIZE))
            cache_to_pages(cache, pages.layers, block_ids, block_size=BLOCK_SIZE)
            queue.put(("prefill", connector.save(tokens, block_ids)))
        else:
            loaded = connector.load(tokens[:loadable_tokens(len(tokens), BLOCK_SIZE)], block_ids)
            cache = pages_to_cache(pages.layers, block_ids, num_tokens=loaded,
                                   config=model.config)
            logits = extend(model, cache, tokens, loaded,
                            prefill_schedule(len(tokens), BLOCK_SIZE, loaded))
            queue.put(("decode", loaded, decode(model, cache, logits, 8).tokens))


def main() -> None:
    from kvstore.demo.cluster import LocalCluster

    tokens = [(7 * i) % 1024 for i in range(100)]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    with LocalCluster(dram="256MiB") as cluster:
        for role in ("prefill", "decode"):
            proc = ctx.Process(target=engine, args=(role, cluster.address, tokens, queue))
            proc.start()
            proc.join()
            print(queue.get())


if __name__ == "__main__":
    main()
