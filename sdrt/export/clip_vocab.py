"""Write the CLIP tokenizer's vocab.json and merges.txt from open_clip's BPE file, a saved tokenizer folder, or CLIP's
merges.txt alone (the vocab follows from the merges)."""

import gzip
import json
import shutil
from pathlib import Path

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
MERGES_HEADER = "#version: 0.2"
N_MERGES = 49152 - 256 - 2  # open_clip SimpleTokenizer: merges[1:49152-256-2+1]
DEFAULT_PAD = EOS  # transformers CLIPTokenizer's pad_token default (SD1); SD2 folders say "!"


def bytes_to_unicode() -> dict[int, str]:
    """Map each byte to the printable character CLIP's byte-level BPE uses for it (open_clip/tokenizer.py)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = [b for b in range(256) if b not in printable]  # whitespace/control bytes move to 256+
    chars = {b: chr(b) for b in printable} | {b: chr(256 + i) for i, b in enumerate(shifted)}
    return {b: chars[b] for b in printable + shifted}  # vocab order: printable bytes first


def write_clip_vocab_from_bpe(bpe_gz_path, out_dir) -> tuple[Path, Path]:
    """Write vocab.json (49408 ids) and merges.txt as openai/clip-vit-large-patch14 ships them; return their paths."""
    lines = gzip.open(bpe_gz_path).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : N_MERGES + 1]]  # line 0 is a version header
    return _write(clip_vocab(merges), merges, Path(out_dir))


def clip_vocab(merges: list[tuple[str, ...]]) -> dict[str, int]:
    """CLIP's token ids: the 256 byte characters, the same ending a word ("</w>"), one token per merge in merge
    order, then BOS and EOS (open_clip SimpleTokenizer.__init__)."""
    byte_chars = list(bytes_to_unicode().values())
    tokens = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges] + [BOS, EOS]
    return dict(zip(tokens, range(len(tokens))))


def read_tokenizer_files(src_dir, out_dir) -> tuple[str, int | None]:
    """Write vocab.json + merges.txt from a transformers 4 or 5 tokenizer folder, or from CLIP's merges.txt alone
    (sdrt's copy of CLIP ViT-L/14's, sdrt.export.ldm_config.CLIP_L14_DIR); return (pad, model_max_length)."""
    src, out = Path(src_dir), Path(out_dir)
    if (src / "vocab.json").is_file() and (src / "merges.txt").is_file():  # transformers 4 layout
        out.mkdir(parents=True, exist_ok=True)
        for name in ("vocab.json", "merges.txt"):
            if (src / name).resolve() != (out / name).resolve():
                shutil.copyfile(src / name, out / name)
        backend = {}
    elif (src / "tokenizer.json").is_file():  # transformers 5 layout: one tokenizers file
        backend = _load_json(src / "tokenizer.json")
        model = backend["model"]
        if model.get("type") != "BPE":
            raise ValueError(f"{src}/tokenizer.json: expected a BPE model, got {model.get('type')!r}")
        _check_added_tokens(backend.get("added_tokens", []), model["vocab"], src)
        # tokenizers < 0.20 saves merges as "a b" strings, newer versions as [a, b] pairs
        merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
        _write(model["vocab"], merges, out)
    elif (src / "merges.txt").is_file():  # CLIP's merges without their vocab: rebuilt, ids as CLIP's vocab.json
        merges = _read_merges(src / "merges.txt")
        _write(clip_vocab(merges), merges, out)
        backend = {}
    else:
        raise FileNotFoundError(f"{src}: expected vocab.json + merges.txt, tokenizer.json, or CLIP's merges.txt")
    return _pad_token(src, backend), _load_json(src / "tokenizer_config.json").get("model_max_length")


def _write(vocab: dict[str, int], merges: list[tuple[str, ...]], out: Path) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    vocab_path, merges_path = out / "vocab.json", out / "merges.txt"
    vocab_path.write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merges_path.write_text("\n".join([MERGES_HEADER, *(" ".join(m) for m in merges)]), encoding="utf-8")
    return vocab_path, merges_path


def _read_merges(path: Path) -> list[tuple[str, ...]]:
    lines = [line for line in path.read_text(encoding="utf-8").split("\n") if line]
    merges = [tuple(line.split()) for line in lines if not line.startswith("#version")]
    if len(merges) != N_MERGES:  # another BPE's vocab is not CLIP's layout: it needs its own vocab.json
        raise ValueError(f"{path}: {len(merges)} merges where CLIP has {N_MERGES}; its vocab.json is needed")
    return merges


def _load_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _token_str(token) -> str:
    # transformers 4 stores special tokens either as strings or as AddedToken dicts with "content"
    return token["content"] if isinstance(token, dict) else token


def _pad_token(src: Path, backend: dict) -> str:
    # transformers 4 from_pretrained lets special_tokens_map.json override tokenizer_config.json
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        pad = _load_json(src / name).get("pad_token")
        if pad is not None:
            return _token_str(pad)
    padding = backend.get("padding") or {}
    return padding.get("pad_token", DEFAULT_PAD)


def _check_added_tokens(added: list[dict], vocab: dict[str, int], src: Path) -> None:
    # Tokens outside the BPE vocab (e.g. textual-inversion embeddings) would be lost in vocab.json.
    extra = [t["content"] for t in added if vocab.get(t["content"]) != t["id"]]
    if extra:
        raise ValueError(f"{src}/tokenizer.json: added tokens outside the BPE vocab are not supported: {extra}")
