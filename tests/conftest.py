"""Shared fixtures: one tiny random SD1 diffusers folder and its exported bundle, built once per test session."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_sd1_dir(tmp_path_factory):
    """A tiny SD1 diffusers folder (transformers 5 layout), random weights from seed 0."""
    pytest.importorskip("diffusers")
    from tiny_models import save_tiny_sd1

    return save_tiny_sd1(tmp_path_factory.mktemp("models") / "tiny-sd1")


@pytest.fixture(scope="session")
def tiny_sd1_bundle(tiny_sd1_dir, tmp_path_factory):
    """The bundle exported from `tiny_sd1_dir` (exported once; tests must not modify it)."""
    from sdrt.export import export_bundle

    out = tmp_path_factory.mktemp("bundles") / "tiny-sd1"
    export_bundle(tiny_sd1_dir, out)
    return out
