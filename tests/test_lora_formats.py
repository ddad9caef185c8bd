"""LoRA files without torch: the tensor readers against safetensors / torch.load, the unpickler's refusals, key
names (kohya, old and new diffusers), and LoHa / LoKr changes against PEFT's implementation of the same math."""
from __future__ import annotations

import struct

import numpy as np
import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

from torch import nn  # noqa: E402

from sdrt.errors import RequestError  # noqa: E402
from sdrt.runtime.lora_formats import kohya_module, parse_lora  # noqa: E402
from sdrt.runtime.tensor_files import read_safetensors, read_torch_file  # noqa: E402

DELTA_TOL = 1e-5  # max abs difference of a layer's change, float32 numpy vs float32 torch (sums of a few products)


def test_safetensors_reader_matches_the_package(tmp_path):
    from safetensors.torch import save_file

    tensors = {"f32": torch.randn(3, 4), "f16": torch.randn(5).half(), "bf16": torch.randn(2, 3).bfloat16(),
               "i64": torch.arange(6).reshape(2, 3)}
    save_file(tensors, str(tmp_path / "t.safetensors"), metadata={"ss_output_name": "x"})
    got, metadata = read_safetensors(tmp_path / "t.safetensors")
    assert metadata == {"ss_output_name": "x"}
    for name, value in tensors.items():
        assert np.array_equal(got[name], value.float().numpy() if name == "bf16" else value.numpy()), name
    assert got["bf16"].dtype == np.float32 and got["f16"].dtype == np.float16


@pytest.mark.parametrize("header", [b'{"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 64]}}',
                                    b'{"a": {"dtype": "F8_E4M3", "shape": [1], "data_offsets": [0, 1]}}', b"[1, 2]",
                                    b"not json"])
def test_safetensors_reader_refuses_malformed_files(tmp_path, header):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + bytes(16))
    with pytest.raises(RequestError):
        read_safetensors(path)


def test_torch_reader_matches_torch_load(tmp_path):
    base = torch.randn(4, 6)
    state = {"a": base[:, 1:4], "p": nn.Parameter(torch.randn(3)), "nested": {"h": torch.randn(2, 2).half()},
             "b": torch.randn(3).bfloat16(), "step": 7, "name": "emb", "list": [torch.ones(2)]}
    torch.save(state, tmp_path / "t.pt")
    got = read_torch_file(tmp_path / "t.pt")
    assert np.array_equal(got["a"], state["a"].numpy()) and got["a"].shape == (4, 3)
    assert np.array_equal(got["p"], state["p"].detach().numpy())
    assert np.array_equal(got["nested"]["h"], state["nested"]["h"].numpy())
    assert np.array_equal(got["b"], state["b"].float().numpy())
    assert (got["step"], got["name"]) == (7, "emb") and np.array_equal(got["list"][0], np.ones(2))


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_torch_reader_runs_nothing_from_the_file(tmp_path):
    marker = tmp_path / "ran"
    torch.save({"w": torch.ones(2), "x": _Payload(marker)}, tmp_path / "evil.pt")
    with pytest.raises(RequestError, match="refusing to load .*open"):
        read_torch_file(tmp_path / "evil.pt")
    assert not marker.exists()
    torch.save({"w": torch.ones(2)}, tmp_path / "old.pt", _use_new_zipfile_serialization=False)
    with pytest.raises(RequestError, match="not a torch zip archive"):
        read_torch_file(tmp_path / "old.pt")


def test_kohya_names_split_back_into_every_module(tiny_sd1_dir):
    """Every Linear and Conv2d of the UNet and text encoder survives kohya's `.` -> `_` flattening."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    for prefix, model in (("lora_unet_", UNet2DConditionModel.from_pretrained(tiny_sd1_dir / "unet")),
                          ("lora_te_text_model_", CLIPTextModel.from_pretrained(tiny_sd1_dir / "text_encoder"))):
        names = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
        assert len(names) > 10
        for name in names:
            component, module = kohya_module(prefix + name.replace(".", "_"))
            assert module.removeprefix("text_model.") == name


def test_diffusers_key_spellings_agree():
    """Old attention-processor names, PEFT's lora_A / lora_B and kohya's name the same layers and changes."""
    rng = np.random.default_rng(0)
    down, up = rng.standard_normal((4, 32), dtype=np.float32), rng.standard_normal((32, 4), dtype=np.float32)
    unet, te = "down_blocks.0.attentions.0.transformer_blocks.0.attn1", "text_model.encoder.layers.0.self_attn"
    spellings = [
        {f"unet.{unet}.to_out.0.lora_A.weight": down, f"unet.{unet}.to_out.0.lora_B.weight": up,
         f"text_encoder.{te}.q_proj.lora_A.weight": down, f"text_encoder.{te}.q_proj.lora_B.weight": up},
        {f"unet.{unet}.processor.to_out_lora.down.weight": down, f"unet.{unet}.processor.to_out_lora.up.weight": up,
         f"text_encoder.{te}.to_q_lora.down.weight": down, f"text_encoder.{te}.to_q_lora.up.weight": up},
        {f"lora_unet_{unet.replace('.', '_')}_to_out_0.lora_down.weight": down,
         f"lora_unet_{unet.replace('.', '_')}_to_out_0.lora_up.weight": up,
         f"lora_te_{te.replace('.', '_')}_q_proj.lora_down.weight": down,
         f"lora_te_{te.replace('.', '_')}_q_proj.lora_up.weight": up},
    ]
    parsed = [{(m.component, m.target): m.delta() for m in parse_lora(s, {})} for s in spellings]
    assert set(parsed[0]) == {("unet", f"{unet}.to_out.0.weight"),
                              ("text_encoder", "encoder.layers.0.self_attn.q_proj.weight")}
    for other in parsed[1:]:
        assert other.keys() == parsed[0].keys()
        assert all(np.array_equal(other[k], parsed[0][k]) for k in other)


def test_alpha_scales_the_change():
    rng = np.random.default_rng(1)
    down, up = rng.standard_normal((4, 8), dtype=np.float32), rng.standard_normal((6, 4), dtype=np.float32)
    state = {"lora_unet_conv_in.lora_down.weight": down, "lora_unet_conv_in.lora_up.weight": up}
    (plain,) = parse_lora(state, {})
    (halved,) = parse_lora({**state, "lora_unet_conv_in.alpha": np.array(2.0, np.float32)}, {})
    assert np.allclose(halved.delta(), 0.5 * plain.delta()) and np.allclose(plain.delta(), up @ down)


def _peft_changes(config, parts: dict) -> tuple[dict, dict]:
    """(PEFT's merged change of each layer, the same factors as kohya keys) for a small Linear + Conv2d model."""

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin, self.conv = nn.Linear(64, 48), nn.Conv2d(16, 32, 3)

    model = peft.get_peft_model(Model(), config)
    before = {n: getattr(model.base_model.model, n).weight.detach().clone() for n in ("lin", "conv")}
    state = {}
    for name, param in model.named_parameters():
        if name.endswith(".default") and any(p in name for p in parts):
            layer, part = name.split(".")[-3:-1]
            state[f"lora_unet_{layer}.{part}"] = param.detach().numpy().copy()
    for layer in ("lin", "conv"):
        state[f"lora_unet_{layer}.alpha"] = np.array(config.alpha, np.float32)
    merged = model.merge_and_unload()
    return {n: (getattr(merged, n).weight.detach() - before[n]).numpy() for n in before}, state


@pytest.mark.parametrize("kind,effective", [("loha", False), ("loha", True), ("lokr", False), ("lokr", True)])
def test_loha_and_lokr_match_peft(kind, effective):
    torch.manual_seed(0)
    cls = peft.LoHaConfig if kind == "loha" else peft.LoKrConfig
    config = cls(r=2, alpha=3, target_modules=["lin", "conv"], init_weights=False, use_effective_conv2d=effective)
    expected, state = _peft_changes(config, ("hada_", "lokr_"))
    modules = {m.module: m for m in parse_lora(state, {})}
    assert {m.kind for m in modules.values()} == {kind}
    for layer, change in expected.items():
        assert np.abs(modules[layer].delta().reshape(change.shape) - change).max() <= DELTA_TOL, layer


@pytest.mark.parametrize("key,message", [
    ("lora_unet_conv_in.dora_scale", "DoRA"), ("lora_unet_conv_in.oft_blocks", "OFT"),
    ("lora_unet_conv_in.diff", "full weight differences"), ("lora_te2_text_model_x.lora_down.weight", "SDXL"),
    ("lora_unet_conv_in.w_norm", "norm layer"), ("unet.conv_in.lora_B.bias", "bias"),
])
def test_unsupported_kinds_are_refused_by_name(key, message):
    with pytest.raises(RequestError, match=message):
        parse_lora({key: np.zeros((2, 2), np.float32), "lora_unet_conv_in.lora_up.weight": np.zeros((2, 2))}, {})
