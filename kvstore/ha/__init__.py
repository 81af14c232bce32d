"""Master high availability on etcd (issue 10): several masters of one cluster elect a
leader; daemons and clients follow it.

``etcd`` (the few etcd v3 calls, over its JSON gateway), ``cluster`` (the cluster's keys in
etcd, master address forms, leader lookup), ``leadership`` (the fence every master call
passes), ``election`` (a master's campaign thread), ``carrier`` (the rpc carrier that follows
the leader). See docs/ARCHITECTURE.md, "Master HA".
"""
