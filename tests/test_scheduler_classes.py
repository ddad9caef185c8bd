"""The scheduler-class records against the installed diffusers: __init__ defaults, from_config, refusals."""
from __future__ import annotations

import inspect

import diffusers
import pytest
from test_samplers import SD15_CONFIG, diffusers_class

from sdrt.runtime.samplers import SAMPLERS, make_schedule, scheduler_for
from sdrt.runtime.scheduler_classes import REPRODUCED, SAMPLER_CHOSEN, SCHEDULER_CLASSES, scheduler_class

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

# Every config key diffusers' classes take, with a value other than its default that sdrt cannot reproduce.
UNREPRODUCED_VALUES = {
    "skip_prk_steps": True, "interpolation_type": "log_linear", "sigma_min": 0.1, "sigma_max": 10.0,
    "timestep_type": "continuous", "algorithm_type": "dpmsolver", "solver_type": "bh1", "use_lu_lambdas": True,
    "use_flow_sigmas": True, "flow_shift": 3.0, "lambda_min_clipped": -5.1, "variance_type": "learned_range",
    "use_dynamic_shifting": True, "time_shift_type": "linear", "predict_x0": False, "disable_corrector": [0],
    "solver_p": "x", "shift_terminal": 0.5, "timestep_scaling": 5.0,
}


def _as_tuples(d: dict) -> dict:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}


@pytest.mark.parametrize("name", list(SCHEDULER_CLASSES))
def test_defaults_are_the_installed_diffusers_init_defaults(name):
    """Key for key: a diffusers upgrade that adds, drops or changes a default fails here, not silently."""
    signature = inspect.signature(diffusers_class(name).__init__)
    expected = {k: p.default for k, p in signature.parameters.items() if k != "self"}
    assert _as_tuples(dict(SCHEDULER_CLASSES[name].defaults)) == _as_tuples(expected)


@pytest.mark.parametrize("name", list(SCHEDULER_CLASSES))
def test_order_is_diffusers(name):
    assert SCHEDULER_CLASSES[name].order == diffusers_class(name).order


@pytest.mark.parametrize("sampler", [n for n, s in SAMPLERS.items() if s.is_diffusers_scheduler])
def test_silent_config_resolves_as_from_config(sampler):
    """Every reproduced key of an empty config and of SD 1.5's takes the value diffusers' from_config gives."""
    name, options = scheduler_for(sampler)
    record = SCHEDULER_CLASSES[name]
    for config in ({}, SD15_CONFIG):
        reference = diffusers_class(name).from_config(config, **options).config
        resolved = record.resolve(config, options)
        for key in REPRODUCED & set(record.defaults) - SAMPLER_CHOSEN:
            value = getattr(resolved, key)
            assert value == (tuple(reference[key]) if key == "trained_betas" and value else reference[key]), key


def test_ddim_clips_on_a_config_saved_by_pndm():
    """issue 14: PNDMScheduler saves no clip_sample, so DDIMScheduler.from_config clips at its default 1.0."""
    pndm_saved = dict(diffusers.PNDMScheduler.from_config(SD15_CONFIG).config)
    pndm_saved.pop("clip_sample", None)
    resolved = scheduler_class("DDIMScheduler").resolve(pndm_saved)
    reference = diffusers.DDIMScheduler.from_config(pndm_saved).config
    assert (resolved.clip_sample, resolved.clip_sample_range) == (reference.clip_sample, 1.0) == (True, 1.0)
    assert make_schedule("DDIM", pndm_saved, 4).clamp_x0 is not None
    assert make_schedule("DDIM", SD15_CONFIG, 4).clamp_x0 is None  # SD 1.5's config says clip_sample: false


def test_keys_a_live_config_holds_only_by_default_are_dropped():
    """from_config skips `_use_default_values`: a DDIM config that took clip_sample=True by default hands an Euler...
    and back to DDIM its own default, not the value stored beside it."""
    live = {**SD15_CONFIG, "clip_sample": False, "_use_default_values": ["clip_sample"]}
    assert scheduler_class("DDIMScheduler").resolve(live).clip_sample is True
    assert diffusers.DDIMScheduler.from_config(live).config.clip_sample is True


def test_keys_a_class_lacks_have_no_effect():
    heun = scheduler_class("HeunDiscreteScheduler").resolve({**SD15_CONFIG, "thresholding": True,
                                                              "rescale_betas_zero_snr": True})
    assert not heun.thresholding and not heun.rescale_betas_zero_snr


def test_sampler_chosen_keys_are_never_read_from_a_config():
    resolved = scheduler_class("EulerDiscreteScheduler").resolve({**SD15_CONFIG, "use_karras_sigmas": True})
    assert resolved.sigma_kind() is None


@pytest.mark.parametrize("name", [n for n, s in SAMPLERS.items() if s.is_diffusers_scheduler])
def test_keys_sdrt_does_not_reproduce_are_refused_by_name(name):
    """Each such key of the sampler's class, set away from its default in a bundle's config, is refused by name,
    unless the sampler fixes it itself (its options: "DPM++ 2M" is dpmsolver++ whatever the config says)."""
    spec = SAMPLERS[name]
    record = scheduler_class(spec.scheduler)
    keys = set(record.defaults) - REPRODUCED - record.ignored - set(spec.options)
    assert keys <= set(UNREPRODUCED_VALUES), f"give {sorted(keys - set(UNREPRODUCED_VALUES))} a test value"
    for key in keys:
        with pytest.raises(ValueError, match=f"{record.name} with {key}="):
            make_schedule(name, {**SD15_CONFIG, key: UNREPRODUCED_VALUES[key]}, 4)
        assert make_schedule(name, {**SD15_CONFIG, key: record.defaults[key]}, 4).steps >= 4  # its default: fine
    for key in set(spec.options) & set(UNREPRODUCED_VALUES):  # the sampler's own choice wins
        assert make_schedule(name, {**SD15_CONFIG, key: UNREPRODUCED_VALUES[key]}, 4).steps >= 4


def test_ignored_keys_are_accepted():
    assert make_schedule("DPM++ SDE", {**SD15_CONFIG, "noise_sampler_seed": 7}, 4).steps == 7


def test_unknown_override_is_refused():
    with pytest.raises(ValueError, match="DDIMScheduler has no use_karras_sigmas"):
        scheduler_class("DDIMScheduler").resolve(SD15_CONFIG, {"use_karras_sigmas": True})


def test_x0_clamps_are_where_diffusers_has_them():
    """The classes whose step() or convert_model_output() clips or thresholds x0, and only they, take the keys."""
    def holders(key):
        return {n for n, r in SCHEDULER_CLASSES.items() if key in r.defaults}

    assert holders("clip_sample") == {"DDIMScheduler", "LCMScheduler", "HeunDiscreteScheduler"}
    assert holders("thresholding") == {"DDIMScheduler", "LCMScheduler", "DPMSolverMultistepScheduler",
                                       "UniPCMultistepScheduler", "DEISMultistepScheduler"}


def test_preset_kind_of_each_class():
    assert {n: r.kind for n, r in SCHEDULER_CLASSES.items() if r.kind != "standard"} == {"LCMScheduler": "lcm"}


def test_unknown_class_is_named():
    with pytest.raises(ValueError, match="unknown scheduler class 'DDPMScheduler'"):
        scheduler_class("DDPMScheduler")
