"""``kvstore.ha.watch.KeyWatch`` against a real etcd (issue 10): it reports every write and
delete of its key, reports nothing it missed as nothing (an etcd outage ends with a "look
again" call and a stream that resumes after the last revision seen), and closes at once."""

from __future__ import annotations

import threading
import time

from kvstore.ha.etcd import EtcdClient
from kvstore.ha.watch import KeyWatch

KEY = b"/kvstore/w/leader"


class _Counter:
    def __init__(self):
        self.count = 0
        self._cond = threading.Condition()

    def __call__(self):
        with self._cond:
            self.count += 1
            self._cond.notify_all()

    def wait_above(self, count: int, what: str, timeout_s: float = 20.0) -> None:
        with self._cond:
            assert self._cond.wait_for(lambda: self.count > count, timeout_s), what


def _wait(predicate, what: str, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)  # the watch thread's state: set from another thread


def test_watch_reports_writes_and_deletes_of_its_key(etcd):
    client = EtcdClient(etcd.url)
    calls = _Counter()
    watch = KeyWatch(etcd.url, KEY, calls).start()
    try:
        _wait(lambda: watch.healthy, "the watch stream to open")
        seen = calls.count
        client.put(KEY, b"one")
        calls.wait_above(seen, "no call for a write")
        seen = calls.count
        client.delete(KEY)
        calls.wait_above(seen, "no call for a delete")
        # a write of ours right after one of another key is reported too
        seen = calls.count
        client.put(b"/kvstore/w/other", b"x")
        client.put(KEY, b"two")
        calls.wait_above(seen, "no call for the second write")
    finally:
        watch.close()
    assert not watch.healthy


def test_watch_resumes_after_an_etcd_outage_without_missing_a_change(etcd):
    client = EtcdClient(etcd.url)
    calls = _Counter()
    watch = KeyWatch(etcd.url, KEY, calls).start()
    try:
        _wait(lambda: watch.healthy, "the watch stream to open")
        client.put(KEY, b"before")
        etcd.stop()
        _wait(lambda: not watch.healthy, "the watch to notice the outage")
        etcd.start()
        _wait(lambda: watch.healthy, "the watch to resume")
        seen = calls.count
        client.put(KEY, b"after")
        calls.wait_above(seen, "no call for a write after the outage")
    finally:
        watch.close()


def test_watch_on_an_etcd_that_does_not_answer_stays_unhealthy_and_closes():
    calls = _Counter()
    watch = KeyWatch("http://127.0.0.1:1", KEY, calls).start()
    calls.wait_above(0, "a failed stream must say 'look again'")
    assert not watch.healthy
    started = time.monotonic()
    watch.close()
    assert time.monotonic() - started < 5
