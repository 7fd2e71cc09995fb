"""``corral serve``: the proxy on uvicorn, with the supervisor in its lifespan.

Shutdown on SIGTERM/SIGINT follows uvicorn's own steps: 1. stop accepting connections,
2. let in-flight requests finish for up to ``shutdown_timeout``, 3. run the lifespan shutdown,
which stops every child (SIGTERM, then SIGKILL after ``llama_server.stop_timeout``).
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

import uvicorn

from corral.config import Config
from corral.proxy import create_app


class CorralServer(uvicorn.Server):
    """uvicorn's server, exiting 0 after a clean shutdown on SIGTERM or SIGINT.

    uvicorn re-raises the signal after its shutdown, so the process would end "killed by
    SIGTERM"; a supervisor (systemd, Kubernetes) should see a clean exit instead. The handlers
    only set flags (``handle_exit``); uvicorn's main loop acts on them.
    """

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        handled = (signal.SIGINT, signal.SIGTERM)
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in handled}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def serve(config: Config) -> None:
    """Run corral in the foreground until SIGTERM or SIGINT."""
    app = create_app(config)
    server = CorralServer(
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
