"""The bundles a server serves, named as A1111 names checkpoints (modules/sd_models.py CheckpointInfo): a title
"NAME [HASH]", the short hash (the first 10 hex digits of the checkpoint's sha256) and the full sha256."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sdrt.bundle import Manifest, read_manifest
from sdrt.errors import RequestError
from sdrt.runtime.pipeline import default_bundle

SHORT_HASH = 10  # A1111's CheckpointInfo.shorthash


@dataclass(frozen=True)
class BundleInfo:
    """One served bundle: where it is, its manifest and the names a client may choose it by."""

    name: str  # the folder's name (A1111's model_name: the file name without extension)
    path: Path
    manifest: Manifest

    @property
    def sha256(self) -> str | None:
        return self.manifest.source.get("sha256") or None

    @property
    def hash(self) -> str | None:
        return self.sha256[:SHORT_HASH] if self.sha256 else None

    @property
    def title(self) -> str:
        return f"{self.name} [{self.hash}]" if self.hash else self.name

    def aliases(self) -> set[str]:
        """Every string that selects this bundle, as A1111's checkpoint_aliases: title, name, hashes."""
        return {a for a in (self.title, self.name, self.hash, self.sha256) if a}

    def item(self) -> dict:
        """The /sdapi/v1/sd-models entry."""
        return {"title": self.title, "model_name": self.name, "hash": self.hash, "sha256": self.sha256,
                "filename": str(self.path), "config": None}


class Catalog:
    """The served bundles in the order given; the first is the default model."""

    def __init__(self, bundles: list[BundleInfo]):
        if not bundles:
            raise RequestError("expected at least one bundle to serve, got none")
        names = [b.name for b in bundles]
        clash = sorted({n for n in names if names.count(n) > 1})
        if clash:
            raise RequestError(f"bundle folder names must be unique (clients choose models by them), got "
                               f"{', '.join(clash)} more than once")
        self.bundles = list(bundles)

    @classmethod
    def from_paths(cls, paths: list[Path | str] | None) -> Catalog:
        """Read the manifests of bundle folders (default: the shipped model)."""
        roots = [Path(p) for p in paths] if paths else [default_bundle()]
        return cls([BundleInfo(root.resolve().name, root, read_manifest(root)) for root in roots])

    @property
    def default(self) -> BundleInfo:
        return self.bundles[0]

    def find(self, alias: str) -> BundleInfo:
        """The bundle `alias` names (a title, folder name or hash; a checkpoint file extension is dropped)."""
        wanted = {alias, alias.removesuffix(".safetensors").removesuffix(".ckpt")}
        for bundle in self.bundles:
            if wanted & bundle.aliases():
                return bundle
        served = ", ".join(repr(b.title) for b in self.bundles)
        raise RequestError(f"sd_model_checkpoint: no served model is called {alias!r}; served: {served}")
