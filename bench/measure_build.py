"""Run one `airbox-build` command in this process and record its peak memory.

    python bench/measure_build.py RESULT.json -- build recipe.yaml -o OUT --cache-dir CACHE

RESULT.json gets the exit code, the wall time, and two peaks: `rss_self` (this Python
process: the builder itself) and `rss_children` (the largest tool it ran: e2fsck, debugfs,
resize2fs...). Running in-process, not under a second wrapper, keeps `rss_self` the builder's.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path


def main(argv: list[str]) -> int:
    result_file = Path(argv[0])
    args = argv[argv.index("--") + 1 :]
    start = time.perf_counter()
    code = 0
    from builder.cli import main as cli_main

    try:
        cli_main.main(args=args, prog_name="airbox-build", standalone_mode=True)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    wall = time.perf_counter() - start
    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    result_file.write_text(
        json.dumps(
            {
                "exit": code,
                "seconds": wall,
                "rss_self": me.ru_maxrss * 1024,
                "rss_children": kids.ru_maxrss * 1024,
                "cpu_self": me.ru_utime + me.ru_stime,
                "cpu_children": kids.ru_utime + kids.ru_stime,
            }
        )
    )
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
