"""
Sample videos from a trained MedSora (paper Sec. 4.1: DDIM, 250 steps, EMA weights, unconditional).

    python sample.py                                   # newest checkpoint of runs/medsora, 8 videos
    python sample.py --num-videos 16 --seed 1 --steps 100 --out my_samples
    torchrun --nproc_per_node=4 sample.py --num-videos 2048 --out runs/medsora/eval   # shards over GPUs

Each video i starts from noise seeded by (--seed, i) alone, so a video is the same whatever the batch size or
the number of GPUs, up to float rounding (with eta = 0, DDIM is deterministic after the noise). Written to OUT:
    frames/<i:06d>/<k:06d>.png   every video as a frame folder: the layout evaluate.py and data.py read
    gif/<i:06d>.gif              one GIF per video
    mp4/<i:06d>.mp4              when PyAV is installed
    grid.png                     the first 16 videos, one per row, every other frame
    stats.json                   the samples' latent statistics and saturated pixels beside the data's
    speed.json                   this invocation's sampling time (denoising and decoding, per batch), what
                                 --reuse / --cache-threshold saved, and their measured speed-up over plain DDIM
    done/<i:06d>.npz             each finished video's latents and saturated pixels (written last)
    sample.json                  the settings the videos were sampled with

Faster sampling (reuse.py): --reuse FILE denoises the first latent frames alone up to a transition step t* and
moves them to the other frames there (Dr. Mo's denoising reuse; t* from its step selector, or --reuse-t);
--cache-threshold reuses a block's output across steps while its input changes little (the training-free
comparator). What they saved is printed at the end and kept in speed.json, with the time this invocation
spent sampling. With either, plain DDIM then samples the last batch's videos again, untimed by the rest and not
written, so that the speed-up (of denoising, what they change) is measured on the same videos, with the model
warm (--no-plain-timing skips it):

    python reuse.py train --run runs/medsora                  # the reuse networks, beside the checkpoint
    python sample.py --reuse runs/medsora/reuse/reuse.pt      # prints the speed-up over plain DDIM

A batch's videos are written by --save-threads threads while the GPU samples the next batch, so the GPU does not
wait for PNGs, GIFs and MP4s; a failed write (a full disk) stops the run one batch later, naming the error. The
writers share the CPU with the sampling loop: for timings, --save-threads 0 writes after each batch, untimed.

A stopped run continues where it stopped: run the same command again. Batches whose videos are all in done/
are skipped, the others are sampled again from their start, so the result is the one an unstopped run gives.
The same --out with other settings (checkpoint, seed, steps, eta, clip, weights) is refused.

Dimension names: B batch, f latent frames, C latent channels, h, w latent size, F pixel frames, H, W pixels.
"""

import argparse
import contextlib
import json
import os
import zipfile
from concurrent.futures import ThreadPoolExecutor

import numpy as np

import torch
from tqdm.auto import tqdm

import data
import distributed
import cache as block_cache
import pipeline
import reuse


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", default="runs/medsora", help="run folder: its newest checkpoint is used")
    p.add_argument("--ckpt", default=None, help="a checkpoint file instead")
    p.add_argument("--vae", default=None, help="the VAE, if it has moved since training")
    p.add_argument("--out", default=None, help="default RUN/generated")
    p.add_argument("--num-videos", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=250)
    p.add_argument("--eta", type=float, default=0.0)
    p.add_argument("--batch-size", type=int, default=8, help="per process")
    p.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA ones")
    p.add_argument("--fps", type=int, default=6)
    p.add_argument("--save-threads", type=int, default=4, help="threads writing the videos while the next batch "
                   "is sampled; 0: written after each batch, outside the timed sampling (tradeoff.py's timings)")
    p.add_argument("--clip-x0", type=float, default=None,
                   help="clamp DDIM's predicted latents to +-VALUE (e.g. 4; latents have unit std): keeps an "
                        "undertrained model in range. Off by default, as in the paper")
    p.add_argument("--num-frames", type=int, default=None, help="video frames (+1), a multiple of 8; default: "
                   "the training clips'. Longer videos than the model was trained on work: its scans take any length")
    p.add_argument("--reuse", default=None, help="denoising reuse with these networks (python reuse.py train)")
    p.add_argument("--reuse-t", type=int, default=None, help="with --reuse: a fixed transition step t* instead of "
                   "the step selector's, rounded down to the probes (999, 899, ..., 99 by default; under the lowest, "
                   "the lowest); 999 turns reuse off")
    p.add_argument("--cache-threshold", type=float, default=None, help="reuse a block's output across steps while "
                   "its input has moved less than this (relative L1; e.g. 0.05): the training-free comparator")
    p.add_argument("--no-plain-timing", action="store_true", help="with --reuse or --cache-threshold: do not time "
                   "plain DDIM on the last batch for the speed-up")
    args = p.parse_args(argv)
    # checked before the model loads; each failure is one line, exit status 2
    distributed.check_args(p, args, positive=("num_videos", "batch_size", "fps"), ranges={"eta": (0, 1)},
                           non_negative=("clip_x0", "reuse_t", "cache_threshold", "save_threads", "seed"), folder="out",
                           multiples={"num_frames": (8, "clips are 8k + 1 frames")} if args.num_frames is not None
                           else None)
    if not 1 <= args.steps <= 1000:
        p.error(f"--steps {args.steps}: DDIM takes 1 to 1000 steps (the training schedule has 1000)")
    if args.reuse_t is not None and args.reuse is None:
        p.error("--reuse-t needs --reuse FILE (the motion networks that move the base frames)")
    if args.reuse and args.cache_threshold is not None:
        p.error("--reuse and --cache-threshold are two ways to sample faster: choose one")
    if args.reuse and args.eta > 0:
        p.error(f"--reuse needs deterministic DDIM (--eta 0, not {args.eta:g})")
    return args


def reuse_sampler(args, model, vae, ckpt, size, rank, device):
    """--reuse: the denoising-reuse sampler with its trained networks, checked against this model."""
    mtn, dss, state = reuse.load(args.reuse, device)
    grid = size // vae.spatial_compression // model.cfg.patch_size
    reuse.check_model(mtn.cfg, model.cfg, (grid, grid), args.reuse)
    if state["ckpt_step"] != ckpt["step"] and rank == 0:
        print(f"note: {args.reuse} was trained on step {state['ckpt_step']} of {state['ckpt']}, this is step "
              f"{ckpt['step']}")
    return reuse.ReuseSampler(mtn, dss, args.reuse_t)


def main(argv=None):
    args = parse_args(argv)
    rank, world, device = distributed.setup()
    amp = device.type == "cuda"
    ckpt_path = args.ckpt or pipeline.newest_checkpoint(args.run)
    model, vae, ckpt = pipeline.load(ckpt_path, not args.no_ema, args.vae)
    model, vae = model.to(device), vae.to(device)
    out = args.out or os.path.join(args.run, "generated")
    f, size = ckpt["latent_frames"], ckpt["args"]["size"]
    if args.num_frames is not None:  # the VAE's first frame alone, then one latent frame per group of frames
        f = args.num_frames // vae.cfg.temporal_compression_ratio + 1
    sampler = reuse_sampler(args, model, vae, ckpt, size, rank, device) if args.reuse else None
    cache_counts = {"run": 0, "reused": 0}  # --cache-threshold: block calls, over all batches
    times = []  # per batch of this invocation: seconds denoising and decoding (pipeline.generate), videos
    if rank == 0:
        print(f"sampling {args.num_videos} videos from {ckpt_path} (step {ckpt['step']}, "
              f"{'raw' if args.no_ema else 'EMA'} weights), DDIM {args.steps} steps, {world} process(es) -> {out}")
    settings = {"ckpt": os.path.abspath(ckpt_path), "step": ckpt["step"], "seed": args.seed, "steps": args.steps,
                "eta": args.eta, "clip_x0": args.clip_x0, "ema": not args.no_ema, "num_frames": args.num_frames,
                "reuse": args.reuse and os.path.abspath(args.reuse), "reuse_t": args.reuse_t,
                "cache_threshold": args.cache_threshold}
    if args.eta > 0:  # then a batch's later noise depends on its first video: the batches must stay the same
        settings.update(batch_size=args.batch_size, world=world, num_videos=args.num_videos, device=device.type)
    if rank == 0:
        os.makedirs(out, exist_ok=True)
    lock = distributed.RunLock(out, rank)  # a second sample.py on the same --out stops at once
    check_settings(out, settings, rank, world)
    mine = list(range(rank, args.num_videos, world))
    batches = [mine[i:i + args.batch_size] for i in range(0, len(mine), args.batch_size)]
    todo = [idx for idx in batches if not all(is_done(out, j) for j in idx)]
    if rank == 0 and len(todo) < len(batches):
        print(f"continuing: {len(batches) - len(todo)} of {len(batches)} batches are already in {out}")
    # a batch's videos are written by threads while the GPU samples the next batch (0 threads: after it, untimed)
    saver, writing = ThreadPoolExecutor(args.save_threads) if args.save_threads else None, []
    for idx in tqdm(todo, disable=rank != 0, desc="sample"):
        cache = block_cache.BlockCache(model, args.cache_threshold) if args.cache_threshold is not None else None
        times.append({"videos": len(idx)})
        with cache or contextlib.nullcontext():
            videos, z = pipeline.generate(model, vae, idx, f, args.steps, args.seed, args.eta, device, amp, size,
                                          clip_x0=args.clip_x0, return_latents=True, sampler=sampler,
                                          times=times[-1])
        last = idx
        if cache is not None:
            cache_counts = {k: v + cache.counts[k] for k, v in cache_counts.items()}
        if saver is None:
            writing = [save_video(out, j, video, zj, args.fps) for j, video, zj in zip(idx, videos, z)]
            continue
        for job in writing:  # the batch before is written by now (an error, such as a full disk, stops here)
            job.result()
        writing = [saver.submit(save_video, out, j, video, zj, args.fps) for j, video, zj in zip(idx, videos, z)]
    if saver is not None:
        writing = [job.result() for job in writing]  # every one: an error is never left unseen
        saver.shutdown()
    faster = sampler is not None or args.cache_threshold is not None
    plain = time_plain(model, vae, last, f, args, device, amp, size) if faster and todo and not \
        args.no_plain_timing else None
    distributed.barrier(world)
    if rank == 0:
        speed = speed_report(sampler, cache_counts, args, times, plain and (len(last), times[-1]["denoise"], plain))
        summarise(out, args, ckpt, ckpt_path, mine, all(writing), speed)
    lock.release()
    distributed.teardown(world)


def summarise(out, args, ckpt, ckpt_path, mine, mp4, speed):
    """The grid, the samples' statistics beside the data's (stats.json, printed), the speed (speed.json), and as
    the last line, in words, whether the samples are in the data's range."""
    shown = [os.path.join(out, "frames", f"{j:06d}") for j in range(min(16, args.num_videos))]
    data.save_grid(shown, os.path.join(out, "grid.png"))
    print(f"wrote {args.num_videos} videos to {out}: frames/, gif/, " + ("mp4/, " if mp4 else "") + "grid.png"
          + ("" if mp4 else " (no MP4: PyAV is not installed)"))
    # the numbers that tell samples in range from noise; under torchrun, of rank 0's share
    z, saturated, bright, moved, detail = zip(*(load_done(out, j) for j in mine))
    moved, detail = [m for m in moved if m is not None], [d for d in detail if d is not None]  # earlier records
    stats = pipeline.sample_stats(torch.stack(z), sum(saturated) / len(mine), ckpt.get("latent_stats"),
                                  ckpt.get("data_saturated"), sum(bright) / len(mine),
                                  sum(moved) / len(moved) if moved else None, ckpt.get("data_motion"),
                                  torch.tensor(detail).mean(0).tolist() if detail else None, ckpt.get("data_detail"))
    for line in pipeline.report(stats) + speed["lines"] + [pipeline.verdict(stats)]:
        print(line)
    path = os.path.join(out, "stats.json")  # written last and whole: curve.py takes it as "finished"
    distributed.write_json(path, {"ckpt": ckpt_path, "step": ckpt["step"], "steps": args.steps,
                                  "clip_x0": args.clip_x0, **stats})
    if speed["videos"]:  # this invocation's time, apart: stats.json depends on the videos alone
        with open(os.path.join(out, "speed.json"), "w") as f:
            json.dump({k: v for k, v in speed.items() if k != "lines"}, f, indent=1)


def time_plain(model, vae, idx, f, args, device, amp, size):
    """Seconds plain DDIM takes to denoise the videos idx (the same seeds and settings, nothing written): the
    baseline of a faster sampler's speed-up."""
    times = {}
    pipeline.generate(model, vae, idx, f, args.steps, args.seed, args.eta, device, amp, size, clip_x0=args.clip_x0,
                      times=times)
    return times["denoise"]


def speed_report(sampler, cache_counts, args, times, plain=None):
    """This invocation's sampling time (under torchrun, rank 0's batches), per batch and in all, what the faster
    samplers saved, and with plain = (videos, the faster sampler's seconds, plain DDIM's seconds) denoising one
    batch, the speed-up."""
    videos, denoise, decode = (sum(t[k] for t in times) for k in ("videos", "denoise", "decode"))
    speed = {"videos": videos, "seconds": denoise + decode, "denoise_seconds": denoise, "batches": times,
             "lines": [f"sampled {videos} videos in {denoise + decode:.1f} s: denoising {denoise:.1f} s, decoding "
                       f"{decode:.1f} s"] if videos else []}
    if sampler is not None and sampler.stats:
        s = sampler.stats
        ratio = sum(v["frame_steps"] for v in s) / sum(v["plain_frame_steps"] for v in s)
        t_star = [v["t_star"] for v in s]
        speed.update(t_star=t_star, frame_steps_ratio=ratio)
        speed["lines"].append(f"denoising reuse: t* {min(t_star)}..{max(t_star)} (mean {np.mean(t_star):.0f}) over "
                              f"{len(s)} videos; {100 * ratio:.1f} % of plain DDIM's frame-steps")
    if args.cache_threshold is not None and sum(cache_counts.values()):
        reused = cache_counts["reused"] / sum(cache_counts.values())
        speed.update(cache_counts, reused_fraction=reused)
        speed["lines"].append(f"block cache (threshold {args.cache_threshold:g}): {100 * reused:.1f} % of the "
                              f"block calls reused")
    if plain:
        n, fast, slow = plain
        speed.update(plain_batch_videos=n, plain_batch_seconds=slow, batch_seconds=fast, speedup=slow / fast)
        speed["lines"].append(f"on the last batch's {n} videos, denoising: plain DDIM {slow / n:.3f} s per video, this "
                              f"sampler {fast / n:.3f}: {slow / fast:.2f}x as fast")
    return speed


def check_settings(out, settings, rank, world):
    """Record the settings in OUT/sample.json, or refuse an OUT sampled with other ones (its videos would mix)."""
    path = os.path.join(out, "sample.json")
    if os.path.exists(path):
        with open(path) as f:
            before = json.load(f)
        changed = [f"{k}: {before.get(k)} -> {v}" for k, v in settings.items() if before.get(k) != v]
        if changed:
            raise ValueError(f"{out} holds videos sampled with other settings ({'; '.join(changed)}): "
                             f"give another --out, or delete it")
    elif rank == 0:
        os.makedirs(out, exist_ok=True)
        distributed.write_json(path, settings)
    distributed.barrier(world)


def done_file(out, j):
    return os.path.join(out, "done", f"{j:06d}.npz")


def save_video(out, j, video, z, fps):
    """Video j's frames, GIF and MP4, then its done record, last: a stop in between leaves it to be sampled again.
    Returns whether the MP4 was written (False without PyAV)."""
    data.save_frames(video, os.path.join(out, "frames", f"{j:06d}"))
    data.save_gif(video, os.path.join(out, "gif", f"{j:06d}.gif"), fps)
    mp4 = data.save_mp4(video, os.path.join(out, "mp4", f"{j:06d}.mp4"), fps)
    save_done(out, j, z, pipeline.saturated_fraction(video[None]),
              pipeline.saturated_fraction(video[None], levels=(255,)), pipeline.motion(video[None]),
              pipeline.detail(video[None]))
    return mp4


def save_done(out, j, z, saturated, bright, moved, detail):
    """Mark video j finished (after its frames): its latents (f, C, h, w), saturated and bright fractions, motion
    and detail by band."""
    path = done_file(out, j)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "wb") as f:
        np.savez(f, z=z.numpy(), saturated=np.float64(saturated), bright=np.float64(bright), motion=np.float64(moved),
                 detail=np.float64(detail))
        f.flush()
        os.fsync(f.fileno())  # on disk before it is named: a crash leaves no empty record
    os.replace(path + ".tmp", path)


def is_done(out, j):
    """Whether video j has a readable record (a damaged one is sampled again)."""
    try:
        load_done(out, j)
        return True
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return False


def load_done(out, j):
    with np.load(done_file(out, j), allow_pickle=False) as d:
        moved = float(d["motion"]) if "motion" in d else None  # not in records of an earlier version
        detail = d["detail"].tolist() if "detail" in d else None
        return torch.from_numpy(d["z"]), float(d["saturated"]), float(d["bright"]), moved, detail


if __name__ == "__main__":
    distributed.cli(main)
