"""The worker pool the grid benchmarks share: runs in spawned processes, a deadline, one failure reported."""

from __future__ import annotations

import multiprocessing
import sys
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Any


def run_pool(work: Callable[[dict[str, Any]], dict[str, Any]], jobs: list[dict[str, Any]], workers: int,
             deadline: float | None = None, start: float | None = None) -> list[dict[str, Any]]:
    """Run ``work(job)`` for each job, ``workers`` at a time, starting none after ``deadline`` seconds
    (counted from ``start``, default now). Each result's ``out`` folder name, score and seconds are printed;
    a run that raises is reported on stderr and the rest go on. Returns the jobs left unstarted."""
    start = time.time() if start is None else start
    jobs = list(jobs)
    # spawn, not fork: CUDA cannot be used in a forked child
    with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        pending: set = set()
        while jobs or pending:
            while jobs and len(pending) < workers and (deadline is None or time.time() - start < deadline):
                pending.add(pool.submit(work, jobs.pop(0)))
            if not pending:
                break
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                try:
                    r = future.result()
                    print(f"{Path(r['out']).name}: {r['score']:.4f} ({r['seconds']:.0f} s)", flush=True)
                except Exception as e:  # one failed run must not stop the grid
                    print(f"run failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
    if jobs:
        print(f"{len(jobs)} runs left undone (deadline)", flush=True)
    return jobs
