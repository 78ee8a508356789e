"""Binding a listening TCP address, with one clear error when it cannot be had."""

from __future__ import annotations

import errno
import socket

from .errors import P2PError


def bind_tcp(host: str, port: int, what: str) -> socket.socket:
    """A TCP socket bound to host:port (SO_REUSEADDR, IPv6 only for an IPv6 address), not yet
    listening; P2PError "cannot bind {what} to host:port: reason" when the address cannot be had."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise P2PError(f"cannot bind {what} to {host}:{port}: unknown address ({e.strerror})") from None
    family, kind, proto, _, addr = infos[0]
    # proto must be IPPROTO_TCP: asyncio sets TCP_NODELAY on accepted sockets only then (without
    # it every keep-alive response waits ~40 ms for a delayed ACK)
    sock = socket.socket(family, kind, proto or socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(addr)
    except OSError as e:
        sock.close()
        reason = "address already in use" if e.errno == errno.EADDRINUSE else (e.strerror or str(e)).lower()
        raise P2PError(f"cannot bind {what} to {host}:{port}: {reason}") from None
    return sock
