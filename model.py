"""
LLaMA-2 in one file: the model alone. loaders.py reads Meta, HF and GGUF checkpoints into it.

References:
1) Touvron et al. 2023, "Llama 2: Open Foundation and Fine-Tuned Chat Models".
2) Meta's reference code (github.com/meta-llama/llama, llama/model.py): the names and
   the checkpoint layout below are Meta's, so a Meta checkpoint loads with no renaming.
3) Su et al. 2021, "RoFormer" for rotary position embeddings (RoPE).

Shapes: B batch, T tokens in this call, S tokens attended to (cache + this call),
nh query heads, nkv key/value heads, hd head dim, D model dim.
"""
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from errors import UserError


@dataclass
class ModelArgs:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: Optional[int] = None  # < n_heads means grouped-query attention (70B)
    vocab_size: int = -1  # -1: take it from the tokenizer
    multiple_of: int = 256  # the FFN hidden size is rounded up to a multiple of this
    ffn_dim_multiplier: Optional[float] = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 4096  # Llama 2's context length; RoPE tables are this long
    hidden_dim: Optional[int] = None  # FFN size; None means Meta's formula below
    head_dim: Optional[int] = None  # None means dim / n_heads, as in Llama 2 (other models choose it)

    def __post_init__(self):
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.hidden_dim is None:
            # Meta's formula: 2/3 of 4*dim (SwiGLU has three matrices, not two), scaled, rounded up.
            # 7B: 4096 -> 11008, 13B: 5120 -> 13824, 70B: 8192 (x1.3) -> 28672.
            hidden = int(2 * (4 * self.dim) / 3)
            if self.ffn_dim_multiplier is not None:
                hidden = int(self.ffn_dim_multiplier * hidden)
            self.hidden_dim = self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)
        if self.head_dim is None:
            assert self.dim % self.n_heads == 0
            self.head_dim = self.dim // self.n_heads
        assert self.n_heads % self.n_kv_heads == 0


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # x / sqrt(mean(x^2) + eps), then the learned gain. Computed in fp32 even for a bf16 model: bf16 keeps
        # 8 bits of mantissa, too few for a mean of squares. F.rms_norm is that formula in one call (fewer
        # small kernels per decode step than spelling it out, and the same result to the bit here).
        return F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).type_as(x) * self.weight


def rope_table(args: ModelArgs, device=None):
    """Meta's freqs_cis: cos + i*sin of the rotation angle pos * theta^(-2i/hd), (max_seq_len, hd/2) complex64."""
    inv_freq = 1.0 / (args.rope_theta ** (torch.arange(0, args.head_dim, 2, device=device).float() / args.head_dim))
    angles = torch.outer(torch.arange(args.max_seq_len, device=device).float(), inv_freq)
    return torch.complex(angles.cos(), angles.sin())


def apply_rope(x, rot):
    """Rotate adjacent pairs (x[2i], x[2i+1]) by angle pos*theta_i. Read as the complex number x[2i] + i*x[2i+1],
    a pair turns by multiplying it with rot = cos + i*sin (Meta's freqs_cis): one kernel instead of six.
    x: (B, T, nh, hd); rot: (B|1, T, 1, hd/2) complex64."""
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))  # (B, T, nh, hd/2)
    return torch.view_as_real(pairs * rot).flatten(-2).type_as(x)  # (B, T, nh, hd/2, 2) -> (B, T, nh, hd)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer_id: int):
        super().__init__()
        self.layer_id = layer_id  # the KV cache keeps one slot per layer
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)

    def forward(self, x, rot, mask, cache=None, start_pos=0):
        # QKV, then attention, then the output projection
        return self.wo(self.attend(self.wq(x), self.wk(x), self.wv(x), rot, mask, cache, start_pos))

    def attend(self, q, k, v, rot, mask, cache=None, start_pos=0):
        """softmax(q k^T / sqrt(hd) + mask) v, with RoPE and the cache: q (B, T, nh*hd), k, v (B, T, nkv*hd) ->
        (B, T, nh*hd). Apart from forward() so that an adapted block can change q, k, v on their way in (para.py)."""
        B, T, _ = q.shape
        q = q.view(B, T, self.n_heads, self.head_dim)
        k = k.view(B, T, self.n_kv_heads, self.head_dim)
        v = v.view(B, T, self.n_kv_heads, self.head_dim)
        # RoPE on queries and keys only
        q, k = apply_rope(q, rot), apply_rope(k, rot)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, nh|nkv, T, hd)
        if cache is not None:
            # write this call's keys/values at [start_pos, start_pos+T), read back all of [0, start_pos+T)
            k, v = cache.update(self.layer_id, start_pos, k, v)  # (B, nkv, S, hd)
        # softmax(q k^T / sqrt(hd) + mask) v, fused. enable_gqa lets each group of nh/nkv query
        # heads share one key/value head, so the cache only ever holds nkv heads. In the cache's dtype: generate.py
        # keeps a bf16 model's cache in fp32 on a CPU without AMX, where fused bf16 attention is several times slower
        y = F.scaled_dot_product_attention(q.to(k.dtype), k, v, attn_mask=mask, is_causal=mask is None and T > 1,
                                           enable_gqa=self.n_kv_heads != self.n_heads).to(q.dtype)  # (B, nh, T, hd)
        return y.transpose(1, 2).reshape(B, T, -1)


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)  # gate
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)  # down
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)  # up

    def forward(self, x):
        # SwiGLU: (silu(x W1) * x W3) W2, the paper's Eq. 2 with g = SiLU
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs, layer_id: int):
        super().__init__()
        self.attention = Attention(args, layer_id)
        self.feed_forward = FeedForward(args.dim, args.hidden_dim)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x, rot, mask, cache=None, start_pos=0):
        h = x + self.attention(self.attention_norm(x), rot, mask, cache, start_pos)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        assert args.vocab_size > 0, "set vocab_size (params.json's -1 means: the tokenizer's size)"
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args, i) for i in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        # A plain attribute, not a buffer: Module.to(torch.bfloat16) would cast a complex buffer to a real one and
        # drop the sines. forward() moves it to the input's device. Not in checkpoints: it is derived from args.
        self.freqs_cis = rope_table(args)  # (max_seq_len, hd/2) complex64
        self.grad_checkpointing = False  # train.py sets it: recompute each block in backward to save memory

    def forward(self, tokens, start_pos=0, pad_len=None, cache=None, last_only=False, logits_at=None, **block_args):
        """
        tokens: (B, T) ids, written at positions [start_pos, start_pos+T) of the sequence (and of the cache).
            start_pos is an int, or a 0-d tensor for a compiled decode step (generate.py --compile).
        pad_len: (B,) number of left-padding tokens in each row, or None. Row b's real tokens start at
            column pad_len[b]; RoPE positions count from there, and padding is never attended to.
        cache: an object with update(layer_id, start_pos, k, v) -> (k, v) (see generate.KVCache), or None.
        logits_at: (B, T) bool, or None. Logits only where it is True, as (N, vocab) rows in row-major order.
            Training needs them at the answer's positions only: projecting the prompt's onto the vocabulary would
            be work thrown away, and a lot of it (a fifth of SmolLM2's forward compute, 49,152 x 576 per position).
        block_args: what the blocks of an adapted model take besides (para.py's prompt_len and vectors, a bank's
            adapter_ids; adapters.block_args says which), handed to every block. model.py's own blocks take none.
        Returns fp32 logits (B, T, vocab); (B, 1, vocab) for the last position if last_only; (N, vocab) if logits_at.
        """
        B, T = tokens.shape
        if isinstance(start_pos, int) and start_pos + T > self.args.max_seq_len:
            raise UserError(f"sequence of {start_pos + T} tokens is longer than the model's context of "
                            f"{self.args.max_seq_len}: shorten the prompt or ask for fewer new tokens")
        h = self.embed(tokens)  # (B, T, D)
        positions = start_pos + torch.arange(T, device=tokens.device)  # (T,)
        rot, mask = self.rope_and_mask(positions, start_pos, pad_len, cache)
        for layer in self.layers:
            if self.grad_checkpointing and self.training:
                h = checkpoint(layer, h, rot, mask, cache, start_pos, use_reentrant=False, **block_args)
            else:
                h = layer(h, rot, mask, cache, start_pos, **block_args)
        if last_only:
            h = h[:, -1:]  # (B, 1, D): decoding needs the next token's logits only
        elif logits_at is not None:
            h = h[logits_at]  # (N, D)
        return self.output(self.norm(h)).float()

    def embed(self, tokens):
        return self.tok_embeddings(tokens)

    def rope_and_mask(self, positions, start_pos, pad_len, cache):
        """The rotation of each query and key, (B|1, T, 1, hd/2), and the attention mask (B|1, 1, T, S), or None
        where SDPA's own causal mask is right, for the tokens at cache positions `positions` (T,)."""
        if self.freqs_cis.device != positions.device:  # once, after model.to(device): it is not a buffer
            self.freqs_cis = self.freqs_cis.to(positions.device)
        rot = rotations(self.freqs_cis, positions, pad_len)
        # SDPA's own causal mask (is_causal) is aligned top-left: query i sees keys 0..i. That is right for a whole
        # sequence and for a single decode query (it sees everything), wrong for padding, for a chunk of several
        # tokens appended to a cache, and for a static cache, whose keys run to its end: those need a mask
        chunk_after_cache = cache is not None and len(positions) > 1 and start_pos > 0
        static = getattr(cache, "static", False)
        if pad_len is not None or chunk_after_cache or static:
            return rot, attention_mask(positions, pad_len, cache.max_len if static else positions[-1] + 1)
        return rot, None


def rotations(table, positions, pad_len):
    """The RoPE rotations of the tokens at cache positions `positions` (T,), from a table (max_seq_len, hd/2):
    (1, T, 1, hd/2), or (B, T, 1, hd/2) when rows are left-padded: a row's positions count from its first real
    token, and padding gets position 0."""
    if pad_len is None:
        return table[positions][None, :, None]
    return table[(positions[None] - pad_len[:, None]).clamp(min=0)][:, :, None]


def attention_mask(positions, pad_len, n_keys):
    """(B|1, 1, T, S) True where the query at positions[t] of row b may attend to cache column s < S = n_keys:
    causally (s <= its position), and never to row b's left padding (s < pad_len[b]). A padding query may attend
    to itself, so that no row of the softmax is empty (which would give NaN)."""
    keys = torch.arange(n_keys, device=positions.device)  # (S,) cache columns
    causal = keys[None, :] <= positions[:, None]  # (T, S)
    if pad_len is None:
        return causal[None, None]
    real = keys[None, :] >= pad_len[:, None]  # (B, S)
    itself = keys[None, :] == positions[:, None]  # (T, S)
    return (causal[None] & (real[:, None] | itself[None]))[:, None]
