"""The Ollama API on corral's port: ``/api/chat``, ``/api/generate``, ``/api/embed``, ...

``routes(proxy)`` gives the routes ``build_app`` mounts. Requests are translated to the child's
OpenAI-style or native endpoints (``translate``) and its answers back to Ollama's NDJSON
(``stream``); models are described from their GGUF headers (``describe``); ``/api/pull`` fetches a
configured model's files (``pull``); the other endpoints that manage Ollama's model store are
refused in one place (``manage``).
"""

from corral.proxy.ollama.routes import OLLAMA_VERSION, routes

__all__ = ["OLLAMA_VERSION", "routes"]
