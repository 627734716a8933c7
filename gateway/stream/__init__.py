"""The stream layer, the byte path between an upstream's answer and a client: ``proxy`` (the
upstream call, built once per app and handed to handlers), ``relay`` (one event stream, its
explicit states and one way out, with ``waiting``, ``closing`` and ``watchdog``), ``render``
(the one render path, pure, with ``dialect``, ``usage`` and the ``sse`` framer),
``client_stream`` (the client's side, the one place that leans on aiohttp's writer),
``answers`` (plain answers) and ``fallback`` (vision streams answered whole). It imports the
upstream layer (``gateway/upstream/``), never the reverse, and the flat core it needs (errors,
settings, the request's record, the in-flight registry, metrics, and for ``fallback`` the app's
keys); never the handlers, the middlewares or the app, which import it.
"""
