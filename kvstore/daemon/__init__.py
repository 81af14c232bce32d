"""The storage daemon: segments, data-plane server, membership (see docs/ARCHITECTURE.md)."""
