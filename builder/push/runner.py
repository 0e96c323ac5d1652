"""Many boxes at once: a worker per box (up to --jobs), a live table, JSON events, a summary.

A box that fails never stops the others; the exit code says whether every box made it.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from builder.errors import AirboxError
from builder.push.bundle import Job, LocalBundle, load_bundle
from builder.push.ssh import Ssh
from builder.push.update import PushOptions, update_box
from builder.units import format_size


@dataclass
class Row:
    box: str
    state: str = "waiting"
    sent: int = 0
    total: int = 0
    message: str = ""
    started: float = field(default_factory=time.monotonic)

    def text(self) -> str:
        if self.state == "sending" and self.total:
            return f"sending {format_size(self.sent)} / {format_size(self.total)}"
        return f"{self.state}{': ' + self.message if self.message else ''}"


class Board:
    """The per-box table: redrawn in place on a terminal, one line per change otherwise, one JSON
    object per change with --json."""

    def __init__(self, boxes: list[str], out: TextIO, *, json_mode: bool, live: bool) -> None:
        self.rows = {b: Row(b) for b in boxes}
        self.out = out
        self.json_mode = json_mode
        self.live = live and not json_mode
        self._lock = threading.Lock()
        self._drawn = 0
        self._last_line: dict[str, str] = {}
        self._last_emit: dict[str, float] = {}

    def update(self, box: str, state: str, **details: Any) -> None:
        with self._lock:
            row = self.rows[box]
            row.state = state
            row.sent = int(details.get("sent", row.sent if state == "sending" else 0))
            row.total = int(details.get("total", row.total if state == "sending" else 0))
            row.message = str(details.get("message", details.get("detail", "")) or "")
            now = time.monotonic()
            if state == "sending" and row.sent < row.total and now - self._last_emit.get(box, 0.0) < 1.0:
                return  # progress: at most one event (or redraw) a second per box
            self._last_emit[box] = now
            if self.json_mode:
                event = {"event": "push", "box": box, "state": state, **details}
                self.out.write(json.dumps(event, sort_keys=True, default=str) + "\n")
                self.out.flush()
            elif self.live:
                self._draw()
            else:
                line = f"{box}: {row.text()}"
                if state != "sending" and self._last_line.get(box) != line:
                    self._last_line[box] = line
                    self.out.write(line + "\n")
                    self.out.flush()

    def _draw(self) -> None:
        width = max(len(b) for b in self.rows)
        lines = [f"  {r.box:<{width}}  {r.text()}" for r in self.rows.values()]
        if self._drawn:
            self.out.write(f"\x1b[{self._drawn}F")
        for line in lines:
            self.out.write("\x1b[2K" + line + "\n")
        self._drawn = len(lines)
        self.out.flush()


@dataclass
class Result:
    box: str
    ok: bool
    state: str
    message: str
    hint: str | None = None
    sent: int = 0
    reused: int = 0


def push_all(
    jobs: list[Job],
    known_hosts: Path | None,
    opts: PushOptions,
    *,
    workers: int,
    json_mode: bool,
    out: TextIO = sys.stdout,
    loaded: Callable[[LocalBundle], None] | None = None,
    identity: Path | None = None,
) -> list[Result]:
    """Verify each distinct bundle once (before any box is touched), then update the boxes."""
    bundles: dict[Path, LocalBundle] = {}
    for job in jobs:
        if job.bundle not in bundles:
            bundles[job.bundle] = load_bundle(job.bundle, known_hosts)
            if loaded is not None:
                loaded(bundles[job.bundle])
    names = [j.target.label for j in jobs]
    if len(set(names)) != len(names):
        raise AirboxError("a box is named twice", hint="give each box once")
    board = Board(names, out, json_mode=json_mode, live=out.isatty())
    results: dict[str, Result] = {}

    def one(job: Job) -> None:
        box = job.target.label
        bundle = bundles[job.bundle]
        ssh = Ssh(job.target, bundle.known_hosts, identity=identity)
        try:
            outcome = update_box(bundle, ssh, opts, lambda state, **d: board.update(box, state, **d))
            results[box] = Result(
                box, True, outcome.state, outcome.message, None, outcome.sent, outcome.reused
            )
            board.update(box, outcome.state, message=outcome.message)
        except AirboxError as e:
            results[box] = Result(box, False, "failed", e.message, e.hint)
            board.update(box, "failed", message=e.message, hint=e.hint)
        except Exception as e:  # one box's surprise must not stop the others
            results[box] = Result(box, False, "failed", f"internal error ({type(e).__name__}: {e})")
            board.update(box, "failed", message=str(e))
        finally:
            ssh.close()

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        list(pool.map(one, jobs))
    return [results[n] for n in names]
