"""Pre-writing a fresh SSD data file: zeros written over its preallocated space in the
background, so puts write into extents that are already written.

Why: ``posix_fallocate`` leaves *unwritten* extents, and every O_DIRECT write into one
converts it to written at I/O completion (filesystem metadata, which the put's fdatasync then
has to commit to the journal). Measured on the build machine's ext4 on virtio, interleaved,
five runs (bench/ssd_extents_bench.py): a 4 MiB put's write (1 MiB pieces, 4 in flight) took
2.1-2.7 ms (medians) into unwritten extents against 1.4-1.9 ms into written ones, and its
data + index fdatasync 0.27-0.33 ms against 0.21-0.26 ms (bench/RESULTS.md, "SSD single puts
(9s)").
``FALLOC_FL_WRITE_ZEROES`` (Linux 6.17) would give written extents at once but needs a device
that offloads zeroing (the build machine's virtio disk answers EOPNOTSUPP), so zeros are
written, once per data file.

Resumed after a stop (``start_bytes``): the pass notes how far it got (``save_progress``, every
PROGRESS_EVERY_REGIONS regions and when it stops or ends; ``ssd_files.PREWRITE_NAME``), and a
daemon restarted on the directory goes on from there, after claiming the extents of every
object it recovered from its index, so no zero lands on a stored object. Regions between the
last note and a SIGKILL are zeroed again unless an object recovered there claims them: what
else lies there belongs to no object (a put the index does not list was never acknowledged,
and the master drops the previous incarnation's replicas when the restarted daemon
registers). A data file without a progress note (a crash between creating the file and
writing the note, or a directory of an older version) is not pre-written.

Rule (``Prewriter``): the file is cut into REGION_BYTES regions, pre-written in order, one
region at a time (so puts keep most of the disk meanwhile). Every write of the backend calls
``claim(offset, length)`` first: a region not yet reached is marked *claimed* and the
pre-writer skips it (it stays unwritten: correct, only not faster); a region being zeroed
right now makes the caller wait until that region's zeros are written, so no zero ever lands
on a byte a put wrote. Reads need nothing: unwritten extents and zeros read the same.

Only with O_DIRECT (``SsdBackend``): through the page cache the zeros would cost memory and
buy nothing measured. Errors: an OSError of the pre-writer's own writes ends the pass
(logged), as does one of ``save_progress`` (logged; the next start then resumes from the
last note that was saved); callers of ``claim`` never see either.
"""

from __future__ import annotations

import logging
import mmap
import os
import threading
import time
from typing import Callable

from kvstore.daemon.aligned_io import AlignedFile

REGION_BYTES = 8 << 20
PROGRESS_EVERY_REGIONS = 32     # a note per 256 MiB zeroed: what a SIGKILL may redo

log = logging.getLogger("kvstore.daemon.ssd")

_CLAIMED, _ZEROING, _DONE = 1, 2, 3


class Prewriter:
    """Writes zeros over ``file``'s first ``file_bytes`` bytes (a multiple of the block
    size) from ``start_bytes`` on (rounded down to a region), on a thread of its own,
    skipping what ``claim`` marked. ``save_progress(next_bytes)``, if given, is called with
    the offset below which every region is zeroed or claimed: every
    PROGRESS_EVERY_REGIONS regions, and when the pass stops or ends (then with
    ``file_bytes``). ``done`` is set when the pass ended (complete, stopped or failed).
    Thread-safe."""

    def __init__(self, file: AlignedFile, file_bytes: int, *, start_bytes: int = 0,
                 save_progress: Callable[[int], None] | None = None):
        self._file = file
        self._file_bytes = file_bytes
        self._num_regions = -(-file_bytes // REGION_BYTES)
        self._first_region = min(max(0, start_bytes) // REGION_BYTES, self._num_regions)
        self._save_progress = save_progress
        self._state = bytearray(self._num_regions)   # 0: not reached yet
        self._state[:self._first_region] = bytes([_DONE]) * self._first_region
        self._changed = threading.Condition()
        self._stop = threading.Event()
        self.done = threading.Event()
        self.num_zeroed_bytes = 0
        self._thread = threading.Thread(target=self._run, name="kvstore-ssd-prewrite",
                                        daemon=True)

    def start(self) -> None:
        self._thread.start()

    def claim(self, offset: int, length: int) -> None:
        """Before a write of [offset, +length): mark the regions it touches as the
        caller's; returns once none of them is being zeroed."""
        if length <= 0 or self.done.is_set():
            return
        first = offset // REGION_BYTES
        last = min((offset + length - 1) // REGION_BYTES, self._num_regions - 1)
        with self._changed:
            for region in range(first, last + 1):
                while self._state[region] == _ZEROING:
                    self._changed.wait()
                if self._state[region] == 0:
                    self._state[region] = _CLAIMED

    def close(self) -> None:
        """Stop the pass (the region being zeroed is finished first) and wait for it."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _run(self) -> None:
        started = time.monotonic()
        zeros = mmap.mmap(-1, REGION_BYTES)   # NOTE: page-aligned zeros, as O_DIRECT needs
        if self._first_region:
            log.info("SSD: resuming the pre-write at %d MiB of %d",
                     (self._first_region * REGION_BYTES) >> 20, self._file_bytes >> 20)
        try:
            for region in range(self._first_region, self._num_regions):
                if self._stop.is_set():
                    self._note_progress(region * REGION_BYTES)
                    log.info("SSD: pre-writing stopped at %d MiB of %d (%d MiB zeroed now)",
                             (region * REGION_BYTES) >> 20, self._file_bytes >> 20,
                             self.num_zeroed_bytes >> 20)
                    return
                if region > self._first_region and \
                        (region - self._first_region) % PROGRESS_EVERY_REGIONS == 0:
                    self._note_progress(region * REGION_BYTES)
                with self._changed:
                    if self._state[region]:
                        continue          # claimed by a write: left as it is
                    self._state[region] = _ZEROING
                start = region * REGION_BYTES
                num_bytes = min(REGION_BYTES, self._file_bytes - start)
                try:
                    self._write_zeros(memoryview(zeros)[:num_bytes], start)
                finally:
                    with self._changed:
                        self._state[region] = _DONE
                        self._changed.notify_all()
                self.num_zeroed_bytes += num_bytes
            self._note_progress(self._file_bytes)
            log.info("SSD: data file pre-written (%d MiB of zeros in %.1f s)",
                     self.num_zeroed_bytes >> 20, time.monotonic() - started)
        except OSError as exc:
            log.warning("SSD: pre-writing the data file failed after %d MiB: %s",
                        self.num_zeroed_bytes >> 20, exc)
        finally:
            # NOTE: the mapping is left to the collector: slices of it may still be
            # referenced by the frame of an OSError being logged
            self.done.set()

    def _note_progress(self, next_bytes: int) -> None:
        """``save_progress(next_bytes)``; its OSError propagates (it ends the pass)."""
        if self._save_progress is not None:
            self._save_progress(next_bytes)

    def _write_zeros(self, data: memoryview, offset: int) -> None:
        while len(data):
            written = os.pwritev(self._file.fd, [data], offset)
            data, offset = data[written:], offset + written
