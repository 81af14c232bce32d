"""The master's native key index (``kvstore.master._keyindex.KeyIndex``) and the table that
mirrors the COMPLETE objects into it (``kvstore.master.keytable.KeyTable``): against a dict
model, on bad input, for references (nothing leaked, cycles collected), and through a real
``kvstore master`` over both carriers (batch reads answer exactly what key-by-key reads do,
across removes, re-puts and a node's death)."""

from __future__ import annotations

import gc
import random
import weakref

import pytest

from kvstore.master._keyindex import KeyIndex
from kvstore.master.keytable import KeyTable
from kvstore.v1 import master_pb2 as pb
from master_helpers import exists, get, master_process, put, raw_client, register


class _Value:
    """A value that can be weakly referenced (to see when the index lets it go)."""


def _assert_mirrors(table: KeyTable, probe_keys) -> None:
    assert len(table.index) == len(table)
    keys = list(probe_keys) + list(table)
    assert table.index.get_many(keys) == [table.get(k) for k in keys]
    assert table.index.contains_many(keys) == [k in table for k in keys]


# -- KeyIndex against a dict model ------------------------------------------------------------

def test_index_follows_a_dict_through_random_sets_and_discards():
    rng = random.Random(7)
    universe = [f"bench/model/L{i % 32}/{i:08x}" for i in range(6000)] + ["", "é", "キー"]
    index, model = KeyIndex(), {}
    for step in range(40_000):
        key = rng.choice(universe)
        if rng.random() < 0.55:
            value = step
            index.set(key, value)
            model[key] = value
        else:
            assert index.discard(key) is (key in model)
            model.pop(key, None)
        if step % 5000 == 0:      # the table grew and shifted runs back many times by now
            batch = rng.sample(universe, 512)
            assert index.get_many(batch) == [model.get(k) for k in batch]
    assert len(index) == len(model)
    assert index.get_many(universe) == [model.get(k) for k in universe]
    assert index.contains_many(universe) == [k in model for k in universe]
    assert [index.get(k) for k in universe[:100]] == [model.get(k) for k in universe[:100]]


def test_index_takes_any_sequence_and_equal_text_from_distinct_objects():
    index = KeyIndex()
    stored = "".join(["k", "ey"])            # built at run time: not the literal's object
    index.set(stored, 1)
    request = pb.ExistsRequest(keys=["key", "nope"])   # a protobuf repeated field of str
    assert index.contains_many(request.keys) == [True, False]
    assert index.get_many(("key",)) == [1]
    assert index.get_many([]) == [] and index.contains_many(iter(())) == []


def test_index_reads_a_generator_that_changes_it_first():
    index = KeyIndex()
    index.set("a", 1)

    def keys_clearing_the_index():
        yield "a"
        index.clear()             # runs while get_many takes its keys
        index.set("b", 2)
        yield "b"

    assert index.get_many(keys_clearing_the_index()) == [None, 2]


def test_index_refuses_non_str_keys_and_non_sequences_without_change():
    index = KeyIndex()
    index.set("a", 1)
    for bad in (b"a", 1, None):
        with pytest.raises(TypeError, match="keys must be str"):
            index.set(bad, 2)
        with pytest.raises(TypeError, match="keys must be str"):
            index.get_many(["a", bad])
        with pytest.raises(TypeError, match="keys must be str"):
            index.discard(bad)
    with pytest.raises(TypeError):
        index.contains_many(5)
    with pytest.raises(TypeError):
        index.set("only-a-key")
    with pytest.raises(TypeError, match="mapping must be a dict"):
        index.store([], "a", 1)
    assert len(index) == 1 and index.get_many(["a"]) == [1]


class _Row:
    __slots__ = ("row", "other")


def test_index_following_a_slot_answers_the_same_for_any_values():
    index = KeyIndex(follow=_Row.row)
    with_tuple, with_list, unset, plain = _Row(), _Row(), _Row(), _Value()
    with_tuple.row = (1, "two", 3.0)
    with_list.row = [1]
    unset.other = 5                       # ``row`` never set: nothing to follow
    values = {"t": with_tuple, "l": with_list, "u": unset, "p": plain, "i": 7}
    for key, value in values.items():
        index.set(key, value)
    keys = list(values) + ["missing"]
    assert index.get_many(keys) == [values.get(k) for k in keys]
    assert with_tuple.row == (1, "two", 3.0) and not hasattr(unset, "row")


@pytest.mark.parametrize("bad", [5, "row", int.real, property(lambda self: 1)])
def test_index_refuses_a_follow_that_is_not_an_object_slot(bad):
    with pytest.raises(TypeError, match="follow must be an object slot"):
        KeyIndex(follow=bad)


def test_index_holds_values_until_replaced_discarded_or_cleared():
    index = KeyIndex()
    first, second, third = _Value(), _Value(), _Value()
    refs = [weakref.ref(v) for v in (first, second, third)]
    index.set("a", first)
    index.set("a", second)         # replaces: the first value is let go
    index.set("b", third)
    del first, second, third
    assert refs[0]() is None and refs[1]() is not None
    index.discard("a")
    assert refs[1]() is None and refs[2]() is not None
    index.clear()
    assert refs[2]() is None and len(index) == 0
    index.set("c", 3)              # usable after clear
    assert index.get("c") == 3


def test_a_table_in_a_reference_cycle_is_collected():
    value = _Value()
    table = KeyTable()
    table["k"] = value
    value.table = table            # value -> table -> index -> value
    ref = weakref.ref(value)
    del value, table
    gc.collect()
    assert ref() is None


# -- KeyTable: every dict mutator keeps the index equal ---------------------------------------

def test_table_mirrors_every_dict_mutation():
    table = KeyTable({"a": 1}, b=2)
    probe = ["a", "b", "c", "d", "e", "f"]
    _assert_mirrors(table, probe)
    table["c"] = 3
    table["a"] = 10
    del table["b"]
    _assert_mirrors(table, probe)
    assert table.pop("c") == 3 and table.pop("c", None) is None
    with pytest.raises(KeyError):
        table.pop("c")
    with pytest.raises(KeyError):
        del table["zz"]
    assert table.setdefault("d", 4) == 4 and table.setdefault("d", 5) == 4
    table.update({"e": 5}, f=6)
    table |= {"g": 7}
    table.store("h", 8)                  # put_end's one-call form of table["h"] = 8
    table.store("a", 11)
    assert table["h"] == 8 and table["a"] == 11
    with pytest.raises(TypeError):
        table.store(b"h", 9)
    _assert_mirrors(table, probe + ["g", "h"])
    key, _ = table.popitem()
    assert key not in table and table.index.get(key) is None
    _assert_mirrors(table, probe + ["g", "h"])
    table.clear()
    assert len(table.index) == 0
    _assert_mirrors(table, probe)


def test_table_refuses_a_non_str_key_leaving_both_unchanged():
    table = KeyTable(a=1)
    with pytest.raises(TypeError):
        table[b"a"] = 2
    assert dict(table) == {"a": 1}
    _assert_mirrors(table, ["a"])


# -- through a real master, both carriers -----------------------------------------------------

@pytest.fixture(scope="module")
def master():
    with master_process() as started:
        yield started


@pytest.mark.parametrize("carrier", ["grpc", "fast"])
def test_batch_reads_equal_key_by_key_reads_across_changes(master, carrier):
    prefix = f"kt-{carrier}/"
    keys = [f"{prefix}{i:04d}" for i in range(300)]
    with raw_client(master, carrier) as client:
        register(client, f"kt-node-{carrier}")
        put(client, keys[:200])
        put(client, keys[200:250], end=False)             # PENDING: absent to readers
        client.call("Remove", pb.RemoveRequest(keys=keys[:20], force=True))
        put(client, keys[5:10])                           # removed, then stored again
        expected = [i < 5 or 10 <= i < 20 or i >= 200 for i in range(300)]
        expected = [not gone for gone in expected]
        assert exists(client, keys) == expected
        assert [exists(client, [k])[0] for k in keys[:30]] == expected[:30]
        reply = get(client, keys)
        statuses = list(reply.statuses)
        assert [s == pb.ITEM_OK for s in statuses] == expected
        assert statuses[200:250] == [pb.ITEM_PENDING] * 50
        assert statuses[250:] == [pb.ITEM_NOT_FOUND] * 50
        one_by_one = [get(client, [k]) for k in keys[:30]]
        assert [r.statuses[0] for r in one_by_one] == statuses[:30]
        assert [r.sizes[0] for r in one_by_one] == list(reply.sizes[:30])
        client.call("UnregisterNode", pb.UnregisterNodeRequest(node_id=f"kt-node-{carrier}"))
        assert exists(client, keys) == [False] * 300      # the node's objects went with it
        assert list(get(client, keys[:10]).statuses) == [pb.ITEM_NOT_FOUND] * 10


@pytest.mark.parametrize("carrier", ["grpc", "fast"])
def test_batch_reads_refuse_a_bad_key_and_keep_the_state(master, carrier):
    prefix = f"kt-bad-{carrier}/"
    with raw_client(master, carrier) as client:
        register(client, f"kt-bad-node-{carrier}")
        put(client, [f"{prefix}a"])
        with pytest.raises(Exception, match="key"):
            exists(client, [f"{prefix}a", ""])
        reply = get(client, [f"{prefix}a", ""])
        assert list(reply.statuses) == [pb.ITEM_OK, pb.ITEM_INVALID]
        assert exists(client, [f"{prefix}a"]) == [True]
