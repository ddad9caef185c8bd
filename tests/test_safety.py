"""The safety checker as the optional safety_checker component: against diffusers' StableDiffusionSafetyChecker,
and the numpy preprocessing against transformers' CLIPImageProcessor."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image

from sdrt.runtime.safety import ClipPreprocess, SafetyChecker, blacken

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("onnxruntime")

from diffusers.pipelines.stable_diffusion.safety_checker import cosine_distance  # noqa: E402
from transformers import CLIPImageProcessor  # noqa: E402

from sdrt.backends.onnxruntime import OnnxRuntimeBackend  # noqa: E402
from sdrt.bundle import MANIFEST, read_manifest, verify_files  # noqa: E402
from sdrt.cli import main  # noqa: E402
from sdrt.contracts import safety_checker_contract  # noqa: E402
from sdrt.errors import ExportError  # noqa: E402
from sdrt.export.exporter import export_component  # noqa: E402
from sdrt.export.safety import (  # noqa: E402
    SAFETY_TOLERANCE,
    SPECIAL_CARE_ADJUSTMENT,
    load_safety_checker,
    read_preprocess,
    safety_spec,
)
from sdrt.runtime.pipeline import Pipeline  # noqa: E402
from tiny_models import SAFETY_IMAGE_SIZE, build_tiny_safety_checker, tiny_feature_extractor  # noqa: E402

# ONNX Runtime against torch on the scores (cosine minus threshold): the export's own tolerance. Flags: equal.
SCORE_TOL = SAFETY_TOLERANCE
# numpy + Pillow against CLIPImageProcessor's PIL backend: the same PIL resize and the same float64 -> float32 steps,
# so equal up to float32 rounding (measured 0.0).
PIXEL_TOL = 1e-6
# Margins of the tuned thresholds below: far from the rounding step (5e-4) and from ORT-vs-torch noise (1e-7).
BAND_SCORE = 2e-4  # a score diffusers' forward rounds to 0.000 (not flagged) and forward_onnx counts (flagged)
MISS = 5e-3  # below the threshold by less than the special-care adjustment (0.01): flagged only with it
# Each tuned image keeps a direction of its own with at least this cosine, so that a threshold at half of it stays
# clear of the other images' scores (0) even when special care adds 0.01 to them: 0.03 / 2 > 0.01 + 5e-4.
MIN_OWN_COSINE = 0.03
S = SAFETY_IMAGE_SIZE


def _pngs(folder) -> list[Image.Image]:
    """Real PNG files, reopened: landscape, portrait, exact size, transparent, palette with tRNS, tiny grey."""
    rng = np.random.default_rng(0)
    gradient = np.linspace(0, 255, 97 * 61 * 3).reshape(61, 97, 3).astype(np.uint8)
    rgba = rng.integers(0, 256, (70, 40, 4), dtype=np.uint8)
    palette = Image.fromarray(rng.integers(0, 256, (45, 45, 3), dtype=np.uint8)).convert("P", palette=1, colors=16)
    images = {
        "gradient.png": Image.fromarray(gradient),
        "noise.png": Image.fromarray(rng.integers(0, 256, (130, 50, 3), dtype=np.uint8)),
        "checker.png": Image.fromarray((np.indices((S, S)).sum(0) % 2 * 255).astype(np.uint8)).convert("RGB"),
        "alpha.png": Image.fromarray(rgba, "RGBA"),
        "palette.png": palette,
        "grey.png": Image.fromarray(rng.integers(0, 256, (20, 20), dtype=np.uint8), "L"),
    }
    for name, image in images.items():
        options = {"transparency": 3} if image.mode == "P" else {}  # a palette entry marked transparent (tRNS)
        image.save(folder / name, **options)
    return [Image.open(folder / name) for name in images]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return _pngs(tmp_path_factory.mktemp("pngs"))


@pytest.fixture(scope="module")
def extractor_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("feature_extractor")
    tiny_feature_extractor().save_pretrained(path)
    return path


def _clip_input(images, folder=None) -> torch.Tensor:
    processor = CLIPImageProcessor.from_pretrained(folder) if folder else tiny_feature_extractor()
    return processor(images, return_tensors="pt").pixel_values


def _embeds(checker, clip_input: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return checker.visual_projection(checker.vision_model(clip_input).pooler_output)


# --- the decision against diffusers -------------------------------------------------------------------------------

def _own_direction(embeds: torch.Tensor, i: int) -> torch.Tensor:
    """The part of image i's embedding orthogonal to every other image's: cosine 0 with the others."""
    others = torch.cat([embeds[:i], embeds[i + 1:]])
    q, _ = torch.linalg.qr(others.T.double())
    e = embeds[i].double()
    return (e - q @ (q.T @ e)).float()


def tuned_checker(clip_input: torch.Tensor):
    """A tiny checker whose concepts flag image 0 directly, image 1 only through special care (+0.01), and give
    image 2 a score in diffusers' rounding band; images 3.. score below every threshold."""
    checker = build_tiny_safety_checker()
    e = _embeds(checker, clip_input)
    own = [_own_direction(e, i) for i in range(3)]
    with torch.no_grad():
        checker.concept_embeds[0], checker.special_care_embeds[0] = own[0], own[1]
        checker.concept_embeds[1], checker.concept_embeds[2] = own[1], own[2]
        cos = [cosine_distance(e[i:i + 1], own[i][None])[0, 0] for i in range(3)]
        assert min(cos) > MIN_OWN_COSINE, cos
        checker.concept_embeds_weights[0] = cos[0] / 2
        checker.special_care_embeds_weights[0] = cos[1] / 2
        checker.concept_embeds_weights[1] = cos[1] + MISS
        checker.concept_embeds_weights[2] = cos[2] - BAND_SCORE
    return checker


def _expected_scores(checker, clip_input: torch.Tensor, special_care: list[bool]):
    """Cosine minus threshold with diffusers' cosine_distance; the concepts' raised by 0.01 where special care."""
    e = _embeds(checker, clip_input)
    with torch.no_grad():
        special = cosine_distance(e, checker.special_care_embeds) - checker.special_care_embeds_weights
        concept = cosine_distance(e, checker.concept_embeds) - checker.concept_embeds_weights
    adjustment = SPECIAL_CARE_ADJUSTMENT * np.array(special_care, np.float32)[:, None]
    return concept.numpy() + adjustment, special.numpy()


FLAGGED = [True, True, False, False, False, False]  # image 0 directly, image 1 through special care
SPECIAL_CARE = [False, True, False, False, False, False]


@pytest.fixture(scope="module")
def tuned(images, extractor_dir, tmp_path_factory):
    """The tuned checker exported alone: (folder, component, torch checker, CLIPImageProcessor's clip_input)."""
    clip_input = _clip_input(images, extractor_dir)
    checker = tuned_checker(clip_input)
    root = tmp_path_factory.mktemp("tuned")
    component = export_component(safety_spec(checker, read_preprocess(extractor_dir)), root, 17, 8)
    return root, component, checker, clip_input


def test_exported_checker_decides_as_diffusers(images, tuned):
    root, component, checker, clip_input = tuned
    with torch.no_grad():
        _, want = checker(clip_input=clip_input, images=np.ones((len(images), 4, 4, 3)))  # the pipeline's forward
        _, onnx_form = checker.forward_onnx(clip_input, torch.ones(len(images), 3, 4, 4))
    assert want == FLAGGED
    assert onnx_form.tolist() == [True, True, True, False, False, False]  # no rounding: the band image counts

    assert component.validation["max_abs_error"] <= SAFETY_TOLERANCE
    safety = SafetyChecker.from_pipeline_session(OnnxRuntimeBackend().load(root, component), component)
    got = safety.scores(images)
    assert got["has_nsfw_concept"].dtype == np.bool_
    assert safety.check(images) == want
    concept, special = _expected_scores(checker, clip_input, SPECIAL_CARE)
    assert np.abs(got["concept_scores"] - concept).max() <= SCORE_TOL
    assert np.abs(got["special_scores"] - special).max() <= SCORE_TOL
    assert abs(got["concept_scores"][2, 2] - BAND_SCORE) <= SCORE_TOL


@pytest.mark.parametrize("options", [{}, {"hint": "throughput", "streams": 2}], ids=["latency", "split-batch"])
def test_openvino_runs_the_bool_output(images, tuned, options):
    ov_backend = pytest.importorskip("sdrt.backends.openvino")
    root, component, checker, clip_input = tuned
    backend = ov_backend.OpenVinoBackend(precision="f32", cache=False, **options)
    got = SafetyChecker.from_pipeline_session(backend.load(root, component), component).scores(images)
    assert got["has_nsfw_concept"].dtype == np.bool_ and got["has_nsfw_concept"].tolist() == FLAGGED
    concept, _ = _expected_scores(checker, clip_input, SPECIAL_CARE)
    assert np.abs(got["concept_scores"] - concept).max() <= SCORE_TOL


def test_openvino_keeps_the_checker_in_f32_whatever_the_backend_precision(images, tuned, tiny_sd1_safety_bundle):
    # A bf16 checker moves scores by ~1e-2 (measured), enough to flip decisions near a threshold.
    ov_backend = pytest.importorskip("sdrt.backends.openvino")
    root, component, checker, clip_input = tuned
    assert read_manifest(tiny_sd1_safety_bundle).components["safety_checker"].contract.full_precision
    assert not read_manifest(tiny_sd1_safety_bundle).components["unet"].contract.full_precision
    session = ov_backend.OpenVinoBackend(precision="bf16", cache=False).load(root, component)
    got = SafetyChecker.from_pipeline_session(session, component).scores(images)
    compiled = session._requests[0].get_compiled_model()
    assert ov_backend._type_name(compiled.get_property("INFERENCE_PRECISION_HINT")) == "f32"
    assert got["has_nsfw_concept"].tolist() == FLAGGED
    concept, _ = _expected_scores(checker, clip_input, SPECIAL_CARE)
    assert np.abs(got["concept_scores"] - concept).max() <= SCORE_TOL


def test_bundle_checks_images_through_the_pipeline(tiny_sd1_safety_bundle, tiny_sd1_safety_dir, images):
    manifest = read_manifest(tiny_sd1_safety_bundle)
    verify_files(tiny_sd1_safety_bundle, manifest)
    component = manifest.components["safety_checker"]
    assert set(manifest.components) == {"text_encoder", "unet", "vae_decoder", "vae_encoder", "safety_checker"}
    assert component.contract == safety_checker_contract(S)
    assert component.preprocess == read_preprocess(tiny_sd1_safety_dir / "feature_extractor").to_dict()
    assert component.validation["max_abs_error"] <= SAFETY_TOLERANCE
    checker, _ = load_safety_checker(tiny_sd1_safety_dir)
    clip_input = _clip_input(images, tiny_sd1_safety_dir / "feature_extractor")
    with torch.no_grad():
        _, want = checker(clip_input=clip_input, images=np.ones((len(images), 4, 4, 3)))
    with Pipeline.load(tiny_sd1_safety_bundle) as pipe:
        safety = SafetyChecker.from_pipeline_session(pipe.session("safety_checker"), component)
        got = safety.scores(images)
    assert got["has_nsfw_concept"].tolist() == want == [False] * len(images)  # thresholds 1.0: nothing flagged
    concept, special = _expected_scores(checker, clip_input, [False] * len(images))
    assert np.abs(got["concept_scores"] - concept).max() <= SCORE_TOL
    assert np.abs(got["special_scores"] - special).max() <= SCORE_TOL


def test_old_bundle_without_the_preprocess_record_still_loads(tiny_sd1_safety_bundle, images, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(tiny_sd1_safety_bundle, old)
    data = json.loads((old / MANIFEST).read_text())
    del data["components"]["safety_checker"]["preprocess"]
    (old / MANIFEST).write_text(json.dumps(data))
    assert all("preprocess" not in c for c in data["components"].values())
    with Pipeline.load(old) as pipe, Pipeline.load(tiny_sd1_safety_bundle) as recorded:
        component = pipe.manifest.components["safety_checker"]
        assert component.preprocess == {}
        safety = SafetyChecker.from_pipeline_session(pipe.session("safety_checker"), component)
        # CLIPImageProcessor's defaults at the contract's size: what the tiny (and SD's) feature extractor records.
        assert safety.preprocess == ClipPreprocess.for_size(S)
        reference = SafetyChecker.from_pipeline_session(
            recorded.session("safety_checker"), recorded.manifest.components["safety_checker"])
        assert reference.preprocess == safety.preprocess
        np.testing.assert_array_equal(safety.scores(images)["concept_scores"],
                                      reference.scores(images)["concept_scores"])


def test_export_without_the_safety_checker(tiny_sd1_safety_dir, tmp_path, capsys):
    out = tmp_path / "bundle"
    assert main(["export", str(tiny_sd1_safety_dir), "-o", str(out), "--no-safety-checker"]) == 0
    manifest = read_manifest(out)
    assert set(manifest.components) == {"text_encoder", "unet", "vae_decoder", "vae_encoder"}
    assert not (out / "safety_checker").exists()
    assert "safety_checker" not in capsys.readouterr().out


def test_components_without_preprocessing_write_no_record(tiny_sd1_bundle):
    data = json.loads((tiny_sd1_bundle / MANIFEST).read_text())
    assert "safety_checker" not in data["components"]
    assert all("preprocess" not in c for c in data["components"].values())


def test_safety_checker_without_feature_extractor_is_refused(tmp_path):
    build_tiny_safety_checker().save_pretrained(tmp_path / "safety_checker")
    with pytest.raises(ExportError, match="no feature_extractor/preprocessor_config.json"):
        load_safety_checker(tmp_path)
    assert load_safety_checker(tmp_path / "elsewhere") is None


def test_feature_extractor_of_another_size_is_refused(tmp_path):
    tiny_feature_extractor(S * 2).save_pretrained(tmp_path)
    with pytest.raises(ExportError, match="takes 32"):
        safety_spec(build_tiny_safety_checker(), read_preprocess(tmp_path))


# --- preprocessing against CLIPImageProcessor ---------------------------------------------------------------------

# SD 1.x's feature_extractor/preprocessor_config.json (CLIPFeatureExtractor era: sizes as plain ints).
LEGACY_SD1 = {
    "crop_size": 224, "do_center_crop": True, "do_convert_rgb": True, "do_normalize": True, "do_resize": True,
    "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711], "resample": 3, "size": 224,
}
PROCESSORS = {
    "tiny": {"size": {"shortest_edge": S}, "crop_size": {"height": S, "width": S}},
    "clip-defaults": {},
    "crop-larger-than-resize": {"size": {"shortest_edge": 24}, "crop_size": {"height": 32, "width": 40}},
    "fixed-size-no-crop": {"size": {"height": 40, "width": 30}, "do_center_crop": False, "resample": 2},
    "no-resize": {"do_resize": False, "crop_size": {"height": 16, "width": 16}, "image_mean": [0.5] * 3},
}


def _saved(tmp_path, name: str):
    if name == "legacy-sd1":
        (tmp_path / "preprocessor_config.json").write_text(json.dumps(LEGACY_SD1))
    else:
        CLIPImageProcessor(**PROCESSORS[name]).save_pretrained(tmp_path)
    return tmp_path


@pytest.mark.parametrize("name", [*PROCESSORS, "legacy-sd1"])
def test_preprocessing_matches_clip_image_processor(images, tmp_path, name):
    folder = _saved(tmp_path, name)
    processor = CLIPImageProcessor.from_pretrained(folder)
    preprocess = ClipPreprocess.from_dict(json.loads(json.dumps(read_preprocess(folder).to_dict())))
    for image in images:
        want = processor(image, return_tensors="np").pixel_values
        got = preprocess([image])
        assert got.dtype == np.float32 and got.shape == want.shape, (got.shape, want.shape)
        assert np.abs(got - want).max() <= PIXEL_TOL, image.mode


def test_legacy_sizes_read_as_clip_defaults(tmp_path):
    assert read_preprocess(_saved(tmp_path, "legacy-sd1")) == ClipPreprocess()


# --- black images and the torch-free runtime ----------------------------------------------------------------------

def test_blacken_replaces_flagged_images_only():
    images = [Image.new("RGB", (5, 3), (200, 10, 30)), Image.new("RGB", (7, 9), (1, 2, 3))]
    out = blacken(images, [True, False])
    assert out[0].size == (5, 3) and out[0].mode == "RGB" and not np.asarray(out[0]).any()
    assert out[1] is images[1]
    with pytest.raises(ValueError, match="one flag per image"):
        blacken(images, [True])


TORCH_FREE = textwrap.dedent(
    """
    import importlib.abc, sys
    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in {{"torch", "diffusers", "transformers"}}:
                raise ImportError(name + " is blocked")
    sys.meta_path.insert(0, Block())
    from PIL import Image
    from sdrt.runtime.pipeline import Pipeline
    from sdrt.runtime.safety import SafetyChecker
    with Pipeline.load({bundle!r}) as pipe:
        safety = SafetyChecker.from_pipeline_session(pipe.session("safety_checker"),
                                                     pipe.manifest.components["safety_checker"])
        print("FLAGS", safety.check([Image.new("RGB", (48, 40), (9, 99, 199))]))
    """
)


def test_checker_runs_with_torch_blocked(tiny_sd1_safety_bundle):
    script = TORCH_FREE.format(bundle=str(tiny_sd1_safety_bundle))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "FLAGS [False]" in proc.stdout
