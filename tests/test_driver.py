"""The one generation driver (sdrt.runtime.driver) and the Python API on top of it: iterations with continuing
seeds, step hooks that skip, interrupt or abandon, steps counted as sampler steps, prompt lists, diffusers'
argument names, images given as paths."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from sdrt.errors import RequestError
from sdrt.runtime.driver import INTERRUPT, SKIP, run
from sdrt.runtime.request import GenerationRequest

FAST = dict(steps=3, sampler="Euler", width=64, height=64, safety_checker=False, watermark=False)


def pixels(out) -> np.ndarray:
    return np.asarray(out.image, np.int16)


def test_iterations_continue_the_seeds_and_match_one_big_batch(sdrt_pipe):
    two_batches = list(run(sdrt_pipe, GenerationRequest("x", seed=5, batch_size=2, n_iter=2, **FAST)))
    one_batch = list(run(sdrt_pipe, GenerationRequest("x", seed=5, batch_size=4, **FAST)))
    assert [o.seed for o in two_batches] == [5, 6, 7, 8] == [o.seed for o in one_batch]
    for a, b in zip(two_batches, one_batch):
        assert np.abs(pixels(a) - pixels(b)).max() <= 1  # image i depends on seed + i only
        assert "Seed: " + str(a.seed) in a.parameters


def test_the_resolved_request_is_what_every_step_sees(sdrt_pipe):
    req = GenerationRequest("x", seed=None, **FAST).resolve(sdrt_pipe.manifest)
    assert req.resolve(sdrt_pipe.manifest) is req  # resolved once
    outs = list(run(sdrt_pipe, req))
    assert outs[0].seed == req.seed and f"Seed: {req.seed}," in outs[0].parameters


def test_random_seed_minus_one(sdrt_pipe):
    seeds = {GenerationRequest("x", seed=-1, **FAST).resolve(sdrt_pipe.manifest).seed for _ in range(4)}
    assert len(seeds) > 1 and all(0 <= s < 2**32 for s in seeds)


def test_interrupt_decodes_the_current_latents_and_stops(sdrt_pipe):
    seen = []

    def hook(progress):
        seen.append((progress.iteration, progress.step))
        return INTERRUPT if progress.step == 1 else None

    outs = list(run(sdrt_pipe, GenerationRequest("x", seed=1, n_iter=3, **FAST), hook))
    full = list(run(sdrt_pipe, GenerationRequest("x", seed=1, **FAST)))
    assert seen == [(0, 1)] and len(outs) == 1  # stopped after one step of the first batch, decoded
    assert np.abs(pixels(outs[0]) - pixels(full[0])).max() > 10  # a partly denoised image, not the finished one


def test_skip_ends_one_iteration_and_goes_on(sdrt_pipe):
    steps = []

    def hook(progress):
        steps.append((progress.iteration, progress.step))
        return SKIP if progress.iteration == 0 and progress.step == 1 else None

    outs = list(run(sdrt_pipe, GenerationRequest("x", seed=1, n_iter=2, **FAST), hook))
    assert [o.seed for o in outs] == [1, 2]
    assert steps == [(0, 1), (1, 1), (1, 2), (1, 3)]


def test_a_hook_that_raises_abandons_the_run(sdrt_pipe):
    class Gone(Exception):
        pass

    def hook(progress):
        raise Gone

    images = run(sdrt_pipe, GenerationRequest("x", seed=1, **FAST), hook)
    with pytest.raises(Gone):
        next(images)


@pytest.mark.parametrize("sampler, calls", [("Euler", 3), ("Heun", 5), ("DPM2", 5), ("PLMS", 4)])
def test_progress_counts_sampler_steps_not_model_calls(sdrt_pipe, sampler, calls):
    seen = []
    request = GenerationRequest("x", seed=1, **{**FAST, "sampler": sampler})
    list(run(sdrt_pipe, request, lambda p: seen.append(p)))
    assert len(seen) == calls  # the hook sees every model call...
    assert [p.steps for p in seen] == [3] * calls  # ...counted in sampler steps
    assert seen[-1].step == 3 and seen[-1].fraction == 1.0
    assert [p.step for p in seen] == sorted(p.step for p in seen)


def test_a_list_of_prompts_is_one_batch_prompt_major(sdrt_pipe):
    outs = sdrt_pipe.generate(["a red circle", "a blue square"], negative_prompt=["ugly", "blurry"],
                              num_images_per_prompt=2, seed=3, **FAST)
    assert [o.seed for o in outs] == [3, 4, 5, 6]
    prompts = [o.parameters.split("\n")[:2] for o in outs]
    assert prompts == [["a red circle", "Negative prompt: ugly"]] * 2 + [["a blue square", "Negative prompt: blurry"]] * 2
    single = sdrt_pipe.generate("a blue square", negative_prompt="blurry", seed=5, **FAST)[0]
    assert np.abs(pixels(single) - pixels(outs[2])).max() <= 1  # same prompt, same seed: same image


def test_diffusers_names_and_paths(sdrt_pipe, tmp_path):
    init = tmp_path / "init.png"
    Image.fromarray(np.full((64, 64, 3), 200, np.uint8)).save(init)
    by_path = sdrt_pipe.generate("x", image=str(init), strength=0.5, num_inference_steps=4, seed=2,
                                 safety_checker=False, watermark=False)[0]
    by_image = sdrt_pipe.generate("x", init_image=Image.open(init), strength=0.5, steps=4, seed=2,
                                  safety_checker=False, watermark=False)[0]
    np.testing.assert_array_equal(pixels(by_path), pixels(by_image))


@pytest.mark.parametrize("kwargs, message", [
    ({"generator": object()}, "does not take diffusers' generator: use seed=N"),
    ({"output_type": "np"}, "does not take diffusers' output_type"),
    ({"num_steps": 3}, "unknown argument 'num_steps'; request fields are: "),
    ({"steps": 3, "num_inference_steps": 4}, "got 'steps' twice"),
    ({"callback": 3}, "callback must be callable"),
    ({"init_image": "/nonexistent.png"}, "cannot read the init image /nonexistent.png"),
])
def test_wrong_arguments_name_the_sdrt_way(sdrt_pipe, kwargs, message):
    with pytest.raises(RequestError, match=message.replace("(", r"\(").replace("?", r"\?")):
        sdrt_pipe.generate("x", **kwargs)


def test_a_callback_returning_true_stops(sdrt_pipe):
    calls = []
    sdrt_pipe.generate("x", seed=1, callback=lambda p: calls.append(p.step) or True, **FAST)
    assert calls == [1]


def test_a_generated_image_saves_with_its_parameters(sdrt_pipe, tmp_path):
    from sdrt.runtime.outputs import read_parameters

    out = sdrt_pipe.generate("a red circle", seed=4, **FAST)[0]
    for name in ("a.png", "a.jpg"):
        path = out.save(tmp_path / name)
        assert read_parameters(path) == out.parameters


def test_request_errors_are_value_errors():
    assert issubclass(RequestError, ValueError)
