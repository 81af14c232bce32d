"""The storage daemon: segments, data-plane server, link to the master (see docs/ARCHITECTURE.md)."""
