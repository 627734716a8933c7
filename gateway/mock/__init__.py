"""The built-in xAI-like upstream: what ``gateway serve`` runs with no configuration, what the
tests and benchmarks relay from, and ``gateway mock-upstream`` on its own. Imported only when
it runs (``tests/test_cli.py`` holds the product to that); nothing outside ``mock/`` imports it
but the places that start it (``gateway/app.py``, ``gateway/cli.py``)."""
