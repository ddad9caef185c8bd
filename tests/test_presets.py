"""Model-kind presets: how a bundle's kind is found, how unset request fields fill, and what that does to the loop."""
import numpy as np
import pytest

from sdrt.bundle import Manifest, ModelInfo
from sdrt.runtime.guidance import ClassifierFreeGuidance
from sdrt.runtime.presets import KINDS, PRESETS, detect_kind, preset_for, scheduler_config
from sdrt.runtime.samplers import make_schedule, resolve_sampler

TIMESTEP_TOL = 0  # timesteps are integers in diffusers: equal exactly
# runwayml/stable-diffusion-v1-5 scheduler_config.json (PNDM), the config LCM-LoRA and Turbo recipes start from.
SD15_SCHEDULER = {
    "_class_name": "PNDMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
    "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
    "timestep_spacing": "leading", "prediction_type": "epsilon",
}


def _manifest(name="my-model", scheduler=SD15_SCHEDULER, kind=None) -> Manifest:
    model = ModelInfo("sd1", "epsilon", 0.18215, name=name, kind=kind or "")
    return Manifest(model=model, components={}, scheduler=dict(scheduler))


def _has_sampler(name: str) -> bool:
    try:
        resolve_sampler(name)
        return True
    except ValueError:
        return False


@pytest.mark.parametrize("name, kind", [
    ("my-model", "standard"), ("stable-diffusion-v1-5", "standard"), ("lcm-lora-sdv1-5", "lcm"),
    ("LCM_Dreamshaper_v7", "lcm"), ("sd-turbo", "turbo"), ("sdxl-turbo", "turbo"),
    ("turbocharged-anime", "standard"),  # a whole word only
])
def test_kind_from_name(name, kind):
    assert detect_kind(_manifest(name)) == kind


def test_kind_from_scheduler_class():
    assert detect_kind(_manifest("dreamshaper", {**SD15_SCHEDULER, "_class_name": "LCMScheduler"})) == "lcm"


def test_explicit_kind_wins():
    assert detect_kind(_manifest("lcm-something", kind="turbo")) == "turbo"
    with pytest.raises(ValueError, match="model kind 'hyper'"):
        detect_kind(_manifest(kind="hyper"))


def test_user_override_and_unknown_kind():
    assert preset_for(_manifest("sd-turbo"), "standard").kind == "standard"
    with pytest.raises(ValueError, match="expected one of standard, lcm, turbo"):
        preset_for(_manifest(), "fast")


@pytest.mark.parametrize("kind, request_fields, expected", [
    ("standard", (None, None, None), (25, 7.5, None)),
    ("standard", (4, None, None), (4, 7.5, None)),
    ("lcm", (None, None, None), (4, 1.0, "LCM")),
    ("lcm", (4, None, None), (4, 1.0, "LCM")),  # `--steps 4` on an LCM bundle
    ("lcm", (6, 1.5, "Euler"), (6, 1.5, "Euler")),  # what the user sets is kept
    ("turbo", (None, None, None), (1, 0.0, "Euler a")),
    ("turbo", (4, 0.0, None), (4, 0.0, "Euler a")),
])
def test_fill(kind, request_fields, expected):
    assert PRESETS[kind].fill(*request_fields) == expected


@pytest.mark.parametrize("kind", ["lcm", "turbo"])
def test_few_step_kinds_skip_the_unconditional_batch(kind):
    cond, uncond = np.ones((2, 77, 8), np.float32), np.zeros((2, 77, 8), np.float32)
    guidance = ClassifierFreeGuidance(cond, uncond, PRESETS[kind].guidance_scale)
    assert guidance.context().shape[0] == 2  # one UNet evaluation per image, not two
    assert guidance.batch(np.zeros((2, 4, 8, 8), np.float32)).shape[0] == 2
    standard = ClassifierFreeGuidance(cond, uncond, PRESETS["standard"].guidance_scale)
    assert standard.context().shape[0] == 4


def test_turbo_starts_at_the_last_training_timestep():
    # diffusers' EulerAncestralDiscreteScheduler(timestep_spacing="trailing").set_timesteps(1) -> [999]; the SD1.5
    # config's "leading" spacing would start one step at t = 1, nearly noise-free: an unusable single step.
    manifest = _manifest("sd-turbo")
    config = scheduler_config(manifest, preset_for(manifest))
    assert config["timestep_spacing"] == "trailing"
    np.testing.assert_array_equal(make_schedule("Euler a", config, 1).timesteps, [999])
    np.testing.assert_array_equal(make_schedule("Euler a", config, 4).timesteps, [999, 749, 499, 249])
    leading = make_schedule("Euler a", SD15_SCHEDULER, 1)
    assert leading.timesteps[0] == 1


@pytest.mark.skipif(not _has_sampler("LCM"), reason="the LCM sampler is not registered yet")
def test_lcm_preset_schedule_matches_diffusers():
    diffusers = pytest.importorskip("diffusers")
    manifest = _manifest("lcm-lora-sdv1-5")
    preset = preset_for(manifest)
    ours = make_schedule(preset.sampler, scheduler_config(manifest, preset), preset.steps)
    reference = diffusers.LCMScheduler.from_config({k: v for k, v in SD15_SCHEDULER.items() if k != "_class_name"})
    reference.set_timesteps(preset.steps)
    np.testing.assert_allclose(ours.timesteps, reference.timesteps.numpy(), rtol=0, atol=TIMESTEP_TOL)


def test_every_preset_sampler_is_known_or_pending():
    assert set(KINDS) == {"standard", "lcm", "turbo"}
    for preset in PRESETS.values():
        if preset.sampler is not None and preset.sampler != "LCM":
            resolve_sampler(preset.sampler)


def test_few_step_runtime_modules_import_without_torch():
    import subprocess
    import sys

    script = (
        "import importlib.abc, sys\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('torch', 'diffusers', 'transformers'):\n"
        "            raise ImportError(name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import sdrt.runtime.presets, sdrt.runtime.preview, sdrt.runtime.philox, sdrt.runtime.noise\n"
        "print('OK')\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "OK", proc.stderr


# --- through a real bundle -------------------------------------------------------------------------------------

def test_request_takes_the_bundles_preset_and_the_users_override():
    from sdrt.bundle import read_manifest
    from sdrt.runtime.pipeline import default_bundle
    from sdrt.runtime.request import GenerationRequest

    manifest = read_manifest(default_bundle())
    standard = GenerationRequest("x").resolve(manifest)
    assert (standard.kind, standard.steps, standard.guidance_scale) == ("standard", 25, 7.5)
    lcm = GenerationRequest("x", kind="lcm").resolve(manifest)
    assert (lcm.kind, lcm.steps, lcm.guidance_scale, lcm.sampler) == ("lcm", 4, 1.0, "lcm")
    turbo = GenerationRequest("x", kind="turbo", steps=2).resolve(manifest)
    assert (turbo.steps, turbo.guidance_scale, turbo.sampler) == (2, 0.0, "euler_ancestral")


def test_kind_changes_the_schedule_and_is_recorded():
    from sdrt.runtime.pipeline import Pipeline
    from sdrt.runtime.request import GenerationRequest

    with Pipeline.load() as pipe:
        req = GenerationRequest("x", kind="turbo", seed=1).resolve(pipe.manifest)
        np.testing.assert_array_equal(pipe.schedule(req).timesteps, [999])  # trailing, as the turbo preset sets
        [image] = pipe.generate(req)
    assert "Model kind: turbo" in image.parameters and "CFG scale: 0" in image.parameters


def test_unknown_kind_is_a_request_error():
    from sdrt.bundle import read_manifest
    from sdrt.errors import RequestError
    from sdrt.runtime.pipeline import default_bundle
    from sdrt.runtime.request import GenerationRequest

    with pytest.raises(RequestError, match="unknown model kind 'fast'"):
        GenerationRequest("x", kind="fast").resolve(read_manifest(default_bundle()))
