"""
Run plumbing shared by the scripts: one process or many (torchrun), stopping cleanly, seeds, the run's log.

    rank, world, device = distributed.setup()     # torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; alone: rank 0
    stop = distributed.StopSignals()              # SIGTERM / SIGINT: finish the step, save, exit
    ...
    distributed.teardown(world)

The same script runs under `python` (one process) and under `torchrun` (one process per GPU: NCCL on GPUs,
gloo on CPU). Rank 0 logs and writes files; every rank meets the others at the barrier after a checkpoint.
"""

import json
import os
import signal

import numpy as np
import torch
import torch.distributed as dist


def setup():
    """(rank, world, device) of this process; joins the process group when started by torchrun."""
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if torch.cuda.is_available():  # the GPU first, so NCCL binds each process to its own device
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if torch.cuda.is_available():
        return rank, world, torch.device("cuda", torch.cuda.current_device())
    return rank, world, torch.device("cpu")


def teardown(world):
    if world > 1:
        dist.destroy_process_group()


def barrier(world):
    if world > 1:
        dist.barrier()


def gather(obj, world):
    """Every rank's `obj` (picklable), in rank order, on every rank."""
    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


def agree(flag, world, device):
    """True on every rank if it is true on any: a signal, a deadline or a NaN seen by one rank stops or skips
    on all of them at the same step, so that none waits forever in the next all-reduce."""
    t = torch.tensor([float(flag)], device=device)
    if world > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def mix_seed(*parts):
    """One 32-bit seed from several integers (seed, epoch, rank, index, ...). Distinct tuples give unrelated
    streams, where `seed + rank` would give run 1's rank 0 the stream of run 0's rank 1."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


class StopSignals:
    """SIGTERM / SIGINT set `.signal` instead of killing the run: the loop finishes its step, saves and exits.
    `restore()` gives the previous handlers back."""

    def __init__(self):
        self.signal = None
        self.previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
        for sig in self.previous:
            signal.signal(sig, self._catch)

    def _catch(self, sig, _frame):
        self.signal = sig

    def restore(self):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


class RunLog:
    """OUT/log.jsonl and the console, from rank 0 only. On resume, what was logged after the checkpoint's step
    is dropped first: those steps run again."""

    def __init__(self, out, rank, resume_step=None):
        self.rank, self.path, self.records = rank, os.path.join(out, "log.jsonl"), []
        if rank != 0:
            return
        if resume_step is not None and os.path.exists(self.path):
            with open(self.path) as f:
                kept = [r for r in map(json.loads, f) if r.get("step", 0) <= resume_step]
            with open(self.path + ".tmp", "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in kept)
            os.replace(self.path + ".tmp", self.path)
            self.records = [r for r in kept if "loss" in r]
        self.file = open(self.path, "a")

    def __call__(self, *msg):
        if self.rank == 0:
            print(*msg, flush=True)

    def write(self, record):
        if self.rank == 0:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
            if "loss" in record:
                self.records.append(record)

    def close(self):
        if self.rank == 0:
            self.file.close()
