"""Convert an ONNX bundle to OpenVINO IR (fp32, or int8 by NNCF), gated by image PSNR; needs no torch."""
from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass, replace
from pathlib import Path

from sdrt.backends import get_backend
from sdrt.backends.onnx_file import OnnxFile
from sdrt.bundle import BundleWriter, Component, Manifest
from sdrt.errors import ExportError
from sdrt.export.convert import (
    GATE_REQUEST, RecordingBackend, check_gate, check_image_psnr, copy_tables, copy_tokenizer, open_onnx_source,
    provenance, reference_backend, tool_versions,
)
from sdrt.runtime.pipeline import Pipeline
from sdrt.runtime.request import GenerationRequest
from sdrt.weights_map import MAP_FILE, WeightsMap, derive_onnx_map, read_weights_map

log = logging.getLogger(__name__)

TARGET = "openvino"
IR_NAME = "openvino_model.xml"  # the .bin of weights sits beside it, as optimum-intel names them
WEIGHTS = ("fp32", "int8")
# Precision labels in the manifest: weights compressed to int8 (activations float), or weights and activations.
INT8_WEIGHTS, INT8_QUANTIZED = "int8-weights", "int8"
# Components int8 compresses. The VAE stays fp32: it is <5% of SD's weights, so int8 saves little, and its errors
# land directly on pixels instead of being corrected by later denoising steps.
INT8_COMPONENTS = ("text_encoder", "unet")
# Operations whose inputs the quantized UNet keeps float besides the layers a scheme names (see quantize_int8).
UNQUANTIZED_TYPES = ["ScaledDotProductAttention", "Interpolate", "Add", "Multiply", "Concat"]


@dataclass(frozen=True)
class QuantizationScheme:
    """Which UNet layers take int8 activations (and int8 weights with per-channel scales) under --quantize-unet:
    the convolutions reading a SiLU always, and the MatMuls whose names match `matmuls` (a regex).

    `smooth_quant`: NNCF's SmoothQuant on those MatMuls (its default for transformers). It rescales a weight per
    input channel and divides the input by the same factors, so the IR's weight is W / s: LoRA deltas still apply
    (the backend reads and writes through s), but int8's rounding error is multiplied by s on the way back and the
    weight no longer matches the ONNX weight within one int8 step, which the weights map's check requires (on
    full-size SD 1.5 the check failed with it). Off in the schemes sdrt uses; bundles converted before have it.
    """

    name: str
    matmuls: str | None = None
    smooth_quant: bool = False


# Tried in order until the gate image passes (each try costs one UNet quantization and one gate image). The
# feed-forward input projection (GEGLU, 8 C^2 of a transformer block's 18 C^2 linear MACs per token) is the one
# linear layer that takes int8 well: on the shipped model, over 16 held-out images (benchmarks/quant_quality.py),
# int8 on SiLU->conv gives a mean 31.8 dB against fp32, adding ff/net.0 30.6 dB, adding both feed-forward layers
# 24.9 dB (for scale: computing the fp32 model in bf16 gives 37.1; all measured with SmoothQuant on, not yet again
# without it). ff/net.0 saves 2-3 % of a 512x512 step.
QUANTIZATION_SCHEMES = (
    QuantizationScheme("SiLU->convolution and feed-forward projection inputs", r"/ff/net\.0/proj/MatMul$"),
    QuantizationScheme("SiLU->convolution inputs"),
)

# Minimum PSNR of the gate image against the reference, in dB. fp32: the bound Apple's ml-stable-diffusion
# tests hold two runtimes' images of one prompt and seed to (ABSOLUTE_MIN_PSNR = 35), which issue 5 adopts.
# int8: 30 dB (RMS error 8/255) is the low end of what 8-bit lossy image compression is considered acceptable
# at (typical range 30-50 dB); a weight change may not cost more than a visible-but-faithful JPEG would.
MIN_PSNR_DB = {"fp32": 35.0, "int8": 30.0}
INT8_MIN_PSNR_DB = MIN_PSNR_DB["int8"]
# Prompts whose denoising trajectories calibrate a quantized UNet's activation ranges (seeds follow the gate's):
# 4 x 12 steps = 48 UNet inputs. On the shipped model, recorded in f32, 1-3 prompts gave a 35.2 dB gate image and
# 4-6 gave 37.4 dB (35.0 with 4 recorded in bf16, as collect_unet_inputs does); each prompt costs 12 UNet calls to
# record and 12 to collect statistics (minutes at 512x512 on a small CPU).
CALIBRATION_PROMPTS = (
    "a green triangle on a white background", "two yellow stars", "a large purple square, small orange circle",
    "blue and red stripes",
)


def convert_bundle(
    src: Path | str,
    out: Path | str,
    *,
    weights: str = "fp32",
    quantize_unet: bool = False,
    overwrite: bool = False,
    psnr_gate: float | None = None,
    request: GenerationRequest = GATE_REQUEST,
) -> Manifest:
    """Convert the ONNX bundle `src` to an OpenVINO bundle at `out`; refuse (writing nothing) below the PSNR gate.

    int8 compresses the text encoder's and UNet's weights; `quantize_unet` quantizes the UNet's activations too,
    calibrated on the source's own denoising trajectories. The manifest's `source` keeps the model's identity and
    adds `converted_from` (the ONNX manifest's sha256) and `validation` (the measured PSNR and its gate).
    """
    if weights not in WEIGHTS:
        raise ExportError(f"weights must be one of {', '.join(WEIGHTS)}, got {weights!r}")
    if quantize_unet and weights != "int8":
        raise ExportError("quantize_unet needs weights='int8'")
    gate = check_gate(MIN_PSNR_DB[weights] if psnr_gate is None else psnr_gate)
    src = Path(src)
    source = open_onnx_source(src, out)
    with BundleWriter(out, overwrite=overwrite) as writer:  # checks `out` before any slow work
        calibration = collect_unet_inputs(src, source, request) if quantize_unet else None
        schemes = QUANTIZATION_SCHEMES if quantize_unet else (None,)
        components = {
            name: convert_component(src, comp, writer.path, weights)
            for name, comp in source.components.items() if not (quantize_unet and name == "unet")
        }
        copy_tokenizer(src, source, writer.path)
        copy_tables(src, source, writer.path)
        for tried, scheme in enumerate(schemes, start=1):
            if scheme:
                unet = convert_component(src, source.components["unet"], writer.path, weights, calibration, scheme)
                components = {name: components.get(name, unet) for name in source.components}
            draft = replace(source, components=components, tools=tool_versions(source.tools, _tools(weights)),
                            files={})
            try:
                validation = _check_image(src, source, writer.path, draft, weights, gate, request)
            except ExportError as error:
                if tried == len(schemes):
                    raise
                log.warning("unet: int8 activations on %s fail the gate (%s); trying %s", scheme.name, error,
                            schemes[tried].name)
                continue
            if scheme:
                validation["int8_activations"] = scheme.name
            return writer.commit(replace(draft, source=provenance(src, source, validation)))


def convert_component(
    src: Path, comp: Component, root: Path, weights: str, calibration: list[dict] | None = None,
    scheme: QuantizationScheme | None = None,
) -> Component:
    """ONNX -> IR at `root/<name>/openvino_model.xml` (+ .bin), int8 where asked (quantized, given calibration)."""
    import openvino as ov

    start = time.perf_counter()
    model, precision = ov.convert_model(str(src / comp.file)), "fp32"
    if weights == "int8" and comp.name == "unet" and calibration:
        model, precision = quantize_int8(model, calibration, scheme or QUANTIZATION_SCHEMES[-1]), INT8_QUANTIZED
    elif weights == "int8" and comp.name in INT8_COMPONENTS:
        model, precision = compress_int8(model), INT8_WEIGHTS
    rel = f"{comp.name}/{IR_NAME}"
    (root / comp.name).mkdir(parents=True, exist_ok=True)
    # compress_to_fp16 defaults to True: it would silently halve the weights of an "fp32" bundle.
    ov.save_model(model, str(root / rel), compress_to_fp16=False)
    weights_map = write_openvino_map(ov.Core().read_model(str(root / rel)), src, comp, root)
    log.info("%s: converted to OpenVINO IR (%s) in %.1f s", comp.name, precision, time.perf_counter() - start)
    # The IR's weights are fp32 (or int8, as `precision` says) whatever the ONNX file stored: convert_model folds
    # fp16 storage's casts.
    return replace(comp, file=rel, format=TARGET, precision=precision, weights_storage="fp32", weights_map=weights_map)


def write_openvino_map(model, src: Path, comp: Component, root: Path) -> str:
    """Write the IR's weights map (from its layer names) beside it, each entry checked against the ONNX source: the
    same torch parameter, and values within one int8 step of the ONNX weight's (equal for fp32 IR)."""
    from sdrt.backends.openvino_weights import constants, derive_openvino_map, stored_weight

    found = derive_openvino_map(model, comp.name)
    graph = OnnxFile(src / comp.file)
    try:
        source = read_weights_map(src, comp) or derive_onnx_map(graph, comp.name)
        by_name = constants(model)
        for name, entry in found.weights.items():
            expected = source.find(name)
            if expected is None or expected.shape != entry.shape:
                raise ExportError(f"{comp.name}: the IR's weight for {name} has no match in the ONNX weights map")
            want = expected.to_torch(graph.array(expected.name).astype("float32"))
            got = entry.to_torch(stored_weight(by_name[entry.name]).value())
            if abs(got - want).max(initial=0.0) > (want.max(initial=0.0) - want.min(initial=0.0)) / 255:
                raise ExportError(f"{comp.name}: the IR's weight {entry.name} is not the ONNX weight of {name}")
    finally:
        graph.close()
    rel = f"{comp.name}/{MAP_FILE}"
    (root / rel).write_text(WeightsMap(TARGET, found.weights).to_json())
    return rel


def compress_int8(model):
    """Per-channel asymmetric int8 weights (NNCF data-free weight compression); activations stay float."""
    import nncf

    return nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT8_ASYM)


def quantize_int8(model, calibration: list[dict], scheme: QuantizationScheme):
    """int8 weights and activations for the layers `scheme` names (NNCF post-training quantization, ranges
    measured on `calibration`), int8-compressed weights with float activations everywhere else.

    optimum-intel's hybrid scheme for diffusion models (`_get_hybrid_mixed_quantization_config`: weight-only int8
    for MatMuls, full int8 for the rest), narrowed: on the shipped model, quantizing the inputs that carry the
    sample, the text embedding, the residual stream (1x1 shortcuts, samplers, proj_in after GroupNorm), the
    attention, its output projection or the feed-forward output layer costs the gate image 6-24 dB, while the
    SiLU->conv layers (most of the convolution FLOPs) and the feed-forward input projection lose a few dB. No overflow fix: VNNI's int8 dot
    product does not saturate.
    """
    import nncf

    convs = silu_convolutions(model)
    matmuls = [op.get_friendly_name() for op in model.get_ops() if op.get_type_name() == "MatMul"
               and scheme.matmuls and re.search(scheme.matmuls, op.get_friendly_name())]
    model = nncf.compress_weights(
        model, mode=nncf.CompressWeightsMode.INT8_ASYM, ignored_scope=nncf.IgnoredScope(names=convs + matmuls)
    )
    chosen = set(convs + matmuls)
    others = [op.get_friendly_name() for op in model.get_ops() if op.get_type_name() in ("Convolution", "MatMul")
              and op.get_friendly_name() not in chosen]
    log.info("unet: int8 activations on %d convolutions and %d MatMuls (%s)", len(convs), len(matmuls), scheme.name)
    return nncf.quantize(
        model, nncf.Dataset(calibration), model_type=nncf.ModelType.TRANSFORMER, subset_size=len(calibration),
        preset=nncf.QuantizationPreset.MIXED, fast_bias_correction=True,
        ignored_scope=nncf.IgnoredScope(names=others, types=UNQUANTIZED_TYPES, validate=False),
        advanced_parameters=nncf.AdvancedQuantizationParameters(
            overflow_fix=nncf.OverflowFix.DISABLE,
            # alpha -1 turns SmoothQuant off; NNCF's own default alpha otherwise
            smooth_quant_alphas=nncf.AdvancedSmoothQuantParameters(**({} if scheme.smooth_quant else {"matmul": -1})),
        ),
    )


def silu_convolutions(model) -> list[str]:
    """Names of the convolutions whose input is a SiLU, except the last (its output is the model's prediction)."""
    return [
        op.get_friendly_name() for op in model.get_ops()
        if op.get_type_name() == "Convolution" and op.input_value(0).get_node().get_type_name() == "Swish"
        and not _feeds_output(op)
    ]


def _feeds_output(op, hops: int = 2) -> bool:
    """Whether `op` reaches a model output within `hops` consumers (the bias Add sits between)."""
    users = [target.get_node() for target in op.output(0).get_target_inputs()]
    return any(u.get_type_name() == "Result" or (hops > 1 and _feeds_output(u, hops - 1)) for u in users)


def collect_unet_inputs(src: Path, manifest: Manifest, request: GenerationRequest) -> list[dict]:
    """UNet feeds along the source's trajectories for CALIBRATION_PROMPTS, at the gate's size, steps and sampler."""
    # OpenVINO at the CPU's default precision (bf16 where it has it): calibration needs representative inputs, not
    # exact ones, at half f32's cost.
    backend = RecordingBackend(get_backend("openvino", cache=False), ("unet",))
    start = time.perf_counter()
    with Pipeline(src, manifest, backend) as pipe:
        for i, prompt in enumerate(CALIBRATION_PROMPTS, start=1):
            pipe.generate(replace(request, prompt=prompt, seed=request.seed + i))
    log.info("unet: %d calibration inputs in %.1f s", len(backend.feeds["unet"]), time.perf_counter() - start)
    return backend.feeds["unet"]


def _check_image(
    src: Path, source: Manifest, root: Path, converted: Manifest, weights: str, gate: float, request: GenerationRequest
) -> dict:
    """The gate image: the candidate runs on OpenVINO in f32 so only the conversion (and the weights) differ. Its
    reference is the ONNX bundle on ONNX Runtime for fp32 (the reference engine), and on OpenVINO f32 for int8
    (only the weights differ)."""
    reference = reference_backend() if weights == "fp32" else get_backend("openvino", precision="f32", cache=False)
    candidate = get_backend("openvino", precision="f32", cache=False)
    return check_image_psnr(src, source, root, converted, reference=reference, candidate=candidate, gate=gate,
                            what=f"{weights} OpenVINO bundle's", request=request)


def _tools(weights: str) -> tuple[str, ...]:
    return ("openvino", "nncf") if weights == "int8" else ("openvino",)
