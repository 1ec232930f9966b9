"""
The 3D causal video VAE of CogVideoX, MedSora's first stage (paper Sec. 3.3).

Encoder: pixels (B, 3, F, H, W) in [-1, 1] -> a diagonal Gaussian over latents (B, 16, f, H/8, W/8), with
f = 1 + (F - 1) / 4: the first frame is encoded alone and every later group of 4 frames becomes one latent
frame. Decoder: the reverse, with "spatial norm" layers that condition every normalisation on the latents.

Causality in time: every 3D convolution sees only the current and earlier frames (the first frame is
repeated before the clip), and time is halved by averaging pairs of frames after the first. So a clip can be
processed in chunks of frames, each convolution carrying its last (k - 1) input frames over to the next chunk
(the "conv cache"): `encode` / `decode` run chunk by chunk, as the published model does, with bounded memory.
One thing is not causal: GroupNorm statistics are taken over all frames of a chunk, so results depend on the
chunking (8 frames for the encoder, 2 latent frames for the decoder, as the published weights were run).

Parameter names and the chunking follow diffusers' `AutoencoderKLCogVideoX`, so its safetensors weights load
strictly (`load_pretrained`) and give the same outputs (tests/test_vae.py, when diffusers is installed).

Dimension names: B batch, C channels, F pixel frames, f latent frames, H, W pixels.

Frequency compensation (Sec. 3.3, Fig. 4): small residual modules added to the pretrained VAE and trained
while it stays frozen: a 2D-convolution component before each of the encoder's 2D down-sampling layers, and a
3D-convolution component in the middle of each decoder block. Their last convolution starts at zero, so a
loaded VAE is exactly unchanged until they are trained. The encoder component works frame by frame and the
decoder one is a causal 3D convolution with its own cache, so both work for any clip length and chunking.
"""

import json
import math
import os
import zipfile
from dataclasses import dataclass, asdict, field

import torch
import torch.nn as nn
import torch.nn.functional as F

import checkpoint


@dataclass
class VAEConfig:
    in_channels: int = 3
    latent_channels: int = 16
    block_out_channels: tuple = (128, 256, 256, 512)
    layers_per_block: int = 3
    norm_num_groups: int = 32
    temporal_compression_ratio: int = 4
    scaling_factor: float = 1.15258426  # CogVideoX-2B's; measured on training data for our own VAEs
    sample_frames_per_chunk: int = 8  # encoder chunk (after the first frame), as the published model runs
    latent_frames_per_chunk: int = 2  # decoder chunk
    freq_comp: bool = True  # frequency-compensation modules (Fig. 4); False = the plain CogVideoX VAE


MODELS = {
    "cogvideox": VAEConfig(),
    "small": VAEConfig(block_out_channels=(64, 128, 128, 256), layers_per_block=2),  # from scratch on one GPU
    "tiny": VAEConfig(block_out_channels=(32, 32, 64, 64), layers_per_block=1, norm_num_groups=8),  # CPU demo
}


def frames_to_time_first(x):
    return x.permute(0, 2, 1, 3, 4)  # (B, C, F, H, W) <-> (B, F, C, H, W)


# ---------------------------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------------------------

class CausalConv3d(nn.Module):
    """3D convolution that pads time only on the past side: with the first frame repeated (k - 1) times at
    the very start, or with the last (k - 1) input frames of the previous chunk (the cache) after that."""

    def __init__(self, cin, cout, kernel_size=3):
        super().__init__()
        self.time_kernel = kernel_size
        self.conv = nn.Conv3d(cin, cout, kernel_size, padding=(0, kernel_size // 2, kernel_size // 2))

    def forward(self, x, cache=None):
        """x (B, C, F, H, W) -> (B, C', F, H, W), and the cache for the next chunk."""
        if self.time_kernel > 1:
            past = cache if cache is not None else x[:, :, :1].expand(-1, -1, self.time_kernel - 1, -1, -1)
            x = torch.cat([past, x], dim=2)
        return self.conv(x), x[:, :, x.shape[2] - self.time_kernel + 1:]


class SpatialNorm3d(nn.Module):
    """GroupNorm whose scale and shift are 1x1x1 convolutions of the latents, resized to the features."""

    def __init__(self, channels, latent_channels, groups):
        super().__init__()
        self.norm_layer = nn.GroupNorm(groups, channels, eps=1e-6)
        self.conv_y = CausalConv3d(latent_channels, channels, kernel_size=1)
        self.conv_b = CausalConv3d(latent_channels, channels, kernel_size=1)

    def forward(self, f, z):
        if f.shape[2] > 1 and f.shape[2] % 2 == 1:  # the first latent frame maps to the first frame alone
            z = torch.cat([F.interpolate(z[:, :, :1], size=(1, *f.shape[-2:])),
                           F.interpolate(z[:, :, 1:], size=(f.shape[2] - 1, *f.shape[-2:]))], dim=2)
        else:
            z = F.interpolate(z, size=f.shape[-3:])
        return self.norm_layer(f) * self.conv_y(z)[0] + self.conv_b(z)[0]


class ResnetBlock3d(nn.Module):
    def __init__(self, cin, cout, groups, latent_channels=None):
        super().__init__()
        if latent_channels is None:  # encoder: plain group norms
            self.norm1, self.norm2 = nn.GroupNorm(groups, cin, eps=1e-6), nn.GroupNorm(groups, cout, eps=1e-6)
        else:  # decoder: spatial norms conditioned on the latents
            self.norm1 = SpatialNorm3d(cin, latent_channels, groups)
            self.norm2 = SpatialNorm3d(cout, latent_channels, groups)
        self.conv1, self.conv2 = CausalConv3d(cin, cout), CausalConv3d(cout, cout)
        if cin != cout:
            self.conv_shortcut = nn.Conv3d(cin, cout, kernel_size=1)
        self.spatial_norm = latent_channels is not None

    def _norm(self, norm, h, z):
        return norm(h, z) if self.spatial_norm else norm(h)

    def forward(self, x, z=None, cache=None):
        cache, new = cache or {}, {}
        h, new["conv1"] = self.conv1(F.silu(self._norm(self.norm1, x, z)), cache.get("conv1"))
        h, new["conv2"] = self.conv2(F.silu(self._norm(self.norm2, h, z)), cache.get("conv2"))
        skip = self.conv_shortcut(x) if hasattr(self, "conv_shortcut") else x
        return h + skip, new


class Downsample(nn.Module):
    """Halve H and W with a strided 2D conv; with compress_time, first average pairs of frames after the first."""

    def __init__(self, channels, compress_time):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=0)
        self.compress_time = compress_time

    def forward(self, x):
        b = x.shape[0]
        if self.compress_time:
            first, rest = (x[:, :, :1], x[:, :, 1:]) if x.shape[2] % 2 == 1 else (x[:, :, :0], x)
            if rest.shape[2]:
                rest = 0.5 * (rest[:, :, 0::2] + rest[:, :, 1::2])  # average consecutive pairs of frames
            x = torch.cat([first, rest], dim=2)
        x = F.pad(x, (0, 1, 0, 1))  # the published model pads right and bottom only
        y = self.conv(frames_to_time_first(x).flatten(0, 1))
        return frames_to_time_first(y.unflatten(0, (b, -1)))


class Upsample(nn.Module):
    """Double H and W (nearest) then a 3x3 conv; with compress_time also double time, except the first frame."""

    def __init__(self, channels, compress_time):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, padding=1)
        self.compress_time = compress_time

    def forward(self, x):
        b, T = x.shape[0], x.shape[2]
        if self.compress_time and T > 1 and T % 2 == 1:
            first = F.interpolate(x[:, :, 0], scale_factor=2.0)[:, :, None]
            x = torch.cat([first, F.interpolate(x[:, :, 1:], scale_factor=2.0)], dim=2)
        elif self.compress_time and T > 1:
            x = F.interpolate(x, scale_factor=2.0)
        else:  # spatial only (a single frame stays a single frame)
            x = frames_to_time_first(F.interpolate(frames_to_time_first(x).flatten(0, 1), scale_factor=2.0)
                                     .unflatten(0, (b, T)))
        y = self.conv(frames_to_time_first(x).flatten(0, 1))
        return frames_to_time_first(y.unflatten(0, (b, -1)))


class FreqComp2d(nn.Module):
    """Encoder component: per-frame 2D convolutions that restore spatial detail before down-sampling."""

    def __init__(self, channels):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)  # starts as the identity of the residual: pretrained VAE unchanged
        nn.init.zeros_(self.conv2.bias)

    def forward(self, x):
        b = x.shape[0]
        h = frames_to_time_first(x).flatten(0, 1)  # frame by frame: any clip length, any chunking
        h = self.conv2(F.silu(self.conv1(h)))
        return x + frames_to_time_first(h.unflatten(0, (b, -1)))


class FreqComp3d(nn.Module):
    """Decoder component: a causal 3D convolution that restores detail across space and time."""

    def __init__(self, channels, groups):
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.conv = CausalConv3d(channels, channels)
        nn.init.zeros_(self.conv.conv.weight)
        nn.init.zeros_(self.conv.conv.bias)

    def forward(self, x, cache=None):
        h, cache = self.conv(F.silu(self.norm(x)), cache)
        return x + h, cache


class Blocks(nn.Module):
    """A stage of resnets, then an optional resampler (named as diffusers names them), with the optional
    frequency compensation: before the down-sampler (encoder) or after the first half of the resnets (decoder)."""

    def __init__(self, cin, cout, n, groups, latent_channels=None, down=None, up=None, freq_comp=False):
        super().__init__()
        self.resnets = nn.ModuleList(ResnetBlock3d(cin if i == 0 else cout, cout, groups, latent_channels)
                                     for i in range(n))
        if down is not None:
            self.downsamplers = nn.ModuleList([Downsample(cout, compress_time=down)])
            if freq_comp:
                self.freq_comp = FreqComp2d(cout)
        if up is not None:
            self.upsamplers = nn.ModuleList([Upsample(cout, compress_time=up)])
        if freq_comp and latent_channels is not None:
            self.freq_comp = FreqComp3d(cout, groups)

    def forward(self, x, z=None, cache=None):
        cache, new = cache or {}, {}
        for i, resnet in enumerate(self.resnets):
            x, new[f"resnet_{i}"] = resnet(x, z, cache.get(f"resnet_{i}"))
            if i == (len(self.resnets) - 1) // 2 and isinstance(getattr(self, "freq_comp", None), FreqComp3d):
                x, new["freq_comp"] = self.freq_comp(x, cache.get("freq_comp"))  # the middle of the block
        if isinstance(getattr(self, "freq_comp", None), FreqComp2d):
            x = self.freq_comp(x)  # before the 2D down-sampling
        for resampler in list(getattr(self, "downsamplers", [])) + list(getattr(self, "upsamplers", [])):
            x = resampler(x)
        return x, new


class Encoder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        ch, g = cfg.block_out_channels, cfg.norm_num_groups
        levels = int(math.log2(cfg.temporal_compression_ratio))  # the first `levels` stages also halve time
        self.conv_in = CausalConv3d(cfg.in_channels, ch[0])
        self.down_blocks = nn.ModuleList(
            Blocks(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block, g, down=(i < levels) if i < len(ch) - 1 else None,
                   freq_comp=cfg.freq_comp)
            for i in range(len(ch)))
        self.mid_block = Blocks(ch[-1], ch[-1], 2, g)
        self.norm_out = nn.GroupNorm(g, ch[-1], eps=1e-6)
        self.conv_out = CausalConv3d(ch[-1], 2 * cfg.latent_channels)

    def forward(self, x, cache=None):
        cache, new = cache or {}, {}
        h, new["conv_in"] = self.conv_in(x, cache.get("conv_in"))
        for i, block in enumerate(self.down_blocks):
            h, new[f"down_block_{i}"] = block(h, cache=cache.get(f"down_block_{i}"))
        h, new["mid_block"] = self.mid_block(h, cache=cache.get("mid_block"))
        h, new["conv_out"] = self.conv_out(F.silu(self.norm_out(h)), cache.get("conv_out"))
        return h, new  # (B, 2 * latent, f, H / 8, W / 8): mean and log-variance


class Decoder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        ch, g, zc = list(reversed(cfg.block_out_channels)), cfg.norm_num_groups, cfg.latent_channels
        levels = int(math.log2(cfg.temporal_compression_ratio))
        self.conv_in = CausalConv3d(zc, ch[0])
        self.mid_block = Blocks(ch[0], ch[0], 2, g, latent_channels=zc)
        self.up_blocks = nn.ModuleList(
            Blocks(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block + 1, g, latent_channels=zc,
                   up=(i < levels) if i < len(ch) - 1 else None, freq_comp=cfg.freq_comp)
            for i in range(len(ch)))
        self.norm_out = SpatialNorm3d(ch[-1], zc, g)
        self.conv_out = CausalConv3d(ch[-1], cfg.in_channels)

    def forward(self, z, cache=None):
        cache, new = cache or {}, {}
        h, new["conv_in"] = self.conv_in(z, cache.get("conv_in"))
        h, new["mid_block"] = self.mid_block(h, z, cache.get("mid_block"))
        for i, block in enumerate(self.up_blocks):
            h, new[f"up_block_{i}"] = block(h, z, cache.get(f"up_block_{i}"))
        h, new["conv_out"] = self.conv_out(F.silu(self.norm_out(h, z)), cache.get("conv_out"))
        return h, new


# ---------------------------------------------------------------------------------------------------------
# The autoencoder
# ---------------------------------------------------------------------------------------------------------

def chunks(num_frames, size):
    """Frame ranges of the chunked pass: the first chunk also takes the frames that do not divide evenly
    (the extra first frame of a 4k + 1 clip), as the published model does."""
    n = max(num_frames // size, 1)
    extra = num_frames % size
    return [(0 if i == 0 else size * i + extra, min(size * (i + 1) + extra, num_frames)) for i in range(n)]


class VideoVAE(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder, self.decoder = Encoder(cfg), Decoder(cfg)

    @property
    def spatial_compression(self):
        """Pixels per latent cell along H and W: 8 (one 2x down-sampling per block but the last)."""
        return 2 ** (len(self.cfg.block_out_channels) - 1)

    def encode_moments(self, x):
        """x (B, 3, F, H, W) in [-1, 1] -> mean, logvar (B, latent, f, H / 8, W / 8), chunk by chunk in time."""
        cache, out = None, []
        for a, b in chunks(x.shape[2], self.cfg.sample_frames_per_chunk):
            h, cache = self.encoder(x[:, :, a:b], cache)
            out.append(h)
        mean, logvar = torch.cat(out, dim=2).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def encode(self, x, sample=True, generator=None):
        """Scaled latents for the diffusion model: z * scaling_factor, z drawn from the posterior (or its mean)."""
        mean, logvar = self.encode_moments(x)
        z = sample_posterior(mean, logvar, generator) if sample else mean
        return z * self.cfg.scaling_factor

    def forward(self, x, generator=None):
        """The training pass (one call, so that DDP can wrap it): x -> (reconstruction of a posterior sample,
        mean, logvar), at unit scale."""
        mean, logvar = self.encode_moments(x)
        return self.decode(sample_posterior(mean, logvar, generator), scaled=False), mean, logvar

    def reconstruct(self, x):
        """x (B, 3, F, H, W) -> the decoding of its posterior mean: what the VAE keeps of a clip (the mean is at
        unit scale, not scaled for the diffusion model)."""
        return self.decode(self.encode_moments(x)[0], scaled=False)

    def decode(self, z, scaled=True):
        """Latents (B, latent, f, h, w) -> pixels (B, 3, 1 + 4 (f - 1), 8h, 8w), chunk by chunk in time."""
        if z.shape[2] % 2 == 0:
            # the first latent frame must reach the decoder's first-frame path: an odd count in the first chunk
            raise ValueError(f"the CogVideoX decoder needs an odd number of latent frames (clips of 8k + 1 frames, "
                             f"or single images), got {z.shape[2]}")
        if scaled:
            z = z / self.cfg.scaling_factor
        cache, out = None, []
        for a, b in chunks(z.shape[2], self.cfg.latent_frames_per_chunk):
            h, cache = self.decoder(z[:, :, a:b], cache)
            out.append(h)
        return torch.cat(out, dim=2)


def sample_posterior(mean, logvar, generator=None):
    """z ~ N(mean, exp(logvar)): the reparameterised sample of the diagonal Gaussian posterior."""
    noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
    return mean + torch.exp(0.5 * logvar) * noise


# ---------------------------------------------------------------------------------------------------------
# Reconstruction quality: the focal frequency loss of Eq. 16, PSNR and SSIM
# ---------------------------------------------------------------------------------------------------------

def frames(x):
    """(B, 3, F, H, W) -> (B * F, 3, H, W)."""
    return frames_to_time_first(x).flatten(0, 1)


def focal_frequency_loss(fake, real, alpha=1.0):
    """Focal frequency loss (Jiang et al. 2021) per frame: squared spectrum error, weighted by its own
    (normalised, detached) magnitude so that hard frequencies count more. (..., H, W) inputs."""
    f_fake = torch.fft.fft2(fake.float(), norm="ortho")
    f_real = torch.fft.fft2(real.float(), norm="ortho")
    dist2 = (f_fake - f_real).abs() ** 2
    weight = dist2.sqrt() ** alpha
    weight = (weight / weight.flatten(-2).amax(-1).clamp(min=1e-12)[..., None, None]).detach()
    return (weight * dist2).mean()


def reconstruction_losses(recon, x, mean, logvar):
    """Eq. 16's terms without LPIPS and the discriminator: L1, the focal frequency loss per frame, and the KL of
    the posterior N(mean, exp(logvar)) from N(0, 1); (B, 3, F, H, W) clips and (B, C, f, h, w) moments."""
    return {"l1": (recon - x).abs().mean(), "ffl": focal_frequency_loss(frames(recon), frames(x)),
            "kl": 0.5 * (mean ** 2 + logvar.exp() - 1 - logvar).mean()}


def psnr(fake, real):
    """Peak signal-to-noise ratio in dB for images in [-1, 1], per sample."""
    mse = ((fake.float() - real.float()) / 2).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(1 / mse.clamp(min=1e-10))


def ssim(fake, real, window=11, sigma=1.5):
    """Structural similarity (Gaussian window, on [0, 1] images), per sample. (N, C, H, W) inputs."""
    x, y = (fake.float() + 1) / 2, (real.float() + 1) / 2
    g = torch.exp(-((torch.arange(window, device=x.device) - window // 2) ** 2) / (2 * sigma ** 2))
    g = (g / g.sum()).float()
    kernel = (g[:, None] * g[None, :]).expand(x.shape[1], 1, window, window)
    blur = lambda t: F.conv2d(t, kernel, groups=x.shape[1])  # noqa: E731  (valid region only)
    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx ** 2, blur(y * y) - my ** 2, blur(x * y) - mx * my
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))
    return s.flatten(1).mean(1)


BANDS = (0.125, 0.25)  # edges in cycles per pixel: low < 1/8 <= mid < 1/4 <= high (up to the diagonal Nyquist)


def band_energy(images, edges=BANDS):
    """Images (N, C, H, W) in [-1, 1] -> per sample, their mean energy (at PSNR's scale, of images / 2) in each
    radial spatial frequency band: low < 1/8 <= mid < 1/4 cycle per pixel <= high (up to the diagonal Nyquist)."""
    spectrum = torch.fft.fft2(images.float() / 2, norm="ortho")                  # energy-preserving
    fy, fx = (torch.fft.fftfreq(n, device=images.device) for n in images.shape[-2:])
    radius = (fy[:, None] ** 2 + fx[None, :] ** 2).sqrt()                         # (H, W) cycles per pixel
    band = torch.bucketize(radius, torch.tensor(edges, device=images.device), right=True).flatten()
    energy = spectrum.abs().pow(2).mean(1).flatten(1)                             # (N, H * W), channels averaged
    return torch.stack([(energy * (band == b)).sum(1) for b in range(len(edges) + 1)], 1) / band.numel()


def band_errors(fake, real, edges=BANDS):
    """The squared error split by band (band_energy of fake - real): by Parseval the bands sum to the whole MSE,
    so they say where a reconstruction loses (vessels and fold edges are the high bands)."""
    return band_energy(fake - real, edges)


def band_detail(images, edges=BANDS):
    """band_energy of the images' variation (each image's mean colour removed): their detail at each scale."""
    return band_energy(images - images.mean((-2, -1), keepdim=True), edges)


@torch.no_grad()
def reconstruction_quality(model, loader, device, amp, max_clips, first=None):
    """Mean PSNR, SSIM and focal-frequency error of reconstructions (posterior mean) over about max_clips
    clips of `loader`; per frequency band, the PSNR of the error (band_errors, averaged over all frames before the
    log: psnr_low, psnr_mid, psnr_high) and the share of the clips' detail there that the reconstructions capture
    (1 - error / band_detail: captured_low, ..., 1 all of it, 0 no better than a flat image of the right colour,
    a blur's high bands); first(x, recon) receives the first clip and its reconstruction (for a picture)."""
    psnrs, ssims, ffls, bands, details = [], [], [], [], []
    for batch in loader:
        x = batch["video"].to(device).transpose(1, 2)  # (B, 3, F, H, W)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            recon = model.reconstruct(x).float().clamp(-1, 1)
        fake, real = frames(recon), frames(x)                                   # (B * F, 3, H, W)
        psnrs.append(psnr(fake, real))
        ssims.append(ssim(fake, real))
        bands.append(band_errors(fake, real))
        details.append(band_detail(real))
        ffls += [focal_frequency_loss(frames(r[None]), frames(c[None])).item() for r, c in zip(recon, x)]
        if first is not None and len(psnrs) == 1:
            first(x[0], recon[0])
        if len(ffls) >= max_clips:
            break
    error, detail = torch.cat(bands).mean(0), torch.cat(details).mean(0)          # (3,) each
    by_band = (10 * torch.log10(1 / error.clamp(min=1e-10))).tolist()
    captured = (1 - error / detail.clamp(min=1e-12)).tolist()
    names = ("low", "mid", "high")
    return {"psnr": torch.cat(psnrs).mean().item(), "ssim": torch.cat(ssims).mean().item(),
            "ffl": sum(ffls) / len(ffls), "clips": len(ffls),
            **{f"psnr_{name}": v for name, v in zip(names, by_band)},
            **{f"captured_{name}": v for name, v in zip(names, captured)}}


# ---------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------

def load_pretrained(path, cfg=None):
    """CogVideoX VAE weights in diffusers' format: a .safetensors file, or a folder holding one (e.g. `vae/`).

    Strict: any missing or unexpected key is an error that lists them.
    """
    try:
        from safetensors.torch import load_file
    except ImportError:
        raise ImportError("loading CogVideoX weights needs safetensors: pip install safetensors") from None
    if os.path.isdir(path):
        files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
        if not files:
            raise FileNotFoundError(f"no .safetensors file in {path}; expected diffusers' vae/ folder")
        config_path = os.path.join(path, "config.json")
        if cfg is None and os.path.exists(config_path):
            with open(config_path) as f:
                c = json.load(f)
            cfg = VAEConfig(block_out_channels=tuple(c["block_out_channels"]), latent_channels=c["latent_channels"],
                            layers_per_block=c["layers_per_block"], norm_num_groups=c["norm_num_groups"],
                            scaling_factor=c.get("scaling_factor", VAEConfig.scaling_factor))
        state = {}
        for f in files:
            state.update(_safetensors(load_file, os.path.join(path, f)))
    elif os.path.isfile(path):
        state = _safetensors(load_file, path)
    else:
        raise FileNotFoundError(f"CogVideoX VAE weights not found at {path}")
    model = VideoVAE(cfg or MODELS["cogvideox"])
    load_state_dict_strict(model, state, path)
    return model


def _safetensors(load_file, path):
    """A .safetensors file's tensors, or an error that says what the file is instead."""
    if zipfile.is_zipfile(path):
        raise ValueError(f"{path} is a torch checkpoint, not CogVideoX's weights: give diffusers' vae/ folder or its "
                         f".safetensors file (a train_vae.py checkpoint is taken by train.py --vae, or --resume)")
    try:
        return load_file(path)
    except Exception as e:  # safetensors' own error: a text file, a pickle, a truncated download
        raise ValueError(f"{path} is not a .safetensors weights file ({e}): give CogVideoX's vae/ folder or its "
                         f".safetensors file") from None


def load(path):
    """A VAE for the diffusion model: a `train_vae.py` checkpoint (.pt) or CogVideoX weights (see load_pretrained)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"no VAE at {path}: train one with `python train_vae.py` (writes runs/vae/ckpt.pt) "
                                f"or give CogVideoX's weights (a vae/ folder or .safetensors file)")
    if path.endswith(".pt") or (os.path.isfile(path) and zipfile.is_zipfile(path)):  # a torch file, by content
        ckpt = checkpoint.load(path, "VAE checkpoint")
        if "model" not in ckpt or "config" not in ckpt or "vae_path" in ckpt:
            raise ValueError(f"{path} is not a train_vae.py checkpoint (expected its 'model' and 'config' entries"
                             f"{'; this one is a MedSora checkpoint' if 'vae_path' in ckpt else ''})")
        model = VideoVAE(VAEConfig(**ckpt["config"]))
        model.load_state_dict(checkpoint.check_finite(ckpt["model"], path, "VAE weights"))  # strict: ours match
        return model
    return load_pretrained(path)


def is_freq_comp(name):
    return ".freq_comp." in name


def load_state_dict_strict(model, state, source="state dict", may_miss=is_freq_comp):
    """Every key of the model must be in `state` and nothing else, except keys for which may_miss(key) is
    true: by default the frequency-compensation modules, which a published CogVideoX checkpoint does not
    have (they keep their zero-output start then)."""
    expected, found = set(model.state_dict()), set(state)
    missing = sorted(k for k in expected - found if not may_miss(k))
    unexpected = sorted(found - expected)
    if missing or unexpected:
        raise KeyError(f"{source} does not match the model: {len(missing)} missing keys {missing[:10]}, "
                       f"{len(unexpected)} unexpected keys {unexpected[:10]}")
    model.load_state_dict(state, strict=False)  # the check above is the strict one
