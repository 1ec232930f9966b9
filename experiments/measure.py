"""
Timing and memory helpers shared by the benchmarks (benchmark.py, throughput.py): CUDA-event medians, freeing
the GPU between rows, and writing a run's rows to JSON with its device and software.
"""

import gc
import time

import torch

import distributed


def time_call(fn, repeat, device, warmup=3, host=False):
    """Median ms of fn() over `repeat` calls after `warmup` (kernel compilation, autotuning, the allocator);
    CUDA events on GPU. host=True: also the median ms until fn() returns, before the GPU has finished (the time
    the CPU needs to issue the work: when it is close to the whole, the GPU waits for the CPU)."""
    for _ in range(warmup):
        fn()
    times, issued = [], []
    for _ in range(repeat):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            start.record()
            fn()
            end.record()
            issued.append(1000 * (time.perf_counter() - t0))
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append(1000 * (time.perf_counter() - t0))
            issued.append(times[-1])
    median = lambda v: sorted(v)[len(v) // 2]  # noqa: E731
    return (median(times), median(issued)) if host else median(times)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def free(device):
    """What an out-of-memory row left behind, given back before the next row."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


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


def write_json(path, device, args, rows):
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    distributed.write_json(path, {"device": name, "torch": torch.__version__, "args": vars(args), "rows": rows})
