"""The process around the app: ``workers.py`` runs one process or a supervisor and its workers
and stops them gracefully; ``limits.py`` guards each connection (header, body and idle
timeouts, a connection cap, requests aiohttp cannot parse) before the app sees a request."""
