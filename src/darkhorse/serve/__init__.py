"""`darkhorse serve`: an OpenAI-compatible HTTP server over the decode engine's continuous batch."""
