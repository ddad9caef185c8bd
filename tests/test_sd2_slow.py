"""SD 2.x, slow tier: the forward-pass prediction test on briefly trained tiny UNets, and single files end to end."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from tiny_models import build_tiny_sd2, save_tiny_sd2_single_file, save_tiny_sd2_yaml  # noqa: E402

from sdrt.export import export_bundle  # noqa: E402
from sdrt.export.detect import EPSILON_MIN_SLOPE, prediction_from_forward_pass  # noqa: E402
from sdrt.runtime.pipeline import Pipeline  # noqa: E402

pytestmark = pytest.mark.slow

# Training: SD's scaled_linear betas, uniform timesteps, toy latents of about unit variance with a non-zero mean
# (fixed random patterns plus noise), enough steps for the epsilon model to learn that at t=999 its input is the noise.
TRAIN_STEPS, TRAIN_BATCH, LEARNING_RATE = 200, 16, 1e-3
TRAIN_THREADS = 1  # a tiny model gains nothing from more, and loses much on a shared machine
PATTERNS, PATTERN_STD, PATTERN_NOISE = 8, 0.8, 0.3
CHANNEL_MEANS = (0.6, -0.3, 0.2, 0.4)
# Slopes measured after 100-600 steps: epsilon 0.92-1.00, v 0.09-0.23 (random init ~0); a margin either side of 0.5.
MARGIN = 0.2
# Same weights through the single file and through the folder: the 8-bit images agree to one step (1/255).
SAME_WEIGHTS_TOL_8BIT = 1
# DDIM: its timestep spacing is "leading" whether the scheduler config names one (single files: "leading") or not
# (Stability's folders predate the key); Euler's default would be "linspace", a different schedule.
SAMPLER = "DDIM"


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(TRAIN_THREADS)
    yield
    torch.set_num_threads(threads)


def _train(prediction: str) -> torch.nn.Module:
    _, unet, _ = build_tiny_sd2(prediction, seed=0)
    g = torch.Generator().manual_seed(1)
    patterns = PATTERN_STD * torch.randn(PATTERNS, 4, 8, 8, generator=g) + torch.tensor(CHANNEL_MEANS)[:, None, None]
    abar = torch.cumprod(1 - torch.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2, 0)
    context = torch.zeros(TRAIN_BATCH, 2, unet.config.cross_attention_dim)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=LEARNING_RATE)
    unet.train()
    for _ in range(TRAIN_STEPS):
        x0 = patterns[torch.randint(0, PATTERNS, (TRAIN_BATCH,), generator=g)]
        x0 = x0 + PATTERN_NOISE * torch.randn(x0.shape, generator=g)
        eps, t = torch.randn(x0.shape, generator=g), torch.randint(0, 1000, (TRAIN_BATCH,), generator=g)
        a = abar[t][:, None, None, None]
        target = eps if prediction == "epsilon" else a.sqrt() * eps - (1 - a).sqrt() * x0
        loss = (unet(a.sqrt() * x0 + (1 - a).sqrt() * eps, t, context).sample - target).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return unet.eval()


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_forward_pass_tells_trained_models_apart(prediction, one_thread, record_property):
    detected, slope = prediction_from_forward_pass(_train(prediction))
    record_property("slope", slope)
    print(f"{prediction}: slope {slope:.3f}")
    assert detected == prediction
    assert abs(slope - EPSILON_MIN_SLOPE) >= MARGIN


@pytest.mark.parametrize("variant, prediction", [("v", "v_prediction"), ("eps", "epsilon")])
def test_single_file_bundle_generates_as_the_folder_bundle(request, tmp_path, variant, prediction):
    path = save_tiny_sd2_single_file(tmp_path / "tiny-sd2.safetensors", prediction)
    yaml_path = save_tiny_sd2_yaml(tmp_path / "tiny.yaml", prediction)
    manifest = export_bundle(path, tmp_path / "bundle", original_config=yaml_path)
    assert (manifest.model.family, manifest.model.prediction_type) == ("sd2", prediction)
    assert (manifest.tokenizer.pad_token, manifest.source["kind"]) == ("!", "single_file")
    folder_bundle = request.getfixturevalue(f"tiny_sd2_{variant}_bundle")
    images = []
    for bundle in (tmp_path / "bundle", folder_bundle):
        with Pipeline.load(bundle, backend="onnxruntime") as pipe:
            out = pipe.generate("a red circle", seed=7, steps=6, width=72, height=64, sampler=SAMPLER)
            images.append(np.asarray(out[0].image, dtype=int))
    assert np.abs(images[0] - images[1]).max() <= SAME_WEIGHTS_TOL_8BIT
    assert np.abs(images[0] - images[0].mean()).max() > 10  # not a flat image
