"""
Speed against quality of the samplers on one MedSora checkpoint: plain DDIM, denoising reuse (reuse.py, Dr. Mo)
with its step selector or a fixed transition step t*, and the training-free block cache (cache.py). Every setting
samples the same seeds with sample.py, is timed there (speed.json), and is scored by evaluate.py against the
validation split and against the checkpoint's VAE's reconstructions of the same clips (evaluate.py --recon: the
VAE's floor removed, so the score shows what the sampler changes); the result is a table, OUT/tradeoff.json and
OUT/tradeoff.png (FVD against the reconstructions, against the speed-up over plain DDIM of the same length).

    python -m experiments.tradeoff --ckpt runs/curve/short-b2/ckpts/min8.5.pt --out runs/tradeoff \\
        --settings plain reuse reuse-t799 reuse-t599 reuse-t399 cache0.05 cache0.2 --num-frames 16 64
    python -m experiments.tradeoff --ckpt CKPT --out runs/tradeoff --num-frames 64 --clips 64 --settings plain reuse

Settings: `plain`; `reuse` (t* per video from the step selector); `reuse-tN` (t* = N, rounded to the DDIM grid);
`cacheX` (block cache at threshold X). --num-frames takes sample.py's lengths (16: 17-frame videos, the training
length; 64: 65 frames, 17 latent frames). Generated videos longer than 16 frames are scored on 16-frame windows
at random places (evaluate.py's rule for folders), so a late drift counts.

Stages, each skipped when its result is already there, so a measurement split over several calls goes on where
the last one stopped:
    1. the reuse networks: `reuse.py train` on the checkpoint (unless --reuse FILE gives them);
    2. each length and setting: sample.py (--clips videos, DDIM --steps), one at a time, so that no two timings
       share the GPU; then 3 of the videos as OUT/F<frames>/<setting>.png;
    3. the evaluations, --eval-jobs at once, after all sampling;
    4. the table, tradeoff.json and tradeoff.png.
Times are sample.py's, per batch (speed.json): the speed-up is of denoising, what the samplers change, per video
over the batches after the first (which also pays the process's start on the GPU); "total" adds the VAE's
decoding, over all batches. The videos are written after each batch, untimed (--save-threads 0). A setting whose
sampling was stopped and resumed is timed on the batches of its last call. --clips takes one number per length
(e.g. 256 17-frame and 64 65-frame videos), and the table holds every setting measured in OUT, so that a length
or setting added by a later call joins the same table and plot.
"""

import argparse
import glob
import json
import os
import re
from concurrent.futures import ThreadPoolExecutor

from PIL import Image, ImageDraw

import checkpoint
import data
import distributed
from experiments import runs

SETTING = re.compile(r"^(plain|reuse|reuse-t(\d+)|cache(\d*\.?\d+))$")
SETTINGS_ORDER = ["plain", "reuse", "reuse-t", "cache"]
COLOURS = [(30, 80, 200), (200, 40, 40), (0, 130, 130), (120, 40, 160)]


def sampler_flags(setting, reuse_file):
    """sample.py's flags for a setting name (SETTING)."""
    m = SETTING.match(setting)
    if setting == "plain":
        return []
    if m.group(2):
        return ["--reuse", reuse_file, "--reuse-t", m.group(2)]
    if setting == "reuse":
        return ["--reuse", reuse_file]
    return ["--cache-threshold", m.group(3)]


def folder(args, frames, setting):
    return os.path.join(args.out, f"F{frames + 1}", setting)


def row_of(args, frames, setting):
    """One setting's measurements: its speed.json and its evaluate.py result."""
    gen = folder(args, frames, setting)
    speed = {"videos": 0}  # none when the call that sampled the last videos stopped before writing it
    if os.path.exists(os.path.join(gen, "speed.json")):
        with open(os.path.join(gen, "speed.json")) as f:
            speed = json.load(f)
    got = runs.evaluated(gen + ".json", []) or {}
    row = {"setting": setting, "frames": frames + 1, "videos": runs.videos_in(gen), "timed_videos": speed["videos"],
           **runs.measured(got, args.metrics.split(",")), **runs.recon_scores(gen + ".json", args.metrics.split(","))}
    if speed["videos"]:
        row["s_per_video_total"] = speed["seconds"] / speed["videos"]  # denoising and decoding, every batch
        batches = speed.get("batches") or [{"videos": speed["videos"], "denoise": speed["seconds"]}]
        timed = batches[1:] if len(batches) > 1 else batches  # the first batch also warms the GPU up
        row["timed_videos"] = sum(b["videos"] for b in timed)
        row["s_per_video"] = sum(b["denoise"] for b in timed) / row["timed_videos"]  # denoising: what samplers change
    if "frame_steps_ratio" in speed:  # reuse: how much of plain DDIM's work it did, and where it switched
        row.update(frame_steps_ratio=speed["frame_steps_ratio"],
                   t_star_mean=sum(speed["t_star"]) / len(speed["t_star"]))
    if "reused_fraction" in speed:
        row["cache_reused"] = speed["reused_fraction"]
    return row


def measured_in(args, done):
    """(frames, setting) of this call's settings, then of every other setting sampled, timed and scored in OUT."""
    found = []
    for path in sorted(glob.glob(os.path.join(args.out, "F*", "*", "speed.json"))):
        setting, length = path.split(os.sep)[-2], path.split(os.sep)[-3]
        if re.fullmatch(r"F\d+", length) and SETTING.match(setting) and os.path.exists(os.path.dirname(path) + ".json"):
            found.append((int(length[1:]) - 1, setting))
    order = {s: i for i, s in enumerate(SETTINGS_ORDER)}
    rest = sorted(set(found) - set(done), key=lambda fs: (fs[0], order.get(fs[1].rstrip("0123456789."), 9), fs[1]))
    return sorted(done, key=lambda fs: fs[0]) + rest


def scored(path, args, clips):
    """Whether evaluate.py's result at `path` has every metric asked for, over `clips` clips."""
    if runs.evaluated(path, args.metrics.split(",")) is None:
        return False
    if args.recon and runs.evaluated(path, [m for m in ("fvd", "fid") if m in args.metrics], part="vs_recon") is None:
        return False
    with open(path) as f:
        return json.load(f)["args"]["num_clips"] == clips


def compare(rows):
    """Each row's speed-up and FVD change against plain DDIM at the same length (when plain was measured)."""
    plain = {r["frames"]: r for r in rows if r["setting"] == "plain"}
    for r in rows:
        base = plain.get(r["frames"])
        if base and "s_per_video" in base and "s_per_video" in r:
            r["speedup"] = base["s_per_video"] / r["s_per_video"]
        for key in ("fvd", "fvd_recon"):
            if base and key in r and key in base:
                r[f"{key}_change"] = r[key] / base[key] - 1
    return rows


def print_table(rows):
    print("\ns/video: seconds of denoising per video (the batches after the first); total: with decoding, all batches")
    print(f"{'frames':>6s} {'setting':14s} {'s/video':>8s} {'total':>7s} {'speed-up':>8s} {'frame-steps':>11s} "
          f"{'t* mean':>7s} {'reused':>6s} {'FVD':>8s} {'vs plain':>8s} {'FID':>7s} {'FVD rec':>8s} {'vs plain':>8s}")
    for r in rows:
        cell = lambda key, fmt: format(r[key], fmt) if key in r else "-".rjust(int(fmt.split(".")[0]))  # noqa: E731
        print(f"{r['frames']:6d} {r['setting']:14s} {cell('s_per_video', '8.3f')} {cell('s_per_video_total', '7.3f')} "
              f"{cell('speedup', '8.2f')} {cell('frame_steps_ratio', '11.2f')} {cell('t_star_mean', '7.0f')} "
              f"{cell('cache_reused', '6.2f')} {cell('fvd', '8.1f')} "
              f"{format(100 * r['fvd_change'], '+7.1f') + '%' if 'fvd_change' in r else '-':>8s} "
              f"{cell('fid', '7.1f')} {cell('fvd_recon', '8.1f')} "
              f"{format(100 * r['fvd_recon_change'], '+7.1f') + '%' if 'fvd_recon_change' in r else '-':>8s}")


def plot(rows, path, width=720, height=420):
    """FVD against the speed-up over plain DDIM, one colour per video length, each point named; the band up to
    10 % over plain's FVD dashed (the quality a faster sampler should keep). FVD against the VAE's reconstructions
    where every point has it, else against the real clips."""
    key = "fvd_recon" if rows and all("fvd_recon" in r for r in rows if "speedup" in r) else "fvd"
    pts = [r for r in rows if "speedup" in r and key in r]
    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    left, right, top, bottom = 70, width - 20, 30, height - 45
    d.rectangle([left, top, right, bottom], outline="black")
    d.text((left, 8), f"FVD against the {'reconstructions' if key == 'fvd_recon' else 'real clips'} (lower is "
                      f"better) against the speed-up over plain DDIM of the same length", fill="black")
    if pts:
        x_hi = max(2.2, max(r["speedup"] for r in pts) * 1.1)
        y_hi = max(r[key] for r in pts) * 1.15
        to_px = lambda x, y: (left + x / x_hi * (right - left), bottom - y / y_hi * (bottom - top))  # noqa: E731
        for x in range(1, int(x_hi) + 1):
            px = to_px(x, 0)[0]
            d.line([px, bottom, px, bottom + 4], fill="black")
            d.text((px - 8, bottom + 8), f"{x}x", fill="black")
        d.text((8, top), f"{y_hi:,.0f}", fill="black")
        d.text((8, bottom - 10), "0", fill="black")
        for k, frames in enumerate(sorted({r["frames"] for r in pts})):
            colour = COLOURS[k % len(COLOURS)]
            mine = [r for r in pts if r["frames"] == frames]
            plain = [r for r in mine if r["setting"] == "plain"]
            if plain:  # the 10 % band over plain's FVD, dashed
                y = to_px(0, plain[0][key] * 1.1)[1]
                for x0 in range(left, right, 12):
                    d.line([x0, y, x0 + 6, y], fill=colour)
            for r in mine:
                x, y = to_px(r["speedup"], r[key])
                d.ellipse([x - 4, y - 4, x + 4, y + 4], fill=colour)
                d.text((x + 6, y - 6), r["setting"], fill=colour)
            d.text((right - 150, top + 8 + 14 * k), f"{frames} frames", fill=colour)
    img.save(path)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="a train.py checkpoint")
    p.add_argument("--out", default="runs/tradeoff")
    p.add_argument("--settings", nargs="+", default=["plain", "reuse", "reuse-t799", "reuse-t599", "reuse-t399",
                                                     "cache0.05", "cache0.2"])
    p.add_argument("--num-frames", type=int, nargs="+", default=[16], help="sample.py's video lengths")
    p.add_argument("--clips", type=int, nargs="+", default=[512], help="videos per setting, and real clips of every "
                   "FVD: one number, or one per --num-frames")
    p.add_argument("--steps", type=int, default=250, help="DDIM steps")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--reuse", default=None, help="trained reuse networks (default: reuse.py train into OUT/reuse.pt)")
    p.add_argument("--reuse-flags", default="", help="more reuse.py train flags, e.g. \"--videos 128\"")
    p.add_argument("--metrics", default="fvd,fid")
    p.add_argument("--i3d", default=None)
    p.add_argument("--inception", default=None)
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--eval-jobs", type=int, default=2, help="evaluations at once (after all sampling)")
    args = p.parse_args(argv)
    args.settings = list(dict.fromkeys(args.settings))  # each once, in the order given
    bad = [s for s in args.settings if not SETTING.match(s)]
    if bad:
        p.error(f"unknown setting(s) {', '.join(bad)}: use plain, reuse, reuse-tN or cacheX")
    if not os.path.isfile(args.ckpt):
        p.error(f"--ckpt {args.ckpt}: no such file")
    if any(f <= 0 or f % 8 for f in args.num_frames):
        p.error("--num-frames: each must be a positive multiple of 8 (16: 17-frame videos)")
    distributed.check_args(p, args, folder="out", positive=("steps", "batch_size", "eval_jobs"),
                           non_negative=("workers", "seed"))
    if len(args.clips) not in (1, len(args.num_frames)):
        p.error(f"--clips: give one number, or one per --num-frames ({len(args.num_frames)})")
    for n in args.clips:
        if n < 1:
            p.error(f"--clips {n}: it must be positive")
        if n < 2:
            p.error(f"--clips {n}: FVD compares two distributions, which takes at least 2 videos (512 default)")
    args.clips = dict(zip(args.num_frames, args.clips * len(args.num_frames) if len(args.clips) == 1 else args.clips))
    if args.reuse is not None and not os.path.isfile(args.reuse):
        p.error(f"--reuse {args.reuse}: no such file")
    try:  # a checkpoint that cannot be used is named here, not by a sampler's log after minutes of work
        vae_path = checkpoint.load(args.ckpt).get("vae_path")
    except ValueError as e:
        p.error(f"--ckpt {e}")
    args.recon = vae_path if vae_path and os.path.exists(vae_path) else None  # evaluate.py --recon
    if not args.recon:
        print(f"note: the checkpoint's VAE ({vae_path}) is not there: scored against the real clips only")
    return args


def sample_all(args, reuse_file):
    """Sample each (length, setting) not sampled yet; return the pairs done."""
    done = []
    for frames in args.num_frames:
        for setting in args.settings:
            gen = folder(args, frames, setting)
            clips = args.clips[frames]
            if runs.videos_in(gen) < clips:
                print(f"sampling {clips} videos of {frames + 1} frames: {setting}", flush=True)
                if os.path.exists(gen + ".json"):  # the score of fewer videos
                    os.remove(gen + ".json")
                # --save-threads 0: the videos are written after each batch, outside the time sample.py measures
                runs.run(["sample.py", "--ckpt", args.ckpt, "--num-videos", str(clips), "--steps",
                           str(args.steps), "--batch-size", str(args.batch_size), "--seed", str(args.seed),
                           "--num-frames", str(frames), "--save-threads", "0", "--out", gen,
                           *sampler_flags(setting, reuse_file), *(["--no-plain-timing"] if setting != "plain" else [])],
                          gen + "_sample.log")  # evaluate's: gen + ".log"; plain is timed as a setting of its own
            if not os.path.exists(os.path.join(gen, "speed.json")):
                print(f"note: {gen} has no time (the call that sampled its last videos stopped before writing "
                      f"speed.json); delete the folder to sample and time it again", flush=True)
            data.save_grid([os.path.join(gen, "frames", f"{j:06d}") for j in range(min(3, clips))], gen + ".png")
            done.append((frames, setting))
    return done


def main(argv=None):
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    reuse_file = args.reuse or os.path.join(args.out, "reuse.pt")
    if any(s.startswith("reuse") for s in args.settings) and not os.path.exists(reuse_file):
        print("training the reuse networks on the checkpoint", flush=True)
        runs.run(["reuse.py", "train", "--ckpt", args.ckpt, "--out", reuse_file, *args.reuse_flags.split()],
                  os.path.join(args.out, "reuse.log"))

    done = sample_all(args, reuse_file)

    todo = [(f, folder(args, f, s)) for f, s in done if not scored(folder(args, f, s) + ".json", args, args.clips[f])]
    evaluate = lambda job: runs.evaluate(job[1], job[1] + ".json", args, recon=args.recon,  # noqa: E731
                                         clips=args.clips[job[0]])
    if todo:  # the first alone: it caches the real clips' features, which the others then share
        evaluate(todo[0])
    with ThreadPoolExecutor(args.eval_jobs) as pool:  # an evaluation that fails raises here, naming its log
        list(pool.map(evaluate, todo[1:]))

    # The table holds every setting measured in OUT, by this call or an earlier one (other lengths, other settings):
    # plain DDIM is then the baseline of each length, also when this call did not list it.
    rows = compare([row_of(args, f, s) for f, s in measured_in(args, done)])
    print_table(rows)
    distributed.write_json(os.path.join(args.out, "tradeoff.json"),
                           {"ckpt": args.ckpt, "steps": args.steps, "rows": rows})
    plot(rows, os.path.join(args.out, "tradeoff.png"))
    print(f"\n{os.path.join(args.out, 'tradeoff.json')} and tradeoff.png written")
    return rows


if __name__ == "__main__":
    main()
