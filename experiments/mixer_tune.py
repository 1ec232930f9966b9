"""
The fused Mamba-2 mixer (ssd_triton.py) alone, at one MedSora model's layer shapes, for several launch settings of
its per-head kernels, side by side in one run: where the time of the step's mixer goes and which setting is fastest
on this GPU.

    python -m experiments.mixer_tune --model B --batch 16 --frames 5 --images 8 --configs 8 8:168 8:128 4 4:128

A configuration "W" or "W:R" runs the per-head kernels (_scan_kernel, _bwd_kernel) of sequences of 64 and 128 steps
with W warps and at most R registers a thread (none: the compiler's choice); shorter sequences keep 4 warps. For
each it times one layer's forward + backward (bf16, median of --repeat, CUDA events) on the spatial planes of
Eq. 8 and on the temporal scan of Eq. 10 at the training shape, and the sum over the model's blocks: the mixer's
share of a training step, as wall time and as the GPU's busy time (what counts inside train.py's CUDA graphs; the
fastest is chosen by it). Then, for the fastest, each kernel's time in one profiled call and its registers and
spilled bytes. MEDSORA_SSD_TUNING=W:R sets a configuration for any other command (train.py, benchmark.py).
"""

import argparse

import torch

import dit
import ssd_triton
from experiments.measure import time_call, write_json


def layer_calls(args, device):
    """{name: forward + backward of one Mamba-2 layer on that plane set} at the training shape."""
    cfg = dit.make_config(args.model)
    h = args.size // cfg.patch_size
    T = (args.frames + args.images) * h * h
    torch.manual_seed(0)
    layer = dit.SpatialMamba(cfg).mamba.to(device)
    u = torch.randn(args.batch, T, cfg.width, device=device, requires_grad=True)
    spatial = dit.spatial_tables(args.frames, args.images, h, h, 0, device)
    temporal = [dit.temporal_tables(args.frames, args.images, h * h, device)]

    def call(planes):
        def run():
            layer.zero_grad(set_to_none=True)
            u.grad = None
            with torch.autocast(device.type, dtype=torch.bfloat16):
                outs = layer.forward_planes(u, planes)
            sum(o.float().square().mean() for o in outs).backward()
        return run
    return cfg, {"spatial": call(spatial), "temporal": call(temporal)}


def gpu_ms(run, calls=5):
    """The GPU's busy time in one call, from the kernels' own times (the mean over `calls`, after a warm-up): what
    the call costs inside train.py's CUDA graphs, where the host's time to launch the kernels does not count."""
    for _ in range(3):
        run()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            run()
        torch.cuda.synchronize()
    return sum(e.device_time_total for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA) \
        / 1000 / calls


def kernel_report(run):
    """Each kernel's GPU ms in one call, and (after the call compiled them) its registers and spilled bytes."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        run()
        torch.cuda.synchronize()
    ms = {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            ms[e.name] = ms.get(e.name, 0.0) + e.device_time_total / 1000
    for name, t in sorted(ms.items(), key=lambda kv: -kv[1])[:10]:
        print(f"  {t:8.3f} ms  {name[:90]}")
    for name in ("_cb_kernel", "_scan_kernel", "_norm_kernel", "_norm_bwd_kernel", "_bwd_kernel", "_bc_kernel"):
        kernel = getattr(ssd_triton, name)
        for cache in getattr(kernel, "device_caches", {}).values():
            for compiled in cache[0].values():
                print(f"  {name:18s} warps {compiled.metadata.num_warps}: {getattr(compiled, 'n_regs', '?')} "
                      f"registers, {getattr(compiled, 'n_spills', '?')} spilled")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--model", default="B", choices=["S", "B", "L"])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--frames", type=int, default=5, help="video latent frames")
    p.add_argument("--images", type=int, default=8, help="image latent frames")
    p.add_argument("--size", type=int, default=16, help="latent height and width")
    p.add_argument("--configs", nargs="+", default=["8", "8:168", "8:128", "4", "4:128"])
    p.add_argument("--repeat", type=int, default=20)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    for spec in args.configs:
        try:
            ssd_triton.launch_settings(spec)
        except ValueError as e:
            p.error(f"--configs: {e}")
    if args.batch < 1 or args.frames < 1 or args.images < 0 or args.repeat < 1:
        p.error("--batch, --frames and --repeat must be >= 1, --images >= 0")
    if not torch.cuda.is_available():
        p.error("times Triton kernels compiled for a GPU: no CUDA device here")
    device = torch.device("cuda")
    cfg, calls = layer_calls(args, device)
    per_step = {"spatial": cfg.depth, "temporal": cfg.depth}  # one layer of each kind per block
    print(f"MedSora-{args.model}'s fused mixer, one layer forward + backward (bf16), batch {args.batch}, "
          f"{args.frames} + {args.images} latent frames of {args.size} x {args.size}: ms")
    print("wall: CUDA events around each call (eager, so partly the host's launching); GPU: the kernels' summed time")
    print(f"{'config':>8s} {'spatial':>9s} {'temporal':>9s} {'GPU spatial':>11s} {'GPU temporal':>12s} "
          f"{'GPU x ' + str(cfg.depth) + ' blocks':>16s}")
    rows = []
    for spec in args.configs:
        ssd_triton.configure(spec)
        ms = {name: time_call(run, args.repeat, device) for name, run in calls.items()}
        gpu = {name: gpu_ms(run) for name, run in calls.items()}
        total = sum(gpu[k] * per_step[k] for k in gpu)
        print(f"{spec:>8s} {ms['spatial']:9.3f} {ms['temporal']:9.3f} {gpu['spatial']:11.3f} {gpu['temporal']:12.3f} "
              f"{total:16.1f}", flush=True)
        rows.append(dict(config=spec, **{f"ms_{k}": v for k, v in ms.items()},
                         **{f"gpu_ms_{k}": v for k, v in gpu.items()}, gpu_ms_step=total))
    best = min(rows, key=lambda r: r["gpu_ms_step"])
    print(f"\nfastest: {best['config']} ({best['gpu_ms_step']:.1f} ms of GPU time a step in these layers); its "
          f"kernels, one call each:")
    ssd_triton.configure(best["config"])
    for name, run in calls.items():
        print(f"{name}:")
        kernel_report(run)
    if args.json:
        write_json(args.json, device, args, rows)


if __name__ == "__main__":
    main()
