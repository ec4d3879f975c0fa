"""
Gemma (the paper's second backbone, Table 5) as a diff against model.py's LLaMA-2: each class below subclasses
LLaMA's and changes only what Gemma does differently, so that model.py stays the LLaMA-2 a student reads.

Gemma 1 (Team Gemma 2024; the paper's Gemma 2B) differs from Llama 2 in five places:
- the embeddings are scaled by sqrt(dim), and tied to the output (the LM head);
- RMSNorm scales by (1 + w), not w, computed in fp32 to the end;
- the FFN is GeGLU with tanh-GELU: (gelu_tanh(x W1) ⊙ x W3) W2, where Llama 2 uses SiLU;
- a head's size is its own setting (256), not dim / n_heads; 2B has multi-query attention (one key/value head);
- attention scores are scaled by query_pre_attn_scalar ** -0.5 (Gemma 3; Gemma 1: head_dim ** -0.5, the same).
Gemma 3 (Team Gemma 2025) adds three:
- QK-norm: Q and K are RMS-normalised per head, after the projection and before RoPE;
- a norm after each sublayer too: x + post_norm(sublayer(pre_norm(x)));
- local attention: five of every six layers see only the last sliding_window (512) positions, with RoPE base 10k;
  the sixth sees everything, with RoPE base 1M.

PARA on Gemma scales what it scales on Llama 2: Q = x Wq, V = x Wv and U = x W3 (Gemma's up_proj), each the
projection's output, exactly Eq. 4 and 5. On Gemma 3 the per-head norm follows Q, so it removes the part of l_q that
is uniform within a head (a head's query keeps its length, it can only turn); l_v and l_u keep their full effect.
The same place is where every baseline adapts wq (LoRA, (IA)^3), so PARA's static twin stays its twin (README).
"""
import math
from dataclasses import dataclass, replace
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

import adapters
import para
from model import (Attention, FeedForward, ModelArgs, RMSNorm, Transformer, TransformerBlock, apply_rope,
                   attention_mask, rope_table, rotations)


@dataclass
class GemmaArgs(ModelArgs):
    version: int = 3  # 1: Gemma (2B, 7B); 3: Gemma 3 (QK-norm, post-norms, local attention)
    norm_eps: float = 1e-6
    query_pre_attn_scalar: Optional[float] = None  # scores are scaled by its -1/2 power; None: head_dim's
    sliding_window: int = 512  # Gemma 3's local layers see this many positions (their own included)
    global_every: int = 6  # Gemma 3: layers 5, 11, 17, ... (every sixth) are global, the others local
    rope_local_theta: float = 10_000.0  # Gemma 3's local layers; rope_theta is the global layers' (1M)

    def is_local(self, layer_id: int) -> bool:
        return self.version >= 3 and (layer_id + 1) % self.global_every != 0


class GemmaRMSNorm(RMSNorm):
    def __init__(self, dim: int, eps: float):
        super().__init__(dim, eps)
        nn.init.zeros_(self.weight)  # the scale is 1 + w

    def forward(self, x):
        # x / sqrt(mean(x^2) + eps) * (1 + w), all in fp32, cast once at the end (Llama casts before the scale)
        return (F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps) * (1.0 + self.weight.float())).type_as(x)


class GemmaAttention(Attention):
    def __init__(self, args: GemmaArgs, layer_id: int):
        super().__init__(args, layer_id)
        self.local = args.is_local(layer_id)
        self.window = args.sliding_window
        self.scale = (args.query_pre_attn_scalar or args.head_dim) ** -0.5
        if args.version >= 3:  # QK-norm, per head, over head_dim
            self.q_norm, self.k_norm = GemmaRMSNorm(args.head_dim, args.norm_eps), GemmaRMSNorm(args.head_dim, args.norm_eps)

    def attend(self, q, k, v, rot, mask, cache=None, start_pos=0):
        """model.Attention.attend, with QK-norm before RoPE, Gemma's score scale, and this layer's RoPE table and
        mask: rot and mask hold a local and a global one (Gemma.rope_and_mask)."""
        B, T, _ = q.shape
        q = q.view(B, T, self.n_heads, self.head_dim)
        k = k.view(B, T, self.n_kv_heads, self.head_dim)
        v = v.view(B, T, self.n_kv_heads, self.head_dim)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        kind = "local" if self.local else "global"
        q, k = apply_rope(q, rot[kind]), apply_rope(k, rot[kind])
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, nh|nkv, T, hd)
        if cache is not None:
            k, v = cache.update(self.layer_id, start_pos, k, v)  # (B, nkv, S, hd)
        m = mask[kind]
        y = F.scaled_dot_product_attention(q.to(k.dtype), k, v, attn_mask=m, is_causal=m is None and T > 1,
                                           scale=self.scale, enable_gqa=self.n_kv_heads != self.n_heads).to(q.dtype)
        return y.transpose(1, 2).reshape(B, T, -1)


class GemmaFeedForward(FeedForward):
    def forward(self, x):
        # GeGLU: (gelu_tanh(x W1) * x W3) W2
        return self.w2(F.gelu(self.w1(x), approximate="tanh") * self.w3(x))


class GemmaBlock(TransformerBlock):
    def __init__(self, args: GemmaArgs, layer_id: int):
        nn.Module.__init__(self)
        self.attention = GemmaAttention(args, layer_id)
        self.feed_forward = GemmaFeedForward(args.dim, args.hidden_dim)
        self.attention_norm = GemmaRMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = GemmaRMSNorm(args.dim, args.norm_eps)
        if args.version >= 3:  # a norm after each sublayer too
            self.post_attention_norm = GemmaRMSNorm(args.dim, args.norm_eps)
            self.post_ffn_norm = GemmaRMSNorm(args.dim, args.norm_eps)

    def post(self, name, y):
        """Gemma 3's norm after a sublayer; Gemma 1 has none."""
        return getattr(self, name)(y) if hasattr(self, name) else y

    def forward(self, x, rot, mask, cache=None, start_pos=0):
        h = x + self.post("post_attention_norm", self.attention(self.attention_norm(x), rot, mask, cache, start_pos))
        return h + self.post("post_ffn_norm", self.feed_forward(self.ffn_norm(h)))


class Gemma(Transformer):
    def __init__(self, args: GemmaArgs):
        nn.Module.__init__(self)
        assert args.vocab_size > 0
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(GemmaBlock(args, i) for i in range(args.n_layers))
        self.norm = GemmaRMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        self.output.weight = self.tok_embeddings.weight  # tied
        self.freqs_cis = rope_table(args)  # the global layers'
        self.freqs_cis_local = None  # the local layers', made on the device of the first call
        self.grad_checkpointing = False

    def embed(self, tokens):
        h = self.tok_embeddings(tokens)
        return h * torch.tensor(math.sqrt(self.args.dim), dtype=h.dtype)  # rounded to the weights' dtype, as HF

    def rope_and_mask(self, positions, start_pos, pad_len, cache):
        """model.Transformer.rope_and_mask for the global layers, and the local layers' own: their RoPE base, and
        the mask of model.py with the keys more than sliding_window positions back hidden."""
        rot, mask = super().rope_and_mask(positions, start_pos, pad_len, cache)
        if self.args.version < 3:
            return {"global": rot}, {"global": mask}
        if self.freqs_cis_local is None or self.freqs_cis_local.device != positions.device:
            self.freqs_cis_local = rope_table(replace(self.args, rope_theta=self.args.rope_local_theta),
                                              positions.device)
        local_rot = rotations(self.freqs_cis_local, positions, pad_len)
        n_keys = cache.max_len if getattr(cache, "static", False) else positions[-1] + 1
        local_mask = attention_mask(positions, pad_len, n_keys) if mask is None else mask
        keys = torch.arange(n_keys, device=positions.device)
        local_mask = local_mask & (keys[None, :] > positions[:, None] - self.args.sliding_window)  # (B|1, 1, T, S)
        return {"global": rot, "local": local_rot}, {"global": mask, "local": local_mask}


# -----------------------------------------------------------------------------
# Adapters on Gemma: the blocks that para.py and adapters.py make of a loaded block, written for Gemma's


class GemmaPARABlock(para.PARABlock, GemmaBlock):
    """para.PARABlock on Gemma's block: the same vectors, scaling the same projections' outputs."""

    def forward(self, x, rot, mask, cache=None, start_pos=0, prompt_len=None, vectors=None, adapter_ids=None):
        a = self.attention_norm(x)
        l_q, l_v, l_u = self.prompt_vectors(a, start_pos, prompt_len, vectors, adapter_ids)
        att, ffn = self.attention, self.feed_forward
        q, v = para.scale(l_q, att.wq(a)), para.scale(l_v, att.wv(a))  # Eq. 4, before Gemma 3's QK-norm
        h = x + self.post("post_attention_norm", att.wo(att.attend(q, att.wk(a), v, rot, mask, cache, start_pos)))
        f = self.ffn_norm(h)
        u = para.scale(l_u, ffn.w3(f))  # Eq. 5
        return h + self.post("post_ffn_norm", ffn.w2(F.gelu(ffn.w1(f), approximate="tanh") * u))


class GemmaBankBlock(adapters.BankBlock, GemmaBlock):
    """adapters.BankBlock on Gemma's block: each bank projection picks each row's adapter."""

    def forward(self, x, rot, mask, cache=None, start_pos=0, adapter_ids=None):
        att, ffn, ids, project = self.attention, self.feed_forward, adapter_ids, adapters.project
        a = project(self.attention_norm, x, ids)  # a norm is a bank too under SSP
        q, k, v = project(att.wq, a, ids), project(att.wk, a, ids), project(att.wv, a, ids)
        h = x + self.post("post_attention_norm", project(att.wo, att.attend(q, k, v, rot, mask, cache, start_pos), ids))
        f = project(self.ffn_norm, h, ids)
        g = F.gelu(project(ffn.w1, f, ids), approximate="tanh")
        return h + self.post("post_ffn_norm", project(ffn.w2, g * project(ffn.w3, f, ids), ids))


para.PARA_BLOCKS[GemmaBlock] = GemmaPARABlock
adapters.BANK_BLOCKS[GemmaBlock] = GemmaBankBlock
