"""The storage tiers, one type for the client, the daemon and the master.

``Tier`` is an ``IntEnum`` whose values are the wire values of ``kvstore.v1.Tier`` (so a Tier
goes into a protobuf field as it is, and a wire value turns back with ``Tier(value)``); its
``label`` ("hbm", "dram", "ssd") is what users write (``put(..., tier="ssd")``, metrics
labels, ``kvstore status``). The wire's ``TIER_UNSPECIFIED`` (0) is not a tier: where a tier
is optional, absence is ``None``.
"""

from __future__ import annotations

import enum
from typing import Any

from kvstore._errors import InvalidArgumentError


class Tier(enum.IntEnum):
    """Where a segment's bytes live, fastest first."""

    HBM = 1     # GPU memory
    DRAM = 2    # host memory (POSIX shared memory)
    SSD = 3     # a file on a local disk

    @property
    def label(self) -> str:
        """The lower-case name users write: "hbm", "dram" or "ssd"."""
        return self.name.lower()

    @classmethod
    def parse(cls, value: Any) -> "Tier":
        """A Tier from a Tier, its wire value or its name in any case ("ssd", "DRAM").

        Raises InvalidArgumentError for anything else.
        """
        if isinstance(value, cls):
            return value
        if isinstance(value, str):
            try:
                return cls[value.upper()]
            except KeyError:
                pass
        elif isinstance(value, int) and not isinstance(value, bool):
            try:
                return cls(value)
            except ValueError:
                pass
        raise InvalidArgumentError(
            f"tier must be one of {', '.join(repr(t.label) for t in cls)}, got {value!r}")


#: Every tier, fastest first (placement's default order; demotion goes down this list).
TIERS_FASTEST_FIRST: tuple[Tier, ...] = (Tier.HBM, Tier.DRAM, Tier.SSD)
