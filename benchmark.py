"""
Speed and memory of the MedSora backbone on each scan path, measured side by side in one run.

    python benchmark.py                      # MedSora-B, batch 8, z = 6 x 16 x 16 x 16 (4 video + 2 image frames)
    python benchmark.py --model S --batch 2 --paths chunked chunked+compile --layers

Times one training step's forward + backward (median over --repeat runs, CUDA events on GPU) and the peak
memory, for each scan path ("kernel": mamba-ssm Triton; "chunked": pure PyTorch SSD) and precision.
"""

import argparse
import time

import torch

import dit


def time_step(forward, dtype, repeat, device):
    """Median ms of forward() + backward, under bf16 autocast when dtype == "bf16"."""
    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bf16"):
            out = forward()
        out.float().square().mean().backward()

    for _ in range(3):  # warm-up: kernel compilation, autotuning, allocator
        step()
    times = []
    for _ in range(repeat):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            step()
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
    parser.add_argument("--profile", action="store_true", help="also print the top operators of one step per path")
    parser.add_argument("--layers", nargs="*", metavar="NxL", help="also time one Mamba2 layer on N sequences of "
                        "length L (CUDA); default MedSora's shapes and longer ones")
    args = parser.parse_args()

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
