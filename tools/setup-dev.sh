#!/usr/bin/env bash
# Create .venv with sdrt (editable) and everything the tests need, on a fresh machine.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# torch first, pinned: the CPU build of 2.13.0 is the only one these machines carry; a range pulls CUDA wheels.
.venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/python -m pip install -q -e '.[export,onnxruntime,openvino-int8,coreml-export,serve,ray,test]'
# TensorRT for RTX and cuda-python: the builder, ONNX parser, profiles and refit flags run without a GPU, which is
# what tests/test_tensorrt.py checks (engine builds need the NVIDIA driver: the -m gpu tier).
.venv/bin/python -m pip install -q -e '.[tensorrt-rtx]'
# Only for its CLIP BPE vocabulary (tests build the real tokenizer from it); --no-deps keeps torchvision,
# which would replace the CPU torch with a CUDA build, out.
.venv/bin/python -m pip install -q --no-deps open-clip-torch==3.3.0
# The SD scripts' invisible-watermark encoder, the reference for sdrt/runtime/watermark.py; --no-deps because it
# declares torch (see above) and opencv-python, which would sit beside the headless OpenCV of the test extra.
.venv/bin/python -m pip install -q --no-deps invisible-watermark==0.2.0
