"""orproxy: an HTTP/1.1 reverse proxy that spreads OpenRouter traffic over many keys."""

__version__ = "0.1.0"
