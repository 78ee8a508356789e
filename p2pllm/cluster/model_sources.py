"""Which peers to learn the model from, for a peer without the model file.

`join --from-peers` asks the `--peer` addresses or, without any, the peers of its cluster that
mDNS finds. `join --model NAME`, where NAME is no model on this machine, does the same but keeps
only peers whose model has that name, file name or fingerprint (prefix). Found peers go to
cluster/fetch.learn_model, which fetches the header, then the daemon fetches its layers.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass

from ..errors import P2PError, UsageError
from ..proto import p2pllm_pb2 as pb

log = logging.getLogger(__name__)

FROM_PEERS_WAIT = 60.0  # seconds to wait for a peer serving the model (P2PLLM_FROM_PEERS_WAIT)
BROWSE_SECONDS = 2.0  # one mDNS look


def from_peers_wait() -> float:
    return float(os.environ.get("P2PLLM_FROM_PEERS_WAIT", FROM_PEERS_WAIT))


def looks_like_a_path(ref: str) -> bool:
    """A --model value that names a file or folder, never a model to ask peers for."""
    return os.sep in ref or "/" in ref or ref.startswith(".") or \
        ref.lower().endswith((".gguf", ".safetensors", ".json", ".bin"))


def matches(manifest: pb.Manifest, name: str) -> bool:
    """NAME is the model's name, its file (or folder) name with or without extension, or at least
    8 leading hex digits of its fingerprint; case-insensitive."""
    want = name.strip().lower()
    if not want:
        return False
    names = {manifest.model_name.lower(), manifest.file_name.lower(), manifest.file_name.lower().rsplit(".", 1)[0]}
    return want in names or (len(want) >= 8 and manifest.fingerprint.lower().startswith(want))


@dataclass
class Sources:
    addresses: list[str]  # peers serving the model, in the order asked
    how: str  # "--peer" or "mDNS on ADDRESS", for the log


async def find_sources(security, *, peers: Sequence[str] = (), cluster: str = "default", mdns: bool = True,
                       interface: str | None = None, name: str | None = None, wait: float | None = None) -> Sources:
    """The peers to learn the model from: `peers`, else the cluster's peers that mDNS finds, asked
    again until one answers or `wait` seconds pass. With `name`, only peers serving that model (a
    UsageError at once, naming what they serve, when peers answer and none does)."""
    from ..transport.client import ClientPool
    from .discovery import browse, pick_interface_address

    if not peers and not mdns:
        raise UsageError("with --no-mdns, give --peer HOST:PORT: a peer to learn the model from and fetch layers from")
    address = pick_interface_address(interface) if not peers else ""
    how = "--peer" if peers else f"mDNS on {address} (cluster {cluster!r})"
    wait = from_peers_wait() if wait is None else wait
    deadline = time.monotonic() + wait
    pool = ClientPool(security)
    said_waiting = False
    try:
        while True:
            if peers:
                candidates = list(dict.fromkeys(peers))
            else:
                found = await browse(address, BROWSE_SECONDS)
                candidates = sorted({a.address for a in found if a.cluster == cluster})
            if candidates and name is None:
                return Sources(candidates, how)
            if candidates:
                served = await _manifests(pool, candidates)
                keep = [a for a, m in served.items() if m is not None and matches(m, name)]
                if keep:
                    return Sources(keep, how)
                answered = {a: m for a, m in served.items() if m is not None}
                if answered:
                    listing = "; ".join(f"{a}: {m.model_name!r} ({m.file_name}, fingerprint {m.fingerprint[:12]})"
                                        for a, m in answered.items())
                    raise UsageError(f"no model {name!r} here or on the cluster's peers (they serve {listing})")
            if time.monotonic() >= deadline:
                what = f"model {name!r}" if name else "the model"
                where = ", ".join(peers) if peers else how
                raise P2PError(f"no peer serves {what}: none answered within {wait:.0f} s ({where})")
            if not said_waiting:
                log.info("waiting up to %.0f s for a peer serving %s (%s)", wait, name or "the model", how)
                said_waiting = True
            await asyncio.sleep(1.0)
    finally:
        await pool.close()


async def _manifests(pool, addresses: Sequence[str]) -> dict[str, pb.Manifest | None]:
    async def one(a: str) -> pb.Manifest | None:
        try:
            return await pool.get(a).model_manifest(timeout=5.0)
        except Exception as e:  # down, refusing, not a p2pllm peer: not a source
            log.debug("%s serves no manifest: %s", a, e)
            return None

    return dict(zip(addresses, await asyncio.gather(*(one(a) for a in addresses))))
