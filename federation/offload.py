"""CPU work that grows with a catalog, kept off the event loop and out of the garbage collector's way.

Decoding, validating, folding and encoding the export set of a member with 20,000 services takes seconds of CPU.
On the event loop that also answers heartbeats (the service), or DNS and xDS (a control plane), it would stall
everything else; ``run(fn, *args, items=n)`` therefore runs it on a worker thread once ``n`` (the services or
changes involved) reaches ``INLINE``, and in place below that (a thread hop costs more than a small job). All such
jobs of a process share one worker thread: under the GIL more threads add no CPU, only more contenders the event
loop has to win the GIL from (with four busy workers it waited hundreds of milliseconds; with one, tens).

Threads alone are not enough: such a catalog is millions of small, acyclic, long-lived objects, and CPython's cyclic
collector walks all of them in each full collection, holding the GIL, a pause of hundreds of milliseconds every
time the heap grows by a quarter, in whichever thread allocates. So for a job of ``LARGE`` items or more the
collector is paused while it runs, and afterwards everything alive is moved out of its generations
(``gc.freeze()``, O(1)). Frozen objects are still freed by reference counting as soon as nothing refers to them
(replaced catalogs go away as before); only reference cycles alive at that moment stay until exit, and the
catalog's values (frozen dataclasses, tuples, strings) make none.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import logging
import sys
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

log = logging.getLogger("meshfed.federation.offload")

T = TypeVar("T")

INLINE = 64  # below this many items, run in place
SWITCH_INTERVAL_S = 0.0005  # the GIL switch interval while a job runs
LARGE = 1_000  # from this many items, pause the cyclic GC while running and freeze the heap afterwards

_lock = threading.Lock()
_executor: ThreadPoolExecutor | None = None
_quiet_depth = 0
_was_enabled = True


@contextlib.contextmanager
def quiet_gc(items: int) -> Iterator[None]:
    """Pause the cyclic collector while a job of ``items`` (``LARGE`` or more) runs; freeze the heap after the
    last such job ends. Nested and concurrent jobs share one pause."""
    global _quiet_depth, _was_enabled
    if items < LARGE:
        yield
        return
    with _lock:
        if _quiet_depth == 0:
            _was_enabled = gc.isenabled()
            gc.disable()
        _quiet_depth += 1
    try:
        yield
    finally:
        with _lock:
            _quiet_depth -= 1
            if _quiet_depth == 0:
                gc.freeze()
                if _was_enabled:
                    gc.enable()
                # (not gc.get_freeze_count(): it walks every frozen object, holding the GIL)
                log.debug("heap frozen out of the cyclic GC after a job of %d items", items)


@contextlib.contextmanager
def worker_section(items: int) -> Iterator[None]:
    """What a worker thread's job of ``items`` runs inside (``run`` uses it; so does a job on a thread of its own,
    the xDS push pipeline's): a short GIL switch interval, and the cyclic GC paused for a ``LARGE`` job."""
    # While the worker computes, the event loop's thread must win the GIL back quickly each time it wants it
    # (after every select, recv and send): a short switch interval bounds each wait (the default is 5 ms).
    interval = sys.getswitchinterval()
    sys.setswitchinterval(min(interval, SWITCH_INTERVAL_S))
    try:
        with quiet_gc(items):
            yield
    finally:
        sys.setswitchinterval(interval)


def _quietly(fn: Callable[..., T], items: int, args: tuple[Any, ...], kwargs: dict[str, Any]) -> T:
    with worker_section(items):
        return fn(*args, **kwargs)


async def run(fn: Callable[..., T], *args: Any, items: int, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)``: in place for a small job, else on a worker thread (see the module docstring)."""
    global _executor
    if items < INLINE:
        return fn(*args, **kwargs)
    with _lock:
        if _executor is None:
            _executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="meshfed-offload")
        executor = _executor
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(executor, functools.partial(_quietly, fn, items, args, kwargs))
