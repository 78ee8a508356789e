"""Running the gateway app with uvicorn inside the daemon's own asyncio loop.

We bind the socket ourselves so that a port in use is one clear P2PError (uvicorn would log and
call sys.exit), and uvicorn never touches the process's signal handlers: the daemon owns those.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from dataclasses import dataclass

import uvicorn
from starlette.types import ASGIApp

from ..errors import P2PError
from ..sockets import bind_tcp

log = logging.getLogger(__name__)


@dataclass
class GatewayServer:
    """A running gateway; `port` is the bound one (useful when asked for port 0)."""

    host: str
    port: int
    server: uvicorn.Server
    task: asyncio.Task

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    async def stop(self, timeout: float = 10.0) -> None:
        """Stop accepting, give open requests a few seconds to end, then close the rest."""
        if self.task.done():
            return
        self.server.should_exit = True
        try:
            await asyncio.wait_for(asyncio.shield(self.task), timeout)
        except asyncio.TimeoutError:
            self.server.force_exit = True
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
        except Exception:
            log.debug("gateway server ended with an error", exc_info=True)


def _bind(host: str, port: int) -> socket.socket:
    sock = bind_tcp(host, port, "the gateway")
    try:
        sock.listen(1024)
        sock.setblocking(False)
    except OSError as e:
        sock.close()
        raise P2PError(f"cannot bind the gateway to {host}:{port}: {(e.strerror or str(e)).lower()}") from None
    return sock


async def serve_gateway(app: ASGIApp, host: str = "127.0.0.1", port: int = 8700, *,
                        log_level: str = "warning", startup_timeout: float = 30.0) -> GatewayServer:
    """Start serving `app` on host:port in the running loop; returns once it accepts connections."""
    sock = _bind(host, port)
    bound_port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level=log_level, access_log=False, lifespan="on", timeout_graceful_shutdown=5,
                            timeout_keep_alive=30)
    server = uvicorn.Server(config)
    server.capture_signals = contextlib.nullcontext  # type: ignore[method-assign]  # the daemon owns signals
    task = asyncio.create_task(server.serve(sockets=[sock]), name=f"gateway:{bound_port}")
    loop = asyncio.get_running_loop()
    deadline = loop.time() + startup_timeout
    try:
        while not server.started:
            if task.done():
                exc = task.exception() if not task.cancelled() else None
                raise P2PError(f"the gateway on {host}:{bound_port} failed to start"
                               + (f": {exc}" if exc else ""))
            if loop.time() > deadline:
                raise P2PError(f"the gateway on {host}:{bound_port} did not start within {startup_timeout:.0f}s")
            await asyncio.sleep(0.01)
    except BaseException:
        server.should_exit = True
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        sock.close()
        raise
    handle = GatewayServer(host, bound_port, server, task)
    log.info("gateway listening on %s", handle.url)
    return handle
