"""
Synthetic colonoscopy video with exact optical flow: the data set that needs no download.

A camera looks down a tube (the lumen). Each scene, fixed by one integer seed, has:
  - a mucosa texture on the tube wall: colour variation, haustral folds, two networks of vessels, wet glints;
  - 0-3 polyp-like lesions painted on the wall;
  - a camera path: forward travel with varying speed, roll, and a drifting, jittering lumen centre.

Geometry. A wall point has coordinates (Theta, Z): angle around the tube and distance along it. The camera at
time t sits at depth s(t) on the axis, rolled by phi(t), and the lumen centre appears at c(t) in the image.
A wall point at depth d = Z - s(t) > 0 projects to radius r = K / d around c(t), at angle Theta - phi(t)
(a pinhole looking along a cylinder). Each pixel therefore maps back to exactly one wall point, and the
optical flow from time t to t' is exact: unproject each pixel at t, project the same point at t'.
All appearance is attached to the wall (the glints too), so brightness moves with the flow; only the
lighting, which falls off with depth, changes as the camera moves.

Image coordinates are in [-1, 1] (x right, y down); flows are returned in pixels of the output size.

    python synthetic.py --out synthetic.gif     # renders one clip and its flow, for a look
"""

import math

import numpy as np
import torch

K = 0.35  # focal length x tube radius: a wall point at depth d appears at radius K / d
VIDEO_FRAMES = 300  # length of one synthetic video, in frames
VESSEL_SLOPE = 3.0  # typical slope of a vessel field per wall unit: turns a wall footprint into field units


def _wave_field(rng, n, max_m, k_range, amp_decay=1.0):
    """Random sum of n plane waves on the (Theta, Z) wall; integer m keeps it periodic around the tube."""
    m = rng.integers(-max_m, max_m + 1, n).astype(np.float32)
    k = (rng.uniform(*k_range, n) * rng.choice([-1, 1], n)).astype(np.float32)
    phase = rng.uniform(0, 2 * math.pi, n).astype(np.float32)
    amp = (1.0 / (1 + np.arange(n)) ** amp_decay).astype(np.float32)
    return [torch.from_numpy(v) for v in (m, k, phase, amp / amp.sum())]


def _eval_field(field, theta, z):
    m, k, phase, amp = field
    waves = torch.sin(m * theta[..., None] + k * z[..., None] + phase)  # (..., n)
    return (waves * amp).sum(-1)


def _smooth_path(rng, n, amp, freq_range):
    """A smooth random function of time: a few sinusoids (so that it is defined at any real t)."""
    return (rng.uniform(-amp, amp, n), rng.uniform(*freq_range, n), rng.uniform(0, 2 * math.pi, n))


def _eval_path(path, t):
    amp, freq, phase = path
    return sum(a * np.sin(f * t + p) for a, f, p in zip(amp, freq, phase))


class Scene:
    """One synthetic video. Everything about it follows from `seed`."""

    def __init__(self, seed):
        rng = np.random.default_rng(seed)
        self.seed = seed
        # camera path: speed in wall units per frame (sometimes backing out), roll, lumen-centre drift and jitter
        self.speed = rng.uniform(0.004, 0.012) * rng.choice([1, 1, 1, -1])
        self.speed_wobble = _smooth_path(rng, 2, 0.4 * abs(self.speed) / 0.05, (0.02, 0.08))
        self.roll_rate = rng.uniform(-0.012, 0.012)
        self.roll_wobble = _smooth_path(rng, 2, 0.15, (0.01, 0.05))
        self.centre = rng.uniform(-0.25, 0.25, 2)
        self.drift = [_smooth_path(rng, 2, 0.2, (0.01, 0.04)) for _ in range(2)]
        self.jitter = [_smooth_path(rng, 3, 0.02, (0.3, 0.9)) for _ in range(2)]
        # appearance
        self.base = (np.array([0.80, 0.42, 0.36]) + rng.uniform(-0.08, 0.08, 3)).tolist()  # mucosa pink-red
        self.colour_field = _wave_field(rng, 8, 6, (2, 12))
        self.fold_spacing = float(rng.uniform(0.25, 0.6))
        self.fold_strength = float(rng.uniform(0.15, 0.45))
        self.fold_wobble = _wave_field(rng, 4, 3, (1, 4))
        self.vessels = [_wave_field(rng, 10, 9, (6, 30), 0.5) for _ in range(2)]
        self.vessel_width = rng.uniform(0.025, 0.05, 2).tolist()
        self.glints = _wave_field(rng, 12, 30, (60, 140), 0.2)
        self.fog = float(rng.uniform(0.6, 1.1))
        # lesions along the stretch of tube the camera sees
        travelled = abs(self.speed) * VIDEO_FRAMES
        n_polyps = rng.choice([0, 1, 2, 3], p=[0.2, 0.4, 0.25, 0.15])
        self.polyps = [(float(rng.uniform(-math.pi, math.pi)),
                        float(self._s(0) + np.sign(self.speed) * rng.uniform(0.2, travelled + 0.6)),
                        float(rng.uniform(0.25, 0.6)), float(rng.uniform(0.05, 0.2))) for _ in range(n_polyps)]

    # --- the camera: depth s(t), roll phi(t), lumen centre c(t) ---
    def _s(self, t):
        return self.speed * t + _eval_path(self.speed_wobble, t) * abs(self.speed)

    def camera(self, t):
        t = float(t)
        phi = self.roll_rate * t + _eval_path(self.roll_wobble, t)
        c = [self.centre[i] + _eval_path(self.drift[i], t) + _eval_path(self.jitter[i], t) for i in range(2)]
        return self._s(t), phi, c[0], c[1]

    def unproject(self, t, size):
        """Wall coordinates (Theta, Z) seen at every pixel at time t: (H, W) each, and the pixel grid (2, H, W)."""
        s, phi, cx, cy = self.camera(t)
        ax = (torch.arange(size, dtype=torch.float64) + 0.5) / size * 2 - 1
        y, x = torch.meshgrid(ax, ax, indexing="ij")
        r = torch.sqrt((x - cx) ** 2 + (y - cy) ** 2).clamp(min=1e-4)
        theta = torch.atan2(y - cy, x - cx) + phi
        return theta, s + K / r, torch.stack([x, y])

    def project(self, theta, z, t):
        """Image position (2, H, W) of wall points at time t; points behind the camera land far outside."""
        s, phi, cx, cy = self.camera(t)
        r = K / (z - s).clamp(min=1e-4)
        return torch.stack([cx + r * torch.cos(theta - phi), cy + r * torch.sin(theta - phi)])

    def flow(self, t0, t1, size):
        """Exact optical flow from frame t0 to frame t1 in pixels: (2, H, W), channel 0 = x, 1 = y."""
        theta, z, grid = self.unproject(t0, size)
        return ((self.project(theta, z, t1) - grid) * (size / 2)).float()

    def render(self, t, size, lit=True):
        """Frame at time t: (3, H, W) RGB in [0, 1]. lit=False leaves out the camera's light (tests of the flow)."""
        theta, z, _ = self.unproject(t, size)
        depth = (z - self._s(t)).float()
        theta32, z32 = theta.float(), z.float()
        # How much wall one pixel covers (wall units): a pixel spans dr = 2 / size, and r = K / depth, so it
        # covers depth^2 / K along the tube and depth / K around it. Details finer than that are filtered
        # analytically below (widened and faded), so distant texture does not alias into flicker.
        footprint = (2 / size) * depth * torch.clamp(depth, min=1.0) / K
        colour = torch.tensor(self.base, dtype=torch.float32)[:, None, None]
        colour = colour * (1 + 0.12 * _eval_field(self.colour_field, theta32, z32))
        # haustral folds: rings along the tube, darker in their valleys
        fold_phase = 2 * math.pi * z32 / self.fold_spacing + 0.6 * _eval_field(self.fold_wobble, theta32, z32)
        fold_strength = self.fold_strength / (1 + (4 * footprint / self.fold_spacing) ** 2)
        colour = colour * (1 - fold_strength * (0.5 + 0.5 * torch.cos(fold_phase)) ** 3)
        # vessels: thin lines along the zero set of smooth random fields, darker and bluer
        for field, width, tint in zip(self.vessels, self.vessel_width, ([0.55, 0.25, 0.35], [0.7, 0.45, 0.5])):
            # a Gaussian line blurred by a pixel-sized Gaussian: wider, and fainter by the same factor
            widen = torch.sqrt(1 + (footprint * VESSEL_SLOPE / width) ** 2)
            v = torch.exp(-(_eval_field(field, theta32, z32) / (width * widen)) ** 2) / widen
            colour = colour * (1 - 0.5 * v) + 0.5 * v * torch.tensor(tint)[:, None, None] * colour
        # polyps: paler, raised-looking patches with shading across the dome
        for th0, z0, zscale, radius in self.polyps:
            dth = torch.remainder(theta32 - th0 + math.pi, 2 * math.pi) - math.pi
            dz = (z32 - z0) / zscale
            dist2 = (dth ** 2 + dz ** 2) / radius ** 2
            dome = torch.exp(-dist2 ** 2)
            shade = 1 + 0.35 * (dth / radius).clamp(-1, 1) * dome
            colour = colour * (1 - dome) + dome * torch.tensor([0.93, 0.62, 0.55])[:, None, None] * shade
        # wet glints fixed to the mucosa
        glint = (_eval_field(self.glints, theta32, z32) - 0.55).clamp(min=0) * 6
        colour = colour + glint.clamp(max=1) / (1 + (footprint / 0.01) ** 2)
        # the light sits at the camera: falls off with depth, so the lumen centre is dark
        light = 1.0 / (1 + (depth / self.fog) ** 2) if lit else 1.0
        return (colour * light).clamp(0, 1)

    def clip(self, t0, num_frames, stride, size, with_flow=True, lit=True):
        """num_frames frames at t0, t0 + stride, ...: (num_frames, 3, H, W) in [0, 1], flow (num_frames-1, 2, H, W)."""
        times = [t0 + stride * k for k in range(num_frames)]
        frames = torch.stack([self.render(t, size, lit) for t in times])
        if not with_flow:
            return frames, None
        return frames, torch.stack([self.flow(a, b, size) for a, b in zip(times[:-1], times[1:])])


def warp(frame, flow):
    """Sample `frame` (C, H, W) at p + flow(p): the frame a flow from A to `frame` maps back onto A."""
    H, W = frame.shape[-2:]
    ys, xs = torch.meshgrid(torch.arange(H, dtype=torch.float32), torch.arange(W, dtype=torch.float32), indexing="ij")
    gx = (xs + flow[0] + 0.5) / W * 2 - 1
    gy = (ys + flow[1] + 0.5) / H * 2 - 1
    grid = torch.stack([gx, gy], dim=-1)[None]
    out = torch.nn.functional.grid_sample(frame[None], grid, mode="bilinear", padding_mode="border",
                                          align_corners=False)[0]
    inside = (gx.abs() <= 1) & (gy.abs() <= 1)  # points that stay in view
    return out, inside


if __name__ == "__main__":
    import argparse

    from PIL import Image

    parser = argparse.ArgumentParser(description="Render one synthetic clip to a GIF (frames | flow magnitude).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--out", default="synthetic.gif")
    args = parser.parse_args()
    frames, flow = Scene(args.seed).clip(0, 17, 3, args.size)
    mag = flow.norm(dim=1)
    mag = (mag / mag.max()).clamp(0, 1)
    pictures = []
    for k in range(16):
        left = (frames[k].permute(1, 2, 0).numpy() * 255).astype(np.uint8)
        right = (mag[k].numpy()[..., None].repeat(3, -1) * 255).astype(np.uint8)
        pictures.append(Image.fromarray(np.concatenate([left, right], axis=1)))
    pictures[0].save(args.out, save_all=True, append_images=pictures[1:], duration=150, loop=0)
    print(f"wrote {args.out}: {len(pictures)} frames (left: video, right: flow magnitude)")
