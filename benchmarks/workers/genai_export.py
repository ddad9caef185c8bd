"""optimum-intel's OpenVINO export as OpenVINO GenAI reads it: the same files (hard-linked), the CLIP tokenizer converted
to OpenVINO tokenizer / detokenizer models by openvino-tokenizers (runs in the openvino-genai venv).

Usage: python genai_export.py OPTIMUM_EXPORT OUT
"""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import openvino as ov
from openvino_tokenizers import convert_tokenizer
from transformers import AutoTokenizer


def main(source: Path, out: Path) -> None:
    shutil.copytree(source, out, copy_function=os.link)  # hard links: GBs of weights, never written
    tokenizer, detokenizer = convert_tokenizer(AutoTokenizer.from_pretrained(source / "tokenizer"),
                                               with_detokenizer=True)
    ov.save_model(tokenizer, str(out / "tokenizer" / "openvino_tokenizer.xml"))
    ov.save_model(detokenizer, str(out / "tokenizer" / "openvino_detokenizer.xml"))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
