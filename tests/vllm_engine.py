"""One real vLLM engine run, as its own process (vLLM spawns processes, so the engine starts
under ``__main__``): ``python vllm_engine.py SPEC.json OUT.json``.

SPEC: ``model`` (a directory saved with save_pretrained), ``prompts`` (lists of token ids),
``max_tokens``, ``block_size`` and optionally ``connector`` ({"role", "extra"}): the
KVStoreConnector with that ``kv_role`` and ``kv_connector_extra_config``; none for a plain
engine. OUT: per prompt the generated token ids, vLLM's ``num_cached_tokens`` (local plus
external prefix hits; the engine is fresh, so external ones) and the first step's logprobs of
the sampled tokens, plus the worker-side connector's TransferStats.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time


def main() -> None:
    spec = json.load(open(sys.argv[1]))
    # NOTE: the engine core and its one CPU worker in this process, so the worker-side
    # connector (and its counters) can be read after the run.
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig

    transfer = None
    if spec.get("connector"):
        transfer = KVTransferConfig(
            kv_connector="KVStoreConnector", kv_connector_module_path="kvstore.engine.vllm",
            kv_role=spec["connector"]["role"], kv_load_failure_policy="recompute",
            kv_connector_extra_config=spec["connector"]["extra"])
    llm = LLM(model=spec["model"], skip_tokenizer_init=True, block_size=spec["block_size"],
              max_model_len=spec.get("max_model_len", 1024), enforce_eager=True,
              dtype="float32", kv_transfer_config=transfer, seed=0,
              kv_cache_memory_bytes=spec.get("kv_cache_bytes", 64 << 20))
    params = SamplingParams(max_tokens=spec["max_tokens"], temperature=0.0, logprobs=0,
                            detokenize=False)
    outputs = llm.generate([{"prompt_token_ids": p} for p in spec["prompts"]], params)
    result = {"requests": [{
        "tokens": list(out.outputs[0].token_ids),
        "num_cached_tokens": out.num_cached_tokens,
        "logprobs": [next(iter(step.values())).logprob for step in out.outputs[0].logprobs],
    } for out in outputs]}
    if transfer is not None:
        from vllm.distributed.kv_transfer import get_kv_transfer_group

        connector = get_kv_transfer_group()
        # NOTE: generate() returns when the outputs are done; a request's asynchronous save
        # may end after that (vLLM frees its pages then). Empty steps until every delayed
        # request was reported (each reported once, so the count is exact), then shutdown.
        num_delayed = spec.get("num_delayed_frees", 0)
        deadline = time.monotonic() + 120
        while connector.stats.num_finished_sends < num_delayed and time.monotonic() < deadline:
            llm.llm_engine.step()
        connector.shutdown()
        result["stats"] = dataclasses.asdict(connector.stats)
    json.dump(result, open(sys.argv[2], "w"))


if __name__ == "__main__":
    main()
