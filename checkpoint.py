"""
Checkpoints: written atomically, read without running code, damage detected and named.

    checkpoint.save(obj, path)      a temporary file, then a rename: a crash leaves the old file or the new one
    checkpoint.load(path)           every part's CRC-32 checked, then torch.load(weights_only=True)
    checkpoint.check_finite(state, path)   NaN or infinite weights refused by name
    checkpoint.rng_state()          every random generator (Python, NumPy, torch, CUDA) as tensors and numbers
    checkpoint.save_run(...)        a trainer's checkpoint with each rank's RNG state, from rank 0, then a barrier

    python checkpoint.py upgrade runs/medsora/ckpt.pt    # an earlier version's checkpoint, in the safe form

`torch.load(weights_only=True)` rebuilds only tensors, numbers, strings, lists, tuples and dicts: a file that
asks for any other object (which is how a pickle runs code) is refused. So nothing here is stored as such an
object: the NumPy RNG state, for one, is kept as a tensor and numbers rather than as a pickled array.
A torch checkpoint is a zip archive whose parts carry CRC-32 checksums that torch.load does not check; `load`
checks them, so a truncated or bit-flipped file is named instead of silently giving wrong weights.
"""

import argparse
import contextlib
import errno
import os
import pickle
import random
import shutil
import sys
import zipfile

import numpy as np
import torch

import distributed


def save(obj, path):
    """torch.save to PATH.tmp, fsync, rename. On failure (a full disk, an interrupt) the temporary file is removed
    and the previous PATH is left as it was; a full disk is said in those words."""
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())  # on disk before the rename, so a power cut cannot leave a renamed empty file
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        full = isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT) or "unexpected pos" in str(e)
        if not full:
            raise
        free = shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free
        kept = "the previous checkpoint is intact; " if os.path.exists(path) else ""
        raise OSError(errno.ENOSPC, f"no space left on the disk while writing {path} ({free / 2**20:.0f} MiB free): "
                      f"{kept}free some space, then --resume") from None
    try:
        os.replace(tmp, path)
    except OSError:  # PATH is a folder, say: nothing is left behind
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def load(path, what="checkpoint"):
    """A file written by `save` (or any torch.save zip file), checked, on the CPU. Errors name the file."""
    check_whole(path, what)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{path}: refused to load: it holds objects other than tensors and plain values, and "
                         f"rebuilding them could run code ({first}). A checkpoint of an earlier version of this "
                         f"project: `python checkpoint.py upgrade {path}` rewrites it (it runs nothing from the "
                         f"file)") from None


def check_whole(path, what="checkpoint"):
    """Refuse a missing file, one that is not a zip archive (torch.save's form), or one whose parts fail their
    CRC-32 checksums; each error names the file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no {what} at {path}")
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()  # reads every part and compares it with its CRC-32
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise ValueError(f"{path} is damaged: not a complete torch checkpoint ({e}); it was probably cut off "
                         f"while being copied or written. Delete it or use another copy") from None
    if bad is not None:
        raise ValueError(f"{path} is damaged: its part {bad} fails its checksum. Delete it or use another copy")


def check_finite(state, path, what="weights"):
    """Refuse a state dict with NaN or infinite values: such weights decode to black or noise."""
    bad = [k for k, v in state.items() if torch.is_tensor(v) and v.is_floating_point() and not v.isfinite().all()]
    if bad:
        raise ValueError(f"{path}: the {what} hold NaN or infinite values in {len(bad)} tensors (first {bad[0]}); "
                         f"this checkpoint cannot be used: take an earlier one")
    return state


def non_finite(state, prefix=""):
    """The names of the floating-point tensors in a (nested) state that hold NaN or infinite values."""
    if torch.is_tensor(state):
        return [prefix] if state.is_floating_point() and not state.isfinite().all() else []
    items = state.items() if isinstance(state, dict) else enumerate(state) if isinstance(state, (list, tuple)) else []
    return [name for k, v in items for name in non_finite(v, f"{prefix}.{k}" if prefix else str(k))]


def resume(out, args, keys, defaults=None):
    """OUT/ckpt.pt for --resume, loaded, or an error that says what to do. The options named in `keys` must be
    those the checkpoint was trained with (its "args"); the error lists every one that differs. An option that
    a checkpoint does not record (it came before the option existed) counts as its value in `defaults`."""
    defaults = defaults or {}
    path = os.path.join(out, "ckpt.pt")
    if not os.path.exists(path):
        raise SystemExit(f"error: --resume given but {path} does not exist; start without --resume")
    ckpt = load(path)
    bad = non_finite({k: ckpt[k] for k in ("model", "ema", "optimizer") if k in ckpt})
    if bad:  # resuming would carry them into the weights (an optimizer's moments, for one)
        raise SystemExit(f"error: {path} holds NaN or infinite values in {len(bad)} tensors (first {bad[0]}): it "
                         f"cannot be resumed; take an earlier checkpoint")
    trained = {k: ckpt["args"].get(k, defaults.get(k)) for k in keys}
    changed = [f"--{k.replace('_', '-')}: {trained[k]!r} -> {getattr(args, k)!r}" for k in keys
               if trained[k] != getattr(args, k)]
    if changed:
        raise SystemExit(f"error: --resume with other options than {path} was trained with: "
                         f"{'; '.join(changed)}. Give the same options, or a new --out")
    return ckpt


def check_same_vae(ckpt, vae_config, vae_path, path):
    """--resume continues in the latent space it trained in: the VAE's configuration, its latent scaling included,
    must be the checkpoint's."""
    trained = ckpt.get("vae_config")
    if trained is not None and trained != vae_config:
        changed = [f"{k}: {trained.get(k)!r} -> {vae_config.get(k)!r}" for k in sorted(set(trained) | set(vae_config))
                   if trained.get(k) != vae_config.get(k)]
        raise SystemExit(f"error: --vae {vae_path} is not the VAE {path} was trained with ({'; '.join(changed)}); "
                         f"give --vae {ckpt.get('vae_path')}, or a new --out")


def rng_state():
    keys, pos, has_gauss, cached = np.random.get_state()[1:]
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_run(state, path, rank, world):
    """A trainer's checkpoint: `state` plus every rank's RNG state ("rng", in rank order), written by rank 0;
    all ranks wait until it is on disk."""
    rngs = distributed.gather(rng_state(), world)
    bad = non_finite({k: state[k] for k in ("model", "ema", "optimizer") if k in state})
    if bad:  # a good checkpoint is never replaced by one that cannot be used
        raise RuntimeError(f"not saving {path}: the weights or optimizer hold NaN or infinite values (first "
                           f"{bad[0]}); the last checkpoint is kept. Lower --lr, or --resume from it")
    if rank == 0:
        save({**state, "rng": rngs, "world": world}, path)
    distributed.barrier(world)


def _old_numpy_pieces():
    """What earlier versions of this project wrote besides tensors and plain values: NumPy's RNG state as a pickled
    uint32 array (written under NumPy 1 or 2, whose module paths differ)."""
    core = getattr(np, "_core", None) or np.core
    rebuild = core.multiarray._reconstruct
    return [np.ndarray, np.dtype, type(np.dtype(np.uint32)), rebuild, (rebuild, "numpy.core.multiarray._reconstruct")]


def upgrade(path):
    """Rewrite a checkpoint of an earlier version, whose NumPy RNG states were pickled arrays, in the safe form.
    It never runs anything from the file: torch's weights-only unpickler reads it, admitting besides tensors and
    plain values only the NumPy array pieces those versions wrote; a file that asks for anything else is refused
    and left as it was."""
    check_whole(path)
    try:
        with torch.serialization.safe_globals(_old_numpy_pieces()):
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{path}: not upgraded, and left as it was: it asks for objects that no version of this "
                         f"project wrote, and rebuilding them could run code ({first[:120]})") from None
    states = ckpt.get("rng")
    for state in states if isinstance(states, list) else [states] if states else []:
        if isinstance(state.get("numpy"), tuple):
            _, keys, pos, has_gauss, cached = state["numpy"]
            state["numpy"] = {"keys": torch.from_numpy(np.asarray(keys).astype(np.int64)), "pos": int(pos),
                              "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}
    save(ckpt, path)
    load(path)  # now loads without running code, or says what is still in the way
    print(f"rewrote {path}")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=["upgrade"])
    p.add_argument("paths", nargs="+")
    for path in p.parse_args().paths:
        try:
            upgrade(path)
        except (OSError, ValueError) as e:
            sys.exit(f"error: {e}")
