"""Route handlers, one module per route family. Each is thin: validate, decide, hand to the relay."""
