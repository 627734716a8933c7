"""The middleware chain, outermost first: errors -> auth -> rate limit (``CHAIN``).

``errors`` is the one place that turns exceptions into responses and records a finished request;
the others raise, and handlers never build error responses themselves. A request aiohttp cannot
parse never reaches the chain: ``gateway/server/limits.py`` answers it.
"""

from __future__ import annotations

from .auth import auth_middleware
from .errors import errors_middleware
from .ratelimit import ratelimit_middleware

CHAIN = (errors_middleware, auth_middleware, ratelimit_middleware)
"""In the order aiohttp runs them, outermost first."""
