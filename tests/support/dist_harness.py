"""Run a function on W gloo ranks (torch.multiprocessing spawn), bounded in time.

A rank that raises fails the test with its traceback (torch's spawn context terminates the other
ranks); collectives time out after `COLLECTIVE_TIMEOUT`; the whole run is killed after `timeout`
seconds. One spawn per world size: callers run all their cases inside one call.
"""

from __future__ import annotations

import datetime
import os
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=90)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, fn, args) -> None:
    torch.set_num_threads(1)
    os.environ.setdefault("TRITON_INTERPRET", "1")
    dist.init_process_group("gloo", rank=rank, world_size=world, init_method=f"tcp://127.0.0.1:{port}",
                            timeout=COLLECTIVE_TIMEOUT)
    try:
        fn(rank, world, *args)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_world(world: int, fn, *args, timeout: float = 300.0) -> None:
    """Call ``fn(rank, world, *args)`` on ``world`` gloo ranks; ``fn`` must be a module-level function."""
    ctx = mp.start_processes(_entry, args=(world, _free_port(), fn, args), nprocs=world, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=1.0):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            pytest.fail(f"{world} ranks did not finish within {timeout:.0f} s")
