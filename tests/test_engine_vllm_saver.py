"""AsyncSaver (kvstore.engine.vllm_saver): the vLLM connector's background save thread. The save
function is injected; here it is gated by events so each test decides when a save ends."""

from __future__ import annotations

import threading

import pytest

from kvstore import ClosedError, InvalidArgumentError
from kvstore.engine.results import SaveResult
from kvstore.engine.vllm_saver import AsyncSaver, SaveJob


class GatedSave:
    """A save function that blocks until its job's gate opens; records what it ran."""

    def __init__(self, fail: set[str] = frozenset()):
        self.gates: dict[str, threading.Event] = {}
        self.started: list[str] = []
        self.fail = fail

    def gate(self, request_id: str) -> threading.Event:
        return self.gates.setdefault(request_id, threading.Event())

    def __call__(self, job: SaveJob) -> SaveResult:
        self.started.append(job.request_id)
        assert self.gate(job.request_id).wait(30)
        if job.request_id in self.fail:
            raise RuntimeError("the store refused it")
        return SaveResult(len(job.block_ids), 100 * len(job.block_ids), [])


@pytest.fixture
def saved():
    results: list = []
    save = GatedSave(fail={"bad"})
    saver = AsyncSaver(save, on_saved=lambda result, seconds: results.append(result))
    yield saver, save, results
    for gate in save.gates.values():
        gate.set()
    saver.close()


def test_a_request_is_reported_once_both_the_engine_and_its_save_are_done(saved) -> None:
    saver, save, results = saved
    saver.submit(SaveJob("a", [1, 2], [4, 5]))
    assert saver.finished(set()) == set()  # saving, and the engine has not finished it
    assert saver.finished({"a", "never-saved"}) == set()  # finished, but still saving
    save.gate("a").set()
    assert saver.wait_for({"a"})
    assert saver.finished(set()) == {"a"}  # the engine said so in an earlier call
    assert saver.finished({"a"}) == set()  # reported once
    assert results == [SaveResult(2, 200, [])]


def test_a_save_that_ends_before_the_request_is_reported_when_the_engine_finishes_it(
        saved) -> None:
    saver, save, _ = saved
    save.gate("b").set()
    saver.submit(SaveJob("b", [1], [0]))
    assert saver.wait_for({"b"})
    assert saver.finished(set()) == set()  # done saving, but the engine still runs it
    assert saver.finished({"b"}) == {"b"}


def test_a_failed_save_is_reported_finished_and_passed_on_as_none(saved) -> None:
    saver, save, results = saved
    save.gate("bad").set()
    saver.submit(SaveJob("bad", [1], [0]))
    assert saver.wait_for({"bad"})
    assert saver.finished({"bad"}) == {"bad"}  # its pages may be freed: nothing is pending
    assert results == [None]


def test_saves_run_in_submit_order_and_wait_for_waits_for_the_named_ones(saved) -> None:
    saver, save, _ = saved
    for request_id in ("x", "y", "x"):
        saver.submit(SaveJob(request_id, [1], [0]))
    assert saver.num_pending() == 3
    assert not saver.wait_for({"x"}, timeout_s=0.05)  # all gated
    save.gate("x").set()
    save.gate("y").set()
    assert saver.wait_for({"x", "y"})
    assert save.started == ["x", "y", "x"] and saver.num_pending() == 0
    assert saver.finished({"x", "y"}) == {"x", "y"}


def test_close_waits_for_pending_saves_and_later_submits_raise(saved) -> None:
    saver, save, results = saved
    saver.submit(SaveJob("c", [1], [0]))
    save.gate("c").set()
    assert saver.close()
    assert len(results) == 1 and saver.num_pending() == 0
    with pytest.raises(ClosedError):
        saver.submit(SaveJob("d", [1], [0]))
    assert saver.close()  # idempotent


def test_max_pending_must_be_positive() -> None:
    with pytest.raises(InvalidArgumentError, match="max_pending"):
        AsyncSaver(lambda job: None, max_pending=0)
