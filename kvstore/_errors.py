"""The one exception tree of kvstore.

    KVStoreError                     root: catch this to catch everything kvstore raises
    ├── InvalidArgumentError         a caller's argument is wrong (bad key, size, dtype, shape)
    ├── KeyNotFoundError             no complete object under the key
    ├── CapacityError                no space left, even after eviction
    ├── AuthenticationError          missing or wrong token; a refused TLS handshake
    ├── ClosedError                  you closed this store/connection and then used it
    ├── ChecksumError                bytes read do not match the object's checksum
    ├── TransferError                moving bytes failed (peer died, network, deadline)
    │   └── TransferTimeoutError     a transfer ran past its deadline
    ├── MasterUnavailableError       the metadata master cannot be reached
    └── ConfigError                  a process configuration (CLI flag, config field) is invalid

Transports and RPC wrappers map the errors of lower libraries (gRPC, OS, NIXL) into this tree
once, at their boundary, chaining the original with ``raise ... from exc``.
"""

from __future__ import annotations

from typing import Sequence


class KVStoreError(Exception):
    """Root of every error kvstore raises.

    ``keys`` names the keys the failure concerns (empty when it concerns none), so an engine
    can recompute exactly those blocks.
    """

    def __init__(self, message: str, *, keys: Sequence[str] = ()):
        super().__init__(message)
        self.keys = list(keys)


class InvalidArgumentError(KVStoreError, ValueError):
    """An argument is invalid: empty or over-long key, bad size, wrong dtype/shape/device."""


class KeyNotFoundError(KVStoreError, KeyError):
    """No COMPLETE object exists under the key (never written, removed, evicted, or pending)."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class CapacityError(KVStoreError):
    """The pool has no space for the object, even after evicting what may be evicted."""


class AuthenticationError(KVStoreError):
    """The master or a daemon refused the token (missing or wrong), or a TLS handshake
    failed (a certificate that does not verify, a missing client certificate, TLS on one
    side only)."""


class ClosedError(KVStoreError):
    """The store or connection was closed by its owner and used afterwards."""


class ChecksumError(KVStoreError):
    """Bytes read do not match the checksum recorded when the object was put."""


class TransferError(KVStoreError):
    """Moving bytes to or from a node failed: the peer died, the network broke, or the
    node refused the range. The cause, if any, is in ``__cause__``."""


class TransferTimeoutError(TransferError, TimeoutError):
    """A transfer did not finish before its deadline."""


class MasterUnavailableError(KVStoreError):
    """The metadata master cannot be reached (not running, wrong address, or deadline)."""


class ConfigError(KVStoreError, ValueError):
    """A configuration value (CLI flag or config dataclass field) is invalid."""
