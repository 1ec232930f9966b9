"""ssd_triton.py: the fused mixer equals the readable path (ssm.Mamba2.forward_planes on the chunked scan), forward and
every gradient, on sequences packed several to a program, one-step sequences, one and two directions, and inside a
whole MedSora and a compiled block. On a CPU the kernels run in Triton's interpreter (conftest.py sets
TRITON_INTERPRET=1); tests/test_gpu.py runs them compiled, in bf16."""
import pytest
import torch

ssd_triton = pytest.importorskip("ssd_triton", reason="needs Triton (pip install triton)")
import dit  # noqa: E402
import ssm  # noqa: E402

if not torch.cuda.is_available() and not ssm.ssd_triton_interpreted():
    pytest.skip("no GPU and TRITON_INTERPRET is not 1", allow_module_level=True)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = 1e-5 if DEVICE == "cpu" else 5e-3  # fp32: exact arithmetic in the interpreter, tf32 products on a GPU


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def pair(d_model=32, d_state=16, headdim=16, seed=0):
    """A layer on the readable path with every parameter drawn (so that each gradient is exercised), and a copy
    on the fused path."""
    torch.manual_seed(seed)
    ref = ssm.Mamba2(d_model, d_state=d_state, headdim=headdim, scan="chunked").to(DEVICE)
    with torch.no_grad():
        ref.norm.weight.normal_(1, 0.3)
        ref.D.normal_()
        ref.conv1d.bias.normal_(0, 0.3)
        ref.dt_bias.add_(torch.randn_like(ref.dt_bias))
    fused = ssm.Mamba2(d_model, d_state=d_state, headdim=headdim, scan="fused").to(DEVICE)
    fused.load_state_dict(ref.state_dict())
    return ref, fused


def compare(ref, fused, u, planes, bidirectional):
    """Outputs and the gradients of the input and of every parameter, fused against readable."""
    results = []
    for layer in (ref, fused):
        layer.zero_grad()
        x = u.clone().requires_grad_()
        outs = layer.forward_planes(x, planes, bidirectional)
        torch.manual_seed(1)
        sum((o * torch.randn_like(o)).sum() for o in outs).backward()
        results.append((outs, x.grad, {n: p.grad for n, p in layer.named_parameters()}))
    (outs_r, du_r, g_r), (outs_f, du_f, g_f) = results
    errs = {f"out {k}": rel(a, b) for k, (a, b) in enumerate(zip(outs_f, outs_r))}
    errs["grad input"] = rel(du_f, du_r)
    errs.update({f"grad {n}": rel(g_f[n], g_r[n]) for n in g_r})
    worst = max(errs, key=errs.get)
    print(f"fused vs chunked: worst {worst} {errs[worst]:.1e}")
    assert all(e < TOL for e in errs.values()), errs  # (max() would hide a NaN)


@pytest.mark.parametrize("bidirectional", [True, False])
def test_fused_matches_readable_on_mixed_tables(bidirectional):
    """Two planes over 14 tokens a sample: sequences of 5 (three to a program, the last program part-full), of 1
    and of 4 steps, in a random order of the tokens."""
    ref, fused = pair()
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(14, generator=g)
    planes = [[perm[:10].view(2, 5), perm[10:].view(4, 1)], [perm[:12].view(3, 4), perm[12:].view(1, 2)]]
    planes = [[t.to(DEVICE) for t in plane] for plane in planes]
    compare(ref, fused, torch.randn(3, 14, 32, generator=g).to(DEVICE), planes, bidirectional)


@pytest.mark.parametrize("L,headdim", [(24, 32), (40, 64)])
def test_fused_matches_readable_on_longer_sequences(L, headdim):
    """One sequence a program (BLOCK 32 and 64 steps, partly padding); heads of 32 channels, and of 64 (two slices
    of 32 at a time)."""
    ref, fused = pair(d_model=64, headdim=headdim)
    g = torch.Generator().manual_seed(L)
    table = torch.randperm(2 * L, generator=g).view(2, L).to(DEVICE)
    compare(ref, fused, torch.randn(2, 2 * L, 64, generator=g).to(DEVICE), [[table]], True)


def test_medsora_fused_matches_chunked():
    """A whole tiny MedSora, 3 video frames and 2 images, on the fused path against the chunked one."""
    torch.manual_seed(0)
    models = {}
    for scan in ("chunked", "fused"):
        cfg = dit.make_config("tiny", in_channels=4, width=64, depth=1, scan=scan, attn_dropout=0.0)  # 4 heads
        models[scan] = dit.MedSora(cfg).to(DEVICE)
    with torch.no_grad():
        for p in models["chunked"].parameters():
            if p.dim() >= 2 and not p.any():
                p.normal_(std=0.05)  # adaLN-Zero's zero matrices would leave the branches unexercised
    models["fused"].load_state_dict(models["chunked"].state_dict())
    x, t = torch.randn(2, 5, 4, 8, 8, device=DEVICE), torch.tensor([10, 900], device=DEVICE)
    out, grads = {}, {}
    for scan, model in models.items():
        out[scan] = model(x, t, num_frames=3)
        out[scan].square().mean().backward()
        grads[scan] = {n: p.grad for n, p in model.named_parameters()}
    assert rel(out["fused"], out["chunked"]) < TOL
    errs = {n: rel(grads["fused"][n], grads["chunked"][n]) for n in grads["chunked"] if grads["chunked"][n].any()}
    print(f"MedSora tiny, fused vs chunked: output {rel(out['fused'], out['chunked']):.1e}, "
          f"worst gradient {max(errs.values()):.1e}")
    assert all(e < TOL for e in errs.values()), errs


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_fused_op_traces_under_torch_compile(backend):
    """The op's shape function and autograd registration: a compiled layer of two planes (AOT autograd alone, and
    with Inductor's code around the op, as train.py compiles it) gives the eager layer's output and gradients. Each
    plane's kept tensors must stay its own: a list of like tensors as the op's output gave plane 1's to plane 0."""
    torch._dynamo.reset()
    _, fused = pair()
    order = torch.randperm(12, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    planes = [[torch.arange(12, device=DEVICE).view(3, 4)], [order.view(2, 6)]]  # each plane keeps its own g
    u = torch.randn(2, 12, 32, device=DEVICE)
    run = lambda f: sum(o * (k + 1) for k, o in enumerate(f(u, planes)))  # noqa: E731
    eager = run(fused.forward_planes)
    eager.square().sum().backward()
    ref = {n: p.grad.clone() for n, p in fused.named_parameters()}
    fused.zero_grad()
    compiled = run(torch.compile(fused.forward_planes, backend=backend, fullgraph=True))
    compiled.square().sum().backward()
    assert torch.allclose(compiled, eager, atol=1e-6)
    for n, p in fused.named_parameters():
        assert torch.allclose(p.grad, ref[n], atol=1e-6), n
    torch._dynamo.reset()


def test_fused_refuses_what_it_cannot_run():
    layer = ssm.Mamba2(32, d_state=16, headdim=16, scan="fused").to(DEVICE)
    long = [[torch.arange(ssm.MAX_FUSED_LEN + 1, device=DEVICE).view(1, -1)]]
    with pytest.raises(RuntimeError, match="scan='fused' needs"):
        layer.forward_planes(torch.randn(1, ssm.MAX_FUSED_LEN + 1, 32, device=DEVICE), long)
    auto = ssm.Mamba2(32, d_state=16, headdim=16, scan="auto").to(DEVICE)  # auto falls back to the readable path
    assert auto.forward_planes(torch.randn(1, ssm.MAX_FUSED_LEN + 1, 32, device=DEVICE), long)[0].isfinite().all()


def test_launch_settings_change_how_not_what():
    """ssd_triton.configure("W:R") (MEDSORA_SSD_TUNING, experiments/mixer_tune.py) sets the per-head kernels' warps
    and register cap; the outputs stay the same, and a malformed setting is refused in words."""
    saved = dict(ssd_triton.HEAD_WARPS), ssd_triton.MAXNREG
    ref, fused = pair(d_model=64, headdim=64)
    table = torch.randperm(80, generator=torch.Generator().manual_seed(1)).view(2, 40).to(DEVICE)  # BLOCK 64
    u = torch.randn(1, 80, 64, device=DEVICE)
    try:
        before = fused.forward_planes(u, [[table]])[0]
        ssd_triton.configure("4:128")
        assert ssd_triton.HEAD_WARPS[64] == 4 and ssd_triton.HEAD_WARPS[16] == saved[0][16]
        assert ssd_triton.MAXNREG == 128
        assert torch.equal(fused.forward_planes(u, [[table]])[0], before)
        for bad in ("3", "8:x", "", "w:128"):
            with pytest.raises(ValueError, match="expected W or W:R"):
                ssd_triton.configure(bad)
    finally:
        ssd_triton.HEAD_WARPS.update(saved[0])
        ssd_triton.MAXNREG = saved[1]


def test_mixer_tune_checks_its_settings_first(capsys):
    from experiments import mixer_tune
    with pytest.raises(SystemExit) as e:
        mixer_tune.main(["--configs", "8", "3:96"])
    assert e.value.code == 2 and "'3:96'" in capsys.readouterr().err


def test_the_op_passes_torch_library_opcheck():
    """torch.library.opcheck: the schema, the autograd registration, the shape function against the real outputs
    (the first form of the op returned one object twice there, which compiled graphs took for aliases) and AOT
    dispatch, on two planes of two directions."""
    _, m = pair()
    order = torch.randperm(12, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    tables = [torch.arange(12, device=DEVICE).view(3, 4).int(), order.view(2, 6).int()]
    u = torch.randn(24, 32, device=DEVICE, requires_grad=True)
    args = (u, m.in_proj.weight, m.conv1d.weight, m.conv1d.bias, m.dt_bias, m.A_log, m.D, m.norm.weight,
            m.out_proj.weight, tables, [0, 1], 12, 1e-5, True)
    result = torch.library.opcheck(ssd_triton.mamba_planes, args)
    out, *kept = ssd_triton.mamba_planes(*[a.detach() if torch.is_tensor(a) else a for a in args])
    backward = torch.library.opcheck(ssd_triton.mamba_planes_backward,
                                     (torch.randn_like(out), *[a.detach() if torch.is_tensor(a) else a for a in args],
                                      *kept), test_utils=("test_schema", "test_faketensor"))
    print(result, backward)
    assert set(result.values()) == set(backward.values()) == {"SUCCESS"}, (result, backward)
