"""``EtcdClient``: the few etcd v3 calls master HA needs, over etcd's JSON gateway.

Why the gateway and the standard library: the gateway (``/v3/kv/range``, ``/v3/kv/txn``,
``/v3/kv/deleterange``, ``/v3/lease/grant``, ``/v3/lease/keepalive``, ``/v3/lease/revoke``)
is etcd's own v3 API with JSON bodies (served by every etcd since 3.3 on the client port),
so no dependency is added: the maintained Python clients either pull another gRPC stack or
are the unmaintained ``etcd3``; generating etcd's protos into our build would add four
files of someone else's protocol for six calls. Keys and values are bytes, base64 on the
wire (what the gateway expects).

Error handling: every failure to reach etcd or to read its answer raises
``EtcdUnavailableError`` (a ``MasterUnavailableError``) naming the URL and the call; an
answer etcd gives with an error body raises the same, with etcd's message. Nothing retries
here: the election and the leader lookups decide when to try again.

Thread-safe: each call opens its own HTTP connection (a few calls a second per process).
"""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request
from dataclasses import dataclass

from kvstore._errors import ConfigError, MasterUnavailableError


class EtcdUnavailableError(MasterUnavailableError):
    """etcd did not answer, or answered with an error; the message names the URL."""


@dataclass(frozen=True, slots=True)
class KeyValue:
    """One key as etcd holds it. ``create_revision`` is the revision that created it (the
    leader key's is the leader's epoch)."""

    key: bytes
    value: bytes
    create_revision: int
    lease_id: int


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _prefix_end(prefix: bytes) -> bytes:
    """The first key after every key starting with ``prefix`` (etcd's range_end)."""
    end = bytearray(prefix)
    while end and end[-1] == 0xFF:
        end.pop()
    if not end:
        return b"\0"
    end[-1] += 1
    return bytes(end)


def check_url(url: str) -> str:
    """``url`` ("http://HOST:PORT") without a trailing slash; ConfigError otherwise."""
    if not url.startswith("http://") or len(url) <= len("http://"):
        raise ConfigError(f"etcd URL must be http://HOST:PORT, got {url!r}")
    return url.rstrip("/")


class EtcdClient:
    """Calls to the etcd at ``url``; each waits at most ``timeout_s``."""

    def __init__(self, url: str, *, timeout_s: float = 1.0):
        self.url = check_url(url)
        self.timeout_s = timeout_s

    def _post(self, path: str, body: dict) -> dict:
        request = urllib.request.Request(self.url + path, data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                answer = json.loads(response.read() or b"{}")
        except urllib.error.HTTPError as exc:
            detail = exc.read()[:200].decode("utf-8", "replace")
            raise EtcdUnavailableError(f"etcd at {self.url}{path}: HTTP {exc.code}: "
                                       f"{detail}") from exc
        except (OSError, ValueError) as exc:   # refused, timed out, reset, not JSON
            raise EtcdUnavailableError(f"etcd at {self.url} did not answer {path}: "
                                       f"{exc}") from exc
        if "error" in answer and "result" not in answer:
            raise EtcdUnavailableError(f"etcd at {self.url}{path}: {answer.get('error')}")
        return answer.get("result", answer)

    # ---- keys ------------------------------------------------------------------------------

    def get(self, key: bytes) -> KeyValue | None:
        """The key, or None when absent."""
        found = self._range({"key": _b64(key)})
        return found[0] if found else None

    def get_prefix(self, prefix: bytes) -> list[KeyValue]:
        """Every key starting with ``prefix``, in key order."""
        return self._range({"key": _b64(prefix), "range_end": _b64(_prefix_end(prefix))})

    def _range(self, body: dict) -> list[KeyValue]:
        answer = self._post("/v3/kv/range", body)
        return [KeyValue(base64.b64decode(kv["key"]), base64.b64decode(kv.get("value", "")),
                         int(kv.get("create_revision", 0)), int(kv.get("lease", 0)))
                for kv in answer.get("kvs", ())]

    def put(self, key: bytes, value: bytes, *, lease_id: int = 0) -> int:
        """Set ``key``; returns the revision of the write."""
        body = {"key": _b64(key), "value": _b64(value)}
        if lease_id:
            body["lease"] = str(lease_id)
        return int(self._post("/v3/kv/put", body)["header"]["revision"])

    def create(self, key: bytes, value: bytes, *, lease_id: int) -> tuple[bool, int]:
        """Set ``key`` only if it does not exist (one transaction): (created, revision). The
        revision is that of the write when created, etcd's current one otherwise."""
        put = {"key": _b64(key), "value": _b64(value), "lease": str(lease_id)}
        answer = self._post("/v3/kv/txn", {
            "compare": [{"key": _b64(key), "target": "CREATE", "create_revision": "0"}],
            "success": [{"request_put": put}]})
        return bool(answer.get("succeeded")), int(answer["header"]["revision"])

    def delete(self, key: bytes) -> None:
        self._post("/v3/kv/deleterange", {"key": _b64(key)})

    # ---- leases ----------------------------------------------------------------------------

    def grant(self, ttl_s: int) -> tuple[int, int]:
        """A new lease: (lease id, TTL in seconds as etcd granted it)."""
        answer = self._post("/v3/lease/grant", {"TTL": str(ttl_s)})
        return int(answer["ID"]), int(answer["TTL"])

    def keepalive(self, lease_id: int) -> int:
        """Renew the lease; returns its TTL in seconds, 0 when etcd no longer has it
        (expired or revoked: every key attached to it is gone)."""
        return int(self._post("/v3/lease/keepalive", {"ID": str(lease_id)}).get("TTL", 0))

    def revoke(self, lease_id: int) -> None:
        """End the lease now (its keys are deleted)."""
        self._post("/v3/lease/revoke", {"ID": str(lease_id)})
