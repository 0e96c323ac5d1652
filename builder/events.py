"""Progress for humans (tqdm on a TTY, quiet lines otherwise) and JSON events for CI."""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TextIO

from tqdm import tqdm

from builder.redact import redact_data, redact_text

_observers: list[Callable[[str], None]] = []  # see checkpoint()


@dataclass
class Reporter:
    """Where a build says what it is doing.

    `json_mode`: one JSON object per line on stdout (step start/end, progress, warnings, result).
    `quiet`: nothing but warnings and errors. Otherwise short lines on stderr, with tqdm bars
    when stderr is a TTY.
    """

    json_mode: bool = False
    quiet: bool = False
    stream: TextIO = field(default_factory=lambda: sys.stderr)
    timings: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    _lock: threading.RLock = field(default_factory=threading.RLock)

    @property
    def bars(self) -> bool:
        return not self.json_mode and not self.quiet and self.stream.isatty()

    def event(self, kind: str, **data: Any) -> None:
        if self.json_mode:
            line = json.dumps({"event": kind, **redact_data(data)}, sort_keys=True)
            with self._lock:
                sys.stdout.write(line + "\n")
                sys.stdout.flush()

    def info(self, message: str) -> None:
        message = redact_text(message)
        self.event("info", message=message)
        if not self.json_mode and not self.quiet:
            print(message, file=self.stream)

    def warn(self, message: str) -> None:
        message = redact_text(message)  # also what the build report lists
        self.warnings.append(message)
        self.event("warning", message=message)
        if not self.json_mode:
            print(f"warning: {message}", file=self.stream)

    @contextmanager
    def step(self, name: str, **data: Any) -> Iterator[None]:
        start = time.monotonic()
        self.event("step-start", step=name, **data)
        if not self.json_mode and not self.quiet:
            print(f"==> {name}", file=self.stream)
        checkpoint(f"step:{name}")
        ok = False
        try:
            yield
            ok = True
        finally:
            elapsed = time.monotonic() - start
            self.timings[name] = self.timings.get(name, 0.0) + elapsed
            self.event("step-end", step=name, ok=ok, seconds=round(elapsed, 3))

    @contextmanager
    def progress(self, label: str, total: int, unit: str = "B") -> Iterator[Any]:
        """A callable `advance(n)` for workers in any thread."""
        bar = (
            tqdm(total=total, unit=unit, unit_scale=True, desc=label, file=self.stream, leave=False)
            if self.bars
            else None
        )
        done = 0
        last = 0.0
        calls = 0

        def advance(n: int) -> None:
            nonlocal done, last, calls
            with self._lock:
                calls += 1
                call = calls
                done += n
                if bar is not None:
                    bar.update(n)
                now = time.monotonic()
                if self.json_mode and (now - last > 1.0 or done >= total):
                    last = now
                    self.event("progress", label=label, done=done, total=total)
            checkpoint(f"progress:{label}:{call}")

        try:
            yield advance
        finally:
            if bar is not None:
                bar.close()


def observe_checkpoints(observer: Callable[[str], None]) -> Callable[[], None]:
    """Call `observer(point)` at every checkpoint from now on; returns what removes it."""
    _observers.append(observer)
    return lambda: _observers.remove(observer)


def checkpoint(point: str) -> None:
    """A named point of a build that others may observe (none do by default).

    Points: `step:<name>` (a step has just started), `progress:<label>:<k>` (the k-th piece of
    work of a progress bar is done, in whatever worker thread did it), `replace` (the new bundle
    is complete, about to take the old one's place), `replace-between` (between the two renames
    of builder.outdir.replace_dir's fallback, where Ctrl-C is held: SIGKILL only),
    `device:<name>` (a fleet device is about to be built), `push:sent:<k>` (push has sent its
    k-th file). The interruption tests observe them to kill a run at an exact point
    (tests/hooks/sitecustomize.py).
    """
    for observer in list(_observers):
        observer(point)
