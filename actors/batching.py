"""Window batching for serving actors: concurrent requests that arrive within `window` seconds (up
to `max_batch`) are answered by one call, the way the world-model scorer and the policy server
amortise a forward pass over many environments.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Callable


class WindowBatcher:
    def __init__(self, answer: Callable[[list[Any]], list[Any]], window_s: float, max_batch: int):
        """`answer(items)` returns one result (or an Exception instance) per item, in order."""
        self.answer = answer
        self.window = window_s
        self.max_batch = max_batch
        self.queue: asyncio.Queue | None = None
        self.batches = 0

    async def submit(self, item: Any) -> Any:
        loop = asyncio.get_running_loop()
        if self.queue is None:
            self.queue = asyncio.Queue()
            self._worker = loop.create_task(self._serve())
        done = loop.create_future()
        await self.queue.put((item, done))
        return await done

    async def _serve(self) -> None:
        while True:
            batch = [await self.queue.get()]
            deadline = time.monotonic() + self.window
            while len(batch) < self.max_batch:
                timeout = deadline - time.monotonic()
                if timeout <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self.queue.get(), timeout))
                except asyncio.TimeoutError:
                    break
            self.batches += 1
            try:
                results = self.answer([item for item, _ in batch])
            except Exception as exc:  # never leave a request waiting
                results = [exc] * len(batch)
            for (_, fut), result in zip(batch, results):
                if isinstance(result, Exception):
                    fut.set_exception(result)
                else:
                    fut.set_result(result)
