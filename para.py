"""
PARA: Prompt Aware Representation Adjustment (Liu et al. 2024, Sec. 3.2), on model.py's LLaMA-2.

One Transformer layer under PARA (B batch, T tokens, D model dim):

    x (B, T, D) ─ attention_norm ─ a ──────────────────────────────────────────── residual ──┐
                                   │ Pooler: a at the last prompt token of each row  (B, D)    │
                                   │   └ VG: W_down ─ GELU ─ W_up + b_up ─ split ─► l_q, l_v, l_u  Eq. 6, Eq. 3
                                   │   (on the prompt only: training, or the prefill; decode steps reuse them)
                                   ├ wq ─► Q' = l_q ⊙ Q ─ RoPE ┐                               │
                                   ├ wk ─► K ───────── RoPE ───┼ softmax(Q'K^T/√hd) V' ─ wo     │  Eq. 4
                                   └ wv ─► V' = l_v ⊙ V ─ cache┘                               │
     ffn_norm ─┬ w1 ─► G ─ SiLU ─┐                                                             │
               └ w3 ─► U' = l_u ⊙ U ─ ⊙ ─ w2                                                   │  Eq. 5

The vectors are computed once per prompt. When generating, the prefill puts them in a store the caller keeps
with its KV cache (generate.KVCache), and every decode step hands that store back: the steps only multiply, and
the VG never runs again.

adapters.py attaches PARA to a model, saves and loads it, and serves many PARA adapters in one batch.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from model import ModelArgs, TransformerBlock

SCALED = ("wq", "wv", "w3")  # the projections whose outputs PARA's vectors scale: Q, V (Eq. 4) and U (Eq. 5)


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
        return self.vectors(h, self.down, self.up, self.bias)

    def vectors(self, h, down, up, bias):
        """Eq. 6 with the given weights: these, or each row's own (B, D, r), (B, r, d_out), (B, 1, d_out) in a bank."""
        l = gelu(h.float()[:, None] @ down) @ up + bias  # Eq. 6: l = g(Pooler(h) W_down) W_up + b_up  (B, 1, d_out)
        return l.split(self.split_sizes, dim=-1)  # Eq. 3: l_q, l_v, l_u = Split(l)  <- the vectors are born


def gelu(x):
    """The exact GELU, x Φ(x) with Φ the standard normal CDF (Hendrycks and Gimpel's definition). Not F.gelu: on a
    CPU it hands an fp32 tensor to oneDNN, whose fixed cost per call (10 µs, 50 between the model's matmuls) is a
    third of the VG's time on its (B, 1, r) input; PyTorch's own kernels take 2 calls and are as accurate."""
    if x.dtype != torch.float32:  # bf16 autocast (training) made the VG's matmul bf16: F.gelu rounds once, not twice
        return F.gelu(x)
    return x * torch.special.ndtr(x)


def scale(l, y):
    """Eq. 4 and 5: l ⊙ y, each row of y (B, T, d) by its own vector l (B, 1, d).

    The product is taken in fp32 (l is fp32): in bf16, a vector 1 + delta would stay exactly 1 until delta > 0.004,
    and training could not move it. It is handed on in y's dtype, except under autocast (bf16 training), where it
    stays fp32 until the next operation (RoPE, SiLU(G) ⊙ U', a matmul) takes it: cast here, a change smaller than
    bf16's resolution would round back to y.

    Without autograd (generation) y is scaled in place: the same numbers, and no new (B, T, d) tensor to fill
    (measured on one CPU thread: 5% of a 274-token prefill of SmolLM2 under PARA in fp32). A bf16 y on a CPU is
    taken to fp32 and back explicitly: the same bits as y.mul_(l), whose mixed bf16 x fp32 product PyTorch's CPU
    kernels take element by element (a GPU fuses it into one pass): see README, "In bf16"."""
    fp32_out = y.dtype != torch.float32 and torch.is_autocast_enabled(y.device.type)  # bf16 training
    if not torch.is_grad_enabled() and not fp32_out:
        if y.dtype == l.dtype or y.device.type != "cpu":
            return y.mul_(l)
        return y.copy_(y.float().mul_(l))  # (B, T, d) in fp32, scaled, rounded back into y
    out = l * y.float()
    return out if fp32_out or out.dtype == y.dtype else out.to(y.dtype)


class PARABlock(TransformerBlock):
    """model.py's TransformerBlock and a vector generator (add_para makes each loaded block one, in place)."""

    vector_generator: VectorGenerator

    def forward(self, x, rot, mask, cache=None, start_pos=0, prompt_len=None, vectors=None, adapter_ids=None):
        """model.py's block, with Q, V and U scaled by the vectors of each row's prompt.
        prompt_len (B,): where each row's prompt ends (training); None: at the last column (a left-padded prefill).
        vectors: a generation's store, layer id -> (l_q, l_v, l_u): the prompt's call fills it, decode steps read it.
        adapter_ids (B,): each row's adapter, when the vector generator is a bank of them (adapters.py)."""
        a = self.attention_norm(x)  # (B, T, D): what the attention sublayer sees, and what the VG reads
        l_q, l_v, l_u = self.prompt_vectors(a, start_pos, prompt_len, vectors, adapter_ids)
        att, ffn = self.attention, self.feed_forward
        q, v = scale(l_q, att.wq(a)), scale(l_v, att.wv(a))  # Eq. 4: Q' = l_q ⊙ Q, V' = l_v ⊙ V
        h = x + att.wo(att.attend(q, att.wk(a), v, rot, mask, cache, start_pos))
        f = self.ffn_norm(h)
        u = scale(l_u, ffn.w3(f))  # Eq. 5: U' = l_u ⊙ U
        return h + ffn.w2(F.silu(ffn.w1(f)) * u)

    def prompt_vectors(self, a, start_pos, prompt_len, vectors, adapter_ids):
        """l_q, l_v, l_u (B, 1, d) of each row: computed from the normed state a (B, T, D) at the prompt's last
        token when a holds the prompts, read from the generation's store in a decode step."""
        layer = self.attention.layer_id
        if isinstance(start_pos, int) and start_pos == 0:  # a holds the prompts (training, or a prefill)
            # The paper says only "the hidden states of the prompt at the current layer". The VG reads the state after
            # this layer's attention_norm: the same scale at every depth, immune to Llama 2's outlier activations.
            last = a[:, -1] if prompt_len is None else a[torch.arange(len(a), device=a.device), prompt_len - 1]
            gen = self.vector_generator
            l_q, l_v, l_u = gen(last) if adapter_ids is None else gen(last, adapter_ids)  # Pooler(h) -> Eq. 6: (B, 1, d)
            if vectors is not None:
                vectors[layer] = (l_q, l_v, l_u)  # every decode step of these rows reuses them
        elif vectors is not None and layer in vectors:  # a decode step: the vectors of these rows' prompts
            l_q, l_v, l_u = vectors[layer]
        else:
            raise RuntimeError("PARA has no vectors for these rows: run their prompt (start_pos=0) before decoding, "
                               "with the same store of vectors")
        return l_q, l_v, l_u


PARA_BLOCKS = {TransformerBlock: PARABlock}  # a backbone's block -> PARA's block for it (gemma.py adds Gemma's)


def add_para(model, r: int = 12) -> dict:
    """Make every block a PARABlock, in place; returns the adapter's settings."""
    for block in model.layers:
        # The loaded block itself becomes a PARABlock: its class changes, its weights stay where they are (built
        # afresh, a block would allocate new weights to replace). Only the vector generator is new.
        block.__class__ = PARA_BLOCKS[type(block)]
        block.vector_generator = VectorGenerator(model.args, r, device=block.attention.wq.weight.device)
    return {"r": r}
