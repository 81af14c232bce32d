"""A put interrupted by an exception that is not a transfer error, after PutStart and before
PutEnd, revokes every key it started before the exception propagates: nothing is left
PENDING (which would make a retried put answer ALREADY_EXISTS and never store the key).

The interruption is real code raising at that point: a logging filter on the client's
logger (filters run inside ``logger.debug`` and their exceptions propagate) raises when the
client logs that its writes finished, which happens after the bytes moved and before PutEnd.
"""

from __future__ import annotations

import logging

import pytest

import kvstore


class Interrupt(Exception):
    """Not a KVStoreError: what an engine's own bug or a KeyboardInterrupt looks like."""


class _RaiseAfterWrite(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if str(record.msg).startswith("wrote "):
            raise Interrupt("interrupted between the write and PutEnd")
        return True


@pytest.fixture
def interrupting_logger():
    logger = logging.getLogger("kvstore.client")
    level, raiser = logger.level, _RaiseAfterWrite()
    logger.setLevel(logging.DEBUG)
    logger.addFilter(raiser)
    yield lambda: logger.removeFilter(raiser)
    logger.removeFilter(raiser)
    logger.setLevel(level)


def test_exception_between_put_start_and_put_end_revokes_the_batch(interrupting_logger):
    keys = [f"interrupted/{i}" for i in range(4)]
    values = [bytes([i]) * (100_000 + i) for i in range(4)]
    with kvstore.local(dram="8MiB") as store:
        used_before = store.stats()["master"]["tiers"][0]["used_bytes"]
        with pytest.raises(Interrupt):
            store.batch_put(keys, values)
        master = store.stats()["master"]
        assert master["num_pending"] == 0                       # revoked, not left pending
        assert master["tiers"][0]["used_bytes"] == used_before  # the space came back
        assert store.batch_exists(keys) == [False] * 4
        interrupting_logger()                                   # no more interruptions
        assert store.batch_put(keys, values) == [None] * 4      # stored, not ALREADY_EXISTS
        assert store.batch_get(keys) == values


def test_interrupted_large_batch_hashed_in_the_background_is_revoked(interrupting_logger):
    """The same with values large enough to be hashed on the background thread
    (client/hashing.py): the interruption still revokes every key, and the retry stores
    them with the right sums (the get verifies them)."""
    keys = [f"interrupted-large/{i}" for i in range(4)]
    values = [bytes([i]) * (1024 * 1024 + i) for i in range(4)]
    with kvstore.local(dram="32MiB") as store:
        with pytest.raises(Interrupt):
            store.batch_put(keys, values)
        master = store.stats()["master"]
        assert master["num_pending"] == 0
        assert store.batch_exists(keys) == [False] * 4
        interrupting_logger()
        assert store.batch_put(keys, values) == [None] * 4
        assert store.batch_get(keys, verify=True) == values
