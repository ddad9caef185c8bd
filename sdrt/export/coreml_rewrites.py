"""SD's attention layers in the form Core ML runs well, after Apple's ml-stable-diffusion (unet.py, attention.py,
layer_norm.py) and "Deploying Transformers on the Apple Neural Engine" (Apple ML research, 2022).

Tensors inside a transformer stay in (batch, channels, 1, sequence) layout, the Neural Engine's native 4-D form;
linear layers become 1x1 convolutions on it, layer norm normalizes the channel axis, and attention is one of:
- `split_einsum`: one einsum pair per head on 4-D tensors, softmax over axis 1 (the Neural Engine's form);
- `original`: all heads in one batched einsum pair (Apple's recommendation for the Mac GPU).
The rewritten modules compute what diffusers' modules compute; `coreml_validation` measures how closely.
"""
from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn import functional as F

from sdrt.errors import ExportError

SPLIT_EINSUM, ORIGINAL = "split_einsum", "original"
ATTENTIONS = (SPLIT_EINSUM, ORIGINAL)
# diffusers' FeedForward activations this rewrite knows: SD 1.x and 2.x use GEGLU (attention.py FeedForward).
GEGLU, GELU = "GEGLU", "GELU"


def to_sequence(x: torch.Tensor) -> torch.Tensor:
    """(batch, channels, height, width) -> (batch, channels, 1, height * width), with no shape arithmetic."""
    return x.flatten(2).unsqueeze(2)


def original_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, scale: float) -> torch.Tensor:
    """Softmax attention over all heads at once; q (b, c, 1, n), k and v (b, c, 1, m) -> (b, c, 1, n)."""
    q, k, v = (t.unflatten(1, (heads, -1)).squeeze(3) for t in (q, k, v))  # (b, heads, dim, seq)
    weights = torch.einsum("bhcq,bhck->bhqk", q * scale, k).softmax(dim=3)
    return torch.einsum("bhqk,bhck->bhcq", weights, v).flatten(1, 2).unsqueeze(2)


def split_einsum_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, scale: float
                           ) -> torch.Tensor:
    """The same attention, one head at a time on 4-D tensors with the keys on axis 1 (Apple's split_einsum)."""
    out = []
    for qh, kh, vh in zip(_split_heads(q, heads), _split_heads(k, heads), _split_heads(v, heads)):
        weights = torch.einsum("bchq,bkhc->bkhq", qh * scale, kh.transpose(1, 3)).softmax(dim=1)  # (b, m, 1, n)
        out.append(torch.einsum("bkhq,bchk->bchq", weights, vh))
    return torch.cat(out, dim=1)


def _split_heads(x: torch.Tensor, heads: int) -> tuple[torch.Tensor, ...]:
    # coremltools cannot convert a chunk into one piece (the VAE's single-head attention)
    return x.chunk(heads, dim=1) if heads > 1 else (x,)


KERNELS = {ORIGINAL: original_attention, SPLIT_EINSUM: split_einsum_attention}


def conv_from_linear(linear: nn.Linear) -> nn.Conv2d:
    """A 1x1 convolution computing `linear` on the channel axis (its weight gains two unit axes)."""
    conv = nn.Conv2d(linear.in_features, linear.out_features, kernel_size=1, bias=linear.bias is not None)
    conv.weight.data = linear.weight.data[:, :, None, None].clone()
    if linear.bias is not None:
        conv.bias.data = linear.bias.data.clone()
    return conv


def conv_1x1(layer: nn.Module) -> nn.Conv2d:
    """A linear layer as a 1x1 convolution; a 1x1 convolution (SD 1.x's proj_in/proj_out) copied as it is."""
    if isinstance(layer, nn.Linear):
        return conv_from_linear(layer)
    if isinstance(layer, nn.Conv2d) and layer.kernel_size == (1, 1):
        return copy.deepcopy(layer)
    raise ExportError(f"expected a linear layer or a 1x1 convolution, got {layer}")


class ChannelLayerNorm(nn.Module):
    """nn.LayerNorm over axis 1 of (batch, channels, 1, sequence), scale then shift as torch applies them.

    Apple's LayerNormANE adds the bias before scaling and divides the loaded bias by the weight to compensate; this
    form keeps torch's order, so the weights load unchanged.
    """

    def __init__(self, norm: nn.LayerNorm):
        super().__init__()
        if len(norm.normalized_shape) != 1:
            raise ExportError(f"expected a layer norm over one axis, got {norm.normalized_shape}")
        self.eps = norm.eps
        channels = norm.normalized_shape[0]
        self.weight = nn.Parameter(norm.weight.data.clone() if norm.weight is not None else torch.ones(channels))
        self.bias = nn.Parameter(norm.bias.data.clone() if norm.bias is not None else torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        centered = x - x.mean(dim=1, keepdim=True)
        normalized = centered * torch.rsqrt((centered * centered).mean(dim=1, keepdim=True) + self.eps)
        return normalized * self.weight[:, None, None] + self.bias[:, None, None]


class ConvAttention(nn.Module):
    """diffusers' Attention (attention_processor.py) on (batch, channels, 1, sequence): 1x1 convolutions and a
    kernel from KERNELS. Kernels scale each head's query before the product rather than the logits after it (as
    Apple does): the same softmax, a multiply over (dim, n) values per head instead of (m, n), and fp16 logits of
    smaller magnitude. After the head split, not on the projection's output, so the converter keeps the projection's
    weights as they are (it folds a multiply that directly follows a convolution into its weights).
    """

    def __init__(self, attn: nn.Module, kernel: str):
        super().__init__()
        unsupported = [name for name in ("spatial_norm", "norm_cross", "norm_q", "added_kv_proj_dim")
                       if getattr(attn, name, None) is not None]
        if unsupported:
            raise ExportError(f"Core ML export: attention with {', '.join(unsupported)} is not supported")
        self.heads, self.scale, self.kernel = attn.heads, attn.scale, KERNELS[kernel]
        self.to_q, self.to_k, self.to_v = conv_1x1(attn.to_q), conv_1x1(attn.to_k), conv_1x1(attn.to_v)
        self.to_out = conv_1x1(attn.to_out[0])

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        return self.to_out(self.kernel(q, k, v, self.heads, self.scale))


class ConvFeedForward(nn.Module):
    """diffusers' FeedForward (GEGLU or GELU, then a linear layer) with 1x1 convolutions; gating on axis 1."""

    def __init__(self, ff: nn.Module):
        super().__init__()
        act = ff.net[0]
        self.kind = type(act).__name__
        if self.kind not in (GEGLU, GELU) or getattr(act, "approximate", "none") != "none":
            raise ExportError(f"Core ML export: feed-forward activation {self.kind} is not supported (GEGLU, GELU)")
        self.proj, self.out = conv_1x1(act.proj), conv_1x1(ff.net[-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.proj(x)
        if self.kind == GEGLU:
            h, gate = h.chunk(2, dim=1)
            h = h * F.gelu(gate)
        else:
            h = F.gelu(h)
        return self.out(h)


class ConvTransformerBlock(nn.Module):
    """diffusers' BasicTransformerBlock with layer norms (SD's): self-attention, cross-attention, feed-forward."""

    def __init__(self, block: nn.Module, kernel: str):
        super().__init__()
        if block.norm_type != "layer_norm" or block.only_cross_attention or block.pos_embed is not None:
            raise ExportError("Core ML export: only SD's transformer blocks (layer norms, self- then cross-attention)"
                              " are supported")
        self.norm1, self.attn1 = ChannelLayerNorm(block.norm1), ConvAttention(block.attn1, kernel)
        self.norm2, self.attn2 = ChannelLayerNorm(block.norm2), ConvAttention(block.attn2, kernel)
        self.norm3, self.ff = ChannelLayerNorm(block.norm3), ConvFeedForward(block.ff)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class ConvSpatialTransformer(nn.Module):
    """diffusers' Transformer2DModel (continuous input) in (batch, channels, 1, height * width) layout.

    Called by diffusers' UNet blocks in place of the original, with the same arguments; returns a 1-tuple as the
    original does with return_dict=False (the only way the blocks call it).
    """

    def __init__(self, transformer: nn.Module, kernel: str):
        super().__init__()
        if not transformer.is_input_continuous:
            raise ExportError("Core ML export: only continuous-input spatial transformers (SD's) are supported")
        self.norm = copy.deepcopy(transformer.norm)
        self.proj_in, self.proj_out = conv_1x1(transformer.proj_in), conv_1x1(transformer.proj_out)
        self.blocks = nn.ModuleList(ConvTransformerBlock(b, kernel) for b in transformer.transformer_blocks)

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor, **unused) -> tuple:
        masks = [name for name, value in unused.items() if "mask" in name and value is not None]
        if masks:
            raise ExportError(f"Core ML export: attention masks ({', '.join(masks)}) are not supported")
        context = encoder_hidden_states.transpose(1, 2).unsqueeze(2)  # (batch, dim, 1, tokens)
        x = to_sequence(self.proj_in(self.norm(hidden_states)))
        for block in self.blocks:
            x = block(x, context)
        return (self.proj_out(x.reshape(hidden_states.shape)) + hidden_states,)


class ConvSpatialSelfAttention(nn.Module):
    """The VAE's mid-block Attention (group norm, self-attention over pixels, residual) in the same layout."""

    def __init__(self, attn: nn.Module, kernel: str):
        super().__init__()
        if attn.group_norm is None or not attn.residual_connection:
            raise ExportError("Core ML export: expected the VAE's attention block (group norm and residual)")
        self.norm = copy.deepcopy(attn.group_norm)
        self.attention = ConvAttention(attn, kernel)
        self.rescale = attn.rescale_output_factor

    def forward(self, hidden_states: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        out = self.attention(to_sequence(self.norm(hidden_states)))
        return (out.reshape(hidden_states.shape) + hidden_states) / self.rescale


def rewrite_unet(unet: nn.Module, attention: str) -> nn.Module:
    """A copy of a diffusers UNet2DConditionModel with every spatial transformer in Core ML form."""
    return _replaced(unet, "Transformer2DModel", lambda m: ConvSpatialTransformer(m, attention), attention)


def rewrite_vae(vae: nn.Module, attention: str) -> nn.Module:
    """A copy of a diffusers AutoencoderKL with its attention blocks in Core ML form."""
    return _replaced(vae, "Attention", lambda m: ConvSpatialSelfAttention(m, attention), attention)


def _replaced(model: nn.Module, class_name: str, make, attention: str) -> nn.Module:
    if attention not in ATTENTIONS:
        raise ExportError(f"attention must be one of {', '.join(ATTENTIONS)}, got {attention!r}")
    model = copy.deepcopy(model)
    targets = [(name, m) for name, m in model.named_modules() if type(m).__name__ == class_name]
    for name, module in targets:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, make(module))
    return model.eval()

