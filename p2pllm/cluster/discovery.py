"""Finding peers on the LAN: advertise ourselves and browse for others over mDNS/DNS-SD.

Each daemon registers one `_p2pllm._tcp.local.` service whose TXT record says who it is and
what it can do (see `Announcement`), and browses for the others. zeroconf is bound to exactly
one IPv4 interface address (`pick_interface_address`), so a laptop with Wi-Fi, Docker bridges
and a VPN announces itself where its peers are, not on whichever interface came first.

Nothing here decides whether a peer is usable (cluster name, protocol, model fingerprint): that
is the membership layer's job, which lists incompatible peers with a reason. Discovery only turns
well-formed announcements into `Announcement` values and drops malformed ones. Networks without
multicast use static `--peer HOST:PORT` addresses instead, handled by the membership layer.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import math
import re
import socket
from dataclasses import dataclass
from typing import Callable, Mapping

import psutil
from zeroconf import IPVersion, ServiceStateChange, Zeroconf
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from p2pllm.errors import P2PError, UsageError

log = logging.getLogger(__name__)

SERVICE_TYPE = "_p2pllm._tcp.local."

# How long one resolve of a peer's SRV/TXT/A records may take, in milliseconds.
_RESOLVE_TIMEOUT_MS = 3000
# DNS labels are at most 63 bytes; the instance name is "<name>-<id[:8]>".
_MAX_NAME_BYTES = 63 - 9
_MAX_TXT_VALUE = 200

_ID_RE = re.compile(r"[0-9a-f]{8,64}")
_TOKEN_RE = re.compile(r"[\x21-\x7e]{0,128}")  # printable ASCII, no spaces (cluster, fingerprint)
_HOSTNAME_BAD = re.compile(r"[^a-z0-9-]+")


@dataclass(frozen=True)
class Announcement:
    """What one daemon tells the LAN about itself. Nothing secret ever goes in here."""

    id: str  # daemon id (lowercase hex)
    name: str  # human name (hostname by default)
    cluster: str
    protocol: int
    host: str  # IPv4 address others reach the gRPC server at
    grpc_port: int
    gateway_port: int
    fingerprint: str  # model fingerprint
    mem_bytes: int
    flops: float
    mem_bw: float

    @property
    def address(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    @property
    def instance_name(self) -> str:
        """The DNS-SD service instance name: "<name>-<id[:8]>._p2pllm._tcp.local."."""
        clean = "".join(c if c.isprintable() and c != "." else "-" for c in self.name)
        label = _truncate_utf8(clean, _MAX_NAME_BYTES) or "peer"
        return f"{label}-{self.id[:8]}.{SERVICE_TYPE}"

    def to_txt(self) -> dict[str, str]:
        """The TXT record, keys exactly: id, name, cluster, proto, grpc, gw, fp, mem, flops, bw."""
        return {
            "id": self.id,
            "name": _truncate_utf8(self.name, _MAX_TXT_VALUE),
            "cluster": self.cluster,
            "proto": str(int(self.protocol)),
            "grpc": str(int(self.grpc_port)),
            "gw": str(int(self.gateway_port)),
            "fp": self.fingerprint,
            "mem": str(int(self.mem_bytes)),
            "flops": repr(float(self.flops)),
            "bw": repr(float(self.mem_bw)),
        }

    @classmethod
    def from_txt(cls, txt: Mapping[bytes | str, bytes | str | None], host: str) -> Announcement:
        """Parse a peer's TXT record. Raises ValueError on anything malformed or out of range."""
        fields: dict[str, str] = {}
        for raw_key, raw_value in txt.items():
            key = _text(raw_key, "key")
            if raw_value is None:
                raise ValueError(f"TXT key {key!r} has no value")
            fields[key] = _text(raw_value, key)
        missing = [k for k in ("id", "name", "cluster", "proto", "grpc", "gw", "fp", "mem", "flops", "bw") if k not in fields]
        if missing:
            raise ValueError(f"TXT lacks {', '.join(missing)}")
        peer_id = fields["id"]
        if not _ID_RE.fullmatch(peer_id):
            raise ValueError(f"id {peer_id[:80]!r} is not 8-64 lowercase hex digits")
        for key in ("cluster", "fp"):
            if not _TOKEN_RE.fullmatch(fields[key]):
                raise ValueError(f"{key} {fields[key][:80]!r} is not a short printable token")
        name = fields["name"]
        if not name or len(name.encode()) > _MAX_TXT_VALUE or not name.isprintable():
            raise ValueError(f"name {name[:80]!r} is empty, too long or not printable")
        host = str(ipaddress.IPv4Address(host))
        return cls(
            id=peer_id,
            name=name,
            cluster=fields["cluster"],
            protocol=_int(fields, "proto", 0, 2**31 - 1),
            host=host,
            grpc_port=_int(fields, "grpc", 1, 65535),
            gateway_port=_int(fields, "gw", 0, 65535),
            fingerprint=fields["fp"],
            mem_bytes=_int(fields, "mem", 0, 2**63 - 1),
            flops=_float(fields, "flops"),
            mem_bw=_float(fields, "bw"),
        )


def _truncate_utf8(text: str, limit: int) -> str:
    return text.encode()[:limit].decode(errors="ignore")


def _text(value: bytes | str, what: str) -> str:
    if isinstance(value, str):
        return value
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"TXT {what} is not UTF-8") from exc


def _int(fields: Mapping[str, str], key: str, low: int, high: int) -> int:
    text = fields[key]
    if not text.isascii() or not text.isdigit() or len(text) > 20:
        raise ValueError(f"{key} {text[:40]!r} is not a non-negative integer")
    value = int(text)
    if not low <= value <= high:
        raise ValueError(f"{key} {value} is outside [{low}, {high}]")
    return value


def _float(fields: Mapping[str, str], key: str) -> float:
    text = fields[key]
    if len(text) > 40:
        raise ValueError(f"{key} is too long")
    try:
        value = float(text)
    except ValueError as exc:
        raise ValueError(f"{key} {text!r} is not a number") from exc
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{key} {value} is not a finite non-negative number")
    return value


def _service_info(me: Announcement, instance_name: str | None = None) -> AsyncServiceInfo:
    host_label = _HOSTNAME_BAD.sub("-", me.name.lower()).strip("-")[:_MAX_NAME_BYTES] or "peer"
    return AsyncServiceInfo(
        SERVICE_TYPE,
        instance_name or me.instance_name,
        port=me.grpc_port,
        properties=me.to_txt(),
        server=f"{host_label}-{me.id[:8]}.local.",
        parsed_addresses=[str(ipaddress.IPv4Address(me.host))],
    )


class Discovery:
    """Advertise `me` and report the other daemons seen on one interface.

    `on_found(announcement)` is called for a new peer and whenever a known peer's announcement
    changes; `on_lost(peer_id)` when its service goes away (a goodbye packet, or its records
    expiring). Both run on the asyncio loop that called `start()` and must not block. Our own
    id is never reported.
    """

    def __init__(
        self,
        me: Announcement,
        *,
        on_found: Callable[[Announcement], None],
        on_lost: Callable[[str], None],
        interface_address: str | None = None,
    ) -> None:
        self.me = me
        self._on_found = on_found
        self._on_lost = on_lost
        self._interface_address = interface_address or me.host
        self._azc: AsyncZeroconf | None = None
        self._browser: AsyncServiceBrowser | None = None
        self._info: AsyncServiceInfo | None = None
        self._peers: dict[str, Announcement] = {}  # instance name (lowercase) -> last announcement
        self._resolving: dict[str, asyncio.Task] = {}

    @property
    def peers(self) -> dict[str, Announcement]:
        """The peers currently seen, by id."""
        return {ann.id: ann for ann in self._peers.values()}

    async def start(self) -> None:
        """Register our service, then browse for the others."""
        if self._azc is not None:
            return
        address = str(ipaddress.IPv4Address(self._interface_address))
        try:
            self._azc = AsyncZeroconf(interfaces=[address], ip_version=IPVersion.V4Only)
        except OSError as exc:
            raise P2PError(
                f"cannot run mDNS on {address}: {exc.strerror or exc} "
                "(pick another --interface, or use --no-mdns with --peer HOST:PORT)"
            ) from exc
        try:
            await self._register(self.me)
            self._browser = AsyncServiceBrowser(
                self._azc.zeroconf, SERVICE_TYPE, handlers=[self._on_state_change]
            )
        except BaseException:
            await self.stop()
            raise
        log.info(
            "discovery: announcing %s (%s) as %s on %s",
            self.me.name, self.me.id[:8], self.me.address, address,
        )

    async def update(self, me: Announcement) -> None:
        """Re-announce with changed fields (free memory, ports, fingerprint ...)."""
        if me.id != self.me.id:
            raise ValueError("Discovery.update cannot change the daemon id")
        old, self.me = self.me, me
        if self._azc is None or self._info is None or me == old:
            return
        if me.instance_name == old.instance_name:
            # Keep the name zeroconf registered, in case it had to rename us to resolve a conflict.
            info = _service_info(me, self._info.name)
            self._info = info
            await (await self._azc.async_update_service(info))
        else:
            # A new instance name: announce it before withdrawing the old one, so that browsers
            # see the same id under the new name instead of a loss followed by a find.
            old_info = self._info
            await self._register(me)
            await (await self._azc.async_unregister_service(old_info))
        log.debug("discovery: re-announced %s", me.to_txt())

    async def stop(self) -> None:
        """Send goodbye packets and close. Safe to call more than once."""
        azc, self._azc = self._azc, None
        if azc is None:
            return
        for task in self._resolving.values():
            task.cancel()
        self._resolving.clear()
        try:
            if self._browser is not None:
                await self._browser.async_cancel()
            if self._info is not None:
                await (await azc.async_unregister_service(self._info))
        except Exception:  # noqa: BLE001 - closing must finish whatever happened before
            log.debug("discovery: error while withdrawing our service", exc_info=True)
        finally:
            self._browser = None
            self._info = None
            await azc.async_close()
        self._peers.clear()

    async def _register(self, me: Announcement) -> None:
        assert self._azc is not None
        info = _service_info(me)
        await (await self._azc.async_register_service(info, allow_name_change=True))
        self._info = info

    def _on_state_change(
        self, zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange
    ) -> None:
        key = name.lower()
        if self._info is not None and key == self._info.name.lower():
            return
        pending = self._resolving.pop(key, None)
        if pending is not None:
            pending.cancel()
        if state_change is ServiceStateChange.Removed:
            self._forget(key)
            return
        task = asyncio.get_running_loop().create_task(self._resolve(zeroconf, name, key))
        self._resolving[key] = task
        task.add_done_callback(lambda t, key=key: self._resolving.get(key) is t and self._resolving.pop(key))

    async def _resolve(self, zeroconf: Zeroconf, name: str, key: str) -> None:
        ann = await _resolve_announcement(zeroconf, name)
        if ann is None or ann.id == self.me.id:
            return
        if self._peers.get(key) == ann:
            return
        self._peers[key] = ann
        log.debug("discovery: found %s (%s) at %s", ann.name, ann.id[:8], ann.address)
        self._call(self._on_found, ann)

    def _forget(self, key: str) -> None:
        ann = self._peers.pop(key, None)
        if ann is None:
            return
        if any(other.id == ann.id for other in self._peers.values()):
            return  # the same daemon is still announced under another instance name
        log.debug("discovery: lost %s (%s)", ann.name, ann.id[:8])
        self._call(self._on_lost, ann.id)

    @staticmethod
    def _call(callback: Callable, arg: object) -> None:
        try:
            callback(arg)
        except Exception:  # noqa: BLE001 - a failing listener must not stop discovery
            log.exception("discovery: callback %r failed", callback)


async def _resolve_announcement(zeroconf: Zeroconf, name: str) -> Announcement | None:
    """The announcement behind a service instance name; None when it does not answer or is malformed."""
    info = AsyncServiceInfo(SERVICE_TYPE, name)
    try:
        if not await info.async_request(zeroconf, _RESOLVE_TIMEOUT_MS):
            log.debug("discovery: %s did not answer with SRV/TXT/A in time", name)
            return None
        addresses = info.parsed_addresses(IPVersion.V4Only)
        if not addresses:
            raise ValueError("no IPv4 address")
        return Announcement.from_txt(info.properties, addresses[0])
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # noqa: BLE001 - a hostile peer must never crash the browser
        log.debug("discovery: ignoring malformed announcement %r: %s", name, exc)
        return None


async def browse(interface_address: str, seconds: float) -> list[Announcement]:
    """The daemons announced on this interface's network within `seconds`, without announcing
    anything ourselves (what `p2pllm plan --discover` plans over)."""
    address = str(ipaddress.IPv4Address(interface_address))
    try:
        azc = AsyncZeroconf(interfaces=[address], ip_version=IPVersion.V4Only)
    except OSError as exc:
        raise P2PError(f"cannot run mDNS on {address}: {exc.strerror or exc} (pick another --interface)") from exc
    names: set[str] = set()

    def seen(zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange) -> None:
        (names.discard if state_change is ServiceStateChange.Removed else names.add)(name)

    browser = AsyncServiceBrowser(azc.zeroconf, SERVICE_TYPE, handlers=[seen])
    try:
        await asyncio.sleep(seconds)
        found = await asyncio.gather(*(_resolve_announcement(azc.zeroconf, n) for n in sorted(names)))
    finally:
        await browser.async_cancel()
        await azc.async_close()
    return list({ann.id: ann for ann in found if ann is not None}.values())


def _default_route_interface() -> str | None:
    try:
        with open("/proc/net/route") as f:
            rows = [line.split() for line in f.readlines()[1:]]
    except OSError:
        return None
    best: tuple[int, str] | None = None
    for row in rows:
        if len(row) < 7:
            continue
        iface, destination, flags, metric = row[0], row[1], row[3], row[6]
        try:
            up = int(flags, 16) & 0x1
            if int(destination, 16) != 0 or not up:
                continue
            candidate = (int(metric), iface)
        except ValueError:
            continue
        if best is None or candidate < best:
            best = candidate
    return best[1] if best else None


def _ipv4_of(addrs: list) -> str | None:
    for addr in addrs:
        if addr.family == socket.AF_INET:
            return addr.address
    return None


def pick_interface_address(interface: str | None = None) -> str:
    """The IPv4 address zeroconf binds to.

    `interface` forces the choice: an interface name ("eth0") or an IPv4 literal. Without it:
    the interface holding the default route, else the first non-loopback interface that is up
    and has an IPv4 address, else 127.0.0.1.
    """
    all_addrs = psutil.net_if_addrs()
    if interface:
        try:
            ip = ipaddress.ip_address(interface)
        except ValueError:
            ip = None
        if ip is not None:
            if ip.version != 4:
                raise UsageError(f"--interface {interface}: only IPv4 addresses are supported")
            return str(ip)
        if interface not in all_addrs:
            raise UsageError(f"no interface {interface} (have: {', '.join(all_addrs)})")
        address = _ipv4_of(all_addrs[interface])
        if address is None:
            raise UsageError(f"interface {interface} has no IPv4 address")
        return address

    stats = psutil.net_if_stats()
    route_iface = _default_route_interface()
    if route_iface and route_iface in all_addrs:
        address = _ipv4_of(all_addrs[route_iface])
        if address is not None:
            return address
    for name, addrs in all_addrs.items():
        stat = stats.get(name)
        if stat is None or not stat.isup:
            continue
        address = _ipv4_of(addrs)
        if address is not None and not ipaddress.IPv4Address(address).is_loopback:
            return address
    return "127.0.0.1"
