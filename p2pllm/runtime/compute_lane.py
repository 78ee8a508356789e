"""The one lane a peer's stage is used on: a single compute thread, or for a small step the event
loop itself.

A stage is not thread-safe, so every use of it (steps, KV exports, loading, freeing) is queued on
one thread. A decode step of a small stage takes a few milliseconds, and handing it to that thread
and its result back costs two thread wake-ups and GIL hand-offs per stage and token (measured:
6-9% of a SmolLM2 token on loopback). So a step may run on the event loop instead, when nothing
is queued on the thread (the loop is the only submitter, so nothing can be queued while it
computes) and the stage's compute threads leave a core free: with as many threads as cores, a
3B model's decode on the loop ran at 9.5 tok/s against 13.5 on the compute thread (the loop's
gRPC poller competes with ggml's threads, which then wait at their barriers).
"""

from __future__ import annotations

import asyncio
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, TypeVar

T = TypeVar("T")


class ComputeLane:
    def __init__(self, name: str = "compute", *, inline: bool = False):
        self.inline = inline  # small steps may run on the event loop (see above)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self._lock = threading.Lock()
        self._queued = 0  # submitted and not finished (finished: done, failed or cancelled)

    def idle(self) -> bool:
        """Nothing is queued or running on the compute thread."""
        return self._queued == 0

    def may_inline(self) -> bool:
        """Whether work may run on the event loop now instead of the compute thread."""
        return self.inline and self.idle()

    async def run(self, fn: Callable[..., T], *args) -> T:
        """fn(*args) on the compute thread, after everything queued before it."""
        with self._lock:
            self._queued += 1
        try:
            future = self._executor.submit(fn, *args)
        except BaseException:
            self._finished(None)
            raise
        future.add_done_callback(self._finished)
        return await asyncio.wrap_future(future)

    def _finished(self, _: Future | None) -> None:
        with self._lock:
            self._queued -= 1

    async def drain(self) -> None:
        """Wait for what is queued now (a step being computed) to finish."""
        await self.run(lambda: None)

    @staticmethod
    def for_threads(threads: int) -> "ComputeLane":
        """The lane of a stage computing with `threads` threads."""
        return ComputeLane(inline=inline_with(threads))

    def follow(self, threads: int) -> None:
        """The stage now used on this lane computes with `threads` threads."""
        self.inline = inline_with(threads)

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


def inline_with(threads: int) -> bool:
    """Small steps may run on the loop only while the stage's threads leave a core to spare."""
    return threads < (os.cpu_count() or 1)
