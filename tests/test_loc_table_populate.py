"""The shm location table's pages are populated ahead of the first publish (issue 15, 15u):
a publish into a page nobody wrote was a first-touch fault on every WRITE_COMMIT's reply.
Real POSIX shm; residency read from /proc/self/smaps (the kernel's count, no mock)."""

from __future__ import annotations

import time

from kvstore import _copy_hash as _c
from kvstore import _loc_table as lt
from kvstore._posix_shm import unique_shm_name
from kvstore.daemon.shm_locations import ShmLocationTable


def _resident_bytes(shm_name: str) -> int:
    """Rss of this process's mapping of ``shm_name`` (0 if not mapped)."""
    found, rss_kib = False, 0
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            if not line[0].isupper():       # a mapping's header line: "addr-addr perms ..."
                found = line.rstrip().endswith(shm_name.lstrip("/")) or \
                    line.rstrip().endswith(shm_name.lstrip("/") + " (deleted)")
            elif found and line.startswith("Rss:"):
                rss_kib += int(line.split()[1])
    return rss_kib * 1024


def test_a_new_table_is_populated_in_the_background_and_close_stops_it():
    segment_name = unique_shm_name("kvstore-test")
    table = ShmLocationTable(segment_name, 1 << 30)     # 262,144 slots: 12 MiB
    try:
        table.stored("early", 4096, 100, 7)             # most likely before its page is
        size = lt.table_bytes(lt.num_slots_for(1 << 30))
        deadline = time.monotonic() + 60
        while _resident_bytes(table.name) < size - 4096:
            assert time.monotonic() < deadline, \
                f"{_resident_bytes(table.name)} of {size} bytes resident after 60 s"
            time.sleep(0.05)   # NOTE: the populating thread's progress, not a clock we own
        # populating kept what was published before it reached the slot's page
        read = _c.loc_read(table._address, 4096)
        assert read is not None and read[2] == lt.key_hash("early") and read[3:5] == (100, 7)
    finally:
        table.close()
    assert not table._populator.is_alive()
    table.close()                                        # idempotent
