"""Deterministic store keys for chunks of a token sequence (prefix-chunk keys).

A key names the KV cache of one chunk of ``chunk_size`` tokens *given everything before it*:
the hash of chunk ``i`` is chained over the hash of chunk ``i - 1``. Two requests that share
their first ``n`` full chunks therefore share their first ``n`` keys, and one different token
changes every key from its chunk on.

Guarantees:
- The hash is blake2b (128-bit digest) over canonical bytes: token ids as little-endian int32.
  It never uses Python's ``hash()``, so the same tokens give the same keys in every process,
  under any ``PYTHONHASHSEED``, on any machine and byte order.
- The key carries the namespace (model, layout, dtype, tensor-parallel rank and size,
  quantization) and the hash-scheme version, so KV saved in one form is never read as another.
- Only full chunks get keys; a partial trailing chunk is left out unless ``include_partial``.

``loadable_tokens`` is the matching rule for loads: how many leading tokens of a prompt may come
from the store.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from typing import Any, Sequence

import numpy as np

from kvstore._errors import InvalidArgumentError

# Bump when the hashed bytes or the key format change: old keys then simply stop matching.
HASH_SCHEME = "b2v1"
_DIGEST_BYTES = 16
_INT32_MAX = 2**31 - 1
# a namespace part must not contain "/" (the key separator) nor whitespace
_PART_RE = re.compile(r"^[A-Za-z0-9._:+=@-]+$")
_MAX_KEY_BYTES = 1024


@dataclasses.dataclass(frozen=True)
class KeyNamespace:
    """Everything that must match for stored KV bytes to be reusable, rendered into every key.

    Fields: ``model`` (name or path tag of the weights), ``layout`` (how a block's bytes are
    laid out, e.g. ``"L2BHD"``), ``dtype`` (``"float16"``, ...), ``tp_rank``/``tp_size`` (the
    tensor-parallel shard the bytes belong to), ``quantization`` (``None`` for raw or
    ``"int8"``), ``prefix`` (a tenant or deployment tag). Raises InvalidArgumentError for an
    empty part, a part containing ``/`` or whitespace, or a rank outside ``[0, tp_size)``.
    """

    model: str
    layout: str = "L2BHD"
    dtype: str = "float32"
    tp_rank: int = 0
    tp_size: int = 1
    quantization: str | None = None
    prefix: str = "kv"

    def __post_init__(self) -> None:
        for name in ("model", "layout", "dtype", "prefix"):
            _check_part(name, getattr(self, name))
        if self.quantization is not None:
            _check_part("quantization", self.quantization)
        if not isinstance(self.tp_size, int) or self.tp_size < 1:
            raise InvalidArgumentError(f"tp_size must be an int >= 1, got {self.tp_size!r}")
        if not isinstance(self.tp_rank, int) or not 0 <= self.tp_rank < self.tp_size:
            raise InvalidArgumentError(
                f"tp_rank must be in [0, {self.tp_size}), got {self.tp_rank!r}")

    def for_shard(self, tp_rank: int, tp_size: int) -> "KeyNamespace":
        """The same namespace for another tensor-parallel shard (heterogeneous TP loads)."""
        return dataclasses.replace(self, tp_rank=tp_rank, tp_size=tp_size)

    def render(self) -> str:
        """The key prefix: ``{prefix}/{model}/{layout}-{dtype}-{quant}/tp{rank}of{size}``."""
        quant = self.quantization or "raw"
        return (f"{self.prefix}/{self.model}/{self.layout}-{self.dtype}-{quant}/"
                f"tp{self.tp_rank}of{self.tp_size}")

    def __str__(self) -> str:
        return self.render()


def _check_part(name: str, value: Any) -> None:
    if not isinstance(value, str) or not _PART_RE.match(value):
        raise InvalidArgumentError(
            f"namespace {name} must be a non-empty string of letters, digits and ._:+=@- "
            f"(no '/' or spaces), got {value!r}")


def canonical_token_bytes(token_ids: Any) -> bytes:
    """Token ids as little-endian int32 bytes, the only bytes the key hash ever sees.

    Accepts a sequence of ints, a 1-D numpy array or a 1-D torch tensor. Raises
    InvalidArgumentError for non-integer ids, ids outside ``[0, 2**31 - 1]`` or a shape that
    is not 1-D.
    """
    return _token_array(token_ids).astype("<i4", copy=False).tobytes()


def _token_array(token_ids: Any) -> np.ndarray:
    if hasattr(token_ids, "detach"):  # torch tensor, without importing torch here
        token_ids = token_ids.detach().cpu().numpy()
    array = np.asarray(token_ids)
    if array.ndim != 1:
        raise InvalidArgumentError(f"token_ids must be 1-D, got shape {array.shape}")
    if array.size == 0:
        return np.zeros(0, dtype=np.int64)
    if not np.issubdtype(array.dtype, np.integer):
        raise InvalidArgumentError(f"token_ids must be integers, got dtype {array.dtype}")
    array = array.astype(np.int64, copy=False)
    if int(array.min()) < 0 or int(array.max()) > _INT32_MAX:
        raise InvalidArgumentError("token ids must lie in [0, 2**31 - 1]")
    return array


def prefix_keys(token_ids: Any, *, chunk_size: int, namespace: KeyNamespace | str,
                include_partial: bool = False) -> list[str]:
    """One key per chunk of ``chunk_size`` tokens, each chained over all the chunks before it.

    ``namespace`` is a KeyNamespace or an already rendered string (same rules per part).
    Returns ``len(token_ids) // chunk_size`` keys, plus one for a partial trailing chunk when
    ``include_partial`` is true (its key also encodes its length, so it never collides with a
    full chunk). Pure function: no I/O, thread-safe. Raises InvalidArgumentError for a
    ``chunk_size`` < 1, bad token ids (see ``canonical_token_bytes``) or a bad namespace.
    """
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise InvalidArgumentError(f"chunk_size must be an int >= 1, got {chunk_size!r}")
    prefix = _render_namespace(namespace)
    data = canonical_token_bytes(token_ids)
    num_tokens = len(data) // 4
    num_chunks = num_tokens // chunk_size
    if include_partial and num_tokens % chunk_size:
        num_chunks += 1
    chunk_bytes = 4 * chunk_size
    # The chain's root binds the scheme and chunk size, so chunkings never share a hash.
    digest = hashlib.blake2b(f"{HASH_SCHEME}/c{chunk_size}".encode(),
                             digest_size=_DIGEST_BYTES).digest()
    keys = []
    for index in range(num_chunks):
        chunk = data[index * chunk_bytes:(index + 1) * chunk_bytes]
        digest = hashlib.blake2b(digest + chunk, digest_size=_DIGEST_BYTES).digest()
        suffix = "" if len(chunk) == chunk_bytes else f"-p{len(chunk) // 4}"
        keys.append(f"{prefix}/{HASH_SCHEME}c{chunk_size}/{digest.hex()}{suffix}")
    return keys


def _render_namespace(namespace: KeyNamespace | str) -> str:
    if isinstance(namespace, KeyNamespace):
        return namespace.render()
    if not isinstance(namespace, str) or not namespace:
        raise InvalidArgumentError(f"namespace must be a KeyNamespace or a non-empty str, "
                                   f"got {namespace!r}")
    for part in namespace.split("/"):
        _check_part("part", part)
    if len(namespace.encode()) > _MAX_KEY_BYTES - 100:
        raise InvalidArgumentError("namespace too long: keys are limited to 1 KiB")
    return namespace


def num_full_chunks(num_tokens: int, chunk_size: int) -> int:
    """How many full chunks ``num_tokens`` tokens fill (the partial tail does not count)."""
    return num_tokens // chunk_size


def loadable_tokens(num_tokens: int, block_size: int) -> int:
    """Leading tokens of a ``num_tokens`` prompt an engine may take from the store: whole
    blocks only, and never the last token, so the engine computes at least one position and
    gets the logits it samples from (vLLM's connectors follow the same rule).

    Raises InvalidArgumentError for a prompt without tokens.
    """
    if num_tokens < 1:
        raise InvalidArgumentError("a prompt needs at least one token")
    return (num_tokens - 1) // block_size * block_size


def tokens_as_list(token_ids: Sequence[int] | Any) -> list[int]:
    """Validated token ids as a plain list of ints (for requests sent between processes)."""
    return _token_array(token_ids).tolist()
