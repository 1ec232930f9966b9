"""
Learning curves on one GPU: FVD and FID of MedSora checkpoints against the validation split, as training goes,
for one or more training recipes trained side by side on the same GPU.

    python -m experiments.curve --out runs/curve --model S --points 3 6 10 15 --recipes short paper  # minutes

Stages, each skipped when its result is already there, so that a curve split over several calls
(`--budget-minutes`) continues where the last one stopped:
    1. the VAE: `train_vae.py` for --vae-minutes (a tiny VAE from scratch on the synthetic data);
    2. two floors, measured the same way as the checkpoints:
       - train vs val: real training clips against the validation clips (what a perfect model would score);
       - reconstruction vs val: training clips through the VAE (what the VAE alone allows the model);
    3. MedSora: one `train.py --resume` process per recipe, all at once, in segments that end at each point
       (the first recipe encodes the latent cache, OUT/latents, and the others start once it is there; recipes
       with --align share OUT/latents_align, which holds their flow alignment targets too);
       every checkpoint is copied to OUT/RECIPE/ckpts/minNN.pt and, while the next segment trains, sampled
       (`sample.py`, DDIM --steps; 3 of the videos in OUT/RECIPE/generated/minNN.png) and evaluated (`evaluate.py`)
       in the background; a recipe whose train.py fails is named with its log and stops there, the others go on
       (the exit status says so at the end);
    4. with --clip-x0 V, the first recipe's last checkpoint sampled again with DDIM's x0 clamped to +-V;
    5. OUT/curve.json and OUT/curve.png: FVD and FID against training minutes, one line per recipe, with the floors,
       and each point's sample statistics (largest |latent|, values beyond the data's range, saturated pixels);
       OUT/losses.png: each recipe's training loss against step.

The recipes (docs/training.md, "Training on a budget"): `paper` is train.py's defaults (Sec. 4.1), the others keep lr 1e-3;
`short-b2` (AdamW's beta2 0.95) is the one docs/training.md recommends for runs of minutes. Recipes that share the GPU slow
each other a little: curve.json keeps each one's steps, clips/s and loss spikes. With --eval-after-training the
sampling and evaluation wait until the call's training has ended (they slow the trainers several times over).
"""

import argparse
import json
import math
import os
import queue
import shutil
import sys
import threading
import time

import torch
from PIL import Image, ImageDraw
from tqdm.auto import tqdm

import data
import distributed
import dit
import vae as vae_lib
from experiments.runs import evaluate, evaluated, finish, measured, recon_scores, run, start, videos_in


RECIPES = {  # train.py flags of each recipe
    "paper": [],  # the defaults: lr 1e-3 and batch 16 for 2 epochs, then lr 1e-4 and batch 2
    "short": ["--lr", "1e-3", "1e-3", "--batch-size", "16", "16"],
    "short-b64": ["--lr", "1e-3", "1e-3", "--batch-size", "64", "64"],
    "short-align": ["--lr", "1e-3", "1e-3", "--batch-size", "16", "16", "--align"],  # + the flow alignment loss
    # candidates against the divergence of lr 1e-3 held for 1,000+ steps (docs/training.md, "Training on a budget"):
    # the paper's drop to 1e-4 after 12 epochs (750 steps of the 1,000 synthetic clips) instead of 2;
    "short-decay": ["--lr", "1e-3", "1e-4", "--batch-size", "16", "16", "--phase-epochs", "12"],
    # AdamW's beta2 0.95: the second moment follows a sudden large gradient within ~20 steps, not ~1,000;
    "short-b2": ["--lr", "1e-3", "1e-3", "--batch-size", "16", "16", "--betas", "0.9", "0.95"],
    # gradients clipped from the first step at about their usual norm (0.05-0.1), so a burst is cut down
    "short-clip": ["--lr", "1e-3", "1e-3", "--batch-size", "16", "16", "--clip-from-epoch", "0", "--clip-norm", "0.1"],
    # the flow alignment ablation on the stable recipe: short-b2 with and without the loss
    "short-b2-align": ["--lr", "1e-3", "1e-3", "--batch-size", "16", "16", "--betas", "0.9", "0.95", "--align"],
}




def share_cpus(processes):
    """Give this process and every script it starts from now on an equal share of the CPU threads.

    Each would otherwise take one OpenMP thread per core, and oversubscribed threads wait on each other: four
    processes of 2 threads on 2 cores made synthetic clips 7-8 times slower than four of 1 thread. This is the
    likely cause of both trainers' set-up (16 clips) lasting over 4 minutes beside the floors on a 16-core GPU
    machine."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    threads = max(1, cores // processes)
    os.environ["OMP_NUM_THREADS"] = str(threads)  # inherited by the scripts started below
    torch.set_num_threads(threads)  # the reconstructions run in this process
    return threads


def cache_of(recipe, args):
    """The latent cache of a recipe: one for all, and one for the recipes with --align (theirs holds targets too)."""
    aligned = "--align" in RECIPES[recipe] or "--align" in args.train_flags.split()
    return os.path.join(args.out, "latents_align" if aligned else "latents")


def sample_record(folder):
    """The numbers of a sample.py folder's stats.json that show outliers, or {}."""
    path = os.path.join(folder, "stats.json")
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        s = json.load(f)
    return {"max_abs_z": s["latents"]["absmax"], "outliers_pct": 100 * s["outliers"] if s["outliers"] is not None
            else None, "saturated_pct": 100 * s["saturated"],
            "bright_pct": 100 * s["bright"] if s.get("bright") is not None else None}


def reconstructions_in(folder):
    """How many reconstructions write_reconstructions finished in `folder` (0 when it stopped or never ran)."""
    try:
        with open(os.path.join(folder, "complete")) as f:
            return int(f.read())
    except (OSError, ValueError):
        return 0


def wait_for(path, proc, poll=2.0):
    """Until `path` exists or `proc` has ended."""
    while not os.path.exists(path) and proc.poll() is None:
        time.sleep(poll)


def last_record(run_dir):
    """The last step record of a train.py run's log.jsonl (step, clips/s, peak memory), or {}."""
    records = [r for r in log_records(run_dir) if "loss" in r]
    return records[-1] if records else {}


@torch.no_grad()
def write_reconstructions(vae_path, out, n, size, num_frames, device, batch_size=16, workers=8):
    """Training clips 0..n-1 through the VAE (encode, posterior mean, decode) as frame folders under out."""
    vae = vae_lib.load(vae_path).to(device).eval()
    clips = data.make_dataset("synthetic", "train", num_frames=num_frames, size=size, num_images=0, flip=False,
                              with_flow=False)
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(clips, range(n)), batch_size,
                                         num_workers=workers)
    amp = device.type == "cuda"
    i = 0
    for batch in tqdm(loader, desc="reconstructions"):
        x = batch["video"].to(device).transpose(1, 2)  # (B, 3, F, H, W)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            video = vae.reconstruct(x)
        for v in video.float().clamp(-1, 1).cpu():
            data.save_frames(v, os.path.join(out, "frames", f"{i:06d}"))
            i += 1
    with open(os.path.join(out, "complete"), "w") as f:  # a stopped run (no marker) writes them again
        f.write(str(n))


def sample_and_evaluate(ckpt, gen, result, args, extra=()):
    """--clips videos from a checkpoint (sample.py, DDIM --steps; a stopped one continues), then their FVD / FID."""
    if videos_in(gen) < args.clips or not os.path.exists(os.path.join(gen, "stats.json")):
        run(["sample.py", "--ckpt", ckpt, "--num-videos", str(args.clips), "--steps", str(args.steps),
             "--batch-size", "128", "--out", gen, *extra], gen + ".log")
    # a small picture beside the numbers (3 videos, every other frame), light enough to copy off a GPU machine
    data.save_grid([os.path.join(gen, "frames", f"{j:06d}") for j in range(min(3, args.clips))], gen + ".png")
    evaluate(gen, result, args, recon=os.path.join(args.out, "vae", "ckpt.pt"))  # also against its reconstructions


COLOURS = [(30, 80, 200), (200, 40, 40), (120, 40, 160), (0, 130, 130)]


def plot(curves, floors, path, width=720, height=400):
    """FVD (left) and FID (right) against minutes of training, one line per recipe, floors dashed; drawn with PIL.
    curves: {recipe: [{"minutes": m, "fvd": x, ...}, ...]}."""
    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    for k, metric in enumerate(("fvd", "fid")):
        left, right, top, bottom = 60 + k * width // 2, (k + 1) * width // 2 - 15, 30, height - 40
        lines = {name: [(p["minutes"], p[metric]) for p in points if metric in p] for name, points in curves.items()}
        lines = {name: xy for name, xy in lines.items() if xy}
        fl = {name: v[metric] for name, v in floors.items() if metric in v}
        if not lines:
            continue
        ys = [y for xy in lines.values() for _, y in xy]
        hi, lo = max(ys + list(fl.values())) * 1.1, 0.0
        x_hi = max(x for xy in lines.values() for x, _ in xy) * 1.05
        to_px = lambda x, y: (left + x / x_hi * (right - left), bottom - (y - lo) / (hi - lo) * (bottom - top))  # noqa
        d.rectangle([left, top, right, bottom], outline="black")
        for (name, v), colour in zip(fl.items(), [(0, 150, 0), (200, 120, 0)]):
            y = to_px(0, v)[1]
            for x0 in range(left, right, 12):
                d.line([(x0, y), (min(x0 + 6, right), y)], fill=colour, width=2)
            d.text((left + 4, y - 13), f"{name} {v:.0f}", fill=colour)
        for j, ((name, xy), colour) in enumerate(zip(lines.items(), COLOURS)):
            d.line([to_px(x, y) for x, y in xy], fill=colour, width=2)
            for x, y in xy:
                cx, cy = to_px(x, y)
                d.ellipse([cx - 3, cy - 3, cx + 3, cy + 3], fill=colour)
            cx, cy = to_px(*xy[-1])
            d.text((cx - 40, cy - 14), f"{xy[-1][1]:.0f}", fill=colour)
            if len(lines) > 1:
                d.text((right - 90, top + 6 + 14 * j), name, fill=colour)
        d.text((left, 8), f"{metric.upper()} vs minutes of MedSora training", fill="black")
        d.text((left, bottom + 8), "0", fill="black")
        d.text((right - 40, bottom + 8), f"{x_hi / 1.05:g} min", fill="black")
        d.text((left - 50, top), f"{hi:.0f}", fill="black")
    img.save(path + ".tmp.png")
    os.replace(path + ".tmp.png", path)


def plot_losses(runs, path, width=720, height=360, window=20):
    """Training loss against step (log scale; a moving average over `window` log records), one line per run, and
    each run's last step marked, with a magenta cross where it ended on a non-finite loss.
    runs: {name: train.py log.jsonl records}."""
    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    left, right, top, bottom = 60, width - 15, 25, height - 30
    lines = {}
    for name, records in runs.items():
        good = [(r["step"], r["loss"]) for r in records if isinstance(r.get("loss"), float) and r["loss"] > 0]
        if len(good) < 2:
            continue
        k = min(window, max(1, len(good) // 5))  # a short run keeps a curve, not one averaged point
        loss = [sum(v for _, v in good[i - k + 1:i + 1]) / k for i in range(k - 1, len(good))]
        lines[name] = ([s for s, _ in good[k - 1:]], loss, any(r.get("error") for r in records))
    if lines:
        x_hi = max(steps[-1] for steps, _, _ in lines.values())
        ys = [math.log10(v) for _, loss, _ in lines.values() for v in loss]
        lo, hi = min(ys), max(ys) + 1e-9
        to_px = lambda s, v: (left + s / x_hi * (right - left),  # noqa: E731
                              bottom - (math.log10(v) - lo) / (hi - lo) * (bottom - top))
        d.rectangle([left, top, right, bottom], outline="black")
        for j, (name, (steps, loss, diverged)) in enumerate(lines.items()):
            colour = COLOURS[j % len(COLOURS)]  # every run gets a line, past the fourth too
            d.line([to_px(s, v) for s, v in zip(steps, loss)], fill=colour, width=2)
            cx, cy = to_px(steps[-1], loss[-1])
            if diverged:
                for dx in (-6, 6):
                    d.line([(cx - dx, cy - 6), (cx + dx, cy + 6)], fill=(255, 0, 255), width=3)
            else:
                d.ellipse([cx - 3, cy - 3, cx + 3, cy + 3], fill=colour)
            d.text((right - 260, top + 6 + 14 * j), name + (" (x: stopped, non-finite loss)" if diverged else ""),
                   fill=colour)
        d.text((left, 6), f"training loss (log scale, mean of {window} log records) vs step", fill="black")
        d.text((4, top), f"{10 ** hi:.3g}", fill="black")
        d.text((4, bottom - 10), f"{10 ** lo:.3g}", fill="black")
        d.text((left, bottom + 8), "0", fill="black")
        d.text((right - 60, bottom + 8), f"step {x_hi}", fill="black")
    img.save(path + ".tmp.png")
    os.replace(path + ".tmp.png", path)


def stability(records, window=20, factor=2.0):
    """How steady a train.py run was, from its log records (each the mean loss of --log-every steps):
    spikes (records whose loss is over `factor` times the median of the `window` records before it), the
    largest of them, the largest logged gradient norm, and whether it stopped on non-finite losses."""
    losses = [(r["step"], r["loss"]) for r in records if isinstance(r.get("loss"), float)]
    spikes = []
    for i in range(window, len(losses)):
        base = sorted(v for _, v in losses[i - window:i])[window // 2]
        if losses[i][1] > factor * base:
            spikes.append((losses[i][0], losses[i][1] / base))
    norms = [r["grad_norm"] for r in records if isinstance(r.get("grad_norm"), float) and math.isfinite(r["grad_norm"])]
    return {"steps": losses[-1][0] if losses else 0, "spikes": len(spikes),
            "spike_steps": [s for s, _ in spikes], "worst_spike": max((x for _, x in spikes), default=None),
            "max_grad_norm": max(norms, default=None), "non_finite_stop": any(r.get("error") for r in records)}


def log_records(run_dir):
    """Every record of a train.py run's log.jsonl ([] when it has none)."""
    path = os.path.join(run_dir, "log.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/curve")
    p.add_argument("--model", default="S", choices=sorted(dit.MODELS))
    p.add_argument("--recipes", nargs="+", default=["short"], choices=sorted(RECIPES),
                   help="recipes trained side by side, each its own train.py process on the same GPU")
    p.add_argument("--points", type=float, nargs="+", default=[3, 6, 10, 15],
                   help="minutes of MedSora training at which a checkpoint is evaluated")
    p.add_argument("--vae-minutes", type=float, default=2.5)
    p.add_argument("--clips", type=int, default=512, help="clips per side of every FVD / FID")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps of the evaluated samples")
    p.add_argument("--metrics", default="fvd,fid")
    p.add_argument("--clip-x0", type=float, default=None,
                   help="also sample the first recipe's last checkpoint with sample.py --clip-x0 VALUE")
    p.add_argument("--i3d", default=None)
    p.add_argument("--inception", default=None)
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--eval-jobs", type=int, default=2, help="checkpoints sampled and evaluated at once")
    p.add_argument("--eval-after-training", action="store_true",
                   help="sample and evaluate the checkpoints only once this call's training has ended, so that "
                        "the trainers have the GPU to themselves and every minute of training counts the same")
    p.add_argument("--train-flags", default="", help="more train.py flags for every recipe, e.g. \"--max-clips 64\"")
    p.add_argument("--budget-minutes", type=float, default=None,
                   help="start no training segment that would end later than this; finish the evaluations")
    args = p.parse_args(argv)
    # checked before any work (the VAE stage alone takes minutes); each failure is one line, exit status 2
    distributed.check_args(p, args, folder="out", positive=("vae_minutes", "clips", "steps", "eval_jobs", "points",
                                                            "budget_minutes"), non_negative=("workers", "clip_x0"))
    if args.clips < 2:
        p.error(f"--clips {args.clips}: FVD compares two distributions, which takes at least 2 clips (512 default)")
    if sorted(set(args.points)) != list(args.points):
        p.error(f"--points {' '.join(map(str, args.points))}: give increasing minutes, each once")
    return args


class Curve:
    """One call of the curve: the stages of the module's docstring, each skipped when its result is there.
    Evaluations run in --eval-jobs background threads beside the training (or after it)."""

    def __init__(self, args):
        self.args, self.t0 = args, time.perf_counter()
        self.metrics = args.metrics.split(",")
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.vae_ckpt = os.path.join(args.out, "vae", "ckpt.pt")
        self.queued, self.failures, self.floors_submitted = queue.Queue(), [], False
        self.floor_files = {"train vs val": os.path.join(args.out, "floor_train.json"),
                            "reconstruction vs val": os.path.join(args.out, "floor_recon.json")}

    def say(self, what):
        print(f"{(time.perf_counter() - self.t0) / 60:.1f} min: {what}", flush=True)

    def paths(self, recipe, point):
        name, root = f"min{point:g}", os.path.join(self.args.out, recipe)
        return dict(run=os.path.join(root, "medsora"), ckpt=os.path.join(root, "ckpts", f"{name}.pt"),
                    gen=os.path.join(root, "generated", name), result=os.path.join(root, f"eval_{name}.json"),
                    record=os.path.join(root, "ckpts", f"{name}.json"))

    def train_vae(self):
        args = self.args
        if not os.path.exists(self.vae_ckpt):
            print(f"training the VAE for {args.vae_minutes} min", flush=True)
            run(["train_vae.py", "--model", "tiny", "--out", os.path.join(args.out, "vae"), "--batch-size", "8",
                 "--steps", "100000", "--max-minutes", str(args.vae_minutes), "--workers", str(args.workers)],
                os.path.join(args.out, "vae.log"))
            self.say("the VAE is trained")

    def start_workers(self):
        def worker():
            while True:
                label, job = self.queued.get()
                try:
                    job()
                    self.say(f"{label} evaluated")
                except Exception as e:  # reported at the end; the curve goes on
                    self.failures.append(f"{label}: {e}")
                self.queued.task_done()
        for _ in range(self.args.eval_jobs):
            threading.Thread(target=worker, daemon=True).start()

    def submit_floors(self):
        """Once: the floors, after the latent cache (their clips are made on the same CPUs)."""
        if self.floors_submitted:
            return
        self.floors_submitted, args, files = True, self.args, self.floor_files
        if evaluated(files["train vs val"], self.metrics) is None:
            self.queued.put(("floor train vs val", lambda: evaluate("synthetic", files["train vs val"], args,
                                                                    fake_stride=3, fake_split="train")))
        if evaluated(files["reconstruction vs val"], self.metrics) is None:
            recon = os.path.join(args.out, "recon")

            def recon_floor():
                if reconstructions_in(recon) < args.clips:
                    write_reconstructions(self.vae_ckpt, recon, args.clips, 128, 16, self.device, workers=args.workers)
                evaluate(recon, files["reconstruction vs val"], args)
            self.queued.put(("floor reconstruction vs val", recon_floor))

    def train_segment(self, todo, point, trained):
        """Every recipe of `todo` trained from `trained` to `point` minutes at once; their checkpoints kept. A
        recipe whose train.py fails is named and left out from here on. Returns the recipes that failed."""
        args, procs, failed = self.args, [], []
        print(f"training MedSora-{args.model} ({', '.join(todo)}) from {trained:g} to {point:g} min", flush=True)
        for recipe in todo:
            at = self.paths(recipe, point)
            os.makedirs(os.path.dirname(at["ckpt"]), exist_ok=True)
            resume = ["--resume"] if os.path.exists(os.path.join(at["run"], "ckpt.pt")) else []
            procs.append(start(["train.py", "--model", args.model, "--vae", self.vae_ckpt, "--out", at["run"],
                                *RECIPES[recipe], *args.train_flags.split(), "--max-minutes", str(point - trained),
                                "--sample-every", "0", "--workers", str(args.workers), "--cache-dir",
                                cache_of(recipe, args), *resume,
                                *(["--inception", args.inception] if "--align" in RECIPES[recipe]
                                  and args.inception else [])],
                               os.path.join(args.out, recipe, "train.log")))
            wait_for(os.path.join(cache_of(recipe, args), "meta.json"), procs[-1])  # one encodes each cache
        self.say("the latent cache is ready")
        self.submit_floors()
        for recipe, proc in zip(todo, procs):
            try:
                finish(proc)
            except RuntimeError as e:  # that recipe stops here; the others go on
                print(f"{recipe}: {e}", flush=True)
                self.failures.append(f"{recipe}: {e}")
                failed.append(recipe)
        for recipe in todo:
            if recipe not in failed:
                at = self.paths(recipe, point)
                shutil.copy(os.path.join(at["run"], "ckpt.pt"), at["ckpt"] + ".tmp")
                os.replace(at["ckpt"] + ".tmp", at["ckpt"])
                with open(at["record"], "w") as f:
                    json.dump(last_record(at["run"]), f)
        return failed

    def train_points(self):
        """The training segments, point by point, each point's checkpoints queued for evaluation. Returns the
        minutes trained, and whether --budget-minutes stopped it early."""
        args, trained, failed = self.args, 0.0, set()
        for point in args.points:
            todo = [r for r in args.recipes if not os.path.exists(self.paths(r, point)["ckpt"]) and r not in failed]
            if todo:
                elapsed = (time.perf_counter() - self.t0) / 60
                if args.budget_minutes is not None and elapsed + (point - trained) + 0.5 > args.budget_minutes:
                    print(f"budget: stopping before the segment to {point:g} min", flush=True)
                    return trained, True
                failed.update(self.train_segment(todo, point, trained))
            trained = point
            for recipe in args.recipes:
                at = self.paths(recipe, point)
                if os.path.exists(at["ckpt"]) and evaluated(at["result"], self.metrics) is None:
                    self.queued.put((f"{recipe} {point:g} min", lambda at=at: sample_and_evaluate(
                        at["ckpt"], at["gen"], at["result"], args)))
            self.say(f"checkpoints at {point:g} min of training")
        return trained, False

    def clipped_run(self, trained):
        """--clip-x0: the first recipe's last checkpoint sampled again with DDIM's x0 clamped."""
        args = self.args
        at = self.paths(args.recipes[0], trained)
        clip = dict(recipe=args.recipes[0], minutes=trained, gen=f"{at['gen']}_clip{args.clip_x0:g}",
                    result=at["result"].replace(".json", f"_clip{args.clip_x0:g}.json"))
        if evaluated(clip["result"], self.metrics) is None:
            self.queued.put((f"clip-x0 {args.clip_x0:g}", lambda: sample_and_evaluate(
                at["ckpt"], clip["gen"], clip["result"], args, ["--clip-x0", str(args.clip_x0)])))
        return clip

    def results(self, clip):
        """What was measured: each recipe's points, the floors, the clipped run, each recipe's loss spikes."""
        args, metrics, curves = self.args, self.metrics, {}
        for recipe in args.recipes:
            curves[recipe] = []
            for point in args.points:
                at = self.paths(recipe, point)
                got = evaluated(at["result"], [])
                if got:
                    record = json.load(open(at["record"])) if os.path.exists(at["record"]) else {}
                    curves[recipe].append({"minutes": point, "steps": record.get("step"),
                                           "clips_per_s": record.get("clips_per_s"),
                                           "peak_gib": record.get("peak_gib"), **measured(got, metrics),
                                           **recon_scores(at["result"], metrics), **sample_record(at["gen"])})
        floors = {k: measured(evaluated(v, []) or {}, metrics) for k, v in self.floor_files.items()}
        got = evaluated(clip["result"], []) if clip is not None else None
        clipped = None
        if got:
            clipped = {"recipe": clip["recipe"], "minutes": clip["minutes"], "clip_x0": args.clip_x0,
                       **measured(got, metrics), **recon_scores(clip["result"], metrics), **sample_record(clip["gen"])}
        steady = {r: stability(log_records(self.paths(r, args.points[0])["run"])) for r in args.recipes}
        return curves, floors, clipped, steady


def write_results(args, curves, floors, clipped, steady, wall):
    """curve.json, curve.png, losses.png, and the same numbers printed."""
    with open(os.path.join(args.out, "curve.json"), "w") as f:
        json.dump({"recipes": {r: {"flags": RECIPES[r], "points": curves[r], "stability": steady[r]}
                               for r in args.recipes},
                   "floors": floors, "clipped": clipped, "steps": args.steps, "clips": args.clips,
                   "model": args.model, "wall_minutes_this_call": wall}, f, indent=1)
    plot(curves, floors, os.path.join(args.out, "curve.png"))
    first = {r: os.path.join(args.out, r, "medsora") for r in args.recipes}
    plot_losses({r: log_records(run_dir) for r, run_dir in first.items()}, os.path.join(args.out, "losses.png"))
    for recipe, points in curves.items():
        for row in points:
            print(recipe, "  ".join(f"{k} {v:.1f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()))
    for recipe, st in steady.items():
        print(f"{recipe}: {st['steps']} steps, {st['spikes']} loss spikes (over 2x the median of the 20 records "
              f"before) at steps {st['spike_steps']}, largest gradient norm {st['max_grad_norm']}"
              f"{', stopped on non-finite losses' if st['non_finite_stop'] else ''}")
    for k, v in floors.items():
        print(f"floor {k}: " + "  ".join(f"{m} {x:.1f}" for m, x in v.items()))
    if clipped:
        print("clip-x0", "  ".join(f"{k} {v}" for k, v in clipped.items()))
    print(f"{wall:.1f} min in this call")


def main(argv=None):
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    curve = Curve(args)
    curve.train_vae()
    # from here on the trainers and the evaluations run at once (the VAE, alone, had every core)
    share_cpus(len(args.recipes) + args.eval_jobs)
    if not args.eval_after_training:
        curve.start_workers()
    trained, stopped = curve.train_points()
    clip = curve.clipped_run(trained) if args.clip_x0 is not None and trained > 0 and not stopped else None
    curve.submit_floors()
    if args.eval_after_training:
        curve.say("training has ended in this call; evaluating")
        curve.start_workers()
    curve.queued.join()
    write_results(args, *curve.results(clip), wall=(time.perf_counter() - curve.t0) / 60)
    if curve.failures:
        sys.exit("failed: " + "; ".join(curve.failures))


if __name__ == "__main__":
    main()
