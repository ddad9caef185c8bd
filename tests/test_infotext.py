"""PNG infotext as A1111 1.9+ writes it, read back with A1111's own parsing rules (modules/infotext_utils.py)."""
from __future__ import annotations

import json
import re

import pytest

from sdrt.runtime.image import infotext
from sdrt.runtime.request import GenerationRequest

# A1111's parse_generation_parameters, transcribed: re_param, the "< 3 fields: still prompt" rule, unquote.
RE_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def unquote(text: str) -> str:
    if len(text) == 0 or text[0] != '"' or text[-1] != '"':
        return text
    try:
        return json.loads(text)
    except Exception:
        return text


def parse_generation_parameters(x: str) -> dict[str, str]:
    res, prompt, negative_prompt, done_with_prompt = {}, "", "", False
    *lines, lastline = x.strip().split("\n")
    if len(RE_PARAM.findall(lastline)) < 3:
        lines.append(lastline)
        lastline = ""
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            done_with_prompt = True
            line = line[16:].strip()
        if done_with_prompt:
            negative_prompt += ("" if negative_prompt == "" else "\n") + line
        else:
            prompt += ("" if prompt == "" else "\n") + line
    res["Prompt"], res["Negative prompt"] = prompt, negative_prompt
    for k, v in RE_PARAM.findall(lastline):
        if v and v[0] == '"' and v[-1] == '"':
            v = unquote(v)
        res[k] = v
    return res


@pytest.mark.parametrize("value", [
    "plain", 'has "quotes" only', "a, comma", "a: colon", "two\nlines", 'all: of, "them"\ntogether', "ünïcödé, ok",
])
def test_values_round_trip_through_a1111s_parser(value):
    text = infotext("a cat", "dog", {"Steps": 20, "Model": value, "Seed": 1, "Size": "64x64"})
    parsed = parse_generation_parameters(text)
    assert parsed["Model"] == value
    assert (parsed["Prompt"], parsed["Negative prompt"], parsed["Steps"], parsed["Seed"]) == ("a cat", "dog", "20", "1")
    assert len(text.split("\n")) == 3  # a quoted newline stays on the parameters line


def test_values_are_quoted_exactly_as_a1111_quotes_them():
    """infotext_utils.quote: json.dumps (non-ASCII kept) only when the value has ',', ':' or a newline."""
    fields = {"A": 'x "y"', "B": "x, y", "C": "é: 1"}
    assert infotext("p", "", fields).split("\n")[-1] == 'A: x "y", B: "x, y", C: "é: 1"'


def test_sampler_and_schedule_type_are_separate_fields(sdrt_pipe):
    req = GenerationRequest("a cat", sampler="Euler a", schedule="Karras", steps=3, seed=7).resolve(sdrt_pipe.manifest)
    parsed = parse_generation_parameters(sdrt_pipe.parameters(req, 0))
    assert (parsed["Sampler"], parsed["Schedule type"], parsed["Steps"]) == ("Euler a", "Karras", "3")
    req = GenerationRequest("a cat", sampler="DPM++ 2M", steps=3, seed=7).resolve(sdrt_pipe.manifest)
    parsed = parse_generation_parameters(sdrt_pipe.parameters(req, 0))
    assert (parsed["Sampler"], parsed["Schedule type"]) == ("DPM++ 2M", "Automatic")
