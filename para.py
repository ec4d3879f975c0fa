"""
PARA: Prompt Aware Representation Adjustment (Liu et al. 2024, Sec. 3.2), on model.py's LLaMA-2.

One Transformer layer under PARA (B batch, T tokens, D model dim):

    x (B, T, D) ──────────────────────────────────────────────────────────── residual ──┐
     │ Pooler: the last prompt token of each row, x[i, prompt_len[i]-1]  (B, D)           │
     │   └ attention_norm ─ VG: W_down ─ GELU ─ W_up + b_up ─ split ─► l_q, l_v, l_u       │  Eq. 6, Eq. 3
     │     (on the prompt only: training, or the prefill; decode steps reuse the vectors)  │
     ├ attention_norm ─┬ wq ─► Q' = l_q ⊙ Q ─ RoPE ┐                                       │
     │                 ├ wk ─► K ───────── RoPE ───┼ softmax(Q'K^T/√hd) V'                 │  Eq. 4
     │                 └ wv ─► V' = l_v ⊙ V ─ cache┘                                       │
     └ ffn_norm ───────┬ w1 ─► G ─ SiLU ─┐                                                 │
                       └ w3 ─► U' = l_u ⊙ U ─ ⊙ ─ w2                                       │  Eq. 5

The vectors are computed once per prompt. When generating, they are kept in the KV cache next to the keys
and values (generate.KVCache), so decode steps only multiply by them, and the VG never runs again.

adapters.py attaches PARA to a model, saves and loads it, and serves many PARA adapters in one batch.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from model import ModelArgs, TransformerBlock


class SharedLinear(nn.Linear):
    """An nn.Linear over another one's weight: the same tensor (no copy), under the same state-dict name.
    Adapted layers subclass it rather than wrap the loaded Linear: a wrapper would cost one more module call
    per projection and decode step, more than PARA's multiply."""

    def __init__(self, linear: nn.Linear):
        super().__init__(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        self.weight, self.bias = linear.weight, linear.bias  # replace the meta placeholders: nothing was allocated


def cast_back(out, dtype):
    """An adapter's fp32 result in the model's dtype. Under autocast (bf16 training) it stays fp32 until it meets
    the next operation (RoPE, SiLU(G) ⊙ U', a matmul): the base output it scales or adds to is a bf16 value,
    and cast right here, a change smaller than bf16's resolution (2^-8) would round back to it, so that an
    adapter near its start (a vector 1 + 1e-4) would change nothing at all."""
    if out.dtype == dtype or torch.is_autocast_enabled(out.device.type):  # fp32 models: nothing to do, at no cost
        return out
    return out.to(dtype)


class VectorGenerator(nn.Module):
    """Eq. 6: a bottleneck from the pooled prompt state to the three vectors l_q, l_v, l_u."""

    def __init__(self, args: ModelArgs, r: int, device=None):
        super().__init__()
        d_q, d_kv = args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim
        self.split_sizes = (d_q, d_kv, args.hidden_dim)  # l_q follows wq's rows: Meta's RoPE order
        d_out = sum(self.split_sizes)
        # Always fp32, even over a bf16 model: near 1.0, bf16 moves in steps of 2^-7, so small updates would vanish
        self.down = nn.Parameter(torch.randn(args.dim, r, device=device) * 0.02)  # W_down ~ N(0, 0.02)
        # W_up = 0 and b_up = 1: every vector starts at exactly 1, so a fresh adapter is the base model
        self.up = nn.Parameter(torch.zeros(r, d_out, device=device))
        self.bias = nn.Parameter(torch.ones(d_out, device=device))

    def forward(self, h):
        """h: (B, D) pooled, normed prompt state -> l_q (B, 1, d_q), l_v (B, 1, d_kv), l_u (B, 1, d_ffn), fp32."""
        l = F.gelu(h.float() @ self.down) @ self.up + self.bias  # Eq. 6: l = g(Pooler(h) W_down) W_up + b_up
        return l[:, None].split(self.split_sizes, dim=-1)  # Eq. 3: l_q, l_v, l_u = Split(l)  <- the vectors are born


class ScaledLinear(SharedLinear):
    """A frozen projection whose output each row scales by its own vector, handed in by PARABlock for one call."""

    vector = None  # (B, 1, out_features): l_q, l_v or l_u of each row of the batch being computed

    def forward(self, x):
        y = super().forward(x)  # x W^T, the loaded weight
        # in fp32: a vector 1 + delta cast to bf16 would stay exactly 1 until delta > 0.004
        return cast_back(self.vector * y.float(), y.dtype)  # Eq. 4: Q' = l_q ⊙ Q, V' = l_v ⊙ V; Eq. 5: U' = l_u ⊙ U


class PARABlock(TransformerBlock):
    """model.py's TransformerBlock plus a vector generator; its wq, wv and w3 become ScaledLinear."""

    def __init__(self, block: TransformerBlock, args: ModelArgs, r: int):
        nn.Module.__init__(self)  # not TransformerBlock.__init__, which would allocate fresh weights:
        for name, child in block.named_children():  # adopt the loaded block's modules instead
            self.add_module(name, child)
        self.vector_generator = VectorGenerator(args, r, device=block.attention.wq.weight.device)
        att, ffn = self.attention, self.feed_forward
        att.wq, att.wv, ffn.w3 = ScaledLinear(att.wq), ScaledLinear(att.wv), ScaledLinear(ffn.w3)

    def forward(self, x, rot, mask, cache=None, start_pos=0, prompt_len=None, adapter_ids=None):
        layer = self.attention.layer_id
        if isinstance(start_pos, int) and start_pos == 0:  # x holds the prompts (training, or a prefill)
            rows = torch.arange(x.shape[0], device=x.device)
            last = x[:, -1] if prompt_len is None else x[rows, prompt_len - 1]  # Pooler(h): (B, D)
            # The paper says only "the hidden states of the prompt at the current layer". We give the VG the state
            # as the attention sublayer sees it, after this layer's attention_norm: the same scale at every depth,
            # and immune to Llama 2's huge outlier activations in the residual stream.
            h = self.attention_norm(last)
            if adapter_ids is None:
                vectors = self.vector_generator(h)
            else:  # multi-tenant serving: a bank of vector generators (adapters.py), row i using adapter_ids[i]
                vectors = self.vector_generator(h, adapter_ids)
            if cache is not None:
                cache.vectors[layer] = vectors  # every decode step of these rows reuses them
        elif cache is not None and layer in cache.vectors:  # a decode step: the vectors of these rows' prompts
            vectors = cache.vectors[layer]
        else:
            raise RuntimeError("PARA has no vectors for these rows: run their prompt (start_pos=0) before decoding")
        att, ffn = self.attention, self.feed_forward
        att.wq.vector, att.wv.vector, ffn.w3.vector = vectors
        try:
            return super().forward(x, rot, mask, cache, start_pos)
        finally:  # the vectors belong to this call's rows: no later call may see them
            att.wq.vector = att.wv.vector = ffn.w3.vector = None


def add_para(model, r: int = 12) -> dict:
    """Make every block a PARABlock, in place; returns the adapter's settings."""
    for i, block in enumerate(model.layers):
        model.layers[i] = PARABlock(block, model.args, r)
    return {"r": r}
