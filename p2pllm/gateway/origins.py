"""Which browsers' pages and which Host names the gateway answers: no cross-site requests, no DNS rebinding.

A page on any web site the user opens can send the gateway requests from the user's browser
(a form-like POST needs no CORS preflight, and the body is read as JSON whatever its content
type), and a site whose name resolves to 127.0.0.1 (DNS rebinding) can also read the answers:
the request history, the cluster's state. Ollama refuses both; so does this gateway, the same way:

- a request with an `Origin` header is answered only when that origin is the gateway's own (the
  dashboard), a loopback origin (`http://localhost:3000`, a local tool), or one given with
  `--allowed-origin` (or P2PLLM_ORIGINS, comma-separated; `*` allows every origin). Clients that
  are not browsers (curl, the openai and ollama libraries) send no `Origin`. Allowed cross-origin
  pages get CORS headers, so a browser app can read the answers.
- a gateway bound to a loopback address answers only Host names that are loopback (localhost,
  127.0.0.1, [::1], *.localhost), this machine's hostname, or given with `--allowed-host`
  (`*`: any). Bound to another address, the operator exposed it on purpose: any Host.

Refusals are a 403 in OpenAI's error shape. /health is exempt (it tells nothing).
"""

from __future__ import annotations

import ipaddress
import re
import socket
from urllib.parse import urlsplit

from starlette.datastructures import Headers

LOOPBACK_ORIGIN = r"https?://(localhost|[a-z0-9.-]+\.localhost|127(\.\d{1,3}){3}|\[::1\])(:\d{1,5})?"


def is_loopback_name(host: str) -> bool:
    host = host.strip("[]").rstrip(".").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _hostname(host_header: str) -> str:
    """The name in a Host header, without its port ([::1]:8700 -> ::1)."""
    host = host_header.strip().lower()
    if host.startswith("["):
        return host[1:host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


class RequestOrigins:
    def __init__(self, allowed_origins: tuple[str, ...] = (), allowed_hosts: tuple[str, ...] = (),
                 local_only: bool = False):
        self.any_origin = "*" in allowed_origins
        self.origins = {o.strip().rstrip("/").lower() for o in allowed_origins if o.strip() and o != "*"}
        self.any_host = "*" in allowed_hosts or not local_only
        self.hosts = {h.strip().lower() for h in allowed_hosts if h.strip()} | {socket.gethostname().lower()}

    def cors_origin_regex(self) -> str:
        """The origins a browser page may read answers from (CORS), as one regex."""
        if self.any_origin:
            return ".*"
        return "|".join([LOOPBACK_ORIGIN, *(re.escape(o) for o in sorted(self.origins))])

    def refusal(self, headers: Headers) -> str:
        """Why this request is refused ('' = it is not)."""
        host = headers.get("host", "")
        name = _hostname(host)  # (none: an HTTP/1.0 client; a browser always sends one)
        if not self.any_host and name and not is_loopback_name(name) and name not in self.hosts:
            return (f"Host {host!r} is not this gateway's: it listens on a loopback address and answers only "
                    f"local names (a DNS-rebinding page would come with its own); allow a name with --allowed-host.")
        origin = headers.get("origin")
        if origin is None or self.any_origin:
            return ""
        normalized = origin.strip().rstrip("/").lower()
        parts = urlsplit(normalized) if normalized != "null" else None
        if parts is not None and (parts.netloc == host.strip().lower() or normalized in self.origins
                                  or re.fullmatch(LOOPBACK_ORIGIN, normalized)):
            return ""
        return (f"Origin {origin!r} may not use this gateway: a web page from another site is refused (it "
                f"would act with the rights of the user's browser); allow it with --allowed-origin.")
