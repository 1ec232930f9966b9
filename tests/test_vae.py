"""vae.py: the same function as diffusers' AutoencoderKLCogVideoX with the same weights; shapes; strict loading."""
import pytest
import torch

import vae


def tiny():
    torch.manual_seed(0)
    return vae.VideoVAE(vae.MODELS["tiny"]).eval()


def test_shapes_and_first_frame_alone():
    model = tiny()
    x = torch.rand(2, 3, 17, 32, 32) * 2 - 1
    mean, logvar = model.encode_moments(x)
    assert mean.shape == logvar.shape == (2, 16, 5, 4, 4)  # 1 + 16 / 4 latent frames, 8x smaller
    assert model.decode(mean, scaled=False).shape == x.shape
    # GroupNorm statistics span the frames of a chunk (as in the published model), so the first latent frame
    # is not independent of later frames; the convolutions are causal (next test)
    # a single image goes through the first-frame path: one latent frame
    assert model.encode_moments(x[:, :, :1])[0].shape == (2, 16, 1, 4, 4)


def test_causal_conv_is_causal_and_chunks_with_its_cache():
    conv = vae.CausalConv3d(4, 6)
    x = torch.randn(1, 4, 7, 5, 5)
    y = x.clone()
    y[:, :, 4:] += 1
    assert torch.equal(conv(x)[0][:, :, :4], conv(y)[0][:, :, :4])  # outputs up to t see inputs up to t only
    first, cache = conv(x[:, :, :3])
    second, _ = conv(x[:, :, 3:], cache)
    assert torch.allclose(torch.cat([first, second], dim=2), conv(x)[0], atol=1e-6)


def test_chunk_ranges_match_the_published_model():
    assert vae.chunks(17, 8) == [(0, 9), (9, 17)]  # the extra first frame rides with the first chunk
    assert vae.chunks(5, 2) == [(0, 3), (3, 5)]
    assert vae.chunks(1, 8) == [(0, 1)]


def test_matches_diffusers_cogvideox():
    diffusers = pytest.importorskip("diffusers")
    cfg = vae.MODELS["tiny"]
    torch.manual_seed(1)
    theirs = diffusers.AutoencoderKLCogVideoX(block_out_channels=cfg.block_out_channels,
                                              layers_per_block=cfg.layers_per_block,
                                              norm_num_groups=cfg.norm_num_groups,
                                              latent_channels=cfg.latent_channels).eval()
    ours = vae.VideoVAE(cfg).eval()
    vae.load_state_dict_strict(ours, theirs.state_dict(), "diffusers tiny VAE")
    x = torch.rand(1, 3, 17, 32, 32) * 2 - 1
    with torch.no_grad():
        dist = theirs.encode(x).latent_dist
        mean, logvar = ours.encode_moments(x)
        enc_err = max((mean - dist.mean).abs().max().item(), (logvar - dist.logvar).abs().max().item())
        dec_err = (ours.decode(mean, scaled=False) - theirs.decode(dist.mean).sample).abs().max().item()
    print(f"vs diffusers: max |encoder diff| {enc_err:.2e}, max |decoder diff| {dec_err:.2e}")
    assert enc_err < 1e-5 and dec_err < 1e-5


def test_strict_loading_names_the_keys(tmp_path):
    model = tiny()
    state = model.state_dict()
    state["encoder.extra.weight"] = torch.zeros(1)
    del state["decoder.conv_out.conv.bias"]
    with pytest.raises(KeyError, match=r"1 missing keys \['decoder.conv_out.conv.bias'\].*encoder.extra.weight"):
        vae.load_state_dict_strict(tiny(), state, "test")
    with pytest.raises(FileNotFoundError, match="not found"):
        vae.load_pretrained(str(tmp_path / "missing.safetensors"))


def test_freq_comp_starts_as_identity_and_can_change_the_output():
    torch.manual_seed(0)
    plain = vae.VideoVAE(vae.VAEConfig(**{**vae.MODELS["tiny"].__dict__, "freq_comp": False})).eval()
    comp = vae.VideoVAE(vae.MODELS["tiny"]).eval()
    vae.load_state_dict_strict(comp, plain.state_dict(), "plain VAE")  # a "pretrained" VAE without the modules
    names = [n for n, _ in comp.named_parameters() if vae.is_freq_comp(n)]
    assert any(n.startswith("encoder.") for n in names) and any(n.startswith("decoder.") for n in names)
    x = torch.rand(1, 3, 9, 32, 32) * 2 - 1
    with torch.no_grad():
        m_plain, m_comp = plain.encode_moments(x)[0], comp.encode_moments(x)[0]
        assert torch.equal(m_plain, m_comp)
        assert torch.equal(plain.decode(m_plain, scaled=False), comp.decode(m_plain, scaled=False))
        for n, p in comp.named_parameters():  # once trained (here: perturbed), they do act
            if vae.is_freq_comp(n):
                p.add_(0.05 * torch.randn_like(p))
        assert not torch.allclose(comp.encode_moments(x)[0], m_plain)
        assert not torch.allclose(comp.decode(m_plain, scaled=False), plain.decode(m_plain, scaled=False))


def test_freq_comp_works_for_any_clip_length():
    model = tiny()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if vae.is_freq_comp(n):
                p.add_(0.05 * torch.randn_like(p))
        for frames in (1, 9, 17, 25):  # several encoder and decoder chunks; one frame = the image path
            mean = model.encode_moments(torch.rand(1, 3, frames, 16, 16))[0]
            assert mean.shape[2] == 1 + (frames - 1) // 4
            assert model.decode(mean, scaled=False).shape[2] == frames
        with pytest.raises(ValueError, match="odd number of latent frames"):
            model.decode(torch.zeros(1, 16, 2, 2, 2))


def test_band_errors_split_the_mse_by_frequency():
    torch.manual_seed(0)
    real = torch.rand(3, 3, 32, 32) * 2 - 1
    fake = real + 0.1 * torch.randn_like(real)
    bands = vae.band_errors(fake, real)
    mse = (((fake - real) / 2) ** 2).flatten(1).mean(1)
    assert torch.allclose(bands.sum(1), mse, rtol=1e-5)  # Parseval: the bands sum to the whole error
    assert (bands[:, 2] > bands[:, 0]).all()  # white noise: most of the spectrum is high frequency
    # a sine of 2 cycles over 32 pixels (1/16 cycle/px) lies in the low band alone; of 10 (0.31) in the high
    x = torch.arange(32.0)
    for cycles, band in ((2, 0), (10, 2)):
        wave = 0.2 * torch.sin(2 * torch.pi * cycles * x / 32)[None, None, None, :].expand(1, 3, 32, 32)
        got = vae.band_errors(real[:1] + wave, real[:1])[0]
        assert float(got[band]) == pytest.approx(0.1 ** 2 / 2, rel=1e-4) and float(got.sum()) == pytest.approx(float(got[band]), rel=1e-4)


def test_band_detail_sees_blur_and_ignores_the_mean_colour():
    torch.manual_seed(0)
    real = torch.rand(4, 3, 32, 32) * 2 - 1
    blurred = torch.nn.functional.interpolate(torch.nn.functional.avg_pool2d(real, 4), scale_factor=4,
                                              mode="bilinear", align_corners=False)
    kept = vae.band_detail(blurred).sum(0) / vae.band_detail(real).sum(0)
    assert kept[2] < 0.05 < kept[0] and kept[0] > kept[1] > kept[2]  # a blur keeps the low band, loses the high
    assert torch.allclose(vae.band_detail(real + 0.3), vae.band_detail(real), atol=1e-6)
    assert torch.allclose(vae.band_energy(real).sum(1), (real / 2).pow(2).flatten(1).mean(1), rtol=1e-5)


def test_reconstruction_quality_says_how_much_detail_each_band_captures():
    torch.manual_seed(0)
    clips = [{"video": torch.rand(2, 5, 3, 32, 32) * 2 - 1} for _ in range(2)]   # (B, F, 3, H, W)

    class Blur:  # a reconstruction that keeps only what a 4 x 4 average keeps, per frame
        def reconstruct(self, x):
            f = x.transpose(1, 2).flatten(0, 1)
            f = torch.nn.functional.interpolate(torch.nn.functional.avg_pool2d(f, 4), scale_factor=4)
            return f.unflatten(0, x.transpose(1, 2).shape[:2]).transpose(1, 2)

    class Same:
        def reconstruct(self, x):
            return x

    same = vae.reconstruction_quality(Same(), clips, torch.device("cpu"), False, 4)
    blur = vae.reconstruction_quality(Blur(), clips, torch.device("cpu"), False, 4)
    assert [same[f"captured_{b}"] for b in ("low", "mid", "high")] == [1, 1, 1]
    assert blur["captured_high"] < 0.1 < blur["captured_low"] and blur["clips"] == 4
