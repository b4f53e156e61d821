"""Run the app with uvicorn: on a background thread (tests, benchmarks, notebooks), and shut down gracefully.

>>> with BackgroundServer(app) as srv:          # doctest: +SKIP
...     httpx.get(srv.url + "/health")

:func:`graceful_shutdown` makes SIGTERM/SIGINT drain first: new requests get 503 JSON at once,
work in flight gets ``grace_s`` seconds to finish and is then cancelled, and only then does
uvicorn close its sockets and exit.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from types import FrameType
from typing import Any

__all__ = ["BackgroundServer", "graceful_shutdown"]

logger = logging.getLogger(__name__)

#: seconds work in flight may take to finish after SIGTERM before it is cancelled
SHUTDOWN_GRACE_S = 10.0


def graceful_shutdown(server: Any, app: Any, *, grace_s: float | None = None) -> None:
    """Make ``server`` (a ``uvicorn.Server`` for ``app``) drain before it exits on SIGTERM/SIGINT.

    ``grace_s`` defaults to ``EXPERTMIX_SHUTDOWN_GRACE_S`` or 10 s. A second signal skips the wait.
    """
    state = app.state.expertmix
    grace = grace_s if grace_s is not None else float(os.environ.get("EXPERTMIX_SHUTDOWN_GRACE_S", SHUTDOWN_GRACE_S))
    original = server.handle_exit
    draining = threading.Event()

    def handle_exit(sig: int, frame: FrameType | None) -> None:
        if draining.is_set():  # a second signal: stop waiting
            state.cancel_all("the server is shutting down")
            server.force_exit = True
            original(sig, frame)
            return
        draining.set()
        state.closing = True
        logger.info("shutdown: refusing new requests; %d in flight get %.0f s", state.in_flight, grace)

        def drain() -> None:
            state.drain(grace)
            original(sig, frame)

        threading.Thread(target=drain, name="expertmix-drain", daemon=True).start()

    server.handle_exit = handle_exit  # uvicorn installs it for SIGTERM and SIGINT when it starts


class BackgroundServer:
    """uvicorn on ``host``, on a free port unless one is given; ``url`` is ``http://host:port``."""

    def __init__(self, app: Any, *, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning") -> None:
        import uvicorn

        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((host, port))
        self.host, self.port = self._sock.getsockname()[:2]
        self.url = f"http://{self.host}:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=5,
                                                    access_log=False))
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self._sock]},
                                        name=f"uvicorn-{self.port}", daemon=True)

    def start(self, timeout_s: float = 30.0) -> BackgroundServer:
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"uvicorn did not start on {self.url}")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self._thread.join(timeout=15)
        self._sock.close()

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
