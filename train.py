"""
Train MedSora's video diffusion model on VAE latents (paper Sec. 3.4 and 4.1).

    python train.py --model tiny --max-minutes 6                        # CPU demo on the synthetic data
    torchrun --nproc_per_node=4 train.py --data kvasir --model B --vae path/to/CogVideoX-2b/vae
    torchrun --nnodes=2 --node_rank=0 --nproc_per_node=8 --master_addr=HOST --master_port=29500 train.py ...

The same script runs alone or under torchrun (it reads RANK / WORLD_SIZE): one process per GPU, DDP, NCCL on
GPUs and gloo on CPU. Each step draws video latents (f frames) and n image latents, concatenated as
(B, f + n, C, h, w); the model sees the images as one-frame clips of their own (joint training, Sec. 3.4),
and learns the noise epsilon of the forward process (Eq. 1) at a random step t.

Recipe (Sec. 4.1), each a flag: AdamW; lr 1e-3 with batch 16 for the first 2 epochs, then 1e-4 with batch 2
(per process); EMA 0.9999; gradient clipping at norm 1.0 from epoch 25; linear schedule, 1000 steps;
bf16 autocast on GPU; `--compile` for torch.compile.

Latents: a clip is encoded by the VAE as 17 frames -> f = 5 latent frames, each image as a single frame.
With --latents cache (the default when training for more than 2 epochs, where it is faster: each clip is
encoded once per flip instead of once per use) the training set is encoded once, both horizontal flips,
and kept in OUT/latents; each epoch then picks one flip per clip. --latents online encodes every batch,
with a fresh random crop each epoch.

The run folder OUT gets log.jsonl (loss, lr, gradient norm, clips/s, skipped steps), loss.png, samples/
(a GIF every --sample-every steps, from the EMA weights) and ckpt.pt (written atomically; --resume
continues exactly where it stopped). SIGTERM or SIGINT saves and exits.

Dimension names: B batch, f video latent frames, n images, F = f + n, C latent channels, h, w latent size.
"""

import argparse
import copy
import hashlib
import json
import math
import os
import sys
import time
from dataclasses import asdict

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image, ImageDraw
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

import data
import dit
import sample
import vae as vae_lib
from diffusion import Diffusion
from train_vae import agree, catch_stop_signals, rng_state, save_atomic, set_rng_state, setup_distributed


# ---------------------------------------------------------------------------------------------------------
# Latents: encode clips once (both flips) or every step
# ---------------------------------------------------------------------------------------------------------

@torch.no_grad()
def encode_batch(vae, batch, device, amp):
    """Posterior moments of a batch: video (B, f, C, h, w) and images (B, n, C, h, w), each a (mean, logvar)."""
    video = batch["video"].to(device).transpose(1, 2)  # (B, 3, 17, H, W)
    images = batch["images"].to(device)  # (B, n, 3, H, W)
    B, n = images.shape[:2]
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
        v_mean, v_logvar = vae.encode_moments(video)  # (B, C, f, h, w)
        if n:  # every image is a one-frame clip: the VAE's first-frame path
            i_mean, i_logvar = vae.encode_moments(images.flatten(0, 1)[:, :, None])  # (B*n, C, 1, h, w)
    v = [t.float().transpose(1, 2) for t in (v_mean, v_logvar)]  # (B, f, C, h, w)
    if n:
        i = [t.float()[:, :, 0].unflatten(0, (B, n)) for t in (i_mean, i_logvar)]  # (B, n, C, h, w)
    else:
        i = [v[0][:, :0], v[1][:, :0]]
    return {"video_mean": v[0], "video_logvar": v[1], "image_mean": i[0], "image_logvar": i[1]}


class CachedLatents(Dataset):
    """Latent moments of every clip, both flips, as fp16 tensors (N, 2, F, C, h, w); one flip drawn per epoch."""

    KEYS = ("video_mean", "video_logvar", "image_mean", "image_logvar")

    def __init__(self, tensors, seed=0):
        self.t, self.seed, self.epoch = tensors, seed, 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return len(self.t["video_mean"])

    def __getitem__(self, index):
        flip = int(np.random.default_rng([self.seed, self.epoch, index]).integers(2))  # the flip augmentation
        return {k: self.t[k][index, flip].float() for k in self.KEYS}


def build_cache(vae, dataset, folder, key, rank, world, device, amp, batch_size, workers, log):
    """Encode `dataset` (this rank's share: indices rank, rank + world, ...) unflipped and flipped, write
    folder/shard<rank>of<world>.pt atomically; then every rank loads all shards. Reused while `key` matches."""
    meta_path = os.path.join(folder, "meta.json")
    if os.path.exists(meta_path):
        with open(meta_path) as f:
            meta = json.load(f)
        if meta["key"] == key:
            return load_cache(folder, meta)
    os.makedirs(folder, exist_ok=True)
    mine = list(range(rank, len(dataset), world))
    loader = DataLoader(torch.utils.data.Subset(dataset, mine), batch_size, num_workers=workers)
    parts = {k: [] for k in CachedLatents.KEYS}
    for batch in tqdm(loader, desc="encoding latents", disable=rank != 0):
        flipped = dict(batch, video=batch["video"].flip(-1), images=batch["images"].flip(-1))
        both = [encode_batch(vae, b, device, amp) for b in (batch, flipped)]
        for k in parts:
            parts[k].append(torch.stack([both[0][k], both[1][k]], dim=1).half().cpu())  # (B, 2, ...)
    shard = {"indices": torch.tensor(mine), **{k: torch.cat(v) for k, v in parts.items()}}
    save_atomic(shard, os.path.join(folder, f"shard{rank}of{world}.pt"))
    if world > 1:
        dist.barrier()
    meta = {"key": key, "shards": [f"shard{r}of{world}.pt" for r in range(world)], "clips": len(dataset)}
    if rank == 0:
        tmp = meta_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(meta, f)
        os.replace(tmp, meta_path)
        log(f"cached the latents of {len(dataset)} clips (both flips) in {folder}")
    if world > 1:
        dist.barrier()
    return load_cache(folder, meta)


def load_cache(folder, meta):
    shards = [torch.load(os.path.join(folder, s), map_location="cpu", weights_only=True) for s in meta["shards"]]
    order = torch.cat([s["indices"] for s in shards]).argsort()  # back to dataset order, whatever the GPU count
    return {k: torch.cat([s[k] for s in shards])[order] for k in CachedLatents.KEYS}


def data_statistics(vae, clips, device, amp, scale, n=16):
    """What samples are compared with (sample.py's report): per-channel statistics of the video latents of
    the first n training clips (posterior samples at unit scale), and their fraction of saturated pixels."""
    batch = next(iter(DataLoader(torch.utils.data.Subset(clips, range(min(n, len(clips)))), batch_size=n)))
    moments = encode_batch(vae, batch, device, amp)
    gen = torch.Generator(device).manual_seed(0)  # does not move the global RNG
    noise = torch.randn(moments["video_mean"].shape, generator=gen, device=device)
    z = (moments["video_mean"] + torch.exp(0.5 * moments["video_logvar"]) * noise) * scale
    return sample.latent_stats(z.cpu()), sample.saturated_fraction(batch["video"].transpose(1, 2))


def cache_key(args, vae_path):
    """What the cached latents depend on: the VAE file and the data options."""
    stat = os.stat(vae_path if os.path.isfile(vae_path) else os.path.join(vae_path, "config.json"))
    parts = [os.path.abspath(vae_path), stat.st_size, stat.st_mtime_ns, args.data,
             data.data_root(args.data, args.data_root), args.num_frames, args.size, args.num_images, args.max_clips]
    return hashlib.sha1(json.dumps(parts, default=str).encode()).hexdigest()


# ---------------------------------------------------------------------------------------------------------
# The training loop's pieces
# ---------------------------------------------------------------------------------------------------------

def epoch_batches(n, batch, rank, world, seed, epoch, start=0):
    """This rank's index lists for one epoch, from global batch `start` on: a seeded shuffle, so that the
    order depends only on (seed, epoch) and a resumed run sees the same batches."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000 + epoch)).tolist()
    per_step = batch * world
    return [perm[b * per_step + rank * batch: b * per_step + (rank + 1) * batch] for b in range(start, n // per_step)]


def phase(args, epoch):
    """(lr, batch size) of the epoch: the paper's two phases (Sec. 4.1)."""
    i = 0 if epoch < args.phase_epochs else 1
    return args.lr[i], args.batch_size[i]


@torch.no_grad()
def update_ema(ema, model, decay):
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p.detach(), 1 - decay)


def ema_decay(args, updates):
    # a warm-up (min with (1 + k) / (10 + k)) keeps a short run's EMA from staying at the initial weights
    return min(args.ema, (1 + updates) / (10 + updates))


def weights_checksum(model):
    return sum(float(p.detach().double().sum()) + float(p.detach().double().abs().sum()) for p in model.parameters())


def plot_loss(records, path, width=640, height=360):
    """A loss curve (log scale) as PNG, drawn with PIL: raw points grey, a moving average blue."""
    records = [r for r in records if r["loss"] is not None and r["loss"] > 0]  # skipped intervals have none
    steps = np.array([r["step"] for r in records], dtype=float)
    loss = np.array([r["loss"] for r in records], dtype=float)
    if len(steps) < 2:
        return
    k = max(1, len(loss) // 20)
    smooth = np.convolve(loss, np.ones(k) / k, mode="valid")
    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    left, right, top, bottom = 60, width - 10, 10, height - 30
    lo, hi = np.log10(loss.min()), np.log10(loss.max()) + 1e-9
    xy = lambda s, v: (left + (s - steps[0]) / max(steps[-1] - steps[0], 1) * (right - left),  # noqa: E731
                       bottom - (np.log10(v) - lo) / (hi - lo) * (bottom - top))
    d.rectangle([left, top, right, bottom], outline="black")
    d.line([xy(s, v) for s, v in zip(steps, loss)], fill=(190, 190, 190))
    d.line([xy(s, v) for s, v in zip(steps[k - 1:], smooth)], fill=(30, 80, 200), width=2)
    for v in (loss.min(), loss.max()):
        d.text((4, xy(steps[0], v)[1] - 6), f"{v:.3g}", fill="black")
    d.text((left, bottom + 8), f"step {int(steps[0])}", fill="black")
    d.text((right - 80, bottom + 8), f"step {int(steps[-1])}", fill="black")
    d.text((left + 8, top + 4), "training loss (log scale)", fill="black")
    tmp = path + ".tmp.png"
    img.save(tmp)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------------------

def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="synthetic", help="synthetic | kvasir | colonoscopic | cholectriplet | PATH")
    p.add_argument("--data-root", default=None)
    p.add_argument("--vae", default="runs/vae/ckpt.pt", help="train_vae.py checkpoint or CogVideoX vae/ weights")
    p.add_argument("--model", default="tiny", choices=sorted(dit.MODELS))
    p.add_argument("--out", default="runs/medsora")
    p.add_argument("--resume", action="store_true", help="continue from OUT/ckpt.pt")
    p.add_argument("--epochs", type=int, default=1000)
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--max-minutes", type=float, default=None, help="stop (saving) after this much training")
    p.add_argument("--lr", type=float, nargs=2, default=(1e-3, 1e-4), help="first phase, then the rest")
    p.add_argument("--batch-size", type=int, nargs=2, default=(16, 2), help="per process, first phase, then the rest")
    p.add_argument("--phase-epochs", type=int, default=2, help="epochs of the first phase")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--ema", type=float, default=0.9999)
    p.add_argument("--clip-from-epoch", type=int, default=25)
    p.add_argument("--clip-norm", type=float, default=1.0)
    p.add_argument("--num-frames", type=int, default=16, help="video frames (+1: clips are 8k + 1 frames)")
    p.add_argument("--num-images", type=int, default=8, help="images for joint training")
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--max-clips", type=int, default=None, help="use only the first N training clips")
    p.add_argument("--latents", default="auto", choices=["auto", "cache", "online"])
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--ckpt-every", type=int, default=500)
    p.add_argument("--sample-every", type=int, default=1000, help="a GIF from the EMA model; 0 = only at the end")
    p.add_argument("--sample-steps", type=int, default=50, help="DDIM steps of those previews")
    p.add_argument("--max-bad-steps", type=int, default=5, help="stop after this many non-finite losses in a row")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    rank, world, device = setup_distributed()
    amp = device.type == "cuda"  # bf16 autocast on GPU, fp32 on CPU
    log = (lambda *a: print(*a, flush=True)) if rank == 0 else (lambda *a: None)
    os.makedirs(args.out, exist_ok=True)
    ckpt_path = os.path.join(args.out, "ckpt.pt")
    ckpt = None
    if args.resume:
        if not os.path.exists(ckpt_path):
            sys.exit(f"error: --resume given but {ckpt_path} does not exist")
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        args.vae = ckpt["vae_path"] if args.vae == parse_args([]).vae else args.vae

    # the VAE: frozen, used to encode the data and to decode the preview samples
    vae = vae_lib.load(args.vae).to(device).eval().requires_grad_(False)
    scale = vae.cfg.scaling_factor
    clip_kwargs = dict(num_frames=args.num_frames, size=args.size, num_images=args.num_images, flip=False,
                       with_flow=False)
    clips = data.make_dataset(args.data, "train", args.data_root, **clip_kwargs)
    if args.max_clips:
        clips = torch.utils.data.Subset(clips, range(min(args.max_clips, len(clips))))
    mode = args.latents if args.latents != "auto" else ("cache" if args.epochs > 2 else "online")
    if mode == "cache":
        torch.manual_seed(args.seed)
        tensors = build_cache(vae, clips, os.path.join(args.out, "latents"), cache_key(args, args.vae), rank, world,
                              device, amp, args.batch_size[0], args.workers, log)
        train_set = CachedLatents(tensors, args.seed)
    else:
        train_set = data.make_dataset(args.data, "train", args.data_root, **{**clip_kwargs, "flip": True})
        if args.max_clips:
            train_set = torch.utils.data.Subset(train_set, range(min(args.max_clips, len(train_set))))
    f = (args.num_frames) // vae.cfg.temporal_compression_ratio + 1  # latent frames of a 8k + 1 frame clip
    data_stats, data_saturated = None, None  # what sample.py compares its samples with; rank 0 saves them
    if ckpt is not None and "latent_stats" in ckpt:
        data_stats, data_saturated = ckpt["latent_stats"], ckpt["data_saturated"]
    elif rank == 0:
        data_stats, data_saturated = data_statistics(vae, clips, device, amp, scale)

    # the model, its EMA copy, the optimiser
    cfg = dit.make_config(args.model, in_channels=vae.cfg.latent_channels)
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    model = dit.MedSora(cfg).to(device)
    ema = copy.deepcopy(model).eval().requires_grad_(False)  # never trained: eval mode, no attention dropout
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr[0], weight_decay=args.weight_decay)
    diffusion = Diffusion()
    step, epoch, batch_in_epoch, skipped, updates = 0, 0, 0, 0, 0
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        ema.load_state_dict(ckpt["ema"])
        opt.load_state_dict(ckpt["optimizer"])
        step, epoch, skipped, updates = ckpt["step"], ckpt["epoch"], ckpt["skipped"], ckpt["updates"]
        # the data position in samples, so that a different GPU count resumes at the same place
        batch_in_epoch = ckpt["samples_in_epoch"] // (phase(args, epoch)[1] * world)
        if ckpt["world"] == world:
            set_rng_state(ckpt["rng"][rank])
        else:
            log(f"note: resuming {ckpt['world']}-process training on {world}: the data order is kept, "
                f"the noise draws are not")
            torch.manual_seed(args.seed + 7919 * step + rank)
        log(f"resumed from {ckpt_path} at step {step} (epoch {epoch})")
    else:
        torch.manual_seed(args.seed + rank)  # each rank draws its own t and noise
    net = torch.compile(model) if args.compile else model  # compile before DDP
    if world > 1:
        net = DDP(net, device_ids=[device.index] if device.type == "cuda" else None)
    log(f"MedSora-{args.model}: {dit.count_params(model):,} parameters; latents ({f} + {args.num_images}, "
        f"{cfg.in_channels}, {args.size // 8}, {args.size // 8}) from {args.vae}; {mode} latents; {world} process(es)")

    def checkpoint():
        states = [None] * world
        if world > 1:
            dist.all_gather_object(states, rng_state())
        else:
            states = [rng_state()]
        if rank == 0:
            save_atomic({"model": model.state_dict(), "ema": ema.state_dict(), "optimizer": opt.state_dict(),
                         "step": step, "epoch": epoch, "samples_in_epoch": batch_in_epoch * batch * world,
                         "skipped": skipped, "updates": updates, "rng": states, "world": world,
                         "config": asdict(cfg), "vae_path": os.path.abspath(args.vae),
                         "vae_config": asdict(vae.cfg), "latent_frames": f, "args": vars(args),
                         "latent_stats": data_stats, "data_saturated": data_saturated}, ckpt_path)
        if world > 1:
            dist.barrier()

    def preview():
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            videos = sample.generate(ema, vae, [0, 1], f, args.sample_steps, device=device, amp=amp,
                                     size=args.size)
        sample.save_gif(torch.cat(list(videos), dim=-1), os.path.join(args.out, "samples", f"step{step:07d}.gif"))

    stop, restore_signals = catch_stop_signals()
    deadline = time.perf_counter() + 60 * args.max_minutes if args.max_minutes is not None else None
    max_steps = args.max_steps or math.inf
    records = []
    if rank == 0 and args.resume:  # drop what was logged after the checkpoint: those steps run again
        log_path = os.path.join(args.out, "log.jsonl")
        with open(log_path) as fh:
            kept = [r for r in map(json.loads, fh) if r["step"] <= step]
        with open(log_path + ".tmp", "w") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in kept)
        os.replace(log_path + ".tmp", log_path)
        records = [r for r in kept if "loss" in r]
    logf = open(os.path.join(args.out, "log.jsonl"), "a") if rank == 0 else None
    bar = tqdm(initial=step, total=None if max_steps == math.inf else max_steps, disable=rank != 0, desc="train")
    loss_sum, n_loss, clips_since, t_last, bad_in_row = 0.0, 0, 0, time.perf_counter(), 0
    done = False
    while epoch < args.epochs and not done:
        lr, batch = phase(args, epoch)
        for group in opt.param_groups:
            group["lr"] = lr
        for ds in (train_set, getattr(train_set, "dataset", None)):  # a Subset passes it on
            if hasattr(ds, "set_epoch"):
                ds.set_epoch(epoch)
        batches = epoch_batches(len(train_set), batch, rank, world, args.seed, epoch, batch_in_epoch)
        if not batches and batch_in_epoch == 0:
            sys.exit(f"error: {len(train_set)} clips are fewer than one batch of {batch} x {world} processes")
        # a private generator: creating the loader draws a seed from it, which must not move the global RNG
        loader = DataLoader(train_set, batch_sampler=batches, num_workers=0 if mode == "cache" else args.workers,
                            generator=torch.Generator().manual_seed(args.seed + epoch))
        for b in loader:
            if mode == "online":
                b = encode_batch(vae, b, device, amp)
            m = torch.cat([b["video_mean"], b["image_mean"]], dim=1).to(device)  # (B, F, C, h, w)
            logvar = torch.cat([b["video_logvar"], b["image_logvar"]], dim=1).to(device)
            x0 = (m + torch.exp(0.5 * logvar) * torch.randn_like(m)) * scale  # a posterior sample, unit scale
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                mse, _ = diffusion.training_loss(net, x0, num_frames=f)
            loss = mse.mean()
            # a non-finite loss on any rank: every rank skips the step together (nobody waits in all-reduce)
            bad = torch.tensor([float(not torch.isfinite(loss))], device=device)
            if world > 1:
                dist.all_reduce(bad, op=dist.ReduceOp.MAX)
            opt.zero_grad(set_to_none=True)
            grad_norm = float("nan")
            if bad.item() == 0:
                loss.backward()
                max_norm = args.clip_norm if epoch >= args.clip_from_epoch else math.inf
                grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm))
                if math.isfinite(grad_norm):  # gradients are all-reduced: every rank decides the same
                    opt.step()
                    updates += 1
                    update_ema(ema, model, ema_decay(args, updates))
            if bad.item() or not math.isfinite(grad_norm):
                skipped, bad_in_row = skipped + 1, bad_in_row + 1
                log(f"warning: non-finite loss or gradient at step {step}: step skipped on every rank "
                    f"({skipped} so far)")
                if bad_in_row >= args.max_bad_steps:
                    if logf:
                        logf.write(json.dumps({"step": step, "error": "non-finite", "skipped": skipped}) + "\n")
                        logf.close()
                    sys.exit(f"error: {bad_in_row} non-finite losses in a row at step {step}; the weights are "
                             f"those of the last checkpoint. Lower --lr or check the data and the VAE")
            else:
                bad_in_row = 0
                loss_sum, n_loss = loss_sum + loss.item(), n_loss + 1
            step, batch_in_epoch = step + 1, batch_in_epoch + 1
            clips_since += batch * world
            bar.update(1)
            # every step: a signal that reached one rank first, or one clock, stops all ranks together
            stop_now = stop["signal"] is not None or (deadline is not None and time.perf_counter() > deadline)
            done = agree(stop_now, world, device) or step >= max_steps
            if step % args.log_every == 0 or done:
                stats = torch.tensor([loss_sum, n_loss], device=device, dtype=torch.float64)
                if world > 1:
                    dist.all_reduce(stats)  # the loss of all ranks
                now = time.perf_counter()
                mean_loss = stats[0].item() / stats[1].item() if stats[1].item() else None  # None: all skipped
                record = {"step": step, "epoch": epoch, "loss": mean_loss,
                          "lr": lr, "grad_norm": grad_norm, "clips_per_s": clips_since / (now - t_last),
                          "skipped": skipped}
                if device.type == "cuda":
                    record["peak_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
                loss_sum, n_loss, clips_since, t_last = 0.0, 0, 0, now
                if rank == 0:
                    logf.write(json.dumps(record) + "\n")
                    logf.flush()
                    records.append(record)
                    bar.set_postfix(loss=mean_loss, clips_s=f"{record['clips_per_s']:.1f}")
            if step % args.ckpt_every == 0 or done:
                checkpoint()
                if rank == 0:
                    plot_loss(records, os.path.join(args.out, "loss.png"))
            if rank == 0 and ((args.sample_every and step % args.sample_every == 0) or done):
                preview()
            if done:
                break
        else:
            epoch, batch_in_epoch = epoch + 1, 0
    if not done:  # all epochs finished
        checkpoint()
        if rank == 0:
            preview()
    bar.close()
    if world > 1:  # every rank must hold the same weights: compare checksums
        sums = [None] * world
        dist.all_gather_object(sums, weights_checksum(model))
        if rank == 0:
            logf.write(json.dumps({"step": step, "rank_checksums": sums}) + "\n")
        if len(set(sums)) != 1:
            raise RuntimeError(f"ranks hold different weights after training: checksums {sums}")
        log(f"weights identical on all {world} ranks (checksum {sums[0]:.6f})")
    restore_signals()
    if stop["signal"] is not None:
        log(f"stopped by signal {stop['signal']} at step {step}; checkpoint saved, continue with --resume")
    else:
        log(f"done at step {step}: {ckpt_path}, samples in {os.path.join(args.out, 'samples')}")
    if logf:
        logf.close()
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
