"""The scenarios, one module per ``--only`` name: each ``scenario_<name>(bench)`` runs its load
against the targets of a ``Bench`` and returns its part of the JSON summary. scripts/bench.py
runs them in its own order (``RUNS``)."""
