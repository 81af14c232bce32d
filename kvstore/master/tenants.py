"""Tenants: who may use a master, under which key namespace, within which byte quotas.

A tenants file (``kvstore master --tenants FILE``, TOML or JSON) lists tenants::

    [[tenant]]
    name = "team-a"            # letters, digits, '.', '_', '-'; at most 64 characters
    token = "secret-a"         # what the tenant's clients pass as their token
    namespace = "team-a"       # optional (default: the name); no '/'
    [tenant.quota]             # optional; a tier left out has no quota
    dram = "4GiB"
    ssd = "100GiB"
    hbm = 0                    # 0: the tenant may not use this tier

JSON has the same shape: ``{"tenant": [{"name": ..., "token": ..., "quota": {...}}]}``.

``load_tenants`` reads and checks a file; every problem raises ``ConfigError`` naming the
file, the tenant (by its position and name) and the field, so a bad file stops the master
at start, before anything is served.

Rule: a tenant's client keys are stored as ``{namespace}/{key}`` (``scoped_key``), so a
tenant can only ever name keys of its own namespace (``kvstore.master.tenancy`` maps every
request), and a client need not change its keys when an operator turns tenants on.
"""

from __future__ import annotations

import json
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from kvstore._errors import ConfigError
from kvstore._units import parse_size
from kvstore.tiers import Tier

#: Separator between a tenant's namespace and its client's key in a stored key.
NAMESPACE_SEP = "/"
MAX_TENANTS = 1024
_NAME_RE = re.compile(r"[A-Za-z0-9._-]{1,64}\Z")
_FIELDS = {"name", "token", "namespace", "quota"}
_TIER_BY_LABEL = {"hbm": Tier.HBM, "dram": Tier.DRAM, "ssd": Tier.SSD}


@dataclass(frozen=True, slots=True)
class Tenant:
    """One tenant. ``tier_to_quota_bytes`` holds only tiers with a quota (absent: none)."""

    name: str
    token: str = field(repr=False)
    namespace: str
    tier_to_quota_bytes: dict = field(default_factory=dict, hash=False, compare=False)

    @property
    def key_prefix(self) -> str:
        """What the master puts before this tenant's client keys."""
        return self.namespace + NAMESPACE_SEP


def load_tenants(path: str | Path) -> tuple[Tenant, ...]:
    """Read and check the tenants file at ``path`` (``.json``: JSON, anything else: TOML).

    Raises ConfigError when the file cannot be read or parsed (with the parser's line), when
    it lists no tenant, or for any bad tenant: a missing or unknown field, a bad name or
    namespace, an empty or whitespace-holding token, a name, namespace or token used twice,
    an unknown tier or a bad size in a quota.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"tenants file {path}: cannot read it: {exc}") from exc
    try:
        document = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"tenants file {path}: does not parse: {exc}") from exc
    return parse_tenants(document, str(path))


def parse_tenants(document, source: str) -> tuple[Tenant, ...]:
    """``load_tenants`` after parsing: ``document`` as TOML or JSON gives it."""
    if not isinstance(document, dict) or set(document) != {"tenant"}:
        raise ConfigError(f"tenants file {source}: expected only a 'tenant' list "
                          "([[tenant]] tables in TOML)")
    entries = document["tenant"]
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"tenants file {source}: 'tenant' must be a non-empty list")
    if len(entries) > MAX_TENANTS:
        raise ConfigError(f"tenants file {source}: more than {MAX_TENANTS} tenants")
    tenants = [_parse_tenant(entry, f"tenants file {source}: tenant #{i + 1}")
               for i, entry in enumerate(entries)]
    for what in ("name", "namespace", "token"):
        seen: dict[str, int] = {}
        for i, tenant in enumerate(tenants):
            value = getattr(tenant, what)
            if value in seen:
                shown = "" if what == "token" else f" {value!r}"
                raise ConfigError(f"tenants file {source}: tenant #{i + 1} ({tenant.name}) "
                                  f"uses the {what}{shown} of tenant #{seen[value] + 1}")
            seen[value] = i
    return tuple(tenants)


def _parse_tenant(entry, where: str) -> Tenant:
    if not isinstance(entry, dict):
        raise ConfigError(f"{where}: must be a table of name, token, namespace, quota")
    name = entry.get("name")
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ConfigError(f"{where}: 'name' must be 1-64 letters, digits, '.', '_' or '-', "
                          f"got {name!r}")
    where = f"{where} ({name})"
    unknown = set(entry) - _FIELDS
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {sorted(unknown)}; known: "
                          f"{sorted(_FIELDS)}")
    token = entry.get("token")
    if not isinstance(token, str) or not token or any(c.isspace() for c in token):
        raise ConfigError(f"{where}: 'token' must be a non-empty string without whitespace")
    namespace = entry.get("namespace", name)
    if not isinstance(namespace, str) or not _NAME_RE.match(namespace):
        raise ConfigError(f"{where}: 'namespace' must be 1-64 letters, digits, '.', '_' or "
                          f"'-' (no '{NAMESPACE_SEP}'), got {namespace!r}")
    quota = entry.get("quota", {})
    if not isinstance(quota, dict):
        raise ConfigError(f"{where}: 'quota' must be a table of tier = size")
    tier_to_quota_bytes = {}
    for label, size in quota.items():
        tier = _TIER_BY_LABEL.get(label)
        if tier is None:
            raise ConfigError(f"{where}: quota of unknown tier {label!r}; tiers: "
                              f"{sorted(_TIER_BY_LABEL)}")
        if isinstance(size, bool) or not isinstance(size, (int, str)):
            raise ConfigError(f"{where}: quota.{label} must be a size such as \"4GiB\" or a "
                              f"number of bytes, got {size!r}")
        try:
            tier_to_quota_bytes[tier] = parse_size(size)
        except ConfigError as exc:
            raise ConfigError(f"{where}: quota.{label}: {exc}") from exc
    return Tenant(name, token, namespace, tier_to_quota_bytes)
