"""The metadata master (server only): which blocks exist and where their replicas live.

Entry points: ``kvstore master`` (``cli.py``) and ``server.run_in_thread`` (embedded mode).
``server`` runs the gRPC service and ``fast_server`` the framed-TCP fast path around one
``service.MasterService``, which turns requests into calls of the pure logic (``state``,
``reads``, ``admin``, registration of nodes, ``eviction``, ``placement``, ``allocator``) and
their results into replies; ``auth`` and ``metrics`` sit around it. Clients talk to it
through ``kvstore.rpc``. Importing this package imports neither torch nor grpc.
"""
