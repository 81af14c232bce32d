"""``kvstore plan``: is prefill/decode disaggregation worth it for this model, workload and
link? ``model`` holds the arithmetic (no torch), ``inputs`` reads model configs, workloads
and bench results, ``measure`` times the demo's model on this machine, ``cli`` is the
command (table, JSON, plot). The model of the computation is in docs/PLANNING.md."""
