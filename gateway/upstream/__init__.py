"""The upstream layer: the gateway's one HTTP/1.1 client to the provider (``client``: the
operator's key, retries, the headers that may go up), its keep-alive connections (``pool``,
``http1``: each answer parsed in the socket's read callback and handed on from there), and what
an upstream says made safe to show a client (``errors``: error statuses and in-stream errors
redacted and bounded, the operator's ``Secrets``). It knows nothing of clients or streams: it
imports only the package's pure core (``gateway/errors.py``, ``gateway/settings.py``), never
``gateway/stream/``, the handlers, the middlewares or the app, which all import it.
"""
