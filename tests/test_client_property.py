"""Property: whatever batch of keys and values is put (duplicates, empties, odd sizes), every
key reads back the first value put under it, through both transports."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kvstore


@pytest.fixture(scope="module")
def stores():
    # short leases: removed objects' space is freed only once their read leases lapse
    store = kvstore.local(dram="128MiB", lease_ttl_s=0.5)
    tcp = kvstore.connect(store.address, transport="tcp", lease_ttl_s=0.5)
    yield store, tcp
    tcp.close()
    store.close()


keys = st.text(alphabet="abcé/-_0", min_size=1, max_size=12)
values = st.one_of(st.binary(max_size=300), st.integers(0, 200_000).map(lambda n: b"\x5a" * n))


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batch=st.lists(st.tuples(keys, values), max_size=12), salt=st.uuids())
def test_batches_read_back_the_first_value_of_each_key(stores, batch, salt):
    store, tcp = stores
    names = [f"prop/{salt}/{key}" for key, _ in batch]
    assert store.batch_put(names, [value for _, value in batch]) == [None] * len(batch)
    first: dict[str, bytes] = {}
    for name, (_, value) in zip(names, batch):
        first.setdefault(name, value)
    expected = [first[name] for name in names]
    assert store.batch_get(names) == expected
    assert tcp.batch_get(names) == expected
    outs = [bytearray(len(value) + 1) for value in expected]
    assert tcp.batch_get_into(names, outs) == [len(value) for value in expected]
    assert [bytes(out[:len(value)]) for out, value in zip(outs, expected)] == expected
    assert store.remove_prefix(f"prop/{salt}/", force=True) == len(first)
