"""Group commit across connections (issue 9, 9s): commits arriving on different connections
share the SSD backend's sync rounds instead of taking turns under the object table's lock,
and two puts acknowledged at the same time both survive a SIGKILL right after."""

from __future__ import annotations

import threading

import numpy as np

from servers import ServerProcess

import kvstore
from kvstore.client.checksum import checksum
from kvstore.daemon.objects import CODEC_RAW, ObjectTable, StoredObject
from kvstore.daemon.ssd import INDEX_NAME, SsdBackend
from kvstore.daemon.ssd_index import load_index

from test_daemon_ssd import _changes, _daemon, _wait_served


def _bytes(size: int, seed: int) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8).tobytes()


class _HeldFirstSync(SsdBackend):
    """An SSD backend whose first ``sync`` waits (after its records are noted) until
    ``release`` is set (``first_entered``, ``second_entered``: the first two syncs began)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.release = threading.Event()
        self.first_entered = threading.Event()
        self.second_entered = threading.Event()
        self._calls = 0
        self._calls_lock = threading.Lock()

    def sync(self) -> None:
        with self._calls_lock:
            self._calls += 1
            call = self._calls
        if call == 1:
            self.first_entered.set()
            assert self.release.wait(30), "the first sync was never released"
        elif call == 2:
            self.second_entered.set()
        super().sync()


def _commit(table: ObjectTable, key: str, offset: int, value: bytes) -> list:
    return table.commit_from_client(
        [(0, key, StoredObject("ssd0", offset, len(value), checksum(value), CODEC_RAW), 0)])


def test_a_commit_on_another_connection_syncs_while_one_is_syncing(tmp_path):
    """The object table no longer holds its lock across the sync: a second client commit
    reaches the backend's sync while the first is still in it (before: it waited for the
    lock), and each returns only with its record in the index on disk."""
    backend = _HeldFirstSync("ssd0", 8 << 20, directory=str(tmp_path), node_id="n1")
    table = ObjectTable([backend])
    a, b = _bytes(70_000, 1), _bytes(90_000, 2)
    backend.write_from(0, memoryview(a))
    backend.write_from(1 << 20, memoryview(b))
    results: dict[str, list] = {}
    first = threading.Thread(target=lambda: results.setdefault("a", _commit(table, "a", 0, a)))
    second = threading.Thread(
        target=lambda: results.setdefault("b", _commit(table, "b", 1 << 20, b)))
    try:
        first.start()
        assert backend.first_entered.wait(30)
        second.start()
        assert backend.second_entered.wait(30), "the second commit waited for the first"
        assert "a" not in results                  # the first is still held in its sync
        second.join(30)
        assert results.get("b") == []              # accepted, and durable on return:
        assert "b" in load_index(str(tmp_path / INDEX_NAME))[0]
    finally:
        backend.release.set()
        first.join(30)
        second.join(30)
    assert results == {"a": [], "b": []}
    assert sorted(load_index(str(tmp_path / INDEX_NAME))[0]) == ["a", "b"]
    backend.close()


def test_a_change_set_is_acked_only_after_its_sync(tmp_path):
    """``apply`` still syncs before it names the change set's sequence as acknowledged
    (the heartbeat's ack and the push's answer), while a client commit meanwhile is not
    held up by it."""
    backend = _HeldFirstSync("ssd0", 8 << 20, directory=str(tmp_path), node_id="n1")
    table = ObjectTable([backend])
    a, b = _bytes(50_000, 3), _bytes(60_000, 4)
    backend.write_from(0, memoryview(a))
    backend.write_from(1 << 20, memoryview(b))
    applying = threading.Thread(target=table.apply,
                                args=(_changes(1, [("a", "ssd0", 0, a)]),))
    try:
        applying.start()
        assert backend.first_entered.wait(30)
        committing = threading.Thread(target=_commit, args=(table, "b", 1 << 20, b))
        committing.start()
        assert backend.second_entered.wait(30)
        committing.join(30)
        assert "b" in load_index(str(tmp_path / INDEX_NAME))[0]
        assert table.acked_seq == 0                # a's sync has not returned yet
    finally:
        backend.release.set()
        applying.join(30)
        committing.join(30)
    assert table.acked_seq == 1
    assert sorted(load_index(str(tmp_path / INDEX_NAME))[0]) == ["a", "b"]
    backend.close()


def test_a_change_set_naming_a_client_commit_still_syncing_waits_for_its_record(tmp_path):
    """The master's copy of a client commit arrives while that commit's sync is still
    running: the change set finds the entry identical, yet it is acknowledged only once the
    entry's index record is durable (its own sync covers it)."""
    backend = _HeldFirstSync("ssd0", 8 << 20, directory=str(tmp_path), node_id="n1")
    table = ObjectTable([backend])
    a = _bytes(80_000, 5)
    backend.write_from(0, memoryview(a))
    committing = threading.Thread(target=_commit, args=(table, "a", 0, a))
    try:
        committing.start()
        assert backend.first_entered.wait(30)
        table.apply(_changes(1, [("a", "ssd0", 0, a)]))
        assert table.acked_seq == 1
        assert "a" in load_index(str(tmp_path / INDEX_NAME))[0]
    finally:
        backend.release.set()
        committing.join(30)
    backend.close()


def test_concurrent_puts_on_two_connections_both_survive_a_sigkill_after_their_ack(tmp_path):
    """Two clients put at the same moment (their commits share sync rounds); the daemon is
    SIGKILLed as soon as both puts of a round returned, and every acknowledged object is
    served with its bytes by the daemon restarted on the same directory."""
    with ServerProcess(["master", "--port", "0", "--heartbeat-interval", "100ms"]) as master:
        daemon = _daemon(master, tmp_path)
        values = {f"pair{r}/{side}": _bytes(1 << 20, 10 * r + side)
                  for r in range(6) for side in (0, 1)}
        stores = [kvstore.connect(master.address, transport="tcp") for _ in range(2)]
        try:
            for r in range(6):
                barrier = threading.Barrier(2)
                errors: list[BaseException] = []

                def put(side: int) -> None:
                    key = f"pair{r}/{side}"
                    barrier.wait(10)
                    try:
                        stores[side].put(key, values[key], tier="ssd")
                    except BaseException as exc:  # noqa: BLE001 - asserted below
                        errors.append(exc)
                threads = [threading.Thread(target=put, args=(side,)) for side in (0, 1)]
                for thread in threads:
                    thread.start()
                for thread in threads:
                    thread.join(60)
                assert errors == []
            daemon.kill()  # SIGKILL right after the last two puts were acknowledged
            daemon.close()
            with _daemon(master, tmp_path):
                _wait_served(stores[0], "pair5/1")
                for key, value in values.items():
                    assert stores[0].get(key) == value, key
        finally:
            for store in stores:
                store.close()
