"""One background task tied to an async context: started on enter, cancelled and awaited on exit.

Used by the push debouncer (``gateway.push``) and the workload certificate rotation (``gateway.sds``); a subclass
names its task and implements ``_run``.
"""

from __future__ import annotations

import asyncio
import contextlib
from types import TracebackType
from typing import ClassVar, Self


class BackgroundTask:
    """Base for an object whose lifetime as an async context manager is one task running ``_run``."""

    task_name: ClassVar[str] = "background"
    _task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        self._task = asyncio.create_task(self._run(), name=self.task_name)
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
