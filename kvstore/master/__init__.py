"""The metadata master (server only): which blocks exist and where their replicas live.

Entry points: ``kvstore master`` (``cli.py``) and ``server.run_in_thread`` (embedded mode).
``server`` runs the gRPC service and ``fast_server`` the framed-TCP fast path around one
``service.MasterService``. The pure logic (``state``, ``reads``, ``admin``, ``registration``,
``eviction``, ``placement``, ``allocator``, ``nodes``, ``objects``) knows nothing of gRPC;
``service`` maps requests to it and builds every reply, those with tables or packed arrays
through ``replies`` (the encoder and its caches). ``auth`` and ``metrics`` sit around it.
Clients talk to it through ``kvstore.rpc``. Importing this package imports neither torch nor
grpc.
"""
