"""Who a caller is, from what it authenticated with: the one place that decides it.

The writer identity bound into write capabilities (``kvstore.capability``) is the principal
of the caller. Today one shared token (or none) opens the cluster, so every caller is the
one principal ``CLUSTER_PRINCIPAL``. NOTE: tenants (a token per tenant) plug in here: the
master's auth layer and the daemon's data-plane handshake both ask this function, so a
capability issued to one tenant is refused on another tenant's connection.
"""

from __future__ import annotations

CLUSTER_PRINCIPAL = "cluster"


def principal_for_token(token: str | None) -> str:
    """The principal of a caller that authenticated with ``token`` (already checked)."""
    del token  # NOTE: one shared token: every authenticated caller is the same principal
    return CLUSTER_PRINCIPAL
