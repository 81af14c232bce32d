"""Save a request's KV pages from one paged cache and load them into another.

    python examples/paged_connector.py

Uses an embedded store (master + daemon inside this process). Two "engines" with their own
paged caches agree only on the key namespace; the second finds the first's blocks by the
request's token ids and loads them into different page ids.
"""

import torch

import kvstore
from kvstore.engine import KeyNamespace, PagedKVConnector

NUM_LAYERS, NUM_PAGES, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM = 4, 32, 16, 8, 64


def paged_cache() -> list[torch.Tensor]:
    # vLLM-style per-layer [2, num_blocks, block_size, num_kv_heads, head_dim]
    return [torch.zeros(2, NUM_PAGES, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM, dtype=torch.float16)
            for _ in range(NUM_LAYERS)]


def main() -> None:
    namespace = KeyNamespace(model="my-model")
    token_ids = list(range(1000, 1000 + 5 * BLOCK_SIZE + 7))  # 5 full blocks + 7 tokens
    with kvstore.local(dram="256MiB") as store:
        prefill_pages = paged_cache()
        for layer in prefill_pages:
            layer.normal_()  # stands for the KV a prefill forward wrote
        prefill = PagedKVConnector(store, prefill_pages, block_size=BLOCK_SIZE,
                                   namespace=namespace)
        print("blocks stored:", prefill.save(token_ids, [3, 4, 5, 6, 7, 8]))

        decode_pages = paged_cache()
        decode = PagedKVConnector(store, decode_pages, block_size=BLOCK_SIZE, namespace=namespace)
        loaded = decode.load(token_ids, [20, 21, 22, 23, 24, 25])
        print(f"tokens loaded: {loaded}; compute the remaining {len(token_ids) - loaded}")
        same = torch.equal(prefill_pages[0][:, 3], decode_pages[0][:, 20])
        print("page 3 (prefill) == page 20 (decode):", same)


if __name__ == "__main__":
    main()
