"""A fair (FIFO) limit on answers in flight, that tells waiters their place in line.

The worker batches up to `max_batch_size` sequences; sending more only makes
every answer slower. The bot keeps the rest waiting here, first come first
served, and shows each waiting user their position.
"""

from __future__ import annotations

import asyncio
from collections import deque
from contextlib import asynccontextmanager
from typing import AsyncIterator, Callable, Awaitable, Optional


class InflightLimiter:
    def __init__(self, limit: int):
        if limit < 1:
            raise ValueError(f"in-flight limit must be at least 1, got {limit}")
        self.limit = limit
        self.active = 0
        self._waiting: deque[asyncio.Future] = deque()
        self._changed = asyncio.Event()

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def _notify(self) -> None:
        # Wake everyone watching positions, then arm a fresh event for the next change.
        self._changed.set()
        self._changed = asyncio.Event()

    def _release(self) -> None:
        while self._waiting:
            fut = self._waiting.popleft()
            if not fut.done():
                fut.set_result(None)  # the slot passes straight to the next in line
                self._notify()
                return
        self.active -= 1
        self._notify()

    @asynccontextmanager
    async def slot(
        self, on_position: Optional[Callable[[int], Awaitable[None]]] = None
    ) -> AsyncIterator[None]:
        """Hold one slot; while waiting, `on_position(n)` is awaited whenever n changes."""
        if self.active < self.limit and not self._waiting:
            self.active += 1
        else:
            fut = asyncio.get_running_loop().create_future()
            self._waiting.append(fut)
            try:
                last = None
                while not fut.done():
                    position = self._waiting.index(fut) + 1
                    changed = self._changed
                    if position != last and on_position is not None:
                        last = position
                        await on_position(position)
                    if not fut.done():
                        watcher = asyncio.ensure_future(changed.wait())
                        try:
                            await asyncio.wait([fut, watcher], return_when=asyncio.FIRST_COMPLETED)
                        finally:
                            watcher.cancel()
            except BaseException:
                if fut.done() and not fut.cancelled():
                    self._release()  # we were handed a slot but will not use it
                else:
                    fut.cancel()
                    if fut in self._waiting:
                        self._waiting.remove(fut)
                    self._notify()
                raise
        try:
            yield
        finally:
            self._release()
