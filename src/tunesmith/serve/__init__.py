"""The OpenAI-compatible server: `create_app(settings)` (app.py), the wire format (protocol.py)
and the batching engine (engine.py)."""

from tunesmith.serve.app import ServeSettings, create_app, serve

__all__ = ["ServeSettings", "create_app", "serve"]
