"""
Speed and memory of the MedSora backbone on each scan path, measured side by side in one run.

    python -m experiments.benchmark                      # MedSora-B, batch 8, z = 6 x 16 x 16 x 16 (4 video + 2 image frames)
    python -m experiments.benchmark --model S --batch 2 --paths chunked chunked+compile --layers
    python -m experiments.benchmark --train-step --frames 5 --images 8 --batches 16 2 --compile eager blocks model --sample
    python -m experiments.benchmark --train-step --peer --sample --sample-videos 1 16 --long 5 17 65 129 --plot long.png

Times one training step's forward + backward (median over --repeat runs, CUDA events on GPU) and the peak
memory, for each scan path ("kernel": mamba-ssm Triton; "chunked": pure PyTorch SSD) and precision; --layers
times one Mamba2 layer at given (sequences x length) shapes for each --layer-paths scan.

--train-step times what train.py runs instead: forward, backward and AdamW under bf16 autocast, for each
--compile mode ("eager"; "blocks": dit.compile_blocks, one compiled graph for every block; "model":
torch.compile of the whole model) and batch. Each row also gives the FLOPs of a step (counted by
torch.utils.flop_counter on the eager model), the fraction of a bf16 matrix-multiply peak measured in the same
run, and the seconds from building the model to the end of its first step (compilation included; the
compile cache starts empty unless --warm-cache). --sample adds DDIM sampling of --sample-videos videos
(--sample-steps steps, latents only) for the same modes; --profile, one step's kernels per row. --peer adds the
same tables for peer.py's PeerTransformer, a Latte / Endora-style video transformer (global attention in each frame,
attention along time, an MLP, adaLN-Zero, SDPA) at MedSora's width, depth, heads and patch: the peer of the
paper's Fig. 6. --long f1 f2 ... times the training step of both at batch 1 against video length (latent frames;
4 (f - 1) + 1 pixel frames), with peak memory, until a length runs out of memory (--long-scans: one set of
MedSora rows per scan path); --plot draws it, --json writes every table's rows. What training costs end
to end, and what the flow alignment adds, are throughput.py's.
"""

import argparse
import itertools
import os
import tempfile
import time

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch.utils.flop_counter import FlopCounterMode

import distributed
import dit
import ssm
from diffusion import Diffusion
from experiments import peer
from experiments.measure import free, matmul_peak, sync, time_call, write_json


def time_step(forward, dtype, repeat, device):
    """Median ms of forward() + backward, under bf16 autocast when dtype == "bf16"."""
    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bf16"):
            out = forward()
        out.float().square().mean().backward()
    return time_call(step, repeat, device)


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


def layer_table(device, repeat, shapes, paths=("kernel", "chunked")):
    """One Mamba2(512) layer, forward + backward (bf16 autocast on GPU), at MedSora's (sequences, length) shapes
    and longer ones, for each scan path: "recurrent" (the step-by-step reference), "chunked" (SSD in PyTorch),
    "chunked+compile" (the same under torch.compile, the fast path's form) and "kernel" (mamba-ssm's Triton
    kernels, CUDA only). Returns the rows."""
    dtype = "bf16" if device.type == "cuda" else "fp32"
    paths = [p for p in paths if p != "kernel" or device.type == "cuda"]
    print(f"\nMamba2(512) layer, {dtype}, forward + backward (ms): sequences x length")
    print(f"{'shape':>12s} " + " ".join(f"{p:>16s}" for p in paths))
    rows = []
    for n, L in shapes:
        u = torch.randn(n, L, 512, device=device)
        ms = {}
        for path in paths:
            torch.manual_seed(0)
            torch._dynamo.reset()
            layer = ssm.Mamba2(512, scan=path.split("+")[0]).to(device)
            run = torch.compile(layer) if path.endswith("+compile") else layer
            try:
                ms[path] = time_step(lambda: run(u), dtype, repeat, device)
            except Exception as e:  # a compiler error at one shape: the row says so, the other paths go on
                print(f"{n} x {L}, {path} failed: {type(e).__name__}: {str(e).splitlines()[0][:160]}", flush=True)
                ms[path] = None
            del layer, run
        print(f"{n:>6d} x {L:<4d} " + " ".join(f"{'failed' if ms[p] is None else f'{ms[p]:.2f}':>16s}" for p in paths),
              flush=True)
        rows.append(dict(table="Mamba2 layer", sequences=n, length=L, dtype=dtype, **{f"ms_{p}": ms[p] for p in paths}))
    return rows


def build(args, mode, device, kind="medsora", scan="auto"):
    """A fresh MedSora (or, kind "peer", the peer at MedSora's width, depth, heads and patch) in training mode,
    compiled as `mode` asks; returns (model to train, callable to run)."""
    torch.manual_seed(0)
    cfg = dit.make_config(args.model, scan=scan)
    model = (peer.PeerTransformer(cfg) if kind == "peer" else dit.MedSora(cfg)).to(device).train()
    model.recompute = getattr(args, "recompute", False)  # the peer ignores it
    if mode in ("blocks", "graphs"):  # graphs: the compiled blocks replayed as CUDA graphs
        dit.compile_blocks(model, **({"mode": "reduce-overhead"} if mode == "graphs" else {}))
        return model, model
    return model, (torch.compile(model) if mode == "model" else model)


def count_flops(args, x, t, device, amp, kind="medsora"):
    """FLOPs of one forward + backward of a new eager MedSora, never of the compiled one: after running under the
    counter, compiled blocks ran ATen's kernels for the rest of the run (MedSora-B, batch 16, one H200: 401 ms/step
    and ~12,500 launches, against 131 ms when the count was made on the eager row's model)."""
    model = build(args, "eager", device, kind, scan="chunked")[0]  # the readable path: the fused op hides its products
    model.recompute = False  # the work of one step as such: --recompute's second forward is not counted
    counter = FlopCounterMode(display=False)
    with counter, torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
        model(x, t, num_frames=args.frames).float().square().mean().backward()
    return counter.get_total_flops()


def name_of(args, kind):
    return f"the peer at MedSora-{args.model}'s size" if kind == "peer" else f"MedSora-{args.model}"


def train_step(net, opt, x, t, num_frames, amp, graphs=False):
    """train.py's step on random latents, as a callable: forward under bf16 autocast (on GPU), backward, AdamW.
    graphs: CUDA graphs are replayed, and each step must say that a new one begins."""
    def step():
        if graphs:
            torch.compiler.cudagraph_mark_step_begin()
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
            loss = F.mse_loss(net(x, t, num_frames=num_frames).float(), x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def train_step_table(args, device, kind="medsora", peak=None):
    """Forward, backward and AdamW of MedSora (or the peer) at each batch and --compile mode, with FLOPs and % of
    peak."""
    peak = peak or matmul_peak(device)
    amp = device.type == "cuda"
    F_ = args.frames + args.images
    print(f"\ntraining step of {name_of(args, kind)} (forward, backward, AdamW; bf16 autocast: {amp}), latents "
          f"({args.frames} + {args.images}) x 16 x {args.size} x {args.size}; matrix-multiply peak measured: "
          f"{peak:.3g} TFLOP/s")
    print(f"{'compile':8s} {'batch':>5s} {'ms/step':>8s} {'host ms':>8s} {'clips/s':>8s} {'TFLOP/step':>10s} "
          f"{'% peak':>7s} {'peak GiB':>8s} {'first step s':>12s}   (AdamW: {args.adamw}; recompute: {args.recompute})")
    flops, rows = {}, []
    for mode in args.compile:
        for batch in args.batches:
            model = net = opt = step = None  # the last row's model, optimizer and closure go before this one
            x = torch.randn(batch, F_, 16, args.size, args.size, device=device)
            t = torch.randint(0, 1000, (batch,), device=device)
            torch._dynamo.reset()  # compiled graphs outlive their model: every row starts from none
            if batch not in flops:  # the same for every mode: counted once, on an eager model of its own
                try:  # (a compiled one runs eager after)
                    flops[batch] = count_flops(args, x, t, device, amp, kind)
                except torch.OutOfMemoryError:  # the readable path's eager step may not fit where the fast one does
                    flops[batch] = None
                    print(f"FLOPs at batch {batch} not counted: the eager readable step ran out of memory", flush=True)
            free(device)  # and the count's memory is not in this row's peak
            t_build = time.perf_counter()
            model, net = build(args, mode, device, kind)
            opt = adamw(model, args.adamw)
            step = train_step(net, opt, x, t, args.frames, amp, graphs=mode == "graphs")
            try:
                step()
                sync(device)
                first = time.perf_counter() - t_build
                ms, host_ms = time_call(step, args.repeat, device, host=True)
                kernels = kernel_table(step, device) if args.profile else None
            except Exception as e:  # out of memory, or a mode this torch cannot run: the other rows go on
                print(f"{mode:8s} {batch:5d} failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}", flush=True)
                rows.append(dict(table="train step", model=name_of(args, kind), compile=mode, batch=batch, ms=None,
                                 error=type(e).__name__))
                continue
            mem = torch.cuda.max_memory_allocated() / 2 ** 30 if device.type == "cuda" else float("nan")
            achieved = flops[batch] / ms / 1e9 if flops[batch] else float("nan")  # TFLOP/s
            print(f"{mode:8s} {batch:5d} {ms:8.1f} {host_ms:8.1f} {batch / ms * 1000:8.1f} "
                  f"{(flops[batch] or float('nan')) / 1e12:10.2f} {100 * achieved / peak:6.1f}% {mem:8.2f} "
                  f"{first:12.1f}", flush=True)
            if kernels:
                print(kernels, flush=True)
            rows.append(dict(table="train step", model=name_of(args, kind), compile=mode, batch=batch, ms=ms,
                             host_ms=host_ms, adamw=args.adamw, recompute=args.recompute,
                             clips_per_s=batch / ms * 1000,
                             tflop=flops[batch] / 1e12 if flops[batch] else None,
                             peak_fraction=achieved / peak if flops[batch] else None,
                             peak_gib=mem if mem == mem else None, first_step_s=first))
    del model, net, opt, step
    free(device)
    return rows


def adamw(model, impl):
    """AdamW as benchmarked: "foreach" (torch's default on CUDA, a few kernels per group of tensors) or "fused"
    (one kernel for all of them; CUDA only)."""
    return torch.optim.AdamW(model.parameters(), lr=1e-4, **({"fused": True} if impl == "fused" else {}))


def component_table(args, device):
    """Forward + backward of one MedSora block and of each of its three branches (with its norm), at the training
    shapes of the first --batches batch, for each --compile mode: where a step's GPU time goes, which the
    profile of compiled blocks cannot say (their kernels mix the branches). Returns the rows."""
    dtype = "bf16" if device.type == "cuda" else "fp32"
    cfg = dit.make_config(args.model)
    B, F_, f, h, D = args.batches[0], args.frames + args.images, args.frames, args.size // cfg.patch_size, cfg.width
    torch.manual_seed(0)
    block = dit.MedSoraBlock(cfg, 0).to(device).train()
    x = torch.randn(B, F_, h * h, D, device=device, requires_grad=True)  # (B, F, L, D)
    c = torch.randn(B, D, device=device)
    idx = dit.block_indices(cfg, f, F_ - f, h, h, device)[0]
    parts = {
        "attention": lambda: block.attn(block.norm1(x).reshape(B * F_, h * h, D), idx["mask"]),
        "spatial Mamba": lambda: block.spatial(block.norm2(x), idx["spatial"]),
        "temporal Mamba": lambda: block.temporal(block.norm3(x), idx["temporal"]),
        "whole block": lambda: block(x, c, f, h, h, idx)[0],
    }
    print(f"\none MedSora-{args.model} block and its branches, forward + backward ({dtype}), x ({B}, {F_}, {h * h}, "
          f"{D}): ms")
    print(f"{'part':16s} " + " ".join(f"{m:>9s}" for m in args.compile))
    rows = []
    for name, fn in parts.items():
        ms = {}
        for mode in args.compile:
            torch._dynamo.reset()
            run = fn if mode == "eager" else torch.compile(fn, **({"mode": "reduce-overhead"} if mode == "graphs"
                                                                   else {}))

            def forward(run=run, graphs=mode == "graphs"):
                # as train.py's zero_grad(set_to_none=True): gradients accumulated into the last step's would read
                # graph outputs that the next replay overwrites
                block.zero_grad(set_to_none=True)
                x.grad = None
                if graphs:
                    torch.compiler.cudagraph_mark_step_begin()
                return run()
            try:
                ms[mode] = time_step(forward, dtype, args.repeat, device)
            except Exception as e:  # the other parts and modes go on
                print(f"{name} ({mode}) failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}", flush=True)
                ms[mode] = None
            block.zero_grad(set_to_none=True)
            x.grad = None
        print(f"{name:16s} " + " ".join(f"{ms[m]:9.2f}" if ms[m] is not None else f"{'-':>9s}" for m in args.compile),
              flush=True)
        rows.append(dict(table="block parts", model=f"MedSora-{args.model}", part=name, batch=B,
                         **{f"ms_{m}": ms[m] for m in args.compile}))
    return rows


def out_of_memory_error(e):
    """Whether e is, or was raised from, running out of GPU memory: while compiling, Inductor wraps the
    OutOfMemoryError of its benchmarking runs in an error of its own."""
    while e is not None:
        if isinstance(e, torch.OutOfMemoryError):
            return True
        e = e.__cause__ or e.__context__
    return False


def long_scans(args, f, device, scan="auto"):
    """The scan paths MedSora's `scan` takes at f latent frames: spatial planes of f x w steps, temporal sequences
    of f steps. The default, "auto", takes the kernels only where mamba-ssm is installed and a sequence spans
    chunks."""
    cfg = dit.make_config(args.model, scan=scan)
    w = args.size // cfg.patch_size
    paths = [ssm.pick_scan(cfg.scan, device, L, cfg.chunk_size) for L in (f * w, f)]
    return paths[0] if paths[0] == paths[1] else f"{paths[0]}/{paths[1]}"  # spatial/temporal


def long_table(args, device):
    """Training step time and peak memory against video length, MedSora against the peer: batch 1, no images,
    each --long count of latent frames (4 (f - 1) + 1 pixel frames) and --compile mode. MedSora runs each
    --long-scans scan (the default, "auto": mamba-ssm's kernels for sequences longer than a chunk, where installed);
    the scan column says which path ran. After one length runs out of memory, the longer ones of that model, scan
    and mode are not tried."""
    amp = device.type == "cuda"
    print(f"\nlong video, training step at batch 1 (forward, backward, AdamW), latents f x 16 x {args.size} x "
          f"{args.size}; MedSora's scan path: spatial/temporal")
    print(f"{'model':40s} {'compile':8s} {'scan':16s} {'latent f':>8s} {'pixel F':>7s} {'ms/step':>9s} {'peak GiB':>9s}")
    rows = []
    runs = [("medsora", scan) for scan in args.long_scans] + [("peer", None)]
    for (kind, asked), mode in itertools.product(runs, args.compile):
        out_of_memory = False
        for f in args.long:
            scan = long_scans(args, f, device, asked) if kind == "medsora" else "attention"
            row = dict(table="long video", model=name_of(args, kind), compile=mode, scans=asked, scan=scan,
                       latent_frames=f, pixel_frames=4 * (f - 1) + 1, ms=None, peak_gib=None)
            tried = not out_of_memory
            if tried:
                torch._dynamo.reset()  # the last row's graphs first, then its memory
                free(device)
                model, net = build(args, mode, device, kind, scan=asked or "auto")
                opt = adamw(model, args.adamw)
                x = torch.randn(1, f, 16, args.size, args.size, device=device)
                t = torch.randint(0, 1000, (1,), device=device)
                try:
                    row["ms"] = time_call(train_step(net, opt, x, t, f, amp, graphs=mode == "graphs"),
                                          args.repeat, device)
                    row["peak_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30 if device.type == "cuda" else None
                except Exception as e:
                    if not out_of_memory_error(e):
                        raise
                    out_of_memory = True
                del model, net, opt, x
                free(device)
            shown = ("out of memory" if tried else "not tried") if row["ms"] is None else \
                f"{row['ms']:9.1f} {row['peak_gib'] or float('nan'):9.2f}"
            print(f"{row['model']:40s} {mode:8s} {scan:16s} {f:8d} {row['pixel_frames']:7d} {shown}", flush=True)
            rows.append(row)
    return rows


def plot_long(rows, path, width=720, height=360):
    """ms per step (left) and peak GiB (right) against latent frames, one line per model, compile mode and
    --long-scans setting."""
    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    colours = [(30, 80, 200), (200, 40, 40), (0, 130, 130), (120, 40, 160)]
    lines = {}
    for r in rows:
        scans = f", scan {r['scans']}" if r.get("scans") not in (None, "auto") else ""
        lines.setdefault(f"{r['model']}, {r['compile']}{scans}", []).append(r)
    for k, (key, label) in enumerate((("ms", "ms per training step"), ("peak_gib", "peak GiB"))):
        left, right, top, bottom = 55 + k * width // 2, (k + 1) * width // 2 - 15, 30, height - 40
        xy = {name: [(r["latent_frames"], r[key]) for r in rs if r[key] is not None] for name, rs in lines.items()}
        xy = {name: v for name, v in xy.items() if v}
        d.text((left, 8), f"{label} vs latent frames (batch 1)", fill="black")
        d.rectangle([left, top, right, bottom], outline="black")
        if not xy:
            d.text((left + 10, (top + bottom) // 2), "not measured (CUDA only)", fill="black")
            continue
        x_hi = max(r["latent_frames"] for r in rows)
        y_hi = max(y for v in xy.values() for _, y in v) * 1.1
        to_px = lambda x, y: (left + x / x_hi * (right - left), bottom - y / y_hi * (bottom - top))  # noqa: E731
        for j, (name, v) in enumerate(xy.items()):
            colour = colours[j % len(colours)]
            d.line([to_px(x, y) for x, y in v], fill=colour, width=2)
            for x, y in v:
                cx, cy = to_px(x, y)
                d.ellipse([cx - 3, cy - 3, cx + 3, cy + 3], fill=colour)
            oom = [r["latent_frames"] for r in lines[name] if r[key] is None]
            if oom:  # where it ran out of memory: a cross on the axis
                cx, cy = to_px(oom[0], 0)
                d.line([(cx - 5, cy - 5), (cx + 5, cy + 5)], fill=colour, width=2)
                d.line([(cx - 5, cy + 5), (cx + 5, cy - 5)], fill=colour, width=2)
            d.text((left + 6, top + 6 + 14 * j), name, fill=colour)
        d.text((left - 45, top), f"{y_hi:.3g}", fill="black")
        d.text((right - 30, bottom + 8), f"{x_hi}", fill="black")
    img.save(path + ".tmp.png")
    os.replace(path + ".tmp.png", path)


@torch.no_grad()
def sample_table(args, device, kind="medsora", videos=16):
    """DDIM sampling of `videos` videos (latents only) for each --compile mode."""
    amp = device.type == "cuda"
    print(f"\nDDIM sampling, {name_of(args, kind)}: {videos} videos of {args.frames} latent frames, "
          f"{args.sample_steps} steps (latents only, no VAE decoding)")
    print(f"{'compile':8s} {'s':>8s} {'videos/s':>9s} {'first call s':>12s}")
    shape = (videos, args.frames, 16, args.size, args.size)
    rows = []
    for mode in args.compile:
        torch._dynamo.reset()
        t_build = time.perf_counter()
        model, net = build(args, mode, device, kind)
        model.eval()

        def eps(z, t, graphs=mode == "graphs", **kw):
            if graphs:  # every model call is a new replay; .float() copies the output out of the graph's memory
                torch.compiler.cudagraph_mark_step_begin()
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                return net(z, t, **kw).float()
        run = lambda steps: Diffusion().ddim_sample(eps, shape, steps=steps, device=device,  # noqa: E731
                                                    generator=torch.Generator(device).manual_seed(0),
                                                    num_frames=args.frames)
        try:
            run(2)
            sync(device)
            first = time.perf_counter() - t_build
            ms = time_call(lambda: run(args.sample_steps), 1, device, warmup=0)
        except Exception as e:  # the other modes go on
            print(f"{mode:8s} failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}", flush=True)
            del model, net
            continue
        print(f"{mode:8s} {ms / 1000:8.2f} {videos / ms * 1000:9.2f} {first:12.1f}", flush=True)
        rows.append(dict(table="DDIM sampling", model=name_of(args, kind), compile=mode, videos=videos,
                         steps=args.sample_steps, s=ms / 1000, first_call_s=first))
        del model, net
    return rows


def parse_args(argv=None):
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
                        "length L; default MedSora's shapes and longer ones")
    parser.add_argument("--layer-paths", nargs="+", default=["kernel", "chunked"],
                        choices=["recurrent", "chunked", "chunked+compile", "kernel"], help="the scans of --layers "
                        "(kernel: CUDA only)")
    parser.add_argument("--train-step", action="store_true", help="time train.py's step (forward, backward, "
                        "AdamW) for each --compile mode and --batches, instead of the --paths table")
    parser.add_argument("--batches", type=int, nargs="+", default=[16, 2])
    parser.add_argument("--compile", nargs="+", default=["eager", "blocks"], choices=["eager", "blocks", "graphs",
                        "model"], help="graphs: the compiled blocks with CUDA graphs (mode reduce-overhead)")
    parser.add_argument("--adamw", default="foreach", choices=["foreach", "fused"], help="the optimizer's kernels")
    parser.add_argument("--recompute", action="store_true", help="MedSora's blocks recompute their activations in "
                        "the backward pass (train.py --recompute)")
    parser.add_argument("--sample", action="store_true", help="with --train-step: also time DDIM sampling")
    parser.add_argument("--sample-videos", type=int, nargs="+", default=[16], help="one table per count")
    parser.add_argument("--peer", action="store_true", help="with --train-step and --sample: the same tables for a "
                        "Latte-style video transformer (PeerTransformer) of MedSora's width, depth, heads and patch")
    parser.add_argument("--long", type=int, nargs="+", metavar="f", help="step time and memory of MedSora and the "
                        "peer at batch 1 for these latent frame counts, e.g. 5 17 65 129")
    parser.add_argument("--long-scans", nargs="+", default=["auto"], choices=["auto", "chunked", "kernel"],
                        help="with --long: MedSora's scan paths, one set of rows each (default: MedSora's default)")
    parser.add_argument("--json", default=None, help="write every table's rows to this JSON file")
    parser.add_argument("--plot", default=None, help="with --long: draw its rows to this PNG")
    parser.add_argument("--sample-steps", type=int, default=250)
    parser.add_argument("--components", action="store_true", help="with --train-step: also time one block and each "
                        "of its branches (attention, spatial Mamba, temporal Mamba) for each --compile mode")
    parser.add_argument("--warm-cache", action="store_true", help="keep torch.compile's cache (default: a new "
                        "empty one, so that the first step shows a cold start)")
    args = parser.parse_args(argv)
    distributed.check_args(parser, args, positive=("batch", "frames", "repeat", "batches", "sample_videos",
                                                   "sample_steps", "long"), non_negative=("images",),
                           multiples={"size": (2, "the 2x2 patch")}, file=("json", "plot"))
    if args.recompute and "graphs" in args.compile:  # pytorch/pytorch#154306: checkpointed CUDA-graph regions
        parser.error("--recompute with --compile graphs: CUDA graphs inside recomputed blocks are not supported")
    return args


def main(argv=None):
    args = parse_args(argv)
    if not args.warm_cache:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="medsora-inductor-")
    if args.train_step or args.long:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        print(f"MedSora-{args.model} on {torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'}")
        kinds, rows = ["medsora"] + (["peer"] if args.peer else []), []
        if args.train_step:
            peak = matmul_peak(device)
            for kind in kinds:
                rows += train_step_table(args, device, kind, peak)
            if args.sample:
                for kind in kinds:
                    for videos in args.sample_videos:
                        rows += sample_table(args, device, kind, videos)
            if args.components:
                rows += component_table(args, device)
        if args.long:
            rows += long_table(args, device)
            if args.plot:
                plot_long([r for r in rows if r["table"] == "long video"], args.plot)
        if args.json:
            write_json(args.json, device, args, rows)
        return
    scan_path_table(args)


def scan_path_table(args):
    """The forward + backward of MedSora on each --paths scan path and --dtypes precision, and with --layers one
    Mamba2 layer at given shapes."""
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
    rows = [dict(table="scan paths", model=f"MedSora-{args.model}", batch=args.batch, path=p, dtype=d, ms=ms,
                 clips_per_s=cps, peak_gib=mem if mem == mem else None) for p, d, ms, cps, mem in rows]
    if args.layers is not None:
        shapes = args.layers or ["2048x1", "1024x4", "512x8", "256x32", "32x256", "8x1024", "2x4096"]
        rows += layer_table(device, args.repeat, [tuple(int(v) for v in s.split("x")) for s in shapes],
                            args.layer_paths)
    if args.json:
        write_json(args.json, device, args, rows)


if __name__ == "__main__":
    main()
