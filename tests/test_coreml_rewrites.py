"""The Core ML forms of SD's attention layers (sdrt.export.coreml_rewrites) against diffusers' modules, in torch.

Bar: ml-stable-diffusion's 35 dB PSNR (torch2coreml.py ABSOLUTE_MIN_PSNR) on every rewritten module, on the
activations a real forward pass feeds it and on random ones. In fp32 the rewrites are the same arithmetic in another
layout, so they land far above the bar; the kernels are also held to 1e-5 against torch's attention.
"""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from sdrt.errors import ExportError  # noqa: E402
from sdrt.export.coreml_rewrites import (  # noqa: E402
    ATTENTIONS, ChannelLayerNorm, original_attention, rewrite_unet, rewrite_vae, split_einsum_attention,
)
from sdrt.export.coreml_validation import MIN_PSNR_DB, check_rewrites, signal_psnr  # noqa: E402
from tiny_models import CONTEXT_DIM, LATENT_CHANNELS, SD2_CONTEXT_DIM, build_tiny_sd1, build_tiny_sd2  # noqa: E402

KERNEL_TOLERANCE = 1e-5  # fp32 max abs error of either kernel against F.scaled_dot_product_attention
UNET_KINDS = {"spatial transformer", "attention", "linear as 1x1 conv", "layer norm", "feed-forward"}


@pytest.fixture(scope="module")
def tiny_sd1():
    return build_tiny_sd1()


def _unet_run(unet, batch=2, size=8, context_dim=CONTEXT_DIM, seed=0):
    g = torch.Generator().manual_seed(seed)
    sample = torch.randn(batch, LATENT_CHANNELS, size, size, generator=g)
    context = torch.randn(batch, 77, context_dim, generator=g)
    return lambda: unet(sample, torch.full((batch,), 501.5), context)


@pytest.mark.parametrize("kernel", [original_attention, split_einsum_attention])
def test_kernels_match_torch_attention(kernel):
    g = torch.Generator().manual_seed(0)
    heads, dim = 4, 8
    q, k, v = (torch.randn(2, heads * dim, 1, n, generator=g) for n in (24, 77, 77))
    got = kernel(q, k, v, heads, dim**-0.5)
    split = [t.squeeze(2).unflatten(1, (heads, dim)).transpose(2, 3) for t in (q, k, v)]  # (b, heads, seq, dim)
    want = torch.nn.functional.scaled_dot_product_attention(*split).transpose(2, 3).flatten(1, 2).unsqueeze(2)
    assert (got - want).abs().max().item() < KERNEL_TOLERANCE


@pytest.mark.parametrize("attention", ATTENTIONS)
def test_every_rewritten_unet_module_matches_diffusers(tiny_sd1, attention):
    unet = tiny_sd1[1]
    record = check_rewrites(unet, rewrite_unet(unet, attention), _unet_run(unet))
    assert set(record) == UNET_KINDS
    for kind, entry in record.items():
        assert entry["modules"] > 0, kind
        for key in ("min_psnr_db_real", "min_psnr_db_random"):
            assert entry[key] is None or entry[key] >= MIN_PSNR_DB, (kind, key)  # None: identical


def test_sd2_linear_projections_become_convolutions():
    unet = build_tiny_sd2("v_prediction")[1]  # use_linear_projection, as SD 2.x: proj_in/proj_out are linear
    record = check_rewrites(unet, rewrite_unet(unet, "split_einsum"), _unet_run(unet, context_dim=SD2_CONTEXT_DIM))
    convs_per_transformer = 2 + 4 + 4 + 2  # proj_in/out, both attentions' q k v out, feed-forward in and out
    assert record["linear as 1x1 conv"]["modules"] == record["spatial transformer"]["modules"] * convs_per_transformer


def test_vae_attention_rewrite_matches_diffusers(tiny_sd1):
    vae = tiny_sd1[2]
    rewritten = rewrite_vae(vae, "split_einsum")
    latents = torch.randn(1, LATENT_CHANNELS, 8, 8, generator=torch.Generator().manual_seed(1))
    record = check_rewrites(vae.decoder, rewritten.decoder, lambda: vae.decoder(latents))
    assert record["VAE attention"]["modules"] == 1
    assert record["VAE attention"]["min_psnr_db_real"] >= MIN_PSNR_DB


def test_channel_layer_norm_applies_scale_then_shift():
    norm = torch.nn.LayerNorm(16)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    x = torch.randn(3, 5, 16)
    got = ChannelLayerNorm(norm)(x.transpose(1, 2).unsqueeze(2)).squeeze(2).transpose(1, 2)
    assert signal_psnr(norm(x).detach().numpy(), got.detach().numpy()) > 100


def test_a_wrong_rewrite_fails_loudly(tiny_sd1):
    unet = tiny_sd1[1]
    broken = rewrite_unet(unet, "split_einsum")
    norm = next(m for m in broken.modules() if isinstance(m, ChannelLayerNorm))
    with torch.no_grad():  # one layer norm off by a constant shift
        norm.bias += 1.0
    with pytest.raises(ExportError, match="down_blocks.0.attentions.0.*below the minimum of 35 dB"):
        check_rewrites(unet, broken, _unet_run(unet))


def test_unknown_attention_is_refused(tiny_sd1):
    with pytest.raises(ExportError, match="attention must be one of split_einsum, original"):
        rewrite_unet(tiny_sd1[1], "flash")


def test_signal_psnr_uses_the_reference_peak():
    import numpy as np

    reference = np.array([1.0, -1.0, 0.5, 0.0])
    assert signal_psnr(reference, reference) == float("inf")
    assert abs(signal_psnr(reference, reference + 0.01) - 40.0) < 0.01  # 20 log10(1 / 0.01)
