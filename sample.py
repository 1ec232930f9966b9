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

Dimension names: B batch, f latent frames, C latent channels, h, w latent size, F pixel frames, H, W pixels.
"""

import argparse
import json
import os

import torch
from tqdm.auto import tqdm

import data
import distributed
import pipeline


def main(argv=None):
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
    p.add_argument("--clip-x0", type=float, default=None,
                   help="clamp DDIM's predicted latents to +-VALUE (e.g. 4; latents have unit std): keeps an "
                        "undertrained model in range. Off by default, as in the paper")
    args = p.parse_args(argv)
    # checked before the model loads; each failure is one line, exit status 2
    distributed.check_args(p, args, positive=("num_videos", "batch_size", "fps"), non_negative=("eta", "clip_x0"),
                           folder="out")
    if not 1 <= args.steps <= 1000:
        p.error(f"--steps {args.steps}: DDIM takes 1 to 1000 steps (the training schedule has 1000)")

    rank, world, device = distributed.setup()
    amp = device.type == "cuda"
    ckpt_path = args.ckpt or pipeline.newest_checkpoint(args.run)
    model, vae, ckpt = pipeline.load(ckpt_path, not args.no_ema, args.vae)
    model, vae = model.to(device), vae.to(device)
    out = args.out or os.path.join(args.run, "generated")
    f, size = ckpt["latent_frames"], ckpt["args"]["size"]
    if rank == 0:
        print(f"sampling {args.num_videos} videos from {ckpt_path} (step {ckpt['step']}, "
              f"{'raw' if args.no_ema else 'EMA'} weights), DDIM {args.steps} steps, {world} process(es) -> {out}")
    mine = list(range(rank, args.num_videos, world))
    mp4 = True
    latents, saturated = [], []
    for i in tqdm(range(0, len(mine), args.batch_size), disable=rank != 0, desc="sample"):
        idx = mine[i:i + args.batch_size]
        videos, z = pipeline.generate(model, vae, idx, f, args.steps, args.seed, args.eta, device, amp, size,
                                      clip_x0=args.clip_x0, return_latents=True)
        latents.append(z)
        saturated.append(pipeline.saturated_fraction(videos) * len(idx))
        for j, video in zip(idx, videos):
            data.save_frames(video, os.path.join(out, "frames", f"{j:06d}"))
            data.save_gif(video, os.path.join(out, "gif", f"{j:06d}.gif"), args.fps)
            mp4 = mp4 and data.save_mp4(video, os.path.join(out, "mp4", f"{j:06d}.mp4"), args.fps)
    distributed.barrier(world)
    if rank == 0:
        shown = [os.path.join(out, "frames", f"{j:06d}") for j in range(min(16, args.num_videos))]
        data.save_grid(shown, os.path.join(out, "grid.png"))
        print(f"wrote {args.num_videos} videos to {out}: frames/, gif/, " + ("mp4/, " if mp4 else "") + "grid.png"
              + ("" if mp4 else " (no MP4: PyAV is not installed)"))
        # the numbers that tell samples in range from noise; under torchrun, of rank 0's share
        stats = pipeline.sample_stats(torch.cat(latents), sum(saturated) / len(mine), ckpt.get("latent_stats"),
                                      ckpt.get("data_saturated"))
        for line in pipeline.report(stats):
            print(line)
        with open(os.path.join(out, "stats.json"), "w") as f:
            json.dump({"ckpt": ckpt_path, "step": ckpt["step"], "steps": args.steps, "clip_x0": args.clip_x0,
                       **stats}, f, indent=1)
    distributed.teardown(world)


if __name__ == "__main__":
    distributed.cli(main)
