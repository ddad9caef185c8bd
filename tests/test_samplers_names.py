"""Sampler and schedule-type names: A1111 labels (combined or apart), k-diffusion and diffusers spellings."""
from __future__ import annotations

import pytest

from sdrt.runtime.samplers import (
    SAMPLERS, SCHEDULE_TYPES, resolve_sampler, sampler_for_config, sampler_label, sampler_name, schedule_label,
    schedule_source, schedule_types_for, scheduler_for,
)


@pytest.mark.parametrize(
    "label, canonical",
    [
        ("PNDM", "pndm"), ("PLMS", "pndm"), ("DDIM", "ddim"), ("Euler", "euler"), ("k_euler", "euler"),
        ("Euler a", "euler_ancestral"), ("euler_a", "euler_ancestral"), ("k_euler_a", "euler_ancestral"),
        ("LMS", "lms"), ("LMS Karras", "lms_karras"), ("DPM++ 2M", "dpmpp_2m"), ("dpmpp_2m", "dpmpp_2m"),
        ("DPM++ 2M Karras", "dpmpp_2m_karras"), ("dpmpp_2m_karras", "dpmpp_2m_karras"),
        ("EulerDiscreteScheduler", "euler"), ("Heun", "heun"), ("k_heun", "heun"), ("DPM2", "dpm_2"),
        ("dpm_2", "dpm_2"), ("DPM2 a", "dpm_2_ancestral"), ("k_dpm_2_a", "dpm_2_ancestral"),
        ("DPM2 a Karras", "dpm_2_ancestral_karras"), ("DPM++ 2S a", "dpmpp_2s_ancestral"),
        ("k_dpmpp_2s_a", "dpmpp_2s_ancestral"), ("DPM++ 2S a Karras", "dpmpp_2s_ancestral_karras"),
        ("DPM++ SDE", "dpmpp_sde"), ("DPM++ SDE Karras", "dpmpp_sde_karras"), ("DPM++ 2M SDE", "dpmpp_2m_sde"),
        ("DPM++ 2M SDE Karras", "dpmpp_2m_sde_karras"), ("DPM++ 2M SDE Exponential", "dpmpp_2m_sde_exponential"),
        ("DPM++ 2M SDE Heun", "dpmpp_2m_sde_heun"), ("DPM++ 2M SDE Heun Karras", "dpmpp_2m_sde_heun_karras"),
        ("UniPC", "unipc"), ("UniPCMultistepScheduler", "unipc"), ("DEIS", "deis"), ("LCM", "lcm"),
        ("Euler SGM Uniform", "euler_sgm_uniform"), ("euler_sgm_uniform", "euler_sgm_uniform"),
        ("DDIM SGM Uniform", "ddim_sgm_uniform"), ("dpm++ 2m|karras", "dpmpp_2m_karras"),
        ("KDPM2AncestralDiscreteScheduler", "dpm_2_ancestral"),  # not DPM++ 2S a, which only borrows its schedule
    ],
)
def test_resolve_sampler_aliases(label, canonical):
    assert resolve_sampler(label) == canonical
    assert resolve_sampler(canonical) == canonical  # canonical names round-trip (requests store them)


@pytest.mark.parametrize(
    "sampler, schedule, canonical",
    [
        ("DPM++ 2M", "Karras", "dpmpp_2m_karras"), ("DPM++ 2M", "Automatic", "dpmpp_2m"), ("Euler", None, "euler"),
        ("Euler a", "SGM Uniform", "euler_ancestral_sgm_uniform"), ("UniPC", "exponential", "unipc_exponential"),
        ("DPM++ 2M Karras", "Karras", "dpmpp_2m_karras"), ("DPM++ 2M Karras", "automatic", "dpmpp_2m_karras"),
        ("Euler a", "Karras", "euler_ancestral_karras"), ("DPM++ 2M", "Polyexponential", "dpmpp_2m_polyexponential"),
        ("Heun", "KL Optimal", "heun_kl_optimal"), ("DPM2", "Align Your Steps", "dpm_2_align_your_steps"),
        ("Euler", "DDIM", "euler_ddim"), ("LMS", "SGMUniform", "lms_sgm_uniform"), ("UniPC", "Beta", "unipc_beta"),
    ],
)
def test_schedule_type_given_apart(sampler, schedule, canonical):
    assert resolve_sampler(sampler, schedule=schedule) == canonical


@pytest.mark.parametrize(
    "sampler, schedule, message",
    [
        ("UniPC KL Optimal", None, "UniPC has no KL Optimal schedule"),
        ("LCM", "SGM Uniform", "LCM has no SGM Uniform"),
        ("DDIM", "Exponential", "offered: SGM Uniform"),
        ("DPM++ 2M Karras", "Exponential", "already names schedule type"),
        ("DPM++ 2M", "Karras Exponential", "unknown schedule type"),
        ("DPM++ 3M SDE", None, "unknown sampler"),
    ],
)
def test_refused_names_say_why(sampler, schedule, message):
    with pytest.raises(ValueError, match=message):
        resolve_sampler(sampler, schedule=schedule)


def test_unknown_sampler_lists_valid_names():
    with pytest.raises(ValueError) as info:
        resolve_sampler("DPM++ 3M SDE")
    for name, spec in SAMPLERS.items():
        assert repr(name) in str(info.value) and repr(spec.label) in str(info.value)


def test_labels():
    assert sampler_label("dpmpp_2m_karras") == "DPM++ 2M Karras"
    assert sampler_name("dpmpp_2m_karras") == "DPM++ 2M"  # A1111 1.9+'s "Sampler" field
    assert sampler_name("Euler a KL Optimal") == "Euler a" and schedule_label("Euler a KL Optimal") == "KL Optimal"
    assert sampler_label("DPM++ 2M", ) == "DPM++ 2M"
    assert sampler_label("euler_sgm_uniform") == "Euler SGM Uniform"
    assert schedule_label("dpmpp_2m_karras") == "Karras"
    assert schedule_label("dpmpp_2m") == "Automatic"
    for name in SAMPLERS:
        for schedule in schedule_types_for(name):
            canonical = resolve_sampler(name, schedule)
            assert resolve_sampler(sampler_label(canonical)) == canonical  # infotext labels parse back


def test_scheduler_for_combines_sampler_and_schedule_overrides():
    assert scheduler_for("DPM++ 2M SDE Karras") == ("DPMSolverMultistepScheduler", {
        "algorithm_type": "sde-dpmsolver++", "solver_type": "midpoint", "solver_order": 2, "use_karras_sigmas": True})
    assert scheduler_for("Euler SGM Uniform") == ("EulerDiscreteScheduler", {"timestep_spacing": "trailing"})
    with pytest.raises(ValueError, match="runs A1111's Karras schedule"):
        scheduler_for("Euler a Karras")  # EulerAncestralDiscreteScheduler has no Karras sigmas


def test_schedule_types_are_a1111s():
    """A1111 1.9+'s list (modules/sd_schedulers.py), in its order."""
    assert [t.label for t in SCHEDULE_TYPES.values()] == [
        "Uniform", "Karras", "Exponential", "Polyexponential", "SGM Uniform", "KL Optimal", "Align Your Steps",
        "Simple", "Normal", "DDIM", "Beta"]


@pytest.mark.parametrize("name, source", [
    ("DPM++ 2M Karras", "diffusers"), ("Euler a Karras", "a1111"), ("Euler a Beta", "a1111"),
    ("Heun Beta", "diffusers"), ("Euler SGM Uniform", "diffusers"), ("Euler Uniform", "a1111"), ("DDIM", "diffusers"),
    ("DPM++ 2S a Normal", "a1111"),
])
def test_schedule_source(name, source):
    """A schedule type is diffusers' where the sampler's class has it (parity tests), A1111's otherwise."""
    assert schedule_source(name) == source


def test_diffusers_only_samplers_keep_what_diffusers_offers():
    for name in ("pndm", "ddim", "unipc", "deis", "lcm"):
        assert all(schedule_source(resolve_sampler(name, t)) == "diffusers" for t in schedule_types_for(name)), name


@pytest.mark.parametrize("config, sampler", [
    ({"_class_name": "PNDMScheduler"}, "pndm"),
    ({"_class_name": "DPMSolverMultistepScheduler"}, "dpmpp_2m"),
    ({"_class_name": "DPMSolverMultistepScheduler", "algorithm_type": "sde-dpmsolver++"}, "dpmpp_2m_sde"),
    ({"_class_name": "DPMSolverMultistepScheduler", "algorithm_type": "sde-dpmsolver++", "solver_type": "heun"},
     "dpmpp_2m_sde_heun"),
    ({"_class_name": "DPMSolverMultistepScheduler", "use_karras_sigmas": True}, "dpmpp_2m_karras"),
    ({"_class_name": "DDIMScheduler", "use_karras_sigmas": True}, "ddim"),  # DDIM has no Karras sigmas
    ({"_class_name": "KDPM2AncestralDiscreteScheduler"}, "dpm_2_ancestral"),
])
def test_sampler_for_config(config, sampler):
    """A bundle's own scheduler: the class's sampler whose algorithm options its config agrees with."""
    assert sampler_for_config(config) == sampler
