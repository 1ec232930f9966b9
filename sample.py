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

Dimension names: B batch, f latent frames, C latent channels, h, w latent size, F pixel frames, H, W pixels.
"""

import argparse
import glob
import os

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from tqdm.auto import tqdm

import dit
import vae as vae_lib
from diffusion import Diffusion


@torch.no_grad()
def generate(model, vae, indices, f, steps=250, seed=0, eta=0.0, device="cpu", amp=False, size=128,
             progress=False, clip_x0=None, return_latents=False):
    """The videos numbered `indices`: (B, 3, F, H, W) in [-1, 1] on the CPU (and the sampled latents
    (B, f, C, h, w) with return_latents). Video i starts from noise seeded by (seed, i) only; with eta > 0
    the later noise depends on the batch's first index too."""
    C, h, w = model.cfg.in_channels, size // 8, size // 8
    noise = torch.stack([torch.randn(f, C, h, w, generator=torch.Generator().manual_seed(seed * 1_000_003 + i))
                         for i in indices])  # (B, f, C, h, w)
    gen = torch.Generator(device).manual_seed(seed * 1_000_003 + indices[0])

    def eps(x, t, **kw):
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=amp):
            return model(x, t, **kw).float()

    z = Diffusion().ddim_sample(eps, noise.shape, steps=steps, eta=eta, generator=gen, device=device,
                                progress=progress, noise=noise, clip_x0=clip_x0, num_frames=f)
    with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=amp):
        # the decoder's activations are large: 16 videos at a time
        video = torch.cat([vae.decode(part.transpose(1, 2), scaled=True).float().clamp(-1, 1).cpu()
                           for part in z.split(16)])  # (B, 3, F, H, W)
    return (video, z.float().cpu()) if return_latents else video


# ---------------------------------------------------------------------------------------------------------
# Is it in range? Latent and pixel statistics of samples beside the data's
# ---------------------------------------------------------------------------------------------------------

def latent_stats(z):
    """Per-channel mean and std, the largest |value| and the 99.99th percentile of |z|, of latents
    (N, f, C, h, w) at unit scale (the diffusion model's space)."""
    z = z.float()
    per_channel = z.transpose(0, 2).flatten(1)  # (C, everything else)
    a = z.abs().flatten()
    a = a[torch.randperm(len(a), generator=torch.Generator().manual_seed(0))[:1_000_000]]  # quantile's size limit
    return {"mean": per_channel.mean(1).tolist(), "std": per_channel.std(1).tolist(),
            "absmax": float(z.abs().max()), "q9999": float(a.quantile(0.9999))}


def saturated_fraction(videos):
    """Fraction of pixels with a channel at 0 or 255 once written as 8-bit: (N, 3, F, H, W) in [-1, 1]."""
    u = ((videos + 1) * 127.5).round().clamp(0, 255)
    return float(((u == 0) | (u == 255)).any(dim=1).float().mean())


def report(gen_z, gen_saturated, data_stats, data_saturated=None):
    """Lines comparing samples with the data: per-channel latent mean and std, outliers, saturated pixels."""
    g = latent_stats(gen_z)
    lines = []
    if data_stats is not None:
        dm, ds = torch.tensor(data_stats["mean"]), torch.tensor(data_stats["std"])
        gm, gs = torch.tensor(g["mean"]), torch.tensor(g["std"])
        ratio = gs / ds
        outliers = float((gen_z.abs() > data_stats["absmax"]).float().mean())
        lines += [f"latents, per channel: |mean - data mean| max {float((gm - dm).abs().max()):.3f} "
                  f"(data means {float(dm.min()):+.2f}..{float(dm.max()):+.2f}); std / data std "
                  f"{float(ratio.min()):.2f}..{float(ratio.max()):.2f} (data std {float(ds.min()):.2f}.."
                  f"{float(ds.max()):.2f})",
                  f"latents: max |z| {g['absmax']:.2f} (data {data_stats['absmax']:.2f}), 99.99th percentile "
                  f"{g['q9999']:.2f} (data {data_stats['q9999']:.2f}); {100 * outliers:.3f} % of values beyond "
                  f"the data's max"]
    else:
        lines.append(f"latents: std {float(gen_z.std()):.3f}, max |z| {g['absmax']:.2f} (no data statistics "
                     f"in the checkpoint)")
    sat = f"saturated pixels (a channel at 0 or 255): {100 * gen_saturated:.2f} %"
    if data_saturated is not None:
        sat += f" (training clips: {100 * data_saturated:.2f} %)"
    lines.append(sat)
    return lines


def to_uint8(video):
    """(3, F, H, W) in [-1, 1] -> (F, H, W, 3) uint8."""
    return ((video + 1) * 127.5).round().clamp(0, 255).byte().permute(1, 2, 3, 0).numpy()


def save_gif(video, path, fps=6):
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    frames = [Image.fromarray(a) for a in to_uint8(video)]
    tmp = path + ".tmp.gif"
    frames[0].save(tmp, save_all=True, append_images=frames[1:], duration=round(1000 / fps), loop=0)
    os.replace(tmp, path)


def save_frames(video, folder):
    """A frame folder, written under a temporary name and renamed when complete (like data.py prepare)."""
    tmp = folder + ".partial"
    os.makedirs(tmp, exist_ok=True)
    for k, a in enumerate(to_uint8(video)):
        Image.fromarray(a).save(os.path.join(tmp, f"{k:06d}.png"))
    if os.path.isdir(folder):
        for old in glob.glob(os.path.join(folder, "*")):
            os.remove(old)
        os.rmdir(folder)
    os.replace(tmp, folder)


def save_mp4(video, path, fps=6):
    """H.264 through PyAV; returns False when PyAV is not installed."""
    try:
        import av
    except ImportError:
        return False
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    frames = to_uint8(video)
    tmp = path + ".tmp.mp4"
    with av.open(tmp, "w") as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.height, stream.width = frames.shape[1] // 2 * 2, frames.shape[2] // 2 * 2
        stream.pix_fmt = "yuv420p"
        for a in frames:
            out.mux(stream.encode(av.VideoFrame.from_ndarray(a[:stream.height, :stream.width], format="rgb24")))
        out.mux(stream.encode())
    os.replace(tmp, path)
    return True


def save_grid(folders, path, every=2):
    """One row per video (its frame folder), every `every`-th frame, as one PNG."""
    rows = []
    for d in folders:
        names = sorted(os.listdir(d))[::every]
        rows.append(np.concatenate([np.asarray(Image.open(os.path.join(d, n)).convert("RGB")) for n in names], 1))
    tmp = path + ".tmp.png"
    Image.fromarray(np.concatenate(rows, 0)).save(tmp)
    os.replace(tmp, path)


def newest_checkpoint(run):
    found = sorted(glob.glob(os.path.join(run, "*.pt")), key=os.path.getmtime)
    if not found:
        raise FileNotFoundError(f"no checkpoint (*.pt) in {run}: train one with `python train.py` or give --ckpt")
    return found[-1]


def load(ckpt_path, use_ema=True, vae_path=None):
    """(model, vae, checkpoint) from a train.py checkpoint, with the EMA weights by default."""
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    model = dit.MedSora(dit.DiTConfig(**ckpt["config"]))
    model.load_state_dict(ckpt["ema" if use_ema else "model"])
    vae = vae_lib.load(vae_path or ckpt["vae_path"])
    if vae.cfg.scaling_factor != ckpt["vae_config"]["scaling_factor"]:
        raise ValueError(f"the VAE at {vae_path or ckpt['vae_path']} has scaling factor {vae.cfg.scaling_factor}, "
                         f"the model was trained with {ckpt['vae_config']['scaling_factor']}: not the same VAE")
    return model.eval(), vae.eval(), ckpt


def main(argv=None):
    from train_vae import setup_distributed
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

    rank, world, device = setup_distributed()
    amp = device.type == "cuda"
    ckpt_path = args.ckpt or newest_checkpoint(args.run)
    model, vae, ckpt = load(ckpt_path, not args.no_ema, args.vae)
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
        videos, z = generate(model, vae, idx, f, args.steps, args.seed, args.eta, device, amp, size,
                             clip_x0=args.clip_x0, return_latents=True)
        latents.append(z)
        saturated.append(saturated_fraction(videos) * len(idx))
        for j, video in zip(idx, videos):
            save_frames(video, os.path.join(out, "frames", f"{j:06d}"))
            save_gif(video, os.path.join(out, "gif", f"{j:06d}.gif"), args.fps)
            mp4 = mp4 and save_mp4(video, os.path.join(out, "mp4", f"{j:06d}.mp4"), args.fps)
    if world > 1:
        dist.barrier()
    if rank == 0:
        shown = [os.path.join(out, "frames", f"{j:06d}") for j in range(min(16, args.num_videos))]
        save_grid(shown, os.path.join(out, "grid.png"))
        print(f"wrote {args.num_videos} videos to {out}: frames/, gif/, " + ("mp4/, " if mp4 else "") + "grid.png"
              + ("" if mp4 else " (no MP4: PyAV is not installed)"))
        # the numbers that tell samples in range from noise; under torchrun, of rank 0's share
        for line in report(torch.cat(latents), sum(saturated) / len(mine), ckpt.get("latent_stats"),
                           ckpt.get("data_saturated")):
            print(line)
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
