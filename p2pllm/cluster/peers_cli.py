"""`p2pllm peers test|add HOST:PORT`, `p2pllm peers drain|admit NAME`: node management through any
peer's gRPC port (cluster/management.py does the work there)."""

from __future__ import annotations

import json

from ..argtypes import host_port
from ..errors import P2PError, UsageError

TIMEOUT_SECONDS = 120.0  # a drain waits for the plan change, which may load weights on other peers


def add_peers_parser(subparsers, add_security_flags) -> None:
    p = subparsers.add_parser(
        "peers", help="test or add a peer by address; drain a peer out of the plan or admit it back",
        description="Manage the cluster's peers through any peer (--host). A drained peer stays up and listed "
                    "but holds no layers until it is admitted again; each is one plan change.")
    p.add_argument("action", choices=["test", "add", "drain", "admit"],
                   help="test HOST:PORT: reachability, RTT, compatibility; add HOST:PORT: test it, then dial it as "
                        "a static peer; drain NAME / admit NAME: out of the plan / back in (NAME: a name or id)")
    p.add_argument("target", metavar="HOST:PORT|NAME")
    p.add_argument("--host", type=host_port, default="127.0.0.1:7700", help="a peer's gRPC address")
    p.add_argument("--json", action="store_true", help="print the details as JSON")
    p.add_argument("--cluster", default="default", help="whose stored secret to use (default: default)")
    add_security_flags(p, "of the peer's cluster")
    p.set_defaults(func=cmd_peers)


def cmd_peers(args) -> int:
    import asyncio

    from ..transport.client import manage_peers
    from ..transport.security import resolve_secret, security_for

    if args.action in ("test", "add"):
        try:
            host_port(args.target)
        except Exception as e:
            raise UsageError(f"peers {args.action}: {e}") from None
    security = security_for(resolve_secret(args.cluster, args.secret, args.insecure, create=False))
    reply = asyncio.run(manage_peers(args.host, security, args.action, args.target, TIMEOUT_SECONDS))
    details = json.loads(reply.json or "{}")
    if args.json:
        print(json.dumps({"ok": reply.ok, "message": reply.message, **details}, indent=2))
    if not reply.ok:
        raise _error(reply.message, details.get("status", 409))
    if not args.json:
        print(reply.message)
    if args.action == "test" and not details.get("compatible"):
        return 1  # reachable or not, it cannot serve in this cluster
    return 0


def _error(message: str, status: int) -> P2PError:
    """The one-line error; a wrong name or address is the user's (exit 2), the rest the cluster's (1)."""
    return UsageError(message) if status in (400, 404) else P2PError(message)
