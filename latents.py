"""
The latent cache: MedSora trains on VAE latents, so each training clip is encoded once, both horizontal flips,
and kept on disk (the paper's only augmentation is the flip); or encoded every batch (`--latents online`).

    train.py --latents cache   # OUT/latents: shard<rank>of<world>.pt, meta.json (the key it was built for)

A clip of 17 frames becomes f = 5 latent frames, each joint-training image one latent frame of its own (the
VAE's first-frame path). The cache is written atomically per rank and checked on loading (zip checksums, every
clip once); its key holds the VAE file and the data options, so a run with other ones encodes again. With the
flow alignment (flow_align.Targets) the clips' alignment targets are cached beside their latents.

Dimension names: B batch, f video latent frames, n images, C latent channels, h, w latent size.
"""

import hashlib
import json
import os
import time

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

import checkpoint
import data
import distributed
import flow_align
import pipeline
import vae as vae_lib



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
        distributed.write_json(meta_path, meta)
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
    the first n training clips (posterior samples at unit scale), their fraction of saturated pixels, their
    motion and their detail by band (pipeline.motion, pipeline.detail)."""
    batch = next(iter(DataLoader(torch.utils.data.Subset(clips, range(min(n, len(clips)))), batch_size=n)))
    moments = encode_batch(vae, batch, device, amp)
    gen = torch.Generator(device).manual_seed(0)  # does not move the global RNG
    z = vae_lib.sample_posterior(moments["video_mean"], moments["video_logvar"], gen) * scale
    videos = batch["video"].transpose(1, 2)
    return (pipeline.latent_stats(z.cpu()), pipeline.saturated_fraction(videos), pipeline.motion(videos),
            pipeline.detail(videos))


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


def training_set(args, vae, align, ckpt, rank, world, device, amp, log):
    """The training set (cached latents, or clips encoded every step), which of the two, and the data's statistics
    that sample.py compares its samples with."""
    clip_kwargs = dict(num_frames=args.num_frames, size=args.size, num_images=args.num_images, flip=False,
                       with_flow=align is not None and align.flow == "exact")
    def first(ds):  # --max-clips: only the first N clips
        return torch.utils.data.Subset(ds, range(min(args.max_clips, len(ds)))) if args.max_clips else ds
    clips = first(data.make_dataset(args.data, "train", args.data_root, **clip_kwargs))
    mode = args.latents if args.latents != "auto" else ("cache" if args.epochs > 2 else "online")
    if mode == "cache":
        torch.manual_seed(args.seed)
        folder = args.cache_dir or os.path.join(args.out, "latents")
        tensors = build_cache(vae, clips, folder, cache_key(args, args.vae, align), rank, world,
                                      device, amp, args.batch_size[0], args.workers, log, align)
        train_set = CachedLatents(tensors, args.seed)
    else:
        train_set = first(data.make_dataset(args.data, "train", args.data_root, **{**clip_kwargs, "flip": True}))
    stats = {"latent_stats": None, "data_saturated": None, "data_motion": None, "data_detail": None}  # sample.py's
    if ckpt is not None and "latent_stats" in ckpt:
        stats = {k: ckpt.get(k) for k in stats}  # data_motion, data_detail: None in a checkpoint of an earlier version
    elif rank == 0:
        stats = dict(zip(stats, data_statistics(vae, clips, device, amp, vae.cfg.scaling_factor)))
    return train_set, mode, stats
