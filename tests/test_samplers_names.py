"""Sampler and schedule-type names: A1111 labels (combined or apart), k-diffusion and diffusers spellings."""
from __future__ import annotations

import pytest

from sdrt.runtime.samplers import (
    SAMPLERS, SCHEDULE_TYPES, resolve_sampler, sampler_label, schedule_label, schedule_types_for, scheduler_for,
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
    ],
)
def test_schedule_type_given_apart(sampler, schedule, canonical):
    assert resolve_sampler(sampler, schedule=schedule) == canonical


@pytest.mark.parametrize(
    "sampler, schedule, message",
    [
        ("Euler a Karras", None, "Euler a has no Karras schedule in diffusers"),
        ("LCM", "SGM Uniform", "LCM has no SGM Uniform"),
        ("DDIM", "Exponential", "offered: SGM Uniform"),
        ("DPM++ 2M Karras", "Exponential", "already names schedule type"),
        ("DPM++ 2M", "Polyexponential", "unknown schedule type"),
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
    assert sampler_label("DPM++ 2M", ) == "DPM++ 2M"
    assert sampler_label("euler_sgm_uniform") == "Euler SGM Uniform"
    assert schedule_label("dpmpp_2m_karras") == "Karras"
    assert schedule_label("dpmpp_2m") == "Automatic"
    for name in SAMPLERS:
        for schedule in schedule_types_for(name):
            canonical = resolve_sampler(name, schedule)
            assert resolve_sampler(sampler_label(canonical)) == canonical  # infotext labels parse back


def test_scheduler_for_combines_sampler_and_schedule_overrides():
    assert scheduler_for("DPM++ 2M SDE Karras") == (
        "DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "use_karras_sigmas": True}
    )
    assert scheduler_for("Euler SGM Uniform") == ("EulerDiscreteScheduler", {"timestep_spacing": "trailing"})
    assert set(SCHEDULE_TYPES) == {"karras", "exponential", "sgm_uniform"}
