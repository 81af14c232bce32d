"""The metadata master: which blocks exist and where their replicas live.

Entry points: ``kvstore master`` (``cli.py``), ``server.run_in_thread`` (embedded mode),
``rpc_client.MasterClient`` (how the daemon and the client talk to it over gRPC),
``fast_client.FastMasterClient`` (the client's framed-TCP fast path, served by ``fastrpc``
in the format of ``fastframes``), ``status_cli.py``. The pure logic (``state``, ``reads``,
``admin``, ``registration``, ``eviction``, ``placement``, ``allocator``, ``nodes``,
``objects``) knows nothing of gRPC; ``service`` maps requests to it and builds every reply,
those with tables or packed arrays through ``replies`` (the encoder and its caches).
Importing this package imports neither torch nor grpc.
"""
