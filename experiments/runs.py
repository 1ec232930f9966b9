"""
Running this project's scripts from an experiment, and reading what they wrote: shared by curve.py and
tradeoff.py. Scripts run by their path under the project root, each with its output appended to a log; an
evaluate.py result is read back by metric.
"""

import glob
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the project root, where the scripts are

NAMES = {"FVD": "fvd", "CD-FVD": "cdfvd", "FID": "fid", "IS": "is", "FC (CLIP)": "fc", "FC-Inception": "fc_inception"}


def start(cmd, log):
    """Start a script of this project, its output appended to `log`."""
    os.makedirs(os.path.dirname(log), exist_ok=True)
    f = open(log, "a")
    f.write(f"\n$ {' '.join(cmd)}\n")
    f.flush()
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, cmd[0]), *cmd[1:]], stdout=f,
                            stderr=subprocess.STDOUT)
    proc.log, proc.cmd = f, cmd
    return proc


def finish(proc):
    """Wait for a started script; an error names the command and its log."""
    code = proc.wait()
    proc.log.close()
    if code != 0:
        raise RuntimeError(f"{proc.cmd[0]} failed with exit status {code}; see {proc.log.name}")


def run(cmd, log):
    finish(start(cmd, log))


def evaluated(path, metrics, part="metrics"):
    """The metrics of an evaluate.py JSON, or None when it is missing or lacks one of `metrics`. `part`:
    "metrics" (against the real clips) or, from an evaluation with --recon, "vs_recon" (against the VAE's
    reconstructions of them) or "vae_floor" (the reconstructions against the real clips)."""
    if not os.path.exists(path):
        return None
    with open(path) as f:
        got = json.load(f).get(part, {})
    got = {NAMES.get(k, k.lower()): v for k, v in got.items()}  # evaluate.py's display names -> metric ids
    return got if all(isinstance(got.get(m), float) for m in metrics) else None


def measured(got, metrics):
    """The entries of an evaluate.py result (evaluated(...)) that are numbers, for the metrics asked for."""
    return {m: got[m] for m in metrics if isinstance(got.get(m), float)}


def recon_scores(path, metrics):
    """The metrics of an evaluate.py --recon result against the VAE's reconstructions, as fvd_recon, fid_recon, ..."""
    return {f"{m}_recon": v for m, v in measured(evaluated(path, [], part="vs_recon") or {}, metrics).items()}


def videos_in(folder):
    """How many finished videos a sample.py folder holds (its done/ records, written after each video's frames)."""
    return len(glob.glob(os.path.join(folder, "done", "*.npz")))


def evaluate(fake, out, args, fake_stride=1, fake_split="all", recon=None, clips=None):
    """evaluate.py on a folder of generated videos against the validation clips, --clips of each (or `clips`)."""
    cmd = ["evaluate.py", "--real", "synthetic", "--real-split", "val", "--fake", fake, "--fake-split", fake_split,
           "--fake-stride", str(fake_stride), "--num-clips", str(clips or args.clips), "--metrics", args.metrics,
           "--cache", os.path.join(args.out, "eval_cache"), "--out", out, "--batch-size", "32",
           "--workers", str(args.workers)]
    for flag in ("i3d", "inception"):
        if getattr(args, flag):
            cmd += [f"--{flag}", getattr(args, flag)]
    if recon:  # also against this VAE's reconstructions of the same validation clips
        cmd += ["--recon", recon]
    run(cmd, out.replace(".json", ".log"))
