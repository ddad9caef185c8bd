"""Full-size SD1 (random weights from the shipped configs): each component exports within its tolerance, including
at the default 512x512 size, and the 3.4 GB UNet goes to external data. Minutes of CPU; the UNet needs ~16 GB."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from diffusers import AutoencoderKL, UNet2DConditionModel  # noqa: E402
from diffusers.loaders.single_file_utils import (  # noqa: E402
    create_unet_diffusers_config_from_ldm,
    create_vae_diffusers_config_from_ldm,
)
from transformers import CLIPTextConfig, CLIPTextModel  # noqa: E402

from sdrt.export.components import component_specs  # noqa: E402
from sdrt.export.exporter import export_component  # noqa: E402
from sdrt.export.ldm_config import CLIP_L14_DIR, read_original_config  # noqa: E402
from sdrt.export.parity import check_parity  # noqa: E402

pytestmark = pytest.mark.slow

VAE_SCALE_FACTOR = 8
DEFAULT_SHAPE = (1, 64, 64, 77)  # 512x512 images: SD1's default size
EXTERNAL = {"unet"}  # components above onnx_export.EXTERNAL_DATA_THRESHOLD at full size


def full_size_sd1(real: str) -> SimpleNamespace:
    """Full-size SD1 modules, random weights; only `real` is materialised, the others live on the meta device."""
    config = read_original_config(None)
    builders = {
        "text_encoder": lambda: CLIPTextModel(CLIPTextConfig(**json.loads((CLIP_L14_DIR / "config.json").read_text()))),
        "unet": lambda: UNet2DConditionModel(**create_unet_diffusers_config_from_ldm(config, {})),
        "vae": lambda: AutoencoderKL(**create_vae_diffusers_config_from_ldm(config, {})),
    }
    modules = {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        for key, build in builders.items():
            with torch.device("cpu" if key == real else "meta"):
                modules[key] = build().eval()
    return SimpleNamespace(**modules)


@pytest.mark.parametrize("name", ["text_encoder", "vae_decoder", "vae_encoder", "unet"])
def test_full_size_component_within_tolerance(tmp_path, name, record_property):
    model = full_size_sd1("vae" if name.startswith("vae") else name)
    spec = next(s for s in component_specs(model) if s.name == name)
    component = export_component(spec, tmp_path, opset=17, vae_scale_factor=VAE_SCALE_FACTOR)
    at_default = check_parity(spec, tmp_path / component.file, [DEFAULT_SHAPE], VAE_SCALE_FACTOR)
    record_property("max_abs_error", component.validation["max_abs_error"])
    record_property("max_abs_error_512", at_default["max_abs_error"])
    assert component.validation["max_abs_error"] <= spec.tolerance
    assert at_default["max_abs_error"] <= spec.tolerance
    assert (tmp_path / name / "model.onnx.data").exists() == (name in EXTERNAL)
