"""The master's part of ``KVStore.stats()``: its ``Stats`` reply as plain values.

Guarantee: the dict holds only str, int, float, bool, None, lists and dicts of them (JSON
as is), tiers named by their labels ("hbm", "dram", "ssd"; None for all tiers), and never the
``data_token`` the reply carries (a secret, not a figure).
"""

from __future__ import annotations

import dataclasses
from typing import Any


def master_stats(stats: Any) -> dict[str, Any]:
    """``stats`` (a ``kvstore.rpc`` Stats result) as the dict ``KVStore.stats()["master"]``."""
    master = dataclasses.asdict(stats)
    del master["data_token"]     # a secret, not a figure
    for tenant in master["tenants"]:
        for name in ("tier_to_used_bytes", "tier_to_quota_bytes"):
            tenant[name] = {tier.label if tier else None: num_bytes
                            for tier, num_bytes in tenant[name].items()}
    master["tiers"] = [{"tier": usage.tier.label if usage.tier else None,
                        "capacity_bytes": usage.capacity_bytes,
                        "used_bytes": usage.used_bytes, "num_objects": usage.num_replicas,
                        "hits": usage.hits, "demotions": usage.demotions,
                        "promotions": usage.promotions, "evictions": usage.evictions}
                       for usage in stats.tiers]
    return master
