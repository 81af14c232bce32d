"""The prefill/decode disaggregation demo (``kvstore demo``): everything here is demo code that
an engine never imports.

``run`` drives one demo (a ``LocalCluster`` from ``cluster``, then a prefill and a decode
process, ``python -m kvstore.demo.pd_worker``); ``model`` builds the seeded random Llama (or
loads a local checkpoint); ``generate`` runs greedy generation on the demo's prefill schedule;
``report`` prints the table; ``cli`` is the click command.
"""

from __future__ import annotations

from kvstore.demo.report import report
from kvstore.demo.run import MODEL_SIZES, DemoConfig, run_demo

__all__ = ["MODEL_SIZES", "DemoConfig", "report", "run_demo"]
