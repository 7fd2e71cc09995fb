"""``corral serve``: the proxy on uvicorn, with the supervisor in its lifespan.

Shutdown on SIGTERM/SIGINT follows uvicorn's own steps: 1. stop accepting connections,
2. let in-flight requests finish for up to ``shutdown_timeout``, 3. run the lifespan shutdown,
which stops every child (SIGTERM, then SIGKILL after ``llama_server.stop_timeout``).
"""

from __future__ import annotations

import uvicorn

from corral.config import Config
from corral.proxy import create_app


def serve(config: Config) -> None:
    """Run corral in the foreground until SIGTERM or SIGINT."""
    app = create_app(config)
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host=config.file.listen.host,
            port=config.file.listen.port,
            lifespan="on",
            access_log=False,  # corral logs each request itself, with model and request_id
            log_level="warning",
            timeout_graceful_shutdown=int(config.file.shutdown_timeout) or 1,
            server_header=False,
        )
    )
    server.run()
