"""Run a function on N processes joined in a gloo process group (CPU).

Used by the distributed families (GEMM + reduce-scatter, MoE dispatch) to test
their protocols without GPUs:

    results = run_distributed(fn, world_size=4, args=(x,))

``fn(rank, world_size, *args)`` runs in each process after
``torch.distributed.init_process_group("gloo")``; its return value (picklable)
comes back in rank order. An exception on any rank fails the call with that
rank's traceback; a rank that hangs fails it after ``timeout_s``.
"""

from __future__ import annotations

import os
import socket
import tempfile
import traceback
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.multiprocessing.spawn import ProcessException

__all__ = ["run_distributed"]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world_size, port, fn, args, out_dir):
    path = os.path.join(out_dir, f"rank{rank}.pt")
    try:
        os.environ["MASTER_ADDR"] = "127.0.0.1"
        os.environ["MASTER_PORT"] = str(port)
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        try:
            result = fn(rank, world_size, *args)
            torch.save({"ok": True, "result": result}, path)
            # Without this, a rank that finishes first tears down its gloo pairs
            # while a peer may still be draining the last exchange; gloo then
            # aborts that peer (SIGABRT, seen once in CI). If a peer failed, the
            # barrier fails too: that peer's own file reports why.
            try:
                dist.barrier()
            except Exception:
                pass
        finally:
            dist.destroy_process_group()
    except BaseException:  # report every failure to the parent, with its traceback
        torch.save({"ok": False, "error": traceback.format_exc()}, path)
        raise


def run_distributed(
    fn: Callable[..., Any], world_size: int, args: Sequence[Any] = (), timeout_s: float = 120.0
) -> list[Any]:
    if world_size < 1:
        raise ValueError(f"expected world_size >= 1, got {world_size}")
    with tempfile.TemporaryDirectory(prefix="inferops_dist_") as out_dir:
        ctx = mp.start_processes(
            _worker,
            args=(world_size, _free_port(), fn, tuple(args), out_dir),
            nprocs=world_size,
            join=False,
            start_method="spawn",
        )
        import time

        deadline = time.monotonic() + timeout_s
        try:
            while not ctx.join(timeout=1.0):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"distributed run did not finish within {timeout_s} s")
        except ProcessException as e:  # raised or died (signal): the files below say which rank
            died = str(e)
        else:
            died = None
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.terminate()
        results = []
        for rank in range(world_size):
            path = os.path.join(out_dir, f"rank{rank}.pt")
            if not os.path.exists(path):
                raise RuntimeError(f"rank {rank} exited without a result ({died or 'no error reported'})")
            rec = torch.load(path, weights_only=False)
            if not rec["ok"]:
                raise RuntimeError(f"rank {rank} failed:\n{rec['error']}")
            results.append(rec["result"])
        return results
