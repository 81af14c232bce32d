"""``kvstore bench``: measuring code, kept out of the library's data path.

``cli`` is the command (flags, table, JSON), ``transfer`` the put/get cases it runs,
``measure`` the primitives (rates beside a memcpy ceiling, latency percentiles, a loopback TCP
ceiling, CPU accounting). The scripts in the repository's ``bench/`` directory build on them.
"""
