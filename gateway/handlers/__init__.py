"""Route handlers, one module per route family; each is thin: validate, decide, relay."""
