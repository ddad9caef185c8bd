"""The build-target table (sdrt.export.targets): options declared per target, checked against the chosen one."""
from __future__ import annotations

import pytest

from sdrt.errors import ExportError
from sdrt.export.targets import TARGETS, Option, Target, all_options, convert, get_target, target_options


def test_every_target_names_a_builder_and_extra():
    for target in TARGETS.values():
        module, function = target.builder.split(":")
        assert module.startswith("sdrt.export.") and function and target.extra


def test_options_shared_between_targets_are_one_option():
    flags = [o.flag for o in all_options()]
    assert len(flags) == len(set(flags))


def test_two_targets_declaring_one_flag_differently_is_caught(monkeypatch):
    clash = Target("x", "", "sdrt.export.x:build", "x", True, (Option("--opset", "opset", "other", 13, type=int),))
    monkeypatch.setitem(TARGETS, "x", clash)
    with pytest.raises(ValueError, match="declare --opset twice"):
        all_options()


def test_an_option_the_target_does_not_read_is_refused_by_flag():
    onnx, openvino = TARGETS["onnx"], TARGETS["openvino"]
    with pytest.raises(ExportError, match="--quantize-unet applies to --target openvino, not onnx"):
        target_options(onnx, {"quantize_unet": True})
    assert target_options(openvino, {"weights": "int8", "opset": 17}) == \
        {"weights": "int8", "quantize_unet": False, "psnr_gate": None}
    with pytest.raises(ExportError, match="--opset applies to --target onnx, not openvino"):
        target_options(openvino, {"opset": 18})
    # Exported through ONNX, the intermediate's options are the user's to set.
    assert target_options(openvino, {"opset": 18}, via=onnx)["weights"] == "fp32"


def test_unknown_and_unconvertible_targets():
    with pytest.raises(ExportError, match="unknown target 'nope'; choose one of: onnx, openvino, tensorrt, torch, coreml"):
        get_target("nope")
    with pytest.raises(ExportError, match="choose one of: openvino, tensorrt$"):
        get_target("onnx", convertible=True)
    with pytest.raises(ExportError, match="built from the checkpoint: sdrt export SOURCE --target onnx"):
        convert(TARGETS["onnx"], "b", "o")
