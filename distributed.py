"""
Run plumbing shared by the scripts: one process or many (torchrun), stopping cleanly, seeds, the run's log,
the run folder's lock, and the command line's checks and one-line errors.

    rank, world, device = distributed.setup()     # torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; alone: rank 0
    stop = distributed.StopSignals()              # SIGTERM / SIGINT: finish the step, save, exit
    ...
    distributed.teardown(world)
    if __name__ == "__main__": distributed.cli(main)   # expected failures as one line (see cli)

The same script runs under `python` (one process) and under `torchrun` (one process per GPU: NCCL on GPUs,
gloo on CPU). Rank 0 logs and writes files; every rank meets the others at the barrier after a checkpoint.
"""

import errno
import fcntl
import json
import math
import os
import signal
import socket
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image, ImageDraw


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
    """Leave the process group once every rank is here: a rank that destroyed its gloo group while another was
    still in a collective with it would make that one abort."""
    if world > 1:
        dist.barrier()
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


def read_log(path):
    """The records of a log.jsonl. A torn last line (a run killed mid-write) is dropped; damage anywhere else is an
    error that names the file and the line."""
    with open(path, "rb") as f:
        lines = f.read().split(b"\n")
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            if all(not rest.strip() for rest in lines[i + 1:]):  # the last line, cut off: its step runs again
                break
            raise ValueError(f"{path} is damaged at line {i + 1} ({e}); move it away to resume without the "
                             f"earlier records") from None
    return records


class RunLog:
    """OUT/log.jsonl and the console, from rank 0 only. On resume, what was logged after the checkpoint's step
    is dropped first: those steps run again."""

    def __init__(self, out, rank, resume_step=None):
        self.rank, self.path, self.records = rank, os.path.join(out, "log.jsonl"), []
        if rank != 0:
            return
        if resume_step is not None and os.path.exists(self.path):
            kept = [r for r in read_log(self.path) if r.get("step", 0) <= resume_step]
            with open(self.path + ".tmp", "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in kept)
            os.replace(self.path + ".tmp", self.path)
            self.records = [r for r in kept if "loss" in r]
        elif resume_step is not None:
            print(f"note: {self.path} is missing; the log goes on from step {resume_step} without the earlier "
                  f"records", flush=True)
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


class RunLock:
    """OUT/lock, held by rank 0 while a run writes to OUT: a second run on the same folder stops at once and
    names the process that holds it. The lock is the kernel's (flock), which drops it when its process ends,
    however it ends: the file a killed run leaves behind blocks nothing."""

    held = {}  # path -> file, of this process: a later run in the same process (after an error) takes over

    def __init__(self, out, rank, option="--out"):
        self.file = None
        if rank != 0:
            return
        path = os.path.realpath(os.path.join(out, "lock"))
        if path in RunLock.held:
            RunLock.held.pop(path).close()
        f = open(path, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            f.close()
            raise SystemExit(f"error: {out} is in use by {holder}; wait for that run to end, or give another {option}")
        f.seek(0)
        f.truncate()
        f.write(f"process {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        f.flush()
        self.file = RunLock.held[path] = f

    def release(self):
        if self.file is not None:
            RunLock.held = {k: v for k, v in RunLock.held.items() if v is not self.file}
            self.file.close()  # closing drops the lock
            self.file = None


def parse_with_preset(parser, argv, presets):
    """parser.parse_args(argv), with the defaults of --preset NAME (presets[NAME]) under the flags given."""
    chosen = parser.parse_known_args(argv)[0].preset
    if chosen is not None:
        parser.set_defaults(**presets[chosen])
    return parser.parse_args(argv)


def check_args(parser, args, positive=(), non_negative=(), multiples=None, folder=(), ranges=None, file=()):
    """The checks every script makes before any work, each failure one line that names the value (exit status 2):
    every number finite (NaN and infinity are refused everywhere), options that must be positive or not negative
    (None is left alone; a pair is checked as a whole), closed ranges ({name: (low, high)}), positive multiples
    ({name: (k, why)}), output folders (`folder`, a name or several) that must not be files or empty names, and
    output files (`file`) that must not be folders."""
    for name, value in vars(args).items():
        values = value if isinstance(value, (list, tuple)) else [value]
        if any(isinstance(v, float) and not math.isfinite(v) for v in values):
            parser.error(f"--{name.replace('_', '-')} {' '.join(map(str, values))}: not a finite number")
    for name, (low, high) in (ranges or {}).items():
        value = getattr(args, name)
        if value is not None and not low <= value <= high:
            parser.error(f"--{name.replace('_', '-')} {value}: it must be between {low} and {high}")
    for name, (k, why) in (multiples or {}).items():
        value = getattr(args, name)
        if value <= 0 or value % k:
            parser.error(f"--{name.replace('_', '-')} {value}: it must be a positive multiple of {k} ({why})")
    rules = ((positive, lambda v: v > 0, "be positive"), (non_negative, lambda v: v >= 0, "not be negative"))
    for names, holds, must in rules:
        for name in names:
            value = getattr(args, name)
            values = value if isinstance(value, (list, tuple)) else [value]
            if value is not None and not all(holds(v) for v in values):
                which = "both" if len(values) == 2 else "it"
                parser.error(f"--{name.replace('_', '-')} {' '.join(map(str, values))}: {which} must {must}")
    for name in (folder,) if isinstance(folder, str) else folder or ():
        path, flag = getattr(args, name), "--" + name.replace("_", "-")
        if path is not None and not path.strip():
            parser.error(f"{flag} is empty; give a folder")
        if path is not None and os.path.exists(path) and not os.path.isdir(path):
            parser.error(f"{flag} {path}: it is a file; give a folder")
    for name in (file,) if isinstance(file, str) else file or ():
        path, flag = getattr(args, name), "--" + name.replace("_", "-")
        if path is not None and (not path.strip() or os.path.isdir(path)):
            parser.error(f"{flag} {path!r}: give the path of a file to write, not a folder")


def cli(main, argv=None):
    """Run a script's main(argv) so that an expected failure (a missing, damaged or mismatched file, bad data,
    a full disk, too little GPU memory) is one line on stderr and exit status 1. `--debug` anywhere on the
    command line, or MEDSORA_DEBUG=1, lets the exception through with its traceback instead."""
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv or os.environ.get("MEDSORA_DEBUG", "0") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    if debug:
        return main(argv)
    try:
        return main(argv)
    except torch.OutOfMemoryError:
        sys.exit("error: out of GPU memory: lower --batch-size (--debug shows where)")
    except (OSError, ValueError, KeyError) as e:
        sys.exit(f"error: {' '.join(describe(e).split())} (--debug shows where)")


def describe(e):
    """The words of an expected failure: an OSError's own message and file, never its bare number (a full disk is
    said as such, with what to do), else the exception's message."""
    if isinstance(e, OSError) and not e.strerror and e.args and isinstance(e.args[0], int):
        e = OSError(e.args[0], os.strerror(e.args[0]))  # only a number: its words
    if isinstance(e, OSError) and e.strerror:
        if e.errno in (errno.ENOSPC, errno.EDQUOT) and not e.strerror.startswith("no space left on the disk"):
            where = f" while writing {e.filename}" if e.filename else ""
            return f"no space left on the disk{where}: free some space, then run it again (--resume where it has one)"
        return f"{e.strerror}: {e.filename}" if e.filename else e.strerror
    text = str(e.args[0]) if e.args else type(e).__name__
    if "Original Traceback" in text:  # raised in a DataLoader worker: its own last line is the message
        text = text.strip().splitlines()[-1].split(": ", 1)[-1]
    return text


def plot_loss(records, path, width=640, height=360):
    """A loss curve (log scale) as PNG, drawn with PIL: raw points grey, a moving average blue."""
    records = [r for r in records if r["loss"] is not None and r["loss"] > 0]  # skipped intervals have none
    steps = np.array([r["step"] for r in records], dtype=float)
    loss = np.array([r["loss"] for r in records], dtype=float)
    if len(steps) < 2:
        return
    k = max(1, len(loss) // 20)
    smooth = np.convolve(loss, np.ones(k) / k, mode="valid")
    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    left, right, top, bottom = 60, width - 10, 10, height - 30
    lo, hi = np.log10(loss.min()), np.log10(loss.max()) + 1e-9
    xy = lambda s, v: (left + (s - steps[0]) / max(steps[-1] - steps[0], 1) * (right - left),  # noqa: E731
                       bottom - (np.log10(v) - lo) / (hi - lo) * (bottom - top))
    d.rectangle([left, top, right, bottom], outline="black")
    d.line([xy(s, v) for s, v in zip(steps, loss)], fill=(190, 190, 190))
    d.line([xy(s, v) for s, v in zip(steps[k - 1:], smooth)], fill=(30, 80, 200), width=2)
    for v in (loss.min(), loss.max()):
        d.text((4, xy(steps[0], v)[1] - 6), f"{v:.3g}", fill="black")
    d.text((left, bottom + 8), f"step {int(steps[0])}", fill="black")
    d.text((right - 80, bottom + 8), f"step {int(steps[-1])}", fill="black")
    d.text((left + 8, top + 4), "training loss (log scale)", fill="black")
    tmp = path + ".tmp.png"
    img.save(tmp)
    os.replace(tmp, path)


def write_json(path, obj):
    """Write obj as JSON to path whole or not at all: an interrupted or failed write leaves the previous file and
    no temporary one."""
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=1)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


class LossMeter:
    """The losses of the steps since the last log record, summed over the ranks when the record is written."""

    def __init__(self):
        self.loss = self.align = 0.0
        self.n = self.clips = 0
        self.t = time.perf_counter()

    def record(self, step, epoch, lr, grad_norm, skipped, world, device, aligned):
        totals = torch.tensor([self.loss, self.n, self.align], device=device, dtype=torch.float64)
        if world > 1:
            dist.all_reduce(totals)  # the loss of all ranks
        loss, n, align = totals.tolist()
        now = time.perf_counter()
        record = {"step": step, "epoch": epoch, "loss": loss / n if n else None,  # None: every step was skipped
                  "lr": lr, "grad_norm": grad_norm, "clips_per_s": self.clips / (now - self.t), "skipped": skipped}
        if aligned and n:
            record["align"] = align / n  # Eq. 15, before alpha
        if device.type == "cuda":
            record["peak_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
        self.__init__()
        return record


def weights_checksum(model):
    return sum(float(p.detach().double().sum()) + float(p.detach().double().abs().sum()) for p in model.parameters())


def check_same_weights(model, world, log, step):
    """Under torchrun: every rank must hold the same weights after training (their checksums are compared)."""
    if world > 1:
        sums = gather(weights_checksum(model), world)
        log.write({"step": step, "rank_checksums": sums})
        if len(set(sums)) != 1:
            raise RuntimeError(f"ranks hold different weights after training: checksums {sums}")
        log(f"weights identical on all {world} ranks (checksum {sums[0]:.6f})")
