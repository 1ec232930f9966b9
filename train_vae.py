"""
Train the video VAE (paper Sec. 3.3, Eq. 16, Sec. 4.1).

    python train_vae.py --finetune path/to/CogVideoX/vae     # frozen CogVideoX VAE, train the frequency compensation
    python train_vae.py --model tiny                         # a whole (tiny) VAE from scratch: no weights needed
    python train_vae.py --preset cpu-demo                    # the same, the CPU demo's size and steps
    torchrun --nproc_per_node=4 train_vae.py --finetune ...  # the same on several GPUs
    python evaluate.py --vae runs/vae/ckpt.pt --real kvasir  # PSNR, SSIM and speed of a trained VAE

Loss (Eq. 16): L1 + perceptual (LPIPS, when its backbone weights are given) + lambda * focal frequency loss
(lambda 0.1), plus a small KL term and, from --disc-start on, a patch discriminator (the VQ-GAN recipe).
Fine-tuning uses Adam, lr 2e-7, betas (0.5, 0.9) as in Sec. 4.1.

The run folder gets: log.jsonl (loss, lr, throughput), ckpt.pt (written atomically: model, optimizer,
discriminator, step, data position, RNG states, config; --resume continues exactly), recon.png (original |
reconstruction | error), and the latent scaling factor measured on training clips, stored in the checkpoint.
"""

import argparse
import os
import time
from dataclasses import asdict, replace
from types import SimpleNamespace

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

import checkpoint
import data
import distributed
import metric_nets
import vae
from vae import frames


# ---------------------------------------------------------------------------------------------------------
# The objective (Eq. 16) and one training step
# ---------------------------------------------------------------------------------------------------------

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


def train_step(net, opt, x, args, step, amp=False, lpips=None, disc=None, disc_opt=None):
    """One step on clips x (B, 3, F, H, W): reconstruct a posterior sample, then Eq. 16's L1 + LPIPS +
    lambda * focal frequency loss, a small KL term, and from --disc-start on the generator's hinge term; then
    the discriminator's own step. net is the VAE, or its DDP wrapper (which averages the gradients).
    Returns the losses (tensors) by name, "loss" their weighted sum."""
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
        recon, mean, logvar = net(x)
    recon, mean, logvar = recon.float(), mean.float(), logvar.float()
    losses = vae.reconstruction_losses(recon, x, mean, logvar)
    loss = losses["l1"] + args.ffl_weight * losses["ffl"] + args.kl_weight * losses["kl"]
    if lpips is not None:
        losses["lpips"] = lpips(frames(recon), frames(x)).mean()
        loss = loss + args.lpips_weight * losses["lpips"]
    gan = disc is not None and step >= args.disc_start
    if gan:
        critic = getattr(disc, "module", disc).requires_grad_(False)  # the generator's term moves only the VAE
        losses["gen"] = -critic(frames(recon)).mean()
        critic.requires_grad_(True)
        loss = loss + args.disc_weight * losses["gen"]
    if not torch.isfinite(loss):
        raise SystemExit(f"error: loss is {loss.item()} at step {step}; lower --lr or check the data")
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    if gan:  # hinge loss; real and reconstructed frames in one pass, so that DDP sees one forward per backward
        real, fake = disc(torch.cat([frames(x), frames(recon.detach())])).chunk(2)
        losses["disc"] = F.relu(1 - real).mean() + F.relu(1 + fake).mean()
        disc_opt.zero_grad(set_to_none=True)
        losses["disc"].backward()
        disc_opt.step()
    return {"loss": loss, **losses}


# ---------------------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------------------

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


# Named sets of defaults; flags given beside a preset still win. cpu-demo: the README's quickstart, a tiny VAE on
# 64 x 64 clips of 9 frames, to a number of steps (not minutes: the same on any machine).
# cpu-demo: lr 5e-4 and betas (0.9, 0.99) reconstructed at 28.7 dB after 300 steps, against 27.4 for the
# defaults (1e-4; (0.5, 0.9), which suit the discriminator this preset does not use): docs/training.md
PRESETS = {"cpu-demo": dict(size=64, num_frames=8, batch_size=2, steps=300, val_every=100, lr=5e-4, betas=[0.9, 0.99])}


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default=None, choices=sorted(PRESETS), help="a named set of defaults (PRESETS)")
    parser.add_argument("--data", default="synthetic")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--model", default="tiny", choices=sorted(vae.MODELS),
                        help="VAE config when training from scratch")
    parser.add_argument("--finetune", default=None, help="CogVideoX VAE weights (file or vae/ folder): train only the "
                        "frequency compensation")
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
    parser.add_argument("--disc-start", type=int, default=-1, help="step at which the patch discriminator starts; "
                        "-1 = never")
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
    args = distributed.parse_with_preset(parser, argv, PRESETS)
    # checked before any work; each failure is one line, exit status 2
    distributed.check_args(parser, args, folder="out", positive=(
        "steps", "batch_size", "lr", "log_every", "ckpt_every", "val_every", "val_clips"), non_negative=(
        "ffl_weight", "kl_weight", "lpips_weight", "disc_weight", "workers", "max_minutes", "seed"), multiples={
        "num_frames": (8, "clips are 8k + 1 frames: the causal first frame, then groups of 4 for the latents and of "
                          "8 for the discriminator; e.g. 8 or 16"),
        "size": (8, "the VAE's spatial factor; e.g. 64 or 128")})
    if not all(0 <= b < 1 for b in args.betas):
        parser.error(f"--betas {args.betas[0]:g} {args.betas[1]:g}: each must be in [0, 1) (e.g. 0.5 0.9)")
    return args


RESUME_KEYS = ("data", "model", "finetune", "num_frames", "size", "no_freq_comp")  # what a resumed run must keep


def restore(ckpt, ckpt_path, model, opt, disc, disc_opt, args, rank, log):
    """Where training stands: from the checkpoint with --resume (weights, optimisers, RNG), else the start."""
    at = {"step": 0, "epoch": 0, "batch_in_epoch": 0}
    if ckpt is None:
        torch.manual_seed(distributed.mix_seed(args.seed, rank))
        return at
    model.load_state_dict(checkpoint.check_finite(ckpt["model"], ckpt_path))
    opt.load_state_dict(ckpt["optimizer"])
    if disc and ckpt.get("disc"):
        disc.load_state_dict(ckpt["disc"])
        disc_opt.load_state_dict(ckpt["disc_optimizer"])
    checkpoint.set_rng_state(ckpt["rng"][rank])
    log(f"resumed from {ckpt_path} at step {ckpt['step']}")
    return {k: ckpt[k] for k in at}


def train_loop(args, r, rank, world, device, amp, log):
    """One train_step per batch, then logging, checkpoints and validation, until --steps, --max-minutes or a stop
    signal (every rank stops at the same step). Returns the stop signal, if one came. r: the run's parts (main)."""
    stop, at = distributed.StopSignals(), r.at
    deadline = time.perf_counter() + 60 * args.max_minutes if args.max_minutes is not None else None
    bar = tqdm(total=args.steps, initial=at["step"], disable=rank != 0, desc="train_vae")
    t_last, clips_since = time.perf_counter(), 0
    while at["step"] < args.steps and stop.signal is None:
        if hasattr(r.train_set, "set_epoch"):
            r.train_set.set_epoch(at["epoch"])
        batches = data.epoch_batches(len(r.train_set), args.batch_size, rank, world, args.seed, at["epoch"],
                                     at["batch_in_epoch"])  # mid-epoch on resume: the batches not yet seen
        loader = DataLoader(r.train_set, batch_sampler=batches, num_workers=args.workers,
                            generator=torch.Generator().manual_seed(distributed.mix_seed(args.seed, at["epoch"])))
        for batch in loader:
            x = batch["video"].to(device).transpose(1, 2)  # (B, 3, F, H, W)
            losses = train_step(r.net, r.opt, x, args, at["step"], amp, r.lpips, r.critic, r.disc_opt)
            at["step"] += 1
            at["batch_in_epoch"] += 1
            step = at["step"]
            if distributed.agree(stop.signal is not None, world, device):
                stop.signal = stop.signal or "from another rank"
            if deadline is not None and distributed.agree(time.perf_counter() > deadline, world, device):
                log(f"time budget of {args.max_minutes} min reached at step {step}")
                args.steps = step  # finish as if this were the last step: checkpoint, validate, scaling factor
            clips_since += x.shape[0] * world
            bar.update(1)
            if step % args.log_every == 0:
                now = time.perf_counter()
                log.write({"step": step, **{k: v.item() for k, v in losses.items()}, "lr": r.lr,
                           "clips_per_s": clips_since / (now - t_last)})
                t_last, clips_since = now, 0
                bar.set_postfix(loss=f"{losses['loss'].item():.4f}")
            if step % args.ckpt_every == 0 or step == args.steps or stop.signal is not None:
                checkpoint.save_run(r.state(), r.ckpt_path, rank, world)
            if (step % args.val_every == 0 or step == args.steps) and rank == 0:
                validate(r.model, r.val_set, args, step, device, amp, log)
            if step >= args.steps or stop.signal is not None:
                break
        else:
            at.update(epoch=at["epoch"] + 1, batch_in_epoch=0)
    bar.close()
    stop.restore()
    return stop.signal


def main(argv=None):
    args = parse_args(argv)
    rank, world, device = distributed.setup()
    amp = device.type == "cuda"  # bf16 autocast on GPU, fp32 on CPU
    os.makedirs(args.out, exist_ok=True)
    ckpt_path = os.path.join(args.out, "ckpt.pt")
    lock = distributed.RunLock(args.out, rank)
    ckpt = checkpoint.resume(args.out, args, RESUME_KEYS) if args.resume else None
    if ckpt is not None and ckpt["step"] >= args.steps:
        print(f"{ckpt_path} has already trained {ckpt['step']} of --steps {args.steps}: nothing to do "
              f"(raise --steps to train longer)")
        lock.release()
        distributed.teardown(world)
        return
    log = distributed.RunLog(args.out, rank, resume_step=ckpt["step"] if ckpt else None)

    # the data, the VAE, its optimiser, the optional perceptual loss and discriminator
    clip_kwargs = dict(num_frames=args.num_frames, size=args.size, num_images=0, with_flow=False)
    train_set = data.make_dataset(args.data, "train", args.data_root, **clip_kwargs)
    val_set = data.make_dataset(args.data, "val", args.data_root, **{**clip_kwargs, "flip": False})
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    model = build(args, device)
    lr = args.lr if args.lr is not None else (2e-7 if args.finetune else 1e-4)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr, betas=tuple(args.betas))
    disc = PatchDiscriminator().to(device) if args.disc_start >= 0 else None
    disc_opt = torch.optim.Adam(disc.parameters(), lr=lr, betas=tuple(args.betas)) if disc else None
    lpips = metric_nets.LPIPS.from_files(*args.lpips).to(device) if args.lpips else None
    if lpips is None:
        log("note: no LPIPS weights given (--lpips VGG16 HEADS): training without the perceptual loss")
    at = restore(ckpt, ckpt_path, model, opt, disc, disc_opt, args, rank, log)
    net, critic = model, disc
    if world > 1:  # DDP broadcasts rank 0's weights, then averages the gradients of every backward
        ids = [device.index] if device.type == "cuda" else None
        net = DDP(model, device_ids=ids)
        critic = DDP(disc, device_ids=ids) if disc else None

    def state():
        return {"model": model.state_dict(), "optimizer": opt.state_dict(),
                "disc": disc.state_dict() if disc else None,
                "disc_optimizer": disc_opt.state_dict() if disc else None, **at,
                "config": asdict(model.cfg), "args": vars(args)}

    # the loop
    run = SimpleNamespace(model=model, net=net, opt=opt, critic=critic, disc_opt=disc_opt, lpips=lpips, lr=lr,
                          train_set=train_set, val_set=val_set, at=at, state=state, ckpt_path=ckpt_path)
    signal = train_loop(args, run, rank, world, device, amp, log)

    # the end: the latent scaling factor, measured on training clips, goes into the checkpoint's config
    if signal is not None:
        log(f"stopped by signal {signal} at step {at['step']}; checkpoint saved, continue with --resume")
    elif rank == 0:
        loader = DataLoader(train_set, args.batch_size, num_workers=args.workers)
        model.cfg.scaling_factor = measure_scaling_factor(model, loader, device)
        saved = checkpoint.load(ckpt_path)
        saved["config"] = asdict(model.cfg)
        checkpoint.save(saved, ckpt_path)
        log(f"latent scaling factor measured on training clips: {model.cfg.scaling_factor:.5f} "
            f"(stored in {ckpt_path})")
    log.close()
    lock.release()
    distributed.teardown(world)


def validate(model, val_set, args, step, device, amp, log):
    """Reconstruction quality on --val-clips validation clips, logged, and OUT/recon.png; the training RNG is
    left where it was, so that a resumed run draws the same numbers."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        loader = DataLoader(val_set, args.batch_size, num_workers=args.workers)
        picture = lambda x, recon: data.save_comparison(x, recon, os.path.join(args.out, "recon.png"))  # noqa: E731
        v = vae.reconstruction_quality(model, loader, device, amp, args.val_clips, first=picture)
    log.write({"step": step, **{f"val_{k}": x for k, x in v.items()}})
    tqdm.write(f"step {step}: validation PSNR {v['psnr']:.2f} dB, SSIM {v['ssim']:.4f}, focal-frequency error {v['ffl']:.5f}; "
               f"by band, low / mid / high: PSNR of the error {v['psnr_low']:.1f} / {v['psnr_mid']:.1f} / "
               f"{v['psnr_high']:.1f} dB, detail captured {v['captured_low']:.2f} / {v['captured_mid']:.2f} / "
               f"{v['captured_high']:.2f}")


if __name__ == "__main__":
    distributed.cli(main)
