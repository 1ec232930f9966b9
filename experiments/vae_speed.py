"""
The VAE's training step (train_vae.py from scratch: forward, Eq. 16's L1 + focal frequency + KL, backward,
Adam), measured side by side in one run for each precision, compile mode and batch size.

    python -m experiments.vae_speed                                   # tiny VAE, 17 x 128 x 128 clips
    python -m experiments.vae_speed --model small --batches 2 8 16 --compile none model --json vae_speed.json

Each row: the median step time over --repeat steps, clips/s, the peak GPU memory, the FLOPs of a step
(torch.utils.flop_counter on the eager fp32 step) and the fraction of a bf16 matrix-multiply peak measured in
the same run. "fp32" is the CPU's and the old GPU path; "bf16" is autocast, as train_vae.py runs on CUDA;
--compile model wraps the VAE in torch.compile. Without LPIPS and the discriminator (their weights are not
shipped), so the rows time what every from-scratch run pays.

Dimension names: B clips, F frames, H, W pixels.
"""

import argparse
import os
import tempfile

import torch
from torch.utils.flop_counter import FlopCounterMode

import distributed
import vae
from experiments.measure import free, matmul_peak, time_call, write_json


def loss_of(recon, x, mean, logvar):
    """train_vae.py's loss from scratch at its default weights (--ffl-weight 0.1, --kl-weight 1e-6)."""
    losses = vae.reconstruction_losses(recon, x, mean, logvar)
    return losses["l1"] + 0.1 * losses["ffl"] + 1e-6 * losses["kl"]


def step_fn(model, opt, x, amp):
    """One training step of train_vae.py from scratch (no LPIPS, no discriminator), as a closure."""
    def step():
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
            recon, mean, logvar = model(x)
        loss = loss_of(recon.float(), x, mean.float(), logvar.float())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def count_flops(cfg, x, device):
    model = vae.VideoVAE(cfg).to(device)
    with FlopCounterMode(display=False) as counter:
        recon, mean, logvar = model(x)
        loss_of(recon, x, mean, logvar).backward()
    return counter.get_total_flops()


def table(args, device):
    cfg = vae.MODELS[args.model]
    peak = matmul_peak(device)
    rows = []
    print(f"VAE {args.model}: clips of {args.frames + 1} x {args.size} x {args.size}; "
          f"{'bf16' if device.type == 'cuda' else 'fp32'} matmul peak {peak:.1f} TFLOP/s")
    print(f"{'precision':>9s} {'compile':>7s} {'batch':>5s} {'ms/step':>8s} {'clips/s':>8s} {'peak GiB':>8s} "
          f"{'% of peak':>9s}")
    for batch in args.batches:
        x = torch.rand(batch, 3, args.frames + 1, args.size, args.size, device=device) * 2 - 1
        flops = count_flops(cfg, x, device)
        for precision in args.precisions:
            for mode in args.compile:
                free(device)
                torch.manual_seed(0)
                model = vae.VideoVAE(cfg).to(device)
                run = torch.compile(model) if mode == "model" else model
                opt = torch.optim.Adam(model.parameters(), lr=1e-4, betas=(0.5, 0.9))
                ms = time_call(step_fn(run, opt, x, precision == "bf16"), args.repeat, device)
                gib = torch.cuda.max_memory_allocated() / 2 ** 30 if device.type == "cuda" else None
                row = {"precision": precision, "compile": mode, "batch": batch, "ms": ms,
                       "clips_per_s": 1000 * batch / ms, "peak_gib": gib, "tflop_per_step": flops / 1e12,
                       "peak_fraction": flops / (ms / 1000) / (peak * 1e12)}
                rows.append(row)
                print(f"{precision:>9s} {mode:>7s} {batch:5d} {ms:8.1f} {row['clips_per_s']:8.2f} "
                      f"{'-' if gib is None else format(gib, '8.2f'):>8s} {100 * row['peak_fraction']:8.1f}%",
                      flush=True)
                del model, run, opt
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny", choices=sorted(vae.MODELS))
    p.add_argument("--frames", type=int, default=16, help="clip frames (+1 for the causal first frame)")
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--batches", type=int, nargs="+", default=[2, 8])
    p.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    p.add_argument("--compile", nargs="+", default=["none", "model"], choices=["none", "model"])
    p.add_argument("--repeat", type=int, default=10)
    p.add_argument("--json", default=None, help="write the rows to this JSON file")
    args = p.parse_args(argv)
    distributed.check_args(p, args, positive=("batches", "repeat"), file="json", multiples={
        "frames": (8, "clips of 8k + 1 frames: the decoder takes an odd number of latent frames"), "size": (8, "the VAE's spatial factor")})
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="medsora-inductor-"))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = table(args, device)
    if args.json:
        write_json(args.json, device, args, rows)
    return rows


if __name__ == "__main__":
    main()
