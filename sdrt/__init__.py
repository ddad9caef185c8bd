"""sdrt: Stable Diffusion exported once, run anywhere without torch."""
from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["Pipeline", "GenerationRequest", "__version__"]


def __getattr__(name: str):
    # Lazy: `import sdrt` stays cheap, and the export side never drags in the runtime (or vice versa).
    if name == "Pipeline":
        from sdrt.runtime.pipeline import Pipeline

        return Pipeline
    if name == "GenerationRequest":
        from sdrt.runtime.request import GenerationRequest

        return GenerationRequest
    raise AttributeError(f"module 'sdrt' has no attribute {name!r}")
