"""
Speed and memory of the MedSora backbone on each scan path, measured side by side in one run.

    python benchmark.py                      # MedSora-B, batch 8, z = 6 x 16 x 16 x 16 (4 video + 2 image frames)
    python benchmark.py --model S --batch 2 --paths chunked

Times one training step's forward + backward (median over --repeat runs, CUDA events on GPU) and the peak
memory, for each scan path ("kernel": mamba-ssm Triton; "chunked": pure PyTorch SSD) and precision.
"""

import argparse
import time

import torch

import dit


def time_step(model, x, t, num_frames, dtype, repeat, device):
    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bf16"):
            out = model(x, t, num_frames=num_frames)
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


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="B", choices=sorted(dit.MODELS))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--frames", type=int, default=4, help="video latent frames (then --images image frames)")
    parser.add_argument("--images", type=int, default=2)
    parser.add_argument("--size", type=int, default=16, help="latent height and width")
    parser.add_argument("--paths", nargs="+", default=["kernel", "chunked"], choices=["kernel", "chunked"])
    parser.add_argument("--dtypes", nargs="+", default=["bf16", "fp32"], choices=["bf16", "fp32"])
    parser.add_argument("--repeat", type=int, default=10)
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    F = args.frames + args.images
    print(f"MedSora-{args.model}, batch {args.batch}, z = {F} x 16 x {args.size} x {args.size} "
          f"({args.frames} video + {args.images} image frames), forward + backward on {name}")
    rows = []
    for path in args.paths:
        if path == "kernel" and device.type != "cuda":
            print("kernel path skipped: needs CUDA")
            continue
        torch.manual_seed(0)
        model = dit.MedSora(dit.make_config(args.model, scan=path)).to(device).train()
        x = torch.randn(args.batch, F, 16, args.size, args.size, device=device)
        t = torch.randint(0, 1000, (args.batch,), device=device)
        for dtype in args.dtypes:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            ms = time_step(model, x, t, args.frames, dtype, args.repeat, device)
            mem = torch.cuda.max_memory_allocated() / 2 ** 30 if device.type == "cuda" else float("nan")
            rows.append((path, dtype, ms, args.batch / ms * 1000, mem))
        del model
    print(f"{'path':8s} {'dtype':5s} {'ms/step':>9s} {'clips/s':>8s} {'peak GiB':>9s}")
    for path, dtype, ms, cps, mem in rows:
        print(f"{path:8s} {dtype:5s} {ms:9.1f} {cps:8.1f} {mem:9.2f}")
    base = {d: ms for p, d, ms, _, _ in rows if p == "chunked"}
    for path, dtype, ms, _, _ in rows:
        if path == "kernel" and dtype in base:
            print(f"kernel speed-up over chunked ({dtype}): {base[dtype] / ms:.2f}x")


if __name__ == "__main__":
    main()
