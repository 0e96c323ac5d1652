"""Worker threads that stop with the build: on Ctrl-C or an error nothing keeps writing.

`worker_pool(n)` is a ThreadPoolExecutor for one block. When the block fails or is interrupted
(KeyboardInterrupt reaches the main thread while it waits for a result), the tasks not started
yet are dropped, running tasks see `cancelled()` turn true (long loops check it and stop), and
the block waits for them before the exception goes on. So the build's cleanup never races a
worker still writing into the folder it removes, and no worker keeps the process alive.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

_local = threading.local()


class Cancelled(Exception):
    """Raised in a worker whose pool was cancelled; its result is never read."""


def _bind(stop: threading.Event) -> None:
    _local.stop = stop


def cancelled() -> bool:
    """True in a worker thread of a pool whose block failed or was interrupted."""
    stop: threading.Event | None = getattr(_local, "stop", None)
    return stop is not None and stop.is_set()


def check_cancelled() -> None:
    """Stop this worker's task (raise Cancelled) when its pool was cancelled."""
    if cancelled():
        raise Cancelled


@contextmanager
def worker_pool(workers: int) -> Iterator[ThreadPoolExecutor]:
    stop = threading.Event()
    pool = ThreadPoolExecutor(max(1, workers), initializer=_bind, initargs=(stop,))
    try:
        yield pool
    except BaseException:
        stop.set()
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown(wait=True)
