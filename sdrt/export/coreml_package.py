"""A Core ML package's signature and compute precision, built from a contract; the signature checked against it
(read back without loading the model, so it runs on Linux), and on macOS its predictions against torch."""
from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Callable

import numpy as np

from sdrt.contracts import Contract
from sdrt.errors import ExportError
from sdrt.export.coreml_validation import check_outputs

log = logging.getLogger(__name__)

# Contract dtypes -> Core ML multi-array types (FeatureTypes.proto ArrayDataType). Core ML has no bool outputs: the
# converter ends them with a cast to fp32 (0 or 1), and the backend casts back to the contract's bool.
ARRAY_TYPES = {"float32": "FLOAT32", "int32": "INT32", "bool": "FLOAT32"}
SPEC_VERSION = 8  # Core ML's specification version for macOS 14 / iOS 17 (coremltools' _SPECIFICATION_VERSION_IOS_17)


def coreml_inputs(contract: Contract, dims: tuple[dict[str, int], ...]) -> list:
    """ct.TensorType per contract input: its static shape, or enumerated shapes for the one input whose shape
    changes with the image size (Core ML before macOS 15 takes enumerated shapes on one input only)."""
    import coremltools as ct

    out, varying = [], []
    for spec in contract.inputs:
        shapes = list(dict.fromkeys(spec.concrete_shape(d) for d in dims))
        shape = shapes[0] if len(shapes) == 1 else ct.EnumeratedShapes(shapes=shapes, default=shapes[0])
        varying += [spec.name] if len(shapes) > 1 else []
        out.append(ct.TensorType(name=spec.name, shape=shape, dtype=np.dtype(spec.dtype).type))
    if len(varying) > 1:
        raise ExportError(f"{contract.component}: Core ML takes enumerated shapes on one input, not {varying}")
    return out


class TimestepEmbeddingInFp32:
    """coremltools FP16ComputePrecision op selector keeping the UNet's sinusoidal timestep embedding in fp32.

    diffusers computes it in fp32 whatever the model's dtype (embeddings.get_timestep_embedding casts the timesteps
    to float): its sin/cos arguments reach the timestep itself (up to 1000), where fp16's spacing is 0.5, so in fp16
    the fractional timesteps of k-diffusion samplers would be rounded and the phases moved by up to 0.25 rad. The ops
    fed only by the `timestep` input stay fp32, up to the first linear layer (a few elementwise ops; the linear
    layers and everything after them are fp16 as usual).
    """

    STOP = ("linear", "matmul", "conv")

    def __init__(self, input_name: str = "timestep"):
        self.fp32 = {input_name}  # names of the vars computed in fp32 so far

    def __call__(self, op) -> bool:
        if op.op_type in self.STOP:
            return True
        values = [v for value in op.inputs.values() for v in (value if isinstance(value, (list, tuple)) else [value])]
        sources = [v for v in values if v.op is None or v.op.op_type != "const"]
        if sources and all(v.name in self.fp32 for v in sources):
            self.fp32.update(out.name for out in op.outputs)
            return False
        return True


def compute_precision(contract: Contract):
    """fp32 for components whose outputs are thresholded (contract.full_precision), else fp16 with the timestep
    embedding in fp32."""
    import coremltools as ct

    if contract.full_precision:
        return ct.precision.FLOAT32
    if "timestep" in contract.input_names:
        return ct.transform.FP16ComputePrecision(op_selector=TimestepEmbeddingInFp32())
    return ct.precision.FLOAT16


def coreml_outputs(contract: Contract) -> list:
    """ct.TensorType per contract output, fp32 (what the converter makes of bool outputs too)."""
    import coremltools as ct

    return [ct.TensorType(name=spec.name, dtype=np.float32) for spec in contract.outputs]


def check_package(path: Path, contract: Contract, dims: tuple[dict[str, int], ...]) -> dict:
    """Read the saved package's description (no model load) and check names, types and shapes against the
    contract at `dims`; raises ExportError on the first difference, else returns the manifest record."""
    import coremltools as ct

    spec = ct.utils.load_spec(str(path))
    if spec.WhichOneof("Type") != "mlProgram" or spec.specificationVersion < SPEC_VERSION:
        raise ExportError(f"{contract.component}: expected an ML Program of specification {SPEC_VERSION} or later, got "
                          f"{spec.WhichOneof('Type')} of specification {spec.specificationVersion}")
    inputs = {f.name: f.type.multiArrayType for f in spec.description.input}
    outputs = {f.name: f.type.multiArrayType for f in spec.description.output}
    if sorted(inputs) != sorted(contract.input_names) or sorted(outputs) != sorted(contract.output_names):
        raise ExportError(f"{contract.component}: the package has inputs {sorted(inputs)} and outputs {sorted(outputs)}"
                          f", expected {sorted(contract.input_names)} and {sorted(contract.output_names)}")
    for tensor in contract.inputs:
        _check_array(contract.component, tensor, inputs[tensor.name], dims, enumerated=True)
    for tensor in contract.outputs:
        _check_array(contract.component, tensor, outputs[tensor.name], dims, enumerated=False)
    return {"specification_version": spec.specificationVersion, "signature": "matches the contract"}


def _check_array(component: str, tensor, array, dims, enumerated: bool) -> None:
    import coremltools as ct

    where = f"{component}.{tensor.name}"
    kind = ct.proto.FeatureTypes_pb2.ArrayFeatureType.ArrayDataType.Name(array.dataType)
    if kind != ARRAY_TYPES[tensor.dtype]:
        raise ExportError(f"{where}: expected Core ML type {ARRAY_TYPES[tensor.dtype]}, got {kind}")
    want = list(dict.fromkeys(tensor.concrete_shape(d) for d in dims))
    default = tuple(array.shape)
    if not enumerated and not default:  # outputs of enumerated-shape models carry no shape: nothing to compare
        return
    if default != want[0]:
        raise ExportError(f"{where}: expected shape {want[0]}, got {default}")
    listed = [tuple(s.shape) for s in array.enumeratedShapes.shapes] if enumerated and len(want) > 1 else want
    if listed != want:
        raise ExportError(f"{where}: expected the shapes {want}, got {listed}")


def check_prediction(path: Path, contract: Contract, inputs: list, reference: Callable[[], list], name: str
                     ) -> dict | str:
    """On macOS, the package's outputs against torch's (`reference()`, outputs for each of `inputs`) at each exported
    shape (Apple's report_correctness: PSNR, 35 dB minimum); elsewhere, a note that it did not run."""
    if sys.platform != "darwin":
        return "not run: Core ML predicts on macOS only"
    import coremltools as ct

    model = ct.models.MLModel(str(path), compute_units=ct.ComputeUnit.CPU_ONLY)
    got = []
    for args in inputs:
        out = model.predict({n: a.numpy() for n, a in zip(contract.input_names, args)})
        got.append(tuple(out[n] for n in contract.output_names))
    return {"compute_units": "cpu_only", "psnr_db": check_outputs(name, "the Core ML package", reference(), got)}
