"""
MedSora from noise to video, for sampling and for training previews: a train.py checkpoint -> model and VAE,
DDIM in latent space -> decoded video, and the statistics that tell samples in range from noise.

    model, vae, ckpt = pipeline.load("runs/medsora/ckpt.pt")
    videos = pipeline.generate(model, vae, indices=[0, 1, 2], f=ckpt["latent_frames"], steps=250)

Dimension names: B batch, f latent frames, C latent channels, h, w latent size, F pixel frames, H, W pixels.
"""

import glob
import os
import time

import torch

import checkpoint
import dit
import vae as vae_lib
from diffusion import Diffusion
from distributed import mix_seed


def video_noise(indices, f, C, size, seed, *salt):
    """The starting noise (B, f, C, size, size) of the videos numbered `indices`: video i's from (seed, i, *salt)
    alone, so it does not depend on the batch. A salt gives other uses (reuse.py's training) noise of their own."""
    return torch.stack([torch.randn(f, C, size, size, generator=torch.Generator().manual_seed(mix_seed(seed, i, *salt)))
                        for i in indices])


def autocast_model(model, device, amp):
    """The model as the samplers call it, eps(x, t, **kw): under bf16 autocast when amp, outputs in fp32 (with
    return_features, the features too)."""
    def eps(x, t, **kw):
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=amp):
            out = model(x, t, **kw)
        return (out[0].float(), [s.float() for s in out[1]]) if isinstance(out, tuple) else out.float()
    return eps


@torch.no_grad()
def generate(model, vae, indices, f, steps=250, seed=0, eta=0.0, device="cpu", amp=False, size=128,
             progress=False, clip_x0=None, return_latents=False, sampler=None, times=None):
    """The videos numbered `indices`: (B, 3, F, H, W) in [-1, 1] on the CPU (and the sampled latents
    (B, f, C, h, w) with return_latents). Video i starts from noise seeded by (seed, i) only; with eta > 0
    the later noise depends on the batch's first index too. sampler(eps, noise, steps, device, clip_x0) -> z
    replaces plain DDIM (reuse.py's denoising reuse, deterministic: eta and progress are then unused);
    eps(x, t, **kw) is the model under autocast. times: a dict whose "denoise" and "decode" get the seconds of each
    part added (the GPU's work finished)."""
    started = time.perf_counter()
    noise = video_noise(indices, f, model.cfg.in_channels, size // vae.spatial_compression, seed)  # the VAE's 8x
    gen = torch.Generator(device).manual_seed(mix_seed(seed, indices[0], 1))
    eps = autocast_model(model, device, amp)
    if sampler is not None:
        z = sampler(eps, noise.to(device), steps, device, clip_x0)
    else:
        z = Diffusion().ddim_sample(eps, noise.shape, steps=steps, eta=eta, generator=gen, device=device,
                                    progress=progress, noise=noise, clip_x0=clip_x0, num_frames=f)
    if times is not None:
        sync(device)
        times["denoise"] = times.get("denoise", 0.0) + time.perf_counter() - started
        started = time.perf_counter()
    with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=amp):
        # the decoder's activations are large: 16 videos at a time
        video = torch.cat([vae.decode(part.transpose(1, 2), scaled=True).float().clamp(-1, 1).cpu()
                           for part in z.split(16)])  # (B, 3, F, H, W)
    if times is not None:  # .cpu() waited for the GPU
        times["decode"] = times.get("decode", 0.0) + time.perf_counter() - started
    return (video, z.float().cpu()) if return_latents else video


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


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


def saturated_fraction(videos, levels=(0, 255)):
    """Fraction of pixels with a channel at one of `levels` once written as 8-bit: (N, 3, F, H, W) in [-1, 1].
    levels=(255,) counts only bright ones: the off-colour cells that latent outliers decode to, not a dark
    lumen clipped at 0."""
    u = ((videos + 1) * 127.5).round().clamp(0, 255)
    return float(sum(u == v for v in levels).bool().any(dim=1).float().mean())


def motion(videos):
    """Mean change between consecutive frames, in grey levels of 0..255, over pixels and channels: (N, 3, F, H, W)
    in [-1, 1]. A model that makes too still (or too jittery) videos shows here beside the data's value."""
    return float((videos[:, :, 1:] - videos[:, :, :-1]).abs().mean() * 127.5)


def detail(videos):
    """The videos' detail by spatial frequency band, low / mid / high (vae.band_detail, over all frames of
    (N, 3, F, H, W) in [-1, 1]). Beside the data's: less is blur, more is block edges or noise."""
    return vae_lib.band_detail(vae_lib.frames(videos)).mean(0).tolist()


def sample_stats(gen_z, gen_saturated, data_stats=None, data_saturated=None, gen_bright=None, gen_motion=None,
                 data_motion=None, gen_detail=None, data_detail=None):
    """Samples beside the data, as numbers: latent statistics, the fraction of latent values beyond the data's
    largest |value| (None without data statistics), saturated pixels (and of them those at 255), motion, detail."""
    outliers = None if data_stats is None else float((gen_z.abs() > data_stats["absmax"]).float().mean())
    return {"latents": latent_stats(gen_z), "outliers": outliers, "saturated": gen_saturated,
            "bright": gen_bright, "data_latents": data_stats, "data_saturated": data_saturated,
            "motion": gen_motion, "data_motion": data_motion, "detail": gen_detail, "data_detail": data_detail}


def report(stats):
    """Lines of sample_stats: per-channel latent mean and std, outliers, saturated pixels, motion, detail."""
    g, d = stats["latents"], stats["data_latents"]
    lines = []
    if d is not None:
        dm, ds = torch.tensor(d["mean"]), torch.tensor(d["std"])
        gm, gs = torch.tensor(g["mean"]), torch.tensor(g["std"])
        ratio = gs / ds
        lines += [f"latents, per channel: |mean - data mean| max {float((gm - dm).abs().max()):.3f} "
                  f"(data means {float(dm.min()):+.2f}..{float(dm.max()):+.2f}); std / data std "
                  f"{float(ratio.min()):.2f}..{float(ratio.max()):.2f} (data std {float(ds.min()):.2f}.."
                  f"{float(ds.max()):.2f})",
                  f"latents: max |z| {g['absmax']:.2f} (data {d['absmax']:.2f}), 99.99th percentile "
                  f"{g['q9999']:.2f} (data {d['q9999']:.2f}); {100 * stats['outliers']:.3f} % of values beyond "
                  f"the data's max"]
    else:
        lines.append(f"latents: max |z| {g['absmax']:.2f} (no data statistics in the checkpoint)")
    sat = f"saturated pixels (a channel at 0 or 255): {100 * stats['saturated']:.2f} %"
    if stats["data_saturated"] is not None:
        sat += f" (training clips: {100 * stats['data_saturated']:.2f} %)"
    if stats.get("bright") is not None:
        sat += f"; bright ones (a channel at 255): {100 * stats['bright']:.2f} %"
    lines.append(sat)
    if stats.get("motion") is not None:
        data_motion = stats.get("data_motion")
        lines.append(f"motion (mean change between consecutive frames): {stats['motion']:.2f} grey levels"
                     + (f" (training clips: {data_motion:.2f}; ratio {stats['motion'] / data_motion:.2f})"
                        if data_motion else ""))
    if stats.get("detail") is not None and stats.get("data_detail") is not None:
        ratio = [f"{g / d:.2f}" if d > 0 else "n/a" for g, d in zip(stats["detail"], stats["data_detail"])]
        lines.append(f"detail by band, samples / training clips: low {ratio[0]}, mid {ratio[1]}, high {ratio[2]} "
                     f"(below 1 blurrier, above 1 block edges or noise)")
    return lines


def verdict(stats):
    """One line, in words: whether the samples are within the data's range, and if not what to do. Far outside:
    latents spread over 2x the data's (per channel) or 1 % of their values beyond the data's largest, or over 5 %
    saturated pixels and 5x the training clips' share (noise from a model that learned little, or diverged)."""
    g, d, why = stats["latents"], stats["data_latents"], []
    if d is not None:
        ratio = float((torch.tensor(g["std"]) / torch.tensor(d["std"])).max())
        if ratio > 2:
            why.append(f"latents spread {ratio:.1f}x the data's")
        if stats["outliers"] > 0.01:
            why.append(f"{100 * stats['outliers']:.1f} % of latent values beyond the data's largest")
    if stats["saturated"] > max(0.05, 5 * (stats["data_saturated"] or 0)):
        why.append(f"{100 * stats['saturated']:.1f} % saturated pixels")
    if why:
        return (f"These samples are far outside the data's range ({'; '.join(why)}): the model has learned "
                f"too little or diverged. Train longer (raise --max-steps and add --resume) or check loss.png; "
                f"--clip-x0 4 keeps a young model's latents in range.")
    return "The samples are within the data's range (latents and pixels): look at grid.png and the GIFs."


def newest_checkpoint(run):
    found = sorted(glob.glob(os.path.join(run, "*.pt")), key=os.path.getmtime)
    if not found:
        raise FileNotFoundError(f"no checkpoint (*.pt) in {run}: train one with `python train.py` or give --ckpt")
    return found[-1]


def load(ckpt_path, use_ema=True, vae_path=None):
    """(model, vae, checkpoint) from a train.py checkpoint, with the EMA weights by default."""
    ckpt = checkpoint.load(ckpt_path)
    if not {"config", "ema", "model", "vae_path"} <= set(ckpt):
        raise ValueError(f"{ckpt_path} is not a train.py checkpoint (it has {', '.join(sorted(ckpt)[:6])}); "
                         f"give the ckpt.pt of a MedSora run (train.py)")
    weights = "ema" if use_ema else "model"
    model = dit.MedSora(dit.DiTConfig(**ckpt["config"]))
    model.load_state_dict(checkpoint.check_finite(ckpt[weights], ckpt_path, f"{'EMA' if use_ema else 'raw'} weights"))
    vae = vae_lib.load(vae_path or ckpt["vae_path"])
    if vae.cfg.scaling_factor != ckpt["vae_config"]["scaling_factor"]:
        raise ValueError(f"the VAE at {vae_path or ckpt['vae_path']} has scaling factor {vae.cfg.scaling_factor}, "
                         f"the model was trained with {ckpt['vae_config']['scaling_factor']}: not the same VAE")
    return model.eval(), vae.eval(), ckpt
