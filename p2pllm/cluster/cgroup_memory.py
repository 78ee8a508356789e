"""How much memory this process's cgroup still allows (Linux; None elsewhere or without a limit).

A daemon in a container or a memory-limited cgroup sees the host's memory in /proc/meminfo
(psutil), so without this it would advertise memory it may not use and be OOM-killed by the
kernel instead of being planned around. Read fresh on every call: usage changes.

Both cgroup versions: v2 (`memory.max`, `memory.high`, `memory.current`) and v1
(`memory.limit_in_bytes`, `memory.usage_in_bytes`), found through /proc/self/cgroup and the
mount table, so hybrid hosts (v1 memory controller beside a v2 tree without it) and nested or
namespaced cgroups resolve to the right directory.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

# v1 writes "no limit" as PAGE_COUNTER_MAX pages (9223372036854771712 on 4 KiB pages); any limit
# this large is no limit on a real machine
UNLIMITED = 1 << 60


@dataclass(frozen=True)
class CgroupMemory:
    """The binding level of the cgroup tree: the one with the least room left."""

    version: int  # 1 or 2
    path: str  # the cgroup directory whose limit binds (this process's own, or an ancestor's)
    limit: int  # bytes
    usage: int  # bytes charged to it now, less page cache the kernel drops before it OOM-kills

    @property
    def available(self) -> int:
        return max(0, self.limit - self.usage)


def cgroup_memory(cgroup_file: str | os.PathLike = "/proc/self/cgroup",
                  mountinfo_file: str | os.PathLike = "/proc/self/mountinfo") -> CgroupMemory | None:
    """The tightest memory limit on this process (its cgroup and every ancestor); None if none."""
    try:
        memberships = _read(cgroup_file)
        mounts = _read(mountinfo_file)
        if memberships is None or mounts is None:  # not Linux, or no /proc: no limit we can see
            return None
        # a hybrid host mounts the v1 memory controller beside a v2 tree that lacks it: v1 wins there;
        # the v2 tree counts only where it has the memory controller (memory.max in the cgroup)
        for version in (1, 2):
            found = _locate(memberships, mounts, version)
            if found is not None:
                return _tightest(*found, version)
    except OSError as e:  # an unreadable cgroup tree must not stop a daemon: the other bounds still hold
        log.debug("cannot read the memory cgroup: %s", e)
    return None


def _read(path) -> str | None:
    try:
        return Path(path).read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return None


def _locate(memberships: str, mounts: str, version: int) -> tuple[Path, Path] | None:
    """(this process's cgroup directory, the mount point above which we must not walk)."""
    cgroup_path = None
    for line in memberships.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if (version == 1 and "memory" in controllers.split(",")) or (version == 2 and parts[0] == "0" and not controllers):
            cgroup_path = path.strip()
            break
    if cgroup_path is None:
        return None
    for line in mounts.splitlines():
        left, sep, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if not sep or len(fields) < 5 or len(tail) < 1:
            continue
        fstype, options = tail[0], (tail[2] if len(tail) > 2 else "")
        if version == 1 and not (fstype == "cgroup" and "memory" in options.split(",")):
            continue
        if version == 2 and fstype != "cgroup2":
            continue
        root, mount_point = _unescape(fields[3]), Path(_unescape(fields[4]))
        directory = _inside(mount_point, root, cgroup_path)
        limit_file = "memory.limit_in_bytes" if version == 1 else "memory.max"
        # v2 has memory files only where the parent enabled the controller (never at the root),
        # so look up the tree as well as at our own level
        if any((d / limit_file).exists() for d in _upwards(directory, mount_point)):
            return directory, mount_point
    return None


def _inside(mount_point: Path, root: str, cgroup_path: str) -> Path:
    """The directory of `cgroup_path` under a mount of the hierarchy's `root`. A cgroup namespace
    (or a container's bind mount) makes our path "/" or one outside the mount: then the mount
    point itself is our cgroup."""
    root = root.rstrip("/") or "/"
    if cgroup_path == root or root == "/":
        rel = cgroup_path[len(root):] if cgroup_path != root else ""
    elif cgroup_path.startswith(root + "/"):
        rel = cgroup_path[len(root):]
    else:
        return mount_point
    directory = mount_point / rel.lstrip("/")
    return directory if directory.is_dir() else mount_point


def _tightest(directory: Path, mount_point: Path, version: int) -> CgroupMemory | None:
    """Walk from our cgroup up to the mount point: a parent's limit binds its children too, and
    siblings' usage counts against it, so the least room at any level is what we may use."""
    best = None
    for d in _upwards(directory, mount_point):
        level = _level(d, version)
        if level is not None and (best is None or level.available < best.available):
            best = level
    return best


def _upwards(directory: Path, mount_point: Path):
    """`directory`, its parent, ... up to and including the mount point."""
    yield directory
    for d in directory.parents:
        if d != mount_point and mount_point not in d.parents:
            return
        yield d
        if d == mount_point:
            return


def _level(d: Path, version: int) -> CgroupMemory | None:
    if version == 1:
        limit = _number(d / "memory.limit_in_bytes")
        usage = _number(d / "memory.usage_in_bytes")
        cache = _stat(d / "memory.stat", "total_inactive_file")
    else:
        # memory.high is a soft limit, but above it the kernel throttles the process into reclaim
        # (a stall that looks like a hang), so it bounds what a stage should plan for just the same
        limits = [x for x in (_number(d / "memory.max"), _number(d / "memory.high")) if x is not None]
        limit = min(limits) if limits else None
        usage = _number(d / "memory.current")
        cache = _stat(d / "memory.stat", "inactive_file")
    if limit is None or limit >= UNLIMITED:
        return None
    # inactive page cache is reclaimed before the OOM killer runs (what docker and the kubelet call
    # the working set), so it is room we have, not room used
    used = max(0, (usage or 0) - (cache or 0))
    return CgroupMemory(version, str(d), int(limit), int(used))


def _text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""


def _number(path: Path) -> int | None:
    """An integer file; "max" (v2's no limit) and anything missing or unreadable are None."""
    text = _text(path).strip()
    if not text or text == "max":
        return None
    try:
        return int(text)
    except ValueError:
        return None


def _stat(path: Path, key: str) -> int | None:
    for line in _text(path).splitlines():
        name, _, value = line.partition(" ")
        if name == key:
            try:
                return int(value)
            except ValueError:
                return None
    return None


def _unescape(field: str) -> str:
    """mountinfo writes space, tab, newline and backslash in paths as octal escapes (\\040)."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


__all__ = ["CgroupMemory", "cgroup_memory"]
