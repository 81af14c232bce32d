"""``kvstore bench``: measuring code, kept out of the library's data path.

``cli`` is the command group; ``transfer_cli``/``run``/``transfer``/``concurrent`` are
``kvstore bench transfer``, ``master`` and ``kernels`` the other two subcommands; ``measure``
holds the primitives (rates beside a memcpy ceiling, latency percentiles, a loopback TCP
ceiling, CPU accounting), ``verify`` the byte checks, ``report`` the table and JSON, ``plot``
the optional PNG. The scripts in the repository's ``bench/`` directory call these commands.
"""
