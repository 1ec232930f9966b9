"""
Train the video VAE (paper Sec. 3.3, Eq. 16, Sec. 4.1).

    python train_vae.py --finetune path/to/CogVideoX/vae     # frozen CogVideoX VAE, train the frequency compensation
    python train_vae.py --model tiny                         # a whole (tiny) VAE from scratch: no weights needed
    torchrun --nproc_per_node=4 train_vae.py --finetune ...  # the same on several GPUs

Loss (Eq. 16): L1 + perceptual (LPIPS, when its backbone weights are given) + lambda * focal frequency loss
(lambda 0.1), plus a small KL term and, from --disc-start on, a patch discriminator (the VQ-GAN recipe).
Fine-tuning uses Adam, lr 2e-7, betas (0.5, 0.9) as in Sec. 4.1.

The run folder gets: log.jsonl (loss, lr, throughput), ckpt.pt (written atomically: model, optimizer,
discriminator, step, data position, RNG states, config; --resume continues exactly), recon.png (original |
reconstruction | error), and the latent scaling factor measured on training clips, stored in the checkpoint.
"""

import argparse
import json
import os
import random
import signal
import sys
import time
from dataclasses import asdict, replace

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, DistributedSampler
from tqdm.auto import tqdm

import data
import vae


# ---------------------------------------------------------------------------------------------------------
# Losses and metrics
# ---------------------------------------------------------------------------------------------------------

def focal_frequency_loss(fake, real, alpha=1.0):
    """Focal frequency loss (Jiang et al. 2021) per frame: squared spectrum error, weighted by its own
    (normalised, detached) magnitude so that hard frequencies count more. (..., H, W) inputs."""
    f_fake = torch.fft.fft2(fake.float(), norm="ortho")
    f_real = torch.fft.fft2(real.float(), norm="ortho")
    dist2 = (f_fake - f_real).abs() ** 2
    weight = dist2.sqrt() ** alpha
    weight = (weight / weight.flatten(-2).amax(-1).clamp(min=1e-12)[..., None, None]).detach()
    return (weight * dist2).mean()


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


class PatchDiscriminator(nn.Module):
    """A small PatchGAN on single frames (the VQ-GAN recipe's discriminator)."""

    def __init__(self, channels=64, layers=3):
        super().__init__()
        mods, c = [nn.Conv2d(3, channels, 4, 2, 1), nn.LeakyReLU(0.2)], channels
        for i in range(1, layers):
            mods += [nn.Conv2d(c, c * 2, 4, 2, 1), nn.GroupNorm(8, c * 2), nn.LeakyReLU(0.2)]
            c *= 2
        mods += [nn.Conv2d(c, 1, 4, 1, 1)]
        self.net = nn.Sequential(*mods)

    def forward(self, x):
        return self.net(x)


def frames(x):
    """(B, 3, F, H, W) -> (B * F, 3, H, W)."""
    return vae.frames_to_time_first(x).flatten(0, 1)


class LPIPS(nn.Module):
    """LPIPS-VGG perceptual distance (Zhang et al. 2018): unit-normalised VGG16 features at 5 depths, their
    squared differences weighted per channel by learned 1x1 heads, averaged over space, summed over depths.

    Weights come from local files only: torchvision's VGG16 state dict (`features.*` keys) and the `lpips`
    package's linear heads for VGG (`lin0.model.1.weight` ... `lin4`). Loaded strictly.
    """

    CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]
    TAPS = (3, 8, 15, 22, 29)  # after the ReLUs of conv1_2, conv2_2, conv3_3, conv4_3, conv5_3
    CHANNELS = (64, 128, 256, 512, 512)

    def __init__(self):
        super().__init__()
        layers, c = [], 3
        for v in self.CFG:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [nn.Conv2d(c, v, 3, padding=1), nn.ReLU()]
                c = v
        self.features = nn.Sequential(*layers)
        self.heads = nn.ModuleList(nn.Conv2d(ch, 1, 1, bias=False) for ch in self.CHANNELS)
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1))
        self.requires_grad_(False)

    @classmethod
    def from_files(cls, backbone_path, heads_path):
        model = cls()
        for path in (backbone_path, heads_path):
            if not os.path.isfile(path):
                raise FileNotFoundError(f"LPIPS weights not found: {path}")
        backbone = torch.load(backbone_path, map_location="cpu", weights_only=True)
        backbone = {k[len("features."):]: v for k, v in backbone.items() if k.startswith("features.")}
        vae.load_state_dict_strict(model.features, backbone, backbone_path)
        heads = torch.load(heads_path, map_location="cpu", weights_only=True)
        heads = {f"{i}.weight": heads[f"lin{i}.model.1.weight"] for i in range(5) if f"lin{i}.model.1.weight" in heads}
        vae.load_state_dict_strict(model.heads, heads, heads_path)
        return model.eval()

    def forward(self, a, b):
        """a, b (N, 3, H, W) in [-1, 1] -> (N,)."""
        h = torch.cat([(a - self.shift) / self.scale, (b - self.shift) / self.scale])
        total = 0
        for i, layer in enumerate(self.features[:self.TAPS[-1] + 1]):
            h = layer(h)
            if i in self.TAPS:
                fa, fb = h.chunk(2)
                fa = fa / (fa.norm(dim=1, keepdim=True) + 1e-10)
                fb = fb / (fb.norm(dim=1, keepdim=True) + 1e-10)
                total = total + self.heads[self.TAPS.index(i)]((fa - fb) ** 2).mean(dim=(1, 2, 3))
        return total


# ---------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------

def setup_distributed():
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if torch.cuda.is_available():  # the GPU first, so NCCL binds each process to its own device
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if torch.cuda.is_available():
        return rank, world, torch.device("cuda", torch.cuda.current_device())
    return rank, world, torch.device("cpu")


def save_atomic(obj, path):
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)  # a crash leaves either the old checkpoint or the new one, never half of one


def rng_state():
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@torch.no_grad()
def measure_scaling_factor(model, loader, device, max_clips=64):
    """1 / std of the posterior means over training clips: unit-variance latents for the diffusion model."""
    values, n = [], 0
    for batch in loader:
        x = batch["video"].to(device).transpose(1, 2)  # (B, 3, F, H, W)
        values.append(model.encode_moments(x)[0].float().flatten().cpu())
        n += x.shape[0]
        if n >= max_clips:
            break
    return float(1 / torch.cat(values).std())


@torch.no_grad()
def validate(model, loader, device, amp, max_clips, picture_path=None):
    """Mean PSNR, SSIM and focal-frequency error of reconstructions (posterior mean) over about max_clips clips."""
    psnrs, ssims, ffls = [], [], []
    for batch in loader:
        x = batch["video"].to(device).transpose(1, 2)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            recon = model.decode(model.encode_moments(x)[0], scaled=False).float().clamp(-1, 1)
        psnrs.append(psnr(frames(recon), frames(x)))
        ssims.append(ssim(frames(recon), frames(x)))
        ffls += [focal_frequency_loss(frames(r[None]), frames(c[None])).item() for r, c in zip(recon, x)]
        if picture_path and len(psnrs) == 1:
            save_picture(x[0], recon[0], picture_path)
        if len(ffls) >= max_clips:
            break
    return {"psnr": torch.cat(psnrs).mean().item(), "ssim": torch.cat(ssims).mean().item(),
            "ffl": float(np.mean(ffls)), "clips": len(ffls)}


@torch.no_grad()
def measure_speed(model, device, amp, batch_size, num_frames, size, repeats=5):
    """Encode + decode throughput (clips/s) and peak memory on random clips of num_frames + 1 frames."""
    x = torch.rand(batch_size, 3, num_frames + 1, size, size, device=device) * 2 - 1
    run = lambda: model.decode(model.encode_moments(x)[0], scaled=False)  # noqa: E731
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
        run()  # warm-up
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        for _ in range(repeats):
            run()
        if device.type == "cuda":
            torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2 ** 30 if device.type == "cuda" else None
    return {"clips_per_s": batch_size * repeats / seconds, "peak_gib": peak, "batch": batch_size,
            "clip": f"{num_frames + 1}x{size}x{size}"}


def evaluate(args, device, amp):
    """--eval: the checkpoint in OUT on --data's --eval-split; prints and writes OUT/eval_<data>.json."""
    ckpt_path = os.path.join(args.out, "ckpt.pt")
    if not os.path.exists(ckpt_path):
        sys.exit(f"error: --eval needs a checkpoint, and {ckpt_path} does not exist")
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    model = vae.VideoVAE(vae.VAEConfig(**ckpt["config"]))
    model.load_state_dict(ckpt["model"])
    model.to(device).eval()
    ds = data.make_dataset(args.data, args.eval_split, args.data_root, num_frames=args.num_frames, size=args.size,
                           num_images=0, flip=False, with_flow=False)
    tag = os.path.basename(os.path.normpath(args.data))
    torch.manual_seed(args.seed)  # the clips' random start frames
    loader = DataLoader(ds, args.batch_size, num_workers=args.workers)
    result = {"data": args.data, "split": args.eval_split, "step": ckpt["step"], "freq_comp": model.cfg.freq_comp,
              **validate(model, loader, device, amp, args.val_clips, os.path.join(args.out, f"recon_{tag}.png")),
              **measure_speed(model, device, amp, args.batch_size, args.num_frames, args.size)}
    with open(os.path.join(args.out, f"eval_{tag}.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps(result))
    return result


def save_picture(x, recon, path, num=4):
    """Rows of frames: original | reconstruction | |error| (x3 brightened), from (3, F, H, W) tensors."""
    idx = np.linspace(0, x.shape[1] - 1, num).round().astype(int)
    to_img = lambda t: ((t.clamp(-1, 1) + 1) * 127.5).byte().permute(1, 2, 0).cpu().numpy()  # noqa: E731
    rows = [np.concatenate([to_img(x[:, i]), to_img(recon[:, i]),
                            to_img(((recon[:, i] - x[:, i]).abs() * 3 - 1).clamp(-1, 1))], axis=1) for i in idx]
    tmp = path + ".tmp.png"
    Image.fromarray(np.concatenate(rows, axis=0)).save(tmp)
    os.replace(tmp, path)


def catch_stop_signals():
    """SIGTERM / SIGINT set stop["signal"] instead of killing the run: the loop finishes its step, saves and
    exits. Returns (stop, restore); restore() gives the previous handlers back."""
    stop = {"signal": None}
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    for sig in previous:
        signal.signal(sig, lambda s, _f: stop.update(signal=s))

    def restore():
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return stop, restore


def agree(flag, world, device):
    """True on every rank if it is true on any: a signal that reached one rank first stops all at one step."""
    t = torch.tensor([float(flag)], device=device)
    if world > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def build(args, device):
    if args.finetune:
        model = vae.load_pretrained(args.finetune)
        if not model.cfg.freq_comp or args.no_freq_comp:
            raise ValueError("fine-tuning trains the frequency compensation; the config has it off")
        for name, p in model.named_parameters():
            p.requires_grad = vae.is_freq_comp(name)  # the pretrained VAE stays frozen
    else:
        model = vae.VideoVAE(replace(vae.MODELS[args.model], freq_comp=not args.no_freq_comp))
    return model.to(device)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="synthetic")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--model", default="tiny", choices=sorted(vae.MODELS), help="VAE config when training from scratch")
    parser.add_argument("--finetune", default=None, help="CogVideoX VAE weights (file or vae/ folder): train only the frequency compensation")
    parser.add_argument("--out", default="runs/vae")
    parser.add_argument("--resume", action="store_true", help="continue from OUT/ckpt.pt")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=2, help="per process")
    parser.add_argument("--lr", type=float, default=None, help="default 2e-7 fine-tuning (Sec. 4.1), 1e-4 from scratch")
    parser.add_argument("--betas", type=float, nargs=2, default=(0.5, 0.9))
    parser.add_argument("--ffl-weight", type=float, default=0.1, help="lambda of Eq. 16")
    parser.add_argument("--kl-weight", type=float, default=1e-6)
    parser.add_argument("--lpips", nargs=2, metavar=("VGG16_PTH", "LPIPS_VGG_HEADS_PTH"), default=None,
                        help="local weight files for the perceptual loss; without them it is left out")
    parser.add_argument("--lpips-weight", type=float, default=1.0)
    parser.add_argument("--disc-start", type=int, default=-1, help="step at which the patch discriminator starts; -1 = never")
    parser.add_argument("--disc-weight", type=float, default=0.1)
    parser.add_argument("--num-frames", type=int, default=16, help="clip frames (+1 for the causal first frame)")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--ckpt-every", type=int, default=200)
    parser.add_argument("--val-every", type=int, default=500)
    parser.add_argument("--val-clips", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-freq-comp", action="store_true", help="from scratch without the compensation modules")
    parser.add_argument("--max-minutes", type=float, default=None, help="stop (as if done) after this much training")
    parser.add_argument("--eval", action="store_true", help="only evaluate OUT/ckpt.pt on --data (see --eval-split)")
    parser.add_argument("--eval-split", default="val", choices=["train", "val", "all"])
    args = parser.parse_args(argv)

    rank, world, device = setup_distributed()
    amp = device.type == "cuda"  # bf16 autocast on GPU, fp32 on CPU
    torch.manual_seed(args.seed + rank)
    os.makedirs(args.out, exist_ok=True)
    log = (lambda *a: print(*a, flush=True)) if rank == 0 else (lambda *a: None)
    if args.eval:
        return evaluate(args, device, amp) if rank == 0 else None

    clip_kwargs = dict(num_frames=args.num_frames, size=args.size, num_images=0, with_flow=False)
    train_set = data.make_dataset(args.data, "train", args.data_root, **clip_kwargs)
    val_set = data.make_dataset(args.data, "val", args.data_root, **{**clip_kwargs, "flip": False})
    model = build(args, device)
    params = [p for p in model.parameters() if p.requires_grad]
    lr = args.lr if args.lr is not None else (2e-7 if args.finetune else 1e-4)
    opt = torch.optim.Adam(params, lr=lr, betas=tuple(args.betas))
    disc = PatchDiscriminator().to(device) if args.disc_start >= 0 else None
    disc_opt = torch.optim.Adam(disc.parameters(), lr=lr, betas=tuple(args.betas)) if disc else None
    lpips = LPIPS.from_files(*args.lpips).to(device) if args.lpips else None
    if lpips is None:
        log("note: no LPIPS weights given (--lpips VGG16 HEADS): training without the perceptual loss")

    step, epoch, batch_in_epoch, pending_rng = 0, 0, 0, None
    ckpt_path = os.path.join(args.out, "ckpt.pt")
    if args.resume:
        if not os.path.exists(ckpt_path):
            sys.exit(f"error: --resume given but {ckpt_path} does not exist")
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        if disc and ckpt.get("disc"):
            disc.load_state_dict(ckpt["disc"])
            disc_opt.load_state_dict(ckpt["disc_optimizer"])
        step, epoch, batch_in_epoch = ckpt["step"], ckpt["epoch"], ckpt["batch_in_epoch"]
        pending_rng = ckpt["rng"][rank]  # restored once the loader is back at the saved position (below)
        log(f"resumed from {ckpt_path} at step {step}")
    if world > 1:  # every rank starts from rank 0's weights; gradients are averaged by hand after backward
        for t in model.state_dict().values():
            dist.broadcast(t, 0)

    def checkpoint():
        states = [None] * world
        if world > 1:
            dist.all_gather_object(states, rng_state())
        else:
            states = [rng_state()]
        if rank == 0:
            save_atomic({"model": model.state_dict(), "optimizer": opt.state_dict(),
                         "disc": disc.state_dict() if disc else None,
                         "disc_optimizer": disc_opt.state_dict() if disc else None,
                         "step": step, "epoch": epoch, "batch_in_epoch": batch_in_epoch, "rng": states,
                         "config": asdict(model.cfg), "args": vars(args)}, ckpt_path)
        if world > 1:
            dist.barrier()

    stop, restore_signals = catch_stop_signals()

    bar = tqdm(total=args.steps, initial=step, disable=rank != 0, desc="train_vae")
    t_last, clips_since = time.perf_counter(), 0
    deadline = time.perf_counter() + 60 * args.max_minutes if args.max_minutes is not None else None
    logf = open(os.path.join(args.out, "log.jsonl"), "a") if rank == 0 else None
    while step < args.steps and stop["signal"] is None:
        if hasattr(train_set, "set_epoch"):
            train_set.set_epoch(epoch)
        sampler = DistributedSampler(train_set, world, rank, shuffle=True, seed=args.seed) if world > 1 else None
        if sampler:
            sampler.set_epoch(epoch)
        order = torch.Generator().manual_seed(args.seed * 1000 + epoch)  # the epoch's shuffle, reproducible
        torch.manual_seed(args.seed * 1000 + epoch + rank)  # worker seeds for this epoch: resume is exact
        loader = DataLoader(train_set, args.batch_size, sampler=sampler, shuffle=sampler is None, generator=order,
                            num_workers=args.workers, drop_last=True, persistent_workers=False)
        for i, batch in enumerate(loader):
            if i < batch_in_epoch:
                continue  # resuming mid-epoch: these batches were used before the checkpoint
            if pending_rng is not None:  # now every random draw continues exactly where the saved run stopped
                set_rng_state(pending_rng)
                pending_rng = None
            x = batch["video"].to(device).transpose(1, 2)  # (B, 3, F, H, W)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                mean, logvar = model.encode_moments(x)
                z = mean + torch.exp(0.5 * logvar) * torch.randn_like(mean)
                recon = model.decode(z, scaled=False)
            recon, logvar, mean = recon.float(), logvar.float(), mean.float()
            losses = {"l1": (recon - x).abs().mean(), "ffl": focal_frequency_loss(frames(recon), frames(x)),
                      "kl": 0.5 * (mean ** 2 + logvar.exp() - 1 - logvar).mean()}
            loss = losses["l1"] + args.ffl_weight * losses["ffl"] + args.kl_weight * losses["kl"]
            if lpips is not None:
                losses["lpips"] = lpips(frames(recon), frames(x)).mean()
                loss = loss + args.lpips_weight * losses["lpips"]
            if disc is not None and step >= args.disc_start:
                losses["gen"] = -disc(frames(recon)).mean()
                loss = loss + args.disc_weight * losses["gen"]
            if not torch.isfinite(loss):
                sys.exit(f"error: loss is {loss.item()} at step {step}; lower --lr or check the data")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if world > 1:  # encode and decode are two calls, not one forward: average gradients by hand
                for p in params:
                    if p.grad is not None:
                        dist.all_reduce(p.grad)
                        p.grad /= world
            opt.step()
            if disc is not None and step >= args.disc_start:  # hinge loss for the discriminator
                d_loss = F.relu(1 - disc(frames(x))).mean() + F.relu(1 + disc(frames(recon.detach()))).mean()
                disc_opt.zero_grad(set_to_none=True)
                d_loss.backward()
                disc_opt.step()
                losses["disc"] = d_loss
            step, batch_in_epoch = step + 1, i + 1
            if agree(stop["signal"] is not None, world, device):
                stop["signal"] = stop["signal"] or "from another rank"
            if deadline is not None and agree(time.perf_counter() > deadline, world, device):
                log(f"time budget of {args.max_minutes} min reached at step {step}")
                args.steps = step  # finish as if this were the last step: checkpoint, validate, scaling factor
            clips_since += x.shape[0] * world
            bar.update(1)
            if step % args.log_every == 0 and rank == 0:
                now = time.perf_counter()
                record = {"step": step, "loss": loss.item(), **{k: v.item() for k, v in losses.items()},
                          "lr": lr, "clips_per_s": clips_since / (now - t_last)}
                t_last, clips_since = now, 0
                logf.write(json.dumps(record) + "\n")
                logf.flush()
                bar.set_postfix(loss=f"{record['loss']:.4f}")
            if step % args.ckpt_every == 0 or step == args.steps or stop["signal"] is not None:
                checkpoint()
            if (step % args.val_every == 0 or step == args.steps) and rank == 0:
                with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                    # validation must not move the training RNG: a resumed run would draw differently
                    val_loader = DataLoader(val_set, args.batch_size, num_workers=args.workers)
                    v = validate(model, val_loader, device, amp, args.val_clips, os.path.join(args.out, "recon.png"))
                logf.write(json.dumps({"step": step, **{f"val_{k}": x for k, x in v.items()}}) + "\n")
                logf.flush()
                tqdm.write(f"step {step}: validation PSNR {v['psnr']:.2f} dB, SSIM {v['ssim']:.4f}, "
                           f"focal-frequency error {v['ffl']:.5f}")
            if step >= args.steps or stop["signal"] is not None:
                break
        else:
            epoch, batch_in_epoch, pending_rng = epoch + 1, 0, None  # a new epoch starts from its own seed
    bar.close()
    restore_signals()
    if stop["signal"] is not None:
        log(f"stopped by signal {stop['signal']} at step {step}; checkpoint saved, continue with --resume")
    elif rank == 0:
        train_loader = DataLoader(train_set, args.batch_size, num_workers=args.workers)
        model.cfg.scaling_factor = measure_scaling_factor(model, train_loader, device)
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        ckpt["config"] = asdict(model.cfg)
        save_atomic(ckpt, ckpt_path)
        log(f"latent scaling factor measured on training clips: {model.cfg.scaling_factor:.5f} (stored in {ckpt_path})")
    if logf:
        logf.close()
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
