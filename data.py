"""
Video data for MedSora: raw videos -> frame folders, and frame folders -> training clips (paper Sec. 4.1-4.2).

A clip is 16 frames taken every third frame, plus one more frame for the optical flow of the last step (17
frames in all), 128 x 128, values in [-1, 1], from a random position in a video. A horizontal flip applies to
the whole clip, and to its flow, whose x component changes sign. For joint image-video training every sample
also carries 8 independent frames from other videos of the same split.

Data sets (`--data`): kvasir, colonoscopic, cholectriplet (prepared frame folders; docs/data.md says where to get
them), synthetic (procedural colonoscopy with exact flow, `synthetic.py`; no download), or any PATH of
prepared frame folders. The root of a named data set is `--data-root`, else $MEDSORA_DATA_ROOT/NAME, else
./data/NAME.

    python data.py prepare --src RAW_DIR --dst OUT_DIR [--size 128] [--workers 4]
    python data.py stats --data synthetic          # a few samples, their shapes, clips/s

Dimension names: F frames, C = 3 channels, H, W pixels; flow (F-1, 2, H, W) in pixels, channel 0 = x.
"""

import argparse
import glob
import hashlib
import json
import multiprocessing
import os
import shutil
import sys
import threading
import time
from collections import Counter

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from tqdm.auto import tqdm

import distributed
from distributed import mix_seed

VIDEO_EXTS = (".mp4", ".avi", ".mkv", ".mov", ".mpg", ".mpeg", ".webm")
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")
DATASETS = ("kvasir", "colonoscopic", "cholectriplet")


def clip_span(num_frames=16, stride=3):
    """Source frames one clip covers: num_frames + 1 frames (the extra one for flow), stride apart."""
    return num_frames * stride + 1


# ---------------------------------------------------------------------------------------------------------
# prepare: raw videos or frame folders -> one folder of 000000.jpg, 000001.jpg, ... per video
# ---------------------------------------------------------------------------------------------------------

def resize_center_crop(img, size):
    """Any PIL image -> RGB size x size: short side resized to `size`, then the centre cut out."""
    img = img.convert("RGB")  # grayscale, palette, RGBA (alpha dropped), 16-bit: all become 8-bit RGB
    w, h = img.size
    scale = size / min(w, h)
    img = img.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.LANCZOS)
    w, h = img.size
    left, top = (w - size) // 2, (h - size) // 2
    return img.crop((left, top, left + size, top + size))


def find_sources(src):
    """Videos (files) and frame folders (directories holding images) under src, each with its own output name:
    its path under src with "__" for the separators, without the extension; where two sources would get the same
    name (clip.avi and clip.mkv, a__b/ and a/b/), each of them gets a short hash of its path added."""
    sources = []
    for dirpath, dirnames, filenames in os.walk(src):
        dirnames.sort()
        rel = os.path.relpath(dirpath, src)
        images = [f for f in filenames if f.lower().endswith(IMAGE_EXTS)]
        if images:
            sources.append(("frames", dirpath, "root" if rel == "." else rel.replace(os.sep, "__")))
        for f in sorted(filenames):
            if f.lower().endswith(VIDEO_EXTS):
                name = os.path.splitext(f if rel == "." else os.path.join(rel, f))[0].replace(os.sep, "__")
                sources.append(("video", os.path.join(dirpath, f), name))
    names = Counter(name for _, _, name in sources)
    tag = lambda path: hashlib.sha1(os.path.relpath(path, src).encode()).hexdigest()[:8]  # noqa: E731
    return [(kind, path, f"{name}-{tag(path)}" if names[name] > 1 else name) for kind, path, name in sources]


def iter_frames(kind, path):
    """PIL images of a video file (decoded with PyAV) or of a frame folder (sorted by file name)."""
    if kind == "frames":
        for f in sorted(f for f in os.listdir(path) if f.lower().endswith(IMAGE_EXTS)):
            try:
                with Image.open(os.path.join(path, f)) as img:
                    img.load()
                    yield img
            except Exception as e:
                raise ValueError(f"unreadable frame {os.path.join(path, f)}: {e}") from None
        return
    try:
        import av
    except ImportError:
        raise ImportError("decoding videos needs PyAV: pip install av") from None
    with av.open(path) as container:
        n = 0
        try:
            for frame in container.decode(video=0):
                if getattr(frame, "is_corrupt", False):  # the decoder concealed an error: damaged pixels
                    raise DamagedVideo(f"frame {n} is damaged (the decoder reports it corrupt)")
                yield frame.to_image()
                n += 1
        except av.error.FFmpegError as e:
            if n == 0:
                raise
            raise DamagedVideo(f"the decoder fails at frame {n} ({e})") from None


class DamagedVideo(Exception):
    """A video that decodes up to a damaged frame: what comes before it is kept, where it makes a clip."""


def prepare_one(job):
    """Write one video's frames to dst/name/ through dst/name.partial/; returns (status, name, message)."""
    kind, path, dst, name, size, min_frames = job
    final, partial = os.path.join(dst, name), os.path.join(dst, name + ".partial")
    if os.path.isdir(final):
        return "done before", name, ""
    shutil.rmtree(partial, ignore_errors=True)  # a half-written attempt is redone from the start
    os.makedirs(partial)
    modes, n, damage = set(), 0, None
    try:
        for img in iter_frames(kind, path):
            modes.add(f"{img.mode} {img.size[0]}x{img.size[1]}")
            resize_center_crop(img, size).save(os.path.join(partial, f"{n:06d}.jpg"), quality=95)
            n += 1
    except DamagedVideo as e:  # cut at the damage: the frames before it are sound
        damage = str(e)
    except Exception as e:
        shutil.rmtree(partial, ignore_errors=True)
        return "failed", name, f"{path}: {type(e).__name__}: {e}"
    if n < min_frames:
        shutil.rmtree(partial, ignore_errors=True)
        return "failed", name, (f"{path}: {n} {'sound ' if damage else ''}frames, a clip needs {min_frames}"
                                f"{'; ' + damage if damage else ''}; lower --min-frames or drop the file")
    os.rename(partial, final)  # atomic: a folder without ".partial" is always complete
    if damage:
        return "cut", name, f"{path}: {damage}: kept the {n} frames before it"
    return "prepared", name, f"{n} frames from {', '.join(sorted(modes))}"


def exit_with_parent():
    """A worker's initializer: the worker ends within a second of its parent (a killed prepare leaves no worker
    writing frames; its half-written folder is redone by the next run)."""
    parent = os.getppid()

    def watch():
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def prepare(src, dst, size=128, min_frames=clip_span(), workers=4):
    """Convert every video / frame folder under src into dst/<name>/%06d.jpg. Resumable; never writes in src."""
    if not os.path.isdir(src):
        raise FileNotFoundError(f"--src {src} does not exist or is not a directory")
    src_abs, dst_abs = os.path.realpath(src), os.path.realpath(dst)
    if dst_abs == src_abs or dst_abs.startswith(src_abs + os.sep):
        raise ValueError(f"--dst {dst} is inside --src {src}; choose an output folder outside the raw data")
    sources = find_sources(src)
    if not sources:
        raise FileNotFoundError(f"no videos ({', '.join(VIDEO_EXTS)}) or frame folders found under {src}")
    os.makedirs(dst, exist_ok=True)
    lock = distributed.RunLock(dst, 0, "--dst")  # a second prepare into the same --dst stops at once
    jobs = [(kind, path, dst, name, size, min_frames) for kind, path, name in sources]
    results = {"prepared": [], "cut": [], "done before": [], "failed": []}
    # spawned, not forked: a worker inherits no threads from the caller, so no lock a thread held at the fork
    spawn = multiprocessing.get_context("spawn")
    with spawn.Pool(max(1, workers), initializer=exit_with_parent) as pool:
        for status, name, message in tqdm(pool.imap_unordered(prepare_one, jobs), total=len(jobs), desc="prepare"):
            results[status].append((name, message))
            if status in ("failed", "cut"):
                tqdm.write(f"{'skipped' if status == 'failed' else 'cut'} {message}")
    print(f"prepared {len(results['prepared'])}, cut at damage {len(results['cut'])}, already done "
          f"{len(results['done before'])}, failed {len(results['failed'])} (of {len(jobs)}) -> {dst}")
    lock.release()
    return results


# ---------------------------------------------------------------------------------------------------------
# split: by video, deterministic, written down
# ---------------------------------------------------------------------------------------------------------

def split_videos(names, val_fraction=0.1, seed=0):
    """Assign whole videos to train / val by a seeded hash of their names: stable as videos are added."""
    key = lambda n: hashlib.sha256(f"{seed}:{n}".encode()).hexdigest()  # noqa: E731
    ranked = sorted(names, key=key)
    n_val = 0 if val_fraction <= 0 or len(names) < 2 else min(len(names) - 1, max(1, round(val_fraction * len(names))))
    return {"train": sorted(ranked[n_val:]), "val": sorted(ranked[:n_val]), "seed": seed,
            "val_fraction": val_fraction}


def load_or_make_split(root, names, val_fraction, seed, index_dir=None):
    """The split, from its index file if that lists the same videos, else made and written (atomically)."""
    index_dir = index_dir or root
    path = os.path.join(index_dir, f"split_seed{seed}_val{val_fraction:g}.json")
    if os.path.exists(path):
        with open(path) as f:
            split = json.load(f)
        if sorted(split["train"] + split["val"]) == sorted(names):
            return split
    split = split_videos(names, val_fraction, seed)
    try:
        distributed.write_json(path, split)
    except OSError as e:  # a read-only data set still loads; the split is reproducible from the seed anyway
        print(f"note: could not write the split index {path} ({e})", file=sys.stderr)
    return split


# ---------------------------------------------------------------------------------------------------------
# Data sets
# ---------------------------------------------------------------------------------------------------------

def to_model_range(frames):
    """uint8 (..., H, W, 3) -> float (..., 3, H, W) in [-1, 1]."""
    return torch.from_numpy(frames).movedim(-1, -3).float() / 127.5 - 1


def hflip(video, images=None, flow=None):
    """Mirror a whole sample left-right; a mirrored flow also has its x component negated."""
    out = [video.flip(-1), None if images is None else images.flip(-1), None]
    if flow is not None:
        out[2] = flow.flip(-1) * torch.tensor([-1.0, 1.0], device=flow.device, dtype=flow.dtype).view(1, 2, 1, 1)
    return out


def frame_folders(root):
    """{video name: its sorted frame files} for the frame folders under root (unfinished .partial ones left out)."""
    folders = {}
    for name in sorted(os.listdir(root)):
        d = os.path.join(root, name)
        if os.path.isdir(d) and not name.endswith(".partial"):
            frames = sorted(f for f in os.listdir(d) if f.lower().endswith(IMAGE_EXTS))
            if frames:
                folders[name] = frames
    return folders


def long_enough(videos, span, where):
    """The videos, (name, number of frames, ...) tuples, that hold a clip of `span` frames; a note on stderr
    says how many are left out."""
    short = [v[0] for v in videos if v[1] < span]
    if short:
        print(f"note: {len(short)} videos in {where} have fewer than the {span} frames a clip needs and are left "
              f"out (e.g. {short[0]})", file=sys.stderr)
    return [v for v in videos if v[1] >= span]


def retry(read, where, tries=10):
    """read(attempt) for attempt 0, 1, ... until one works: an unreadable file costs a warning, not the run.
    Returns (result, attempt); after `tries` failures in a row the error says to check the data."""
    for attempt in range(tries):
        try:
            return read(attempt), attempt
        except (OSError, ValueError) as e:
            print(f"warning: skipped an unreadable clip: {e}", file=sys.stderr)
            last = e
    raise ValueError(f"{tries} clips in a row near {where} were unreadable, the last: {last}; replace or remove "
                     f"the damaged files (python data.py prepare reports them)")


class FrameFolderClips(Dataset):
    """Clips from prepared frame folders (root/<video>/%06d.jpg); split "train", "val" or "all" (every video)."""

    def __init__(self, root, split="train", num_frames=16, stride=3, size=128, num_images=8, flip=True,
                 val_fraction=0.1, seed=0):
        if os.path.isfile(root):
            raise NotADirectoryError(f"data {root} is a file; give a folder of frame folders "
                                     f"(<video>/000000.jpg ...), made from videos by `python data.py prepare`")
        if not os.path.isdir(root):
            raise FileNotFoundError(f"data root {root} does not exist; prepare it with "
                                    f"`python data.py prepare --src RAW --dst {root}` or set --data-root")
        folders = frame_folders(root)
        if not folders:
            videos = [f for _, _, files in os.walk(root) for f in files if f.lower().endswith(VIDEO_EXTS)]
            if videos:
                raise FileNotFoundError(f"{root} holds {len(videos)} video files but no frame folders: convert them "
                                        f"once with `python data.py prepare --src {root} --dst FOLDER` and give "
                                        f"FOLDER")
            raise FileNotFoundError(f"no frame folders in {root}; expected {root}/<video>/000000.jpg ... "
                                    f"(run `python data.py prepare`)")
        self.root, self.num_frames, self.stride, self.size = root, num_frames, stride, size
        self.num_images, self.flip, self.seed, self.epoch = num_images, flip, seed, 0
        self.span = clip_span(num_frames, stride)
        self.split_index = load_or_make_split(root, list(folders), val_fraction, seed)
        names = sorted(folders) if split == "all" else self.split_index[split]
        kept = long_enough([(n, len(folders[n])) for n in names], self.span, f"{root} ({split})")
        self.videos = [(n, folders[n]) for n, _ in kept]
        if not self.videos:
            raise ValueError(f"no {split} video in {root} has the {self.span} frames a clip needs")
        # one sample per non-overlapping window of `span` frames; the clip starts at random inside it
        self.windows = [(v, k) for v, (_, frames) in enumerate(self.videos) for k in range(len(frames) // self.span)]
        self.skipped = 0  # unreadable clips replaced by others, counted

    def __len__(self):
        return len(self.windows)

    def set_epoch(self, epoch):
        """Different clip positions every epoch; the same ones for the same (seed, epoch, index)."""
        self.epoch = epoch

    def _read(self, video, indices):
        name, frames = self.videos[video]
        arrays = []
        for i in indices:
            path = os.path.join(self.root, name, frames[i])
            with Image.open(path) as img:
                img = img.convert("RGB")
                if img.size != (self.size, self.size):
                    img = resize_center_crop(img, self.size)
                arrays.append(np.asarray(img))
        return to_model_range(np.stack(arrays))

    def _sample(self, index, rng):
        v, k = self.windows[index]
        n = len(self.videos[v][1])
        start = int(rng.integers(k * self.span, min(n - self.span, (k + 1) * self.span - 1) + 1))
        indices = [start + self.stride * j for j in range(self.num_frames + 1)]
        video = self._read(v, indices)
        others = [u for u in range(len(self.videos)) if u != v] or [v]  # images from other videos if there are any
        picks = [int(u) for u in rng.choice(others, self.num_images)]
        images = torch.cat([self._read(u, [int(rng.integers(len(self.videos[u][1])))]) for u in picks]) \
            if self.num_images else video[:0]
        if self.flip and rng.random() < 0.5:
            video, images, _ = hflip(video, images)
        return {"video": video, "images": images, "frame_index": torch.tensor(indices), "name": self.videos[v][0]}

    def __getitem__(self, index):
        # random choices depend only on (seed, epoch, index): any worker, any GPU count, and resume see the same
        rng = np.random.default_rng([self.seed, self.epoch, index])
        sample, attempts = retry(lambda k: self._sample((index + k) % len(self), rng), f"index {index} of {self.root}")
        self.skipped += attempts
        return sample


class SyntheticClips(Dataset):
    """Procedural colonoscopy clips with exact optical flow. Train and val scenes never overlap (seed ranges)."""

    VAL_SEED_OFFSET = 1_000_000

    def __init__(self, split="train", num_frames=16, stride=3, size=128, num_images=8, flip=True,
                 num_videos=None, seed=0, with_flow=True):
        from synthetic import VIDEO_FRAMES
        num_videos = num_videos or (1000 if split == "train" else 50)
        offset = 0 if split == "train" else self.VAL_SEED_OFFSET
        self.scenes = [offset + i for i in range(num_videos)]
        self.num_frames, self.stride, self.size = num_frames, stride, size
        self.num_images, self.flip, self.seed, self.epoch = num_images, flip, seed, 0
        self.with_flow = with_flow  # the VAE does not need flow: rendering is ~30 % faster without it
        self.span = clip_span(num_frames, stride)
        self.max_start = VIDEO_FRAMES - self.span

    def set_epoch(self, epoch):
        """Different clip positions every epoch; the same ones for the same (seed, epoch, index)."""
        self.epoch = epoch

    def __len__(self):
        return len(self.scenes)

    def __getitem__(self, index):
        from synthetic import Scene
        rng = np.random.default_rng([self.seed, self.epoch, index])
        start = int(rng.integers(0, self.max_start + 1))
        frames, flow = Scene(self.scenes[index]).clip(start, self.num_frames + 1, self.stride, self.size,
                                                      with_flow=self.with_flow)
        video = frames * 2 - 1
        images = []
        for _ in range(self.num_images):
            other = self.scenes[int(rng.integers(len(self.scenes)))]
            images.append(Scene(other).render(float(rng.uniform(0, self.max_start)), self.size) * 2 - 1)
        images = torch.stack(images) if images else video[:0]
        if self.flip and rng.random() < 0.5:
            video, images, flow = hflip(video, images, flow)
        sample = {"video": video, "images": images, "name": f"scene{self.scenes[index]}",
                  "frame_index": torch.arange(start, start + self.span, self.stride)}
        return {**sample, "flow": flow} if flow is not None else sample


def data_root(data, root=None):
    if root:
        return root
    if data in DATASETS:
        env = os.environ.get("MEDSORA_DATA_ROOT")
        return os.path.join(env, data) if env else os.path.join("data", data)
    return data  # a PATH of prepared frame folders


def make_dataset(data, split="train", root=None, with_flow=True, **kwargs):
    """`--data` name or PATH -> a Dataset of clip dicts (video, images, frame_index, and flow for synthetic).
    with_flow=False skips the synthetic flow (only synthetic data has flow)."""
    if data == "synthetic":
        return SyntheticClips(split, with_flow=with_flow, **kwargs)
    return FrameFolderClips(data_root(data, root), split, **kwargs)


# ---------------------------------------------------------------------------------------------------------
# Batches of an epoch, and writing videos (frame folders, GIF, MP4, picture grids)
# ---------------------------------------------------------------------------------------------------------

def epoch_batches(n, batch, rank, world, seed, epoch, start=0):
    """This rank's index lists for one epoch of n samples, from global batch `start` on: a seeded shuffle, so
    that the order depends only on (seed, epoch), and a resumed run skips to its position without reading
    the batches before it."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(mix_seed(seed, epoch))).tolist()
    per_step = batch * world
    return [perm[b * per_step + rank * batch: b * per_step + (rank + 1) * batch] for b in range(start, n // per_step)]


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
    """A frame folder, written under a temporary name and renamed when complete (as `prepare` does)."""
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
    """H.264 through PyAV, the same bytes on every machine; returns False when PyAV is not installed."""
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
        stream.codec_context.thread_count = 1  # x264's output depends on its thread count: one, on every machine
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


def save_comparison(x, recon, path, num=4):
    """Rows of frames: original | reconstruction | |error| (x3 brightened), from (3, F, H, W) tensors."""
    idx = np.linspace(0, x.shape[1] - 1, num).round().astype(int)
    to_img = lambda t: ((t.clamp(-1, 1) + 1) * 127.5).byte().permute(1, 2, 0).cpu().numpy()  # noqa: E731
    rows = [np.concatenate([to_img(x[:, i]), to_img(recon[:, i]),
                            to_img(((recon[:, i] - x[:, i]).abs() * 3 - 1).clamp(-1, 1))], axis=1) for i in idx]
    tmp = path + ".tmp.png"
    Image.fromarray(np.concatenate(rows, axis=0)).save(tmp)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------

def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="raw videos / frame folders -> frame folders")
    p.add_argument("--src", required=True, help="folder of raw videos (mp4/avi/mkv/...) or frame folders; read only")
    p.add_argument("--dst", required=True, help="output folder: one sub-folder of frames per video")
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--min-frames", type=int, default=clip_span(), help="shorter videos are reported and skipped")
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1))
    s = sub.add_parser("stats", help="load a few samples and time the loader")
    s.add_argument("--data", default="synthetic", help=f"{', '.join(DATASETS)}, synthetic, or a PATH")
    s.add_argument("--data-root", default=None)
    s.add_argument("--split", default="train", choices=["train", "val", "all"])
    s.add_argument("--samples", type=int, default=8)
    args = parser.parse_args(argv)
    if args.command == "prepare":
        distributed.check_args(p, args, positive=("size", "min_frames", "workers"), folder="dst")
        try:
            results = prepare(args.src, args.dst, args.size, args.min_frames, args.workers)
        except (OSError, ValueError) as e:
            sys.exit(f"error: {e}")
        sys.exit(1 if results["failed"] else 0)
    distributed.check_args(s, args, positive=("samples",))
    try:
        ds = make_dataset(args.data, args.split, args.data_root)
        t0 = time.perf_counter()
        for i in range(args.samples):
            sample = ds[i % len(ds)]
        dt = time.perf_counter() - t0
    except (OSError, ValueError) as e:
        sys.exit(f"error: {e}")
    print(f"{args.data} {args.split}: {len(ds)} samples; " +
          ", ".join(f"{k} {tuple(v.shape)}" for k, v in sample.items() if torch.is_tensor(v)))
    print(f"{args.samples / dt:.1f} samples/s in one process")


if __name__ == "__main__":
    main()
