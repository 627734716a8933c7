"""A streaming API gateway for OpenAI-compatible LLM providers."""
