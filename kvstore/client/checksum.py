"""Object checksums, and the encoding of empty values.

Checksum: XXH3-64 (``xxhash.xxh3_64``) of an object's bytes, computed once on put and stored
by the master with the object. NOTE: XXH3 rather than classic XXH64 because it hashes at about
5x the speed (46 vs 9 GB/s measured on the dev machine), so checksumming every put costs a
fraction of the copy instead of more than the copy.

Empty values: the master requires every object to have size > 0, so an empty value is stored
as a one-byte object (one zero byte) whose recorded checksum is the checksum of ``b""``. No
one-byte value hashes to that (``tests/test_client_checksum.py`` checks all 256), so a reader
that sees size 1 with that checksum knows the value is empty and skips the transfer.
"""

from __future__ import annotations

import xxhash

checksum = xxhash.xxh3_64_intdigest
"""checksum(buffer) -> int: the 64-bit checksum of any C-contiguous buffer's bytes."""

EMPTY_CHECKSUM = checksum(b"")
EMPTY_PLACEHOLDER = memoryview(b"\x00")  # what is stored for an empty value
EMPTY_STORED_SIZE = len(EMPTY_PLACEHOLDER)


def is_empty_marker(size: int, stored_checksum: int) -> bool:
    """True when a stored (size, checksum) pair encodes an empty value."""
    return size == EMPTY_STORED_SIZE and stored_checksum == EMPTY_CHECKSUM
