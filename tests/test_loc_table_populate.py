"""The shm location table's pages are populated ahead of the first publish (issue 15, 15u;
issue 10, 10d2):
a publish into a page nobody wrote was a first-touch fault on every WRITE_COMMIT's reply.
Real POSIX shm; residency read from /proc/self/smaps (the kernel's count, no mock)."""

from __future__ import annotations

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


def test_a_new_table_is_resident_before_its_first_publish():
    segment_name = unique_shm_name("kvstore-test")
    table = ShmLocationTable(segment_name, 1 << 30)     # 262,144 slots: 12 MiB
    try:
        size = lt.table_bytes(lt.num_slots_for(1 << 30))
        assert _resident_bytes(table.name) >= size - 4096
        table.stored("early", 4096, 100, 7)
        read = _c.loc_read(table._address, 4096)
        assert read is not None and read[2] == lt.key_hash("early") and read[3:5] == (100, 7)
    finally:
        table.close()
    assert _resident_bytes(table.name) == 0             # unmapped
    table.close()                                        # idempotent
