"""Remove and pin verbs: remove, remove_prefix, pin, unpin."""

from __future__ import annotations

from kvstore.master.objects import (
    ITEM_INVALID, ITEM_LEASED, ITEM_NOT_FOUND, ITEM_OK, ITEM_PENDING, ITEM_PINNED, PENDING,
)
from kvstore.master.validation import check_batch, invalid, key_problem


def remove(state, keys, force: bool, now_s: float):
    """Remove COMPLETE objects. Per key: ITEM_OK; ITEM_NOT_FOUND; ITEM_INVALID (bad key);
    ITEM_PENDING (being written: the writer revokes it, or the pending timeout reclaims it,
    even with ``force``); without ``force``, ITEM_PINNED (hard pin) or ITEM_LEASED. A forced
    remove of a leased object hides it at once and frees its space when the lease ends.
    Returns ``(statuses, messages)``."""
    check_batch(len(keys), state.config.max_batch)
    statuses, messages = [], None
    for i, key in enumerate(keys):
        obj = state.objects.get(key)
        if obj is None:
            if key in state.pending:
                statuses.append(ITEM_PENDING)
                continue
            problem = key_problem(key)
            statuses.append(ITEM_NOT_FOUND if problem is None else ITEM_INVALID)
            if problem is not None:
                messages = messages or [""] * len(keys)
                messages[i] = problem
        elif not force and obj.hard_pin:
            statuses.append(ITEM_PINNED)
        elif not force and obj.lease_until_s > now_s:
            statuses.append(ITEM_LEASED)
        else:
            state.drop_object(obj, now_s)
            statuses.append(ITEM_OK)
    return statuses, messages


def remove_prefix(state, prefix: str, force: bool, now_s: float) -> tuple[int, int]:
    """Remove every COMPLETE object whose key starts with ``prefix`` (non-empty). Returns
    ``(num_removed, num_skipped)``; skipped: PENDING ones, and pinned/leased ones unless
    ``force``. Scans every key (an admin operation, not a hot path)."""
    if not prefix:
        raise invalid("prefix must not be empty")
    matching = [k for k in state.objects if k.startswith(prefix)]
    num_pending = sum(1 for k in state.pending if k.startswith(prefix))
    num_removed = 0
    for start in range(0, len(matching), state.config.max_batch):
        statuses, _ = remove(state, matching[start:start + state.config.max_batch], force,
                             now_s)
        num_removed += statuses.count(ITEM_OK)
    return num_removed, len(matching) - num_removed + num_pending


def pin(state, keys, ttl_s: float, hard: bool, now_s: float):
    """Hard pin, or soft pin until ``now + ttl_s`` (lengthens only; on a PENDING object the
    pin counts from put_end). Per key: ITEM_OK or ITEM_NOT_FOUND. Idempotent."""
    check_batch(len(keys), state.config.max_batch)
    if not hard and ttl_s <= 0:
        raise invalid("a soft pin needs ttl_ms > 0")
    statuses = []
    for key in keys:
        obj = state.objects.get(key) or state.pending.get(key)
        if obj is None:
            statuses.append(ITEM_NOT_FOUND)
        elif hard:
            obj.hard_pin = True
            statuses.append(ITEM_OK)
        else:
            if obj.state is PENDING:
                obj.soft_pin_ttl_s = max(obj.soft_pin_ttl_s, ttl_s)
            obj.soft_pin_until_s = max(obj.soft_pin_until_s, now_s + ttl_s)
            statuses.append(ITEM_OK)
    return statuses


def unpin(state, keys):
    """Clear hard and soft pins. Per key: ITEM_OK or ITEM_NOT_FOUND. Idempotent."""
    check_batch(len(keys), state.config.max_batch)
    statuses = []
    for key in keys:
        obj = state.objects.get(key) or state.pending.get(key)
        if obj is None:
            statuses.append(ITEM_NOT_FOUND)
            continue
        obj.hard_pin = False
        obj.soft_pin_until_s = obj.soft_pin_ttl_s = 0.0
        statuses.append(ITEM_OK)
    return statuses
