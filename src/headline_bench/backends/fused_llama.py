"""The compiled loop's decode step for Llama-family models, written out gpt-fast style over transformers' own modules
and StaticCache: q/k/v and gate/up as one matmul each, and grouped-query attention on the key/value heads.

Why: transformers' forward, traced for one token, runs five projections per layer where two read one input each
(q, k, v; gate, up), copies every layer's keys and values into one per query head (`repeat_kv`: its sdpa turns
grouped-query attention off under a mask, and its `pack_gqa` shortcut is skipped while compiling) and does the cache's
position arithmetic per layer. On a GPU each is bytes read or a kernel per layer per token. Here the weights are fused
once, at load (the model's own projections become views into the fused tensors, so nothing is stored twice and the
eager prefill still runs the model's forward), the step writes each layer's key and value at the one slot `pos` and
attends with a group's query heads as the query rows of its key/value head (transformers' eager `pack_gqa`).

Projections that are not plain tensors (torchao int4 / int8 subclasses, bitsandbytes) stay apart: on CPU inductor's
`cpp.enable_concat_linear` concatenates int4 ones itself (compiled_loop_cpu).
"""

from __future__ import annotations

import sys
from typing import Any

import torch
import torch.nn.functional as F

SUPPORTED = ("llama",)  # model_type values whose decoder layer is exactly the one `FusedLayer` writes out


def grouped_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, visible: torch.Tensor, scaling: float,
                      arithmetic: bool) -> torch.Tensor:
    """One query token per row over the cache, grouped-query heads never copied.

    Args:
        q: [B, H, 1, d] queries; keys, values: [B, Hkv, L, d] (the cache); visible: [B, L], False on padding and
            slots not written yet.
        arithmetic: multiply-sum, masked softmax and multiply-sum in float32 (inductor fuses it on CPU; the loop's
            `attention: fused`) instead of torch's sdpa.

    Returns:
        [B, 1, H * d], heads in the model's order (query head h reads key/value head h // (H / Hkv)).
    """
    b, heads, _, d = q.shape
    groups = keys.shape[1]
    q = q.reshape(b, groups, heads // groups, d)  # a group's query heads as the query rows of its key/value head
    mask = visible[:, None, None, :]  # [B, 1, 1, L]: every head, every row
    if arithmetic:
        scores = (q.float()[..., None, :] * keys[:, :, None].float()).sum(-1) * scaling  # [B, Hkv, H/Hkv, L]
        weights = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
        out = (weights[..., None] * values[:, :, None].float()).sum(-2).to(q.dtype)  # [B, Hkv, H/Hkv, d]
    else:
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scaling)
    return out.reshape(b, 1, heads * d)


def plain(module: Any) -> bool:
    """A linear whose weight (and bias) are ordinary tensors, which torch.cat can join."""
    tensors = [module.weight] + ([module.bias] if getattr(module, "bias", None) is not None else [])
    return all(type(t) in (torch.Tensor, torch.nn.Parameter) for t in tensors)


def fuse(*linears: Any) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """The weights of linears that read one input, as one [sum of outputs, in] tensor (and bias); each module's weight
    then becomes a view of its rows, so nothing is stored twice. A second loop on the same model reuses the first
    fusion. None when a weight is not a plain tensor or the biases are mixed."""
    if not all(plain(m) for m in linears) or len({getattr(m, "bias", None) is None for m in linears}) > 1:
        return None
    done = getattr(linears[0], "fused_weights", None)
    if done is not None and linears[0].weight.data_ptr() == done[0].data_ptr():
        return done
    with torch.no_grad():
        weight = torch.cat([m.weight.detach() for m in linears])
        bias = torch.cat([m.bias.detach() for m in linears]) if linears[0].bias is not None else None
        start = 0
        for m in linears:
            rows = slice(start, start + m.weight.shape[0])
            m.weight = torch.nn.Parameter(weight[rows], requires_grad=False)
            if bias is not None:
                m.bias = torch.nn.Parameter(bias[rows], requires_grad=False)
            start = rows.stop
    linears[0].fused_weights = (weight, bias)
    return weight, bias


class Projection(torch.nn.Module):
    """Linears that read one input: one matmul over their fused weight, split back; apart where they cannot fuse."""

    def __init__(self, *linears: Any) -> None:
        super().__init__()
        self.parts = torch.nn.ModuleList(linears)
        self.sizes = [m.weight.shape[0] for m in linears] if (fused := fuse(*linears)) else []
        self.register_buffer("weight", fused[0] if fused else None, persistent=False)
        self.register_buffer("bias", fused[1] if fused else None, persistent=False)
        for tensor in (self.weight, self.bias):
            if tensor is not None:
                torch._dynamo.mark_static_address(tensor)  # a CUDA graph reads it in place, never copies it in

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.weight is None:
            return tuple(m(x) for m in self.parts)
        return F.linear(x, self.weight, self.bias).split(self.sizes, dim=-1)


class FusedLayer(torch.nn.Module):
    """One Llama decoder layer for one token: the model's norms, o_proj and down_proj, fused q/k/v and gate/up."""

    def __init__(self, layer: Any) -> None:
        super().__init__()
        attn, mlp = layer.self_attn, layer.mlp
        self.input_norm, self.post_norm = layer.input_layernorm, layer.post_attention_layernorm
        self.qkv, self.o = Projection(attn.q_proj, attn.k_proj, attn.v_proj), attn.o_proj
        self.gate_up, self.down, self.act = Projection(mlp.gate_proj, mlp.up_proj), mlp.down_proj, mlp.act_fn


class FusedStep(torch.nn.Module):
    """Logits [B, V] of the next token for every row, from the token just chosen, with the cache written at `pos`."""

    def __init__(self, model: Any) -> None:
        super().__init__()
        inner, config = model.model, model.config.get_text_config()
        self.embed, self.rotary, self.norm, self.head = inner.embed_tokens, inner.rotary_emb, inner.norm, model.lm_head
        self.layers = torch.nn.ModuleList(FusedLayer(layer) for layer in inner.layers[: config.num_hidden_layers])
        attn = inner.layers[0].self_attn
        self.heads, self.kv_heads, self.head_dim, self.scaling = config.num_attention_heads, config.num_key_value_heads, attn.head_dim, attn.scaling
        self.rope = sys.modules[type(attn).__module__].apply_rotary_pos_emb  # the model's own RoPE arithmetic

    @staticmethod
    def supports(model: Any) -> bool:
        return getattr(model.config, "model_type", None) in SUPPORTED and hasattr(getattr(model, "model", None), "rotary_emb")

    def forward(self, token: torch.Tensor, position_ids: torch.Tensor, visible: torch.Tensor, cache: Any, pos: torch.Tensor,
                arithmetic: bool) -> torch.Tensor:
        """token: [B, 1]; position_ids: [B, 1]; visible: [B, L]; pos: [] the cache slot of this token; arithmetic: see
        `grouped_attention`."""
        b = token.shape[0]
        x = self.embed(token)  # [B, 1, D]
        cos, sin = self.rotary(x, position_ids)  # [B, 1, d]
        slot = pos.view(1)
        for layer, cached in zip(self.layers, cache.layers):
            q, k, v = layer.qkv(layer.input_norm(x))
            q = q.view(b, 1, self.heads, self.head_dim).transpose(1, 2)  # [B, H, 1, d]
            k = k.view(b, 1, self.kv_heads, self.head_dim).transpose(1, 2)  # [B, Hkv, 1, d]
            q, k = self.rope(q, k, cos, sin)
            cached.keys.index_copy_(2, slot, k)
            cached.values.index_copy_(2, slot, v.view(b, 1, self.kv_heads, self.head_dim).transpose(1, 2))
            x = x + layer.o(grouped_attention(q, cached.keys, cached.values, visible, self.scaling, arithmetic))
            gate, up = layer.gate_up(layer.post_norm(x))
            x = x + layer.down(layer.act(gate) * up)
        return self.head(self.norm(x)[:, -1])  # [B, V]
