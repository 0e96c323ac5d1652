"""Fault hooks for the test suite's subprocesses, applied at interpreter start-up.

The product has no test hooks. A test that must stop a build at an exact point, or take a code
path this machine would not take, runs the CLI with this folder on PYTHONPATH (faultkit.cli_env,
faultkit.start_cli) and one of these variables:

- `_AIRBOX_BUILD_STALL_AT=<point>`: at that `builder.events.checkpoint` (`step:<name>`,
  `progress:<label>:<k>`, `replace`, `replace-between`, `device:<name>`, `push:sent:<k>`), print
  `{"event": "stalled", "at": point}` and wait: on the main thread until a signal interrupts
  it, in a worker until its pool is cancelled. The test then signals the process.
- `_AIRBOX_BUILD_NO_EXCHANGE=1`: renameat2(RENAME_EXCHANGE) is unavailable (builder.outdir takes
  its portable two-rename path, as on macOS or an old glibc).
- `_AIRBOX_BUILD_TOOL_DIRS=<dirs>`: the fallback folders for tools missing from PATH (instead of
  /usr/sbin, /sbin, ...), so a test can hide a tool.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time


def _stall_at(wanted: str) -> None:
    from builder import events
    from builder.pool import Cancelled, cancelled

    def stall(point: str) -> None:
        if point != wanted:
            return
        sys.stdout.write(json.dumps({"event": "stalled", "at": point}) + "\n")
        sys.stdout.flush()
        main = threading.main_thread()
        on_main = threading.current_thread() is main
        while True:
            if not on_main and (cancelled() or not main.is_alive()):
                raise Cancelled
            time.sleep(0.01)

    events.observe_checkpoints(stall)


if os.environ.get("_AIRBOX_BUILD_STALL_AT"):
    _stall_at(os.environ["_AIRBOX_BUILD_STALL_AT"])
if os.environ.get("_AIRBOX_BUILD_NO_EXCHANGE"):
    import builder.outdir

    builder.outdir._exchange = lambda a, b: False
if "_AIRBOX_BUILD_TOOL_DIRS" in os.environ:
    import builder.run

    value = os.environ["_AIRBOX_BUILD_TOOL_DIRS"]
    builder.run.FALLBACK_DIRS = tuple(d for d in value.split(os.pathsep) if d)
