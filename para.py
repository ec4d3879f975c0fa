"""
PARA: Prompt Aware Representation Adjustment (Liu et al. 2024, paper/PARA.md, Sec. 3.2), on model.py's LLaMA-2.

One Transformer layer under PARA (B batch, T tokens, D model dim, shapes per row):

    x (B, T, D) ─────────────────────────────────────────────────────── residual ──┐
     │ pool the last prompt token: x[i, prompt_len[i]-1]  (B, D)                  │
     │   └─ attention_norm ─ VG: down ─ GELU ─ up + b ─ split ─► l_q, l_v, l_u    │  Eq. 6, Eq. 3
     │        (only when start_pos == 0: training or prefill; decode reuses them)  │
     ├ attention_norm ─┬ wq ─► Q' = l_q ⊙ Q ─ RoPE ┐                               │
     │                 ├ wk ─► K ───────── RoPE ───┼ softmax(Q'K^T/√hd) V'         │  Eq. 4
     │                 └ wv ─► V' = l_v ⊙ V ─ cache┘                               │
     └ ffn_norm ───────┬ w1 ─► G ─ SiLU ─┐                                         │
                       └ w3 ─► U' = l_u ⊙ U ─ ⊙ ─ w2                               │  Eq. 5

The vectors are per row: a batch of prompts gets one set each, and a bank of A adapters (multi-tenant
serving) lets row i use adapter adapter_ids[i]. The same interface (add_adapter, set_rows, reorder_rows,
save/load) serves the baselines in baselines.py, (IA)^3 and LoRA.
"""
import dataclasses
import os
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

import baselines
from model import ModelArgs, Transformer, TransformerBlock

ADAPTER_PARAMS = ("vector_generator.", "ia3_", "lora_")  # what mark_only_adapter_as_trainable and saving pick
FILE_FORMAT = "para-adapter-v1"
BASE_FIELDS = ("dim", "n_layers", "n_heads", "n_kv_heads", "hidden_dim", "vocab_size")  # a base model's shape


class VectorGenerator(nn.Module):
    """Eq. 6: a bottleneck from the pooled prompt state to l_q, l_v, l_u; A adapters stacked in a bank."""

    def __init__(self, args: ModelArgs, r: int, n_adapters: int, device=None, dtype=None):
        super().__init__()
        d_q, d_kv = args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim
        self.split_sizes = (d_q, d_kv, args.hidden_dim)  # l_q, l_v, l_u; l_q follows wq's rows (Meta's RoPE order)
        d_out = sum(self.split_sizes)
        A = n_adapters
        self.down = nn.Parameter(torch.randn(A, args.dim, r, device=device, dtype=dtype) * 0.02)  # W_down ~ N(0, 0.02)
        # W_up = 0 and b_up = 1: every vector starts at exactly 1, so a fresh adapter is the base model
        self.up = nn.Parameter(torch.zeros(A, r, d_out, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.ones(A, d_out, device=device, dtype=dtype))

    def forward(self, h, adapter_ids=None):
        """h: (B, D) pooled, normed prompt state -> l_q (B, 1, d_q), l_v (B, 1, d_kv), l_u (B, 1, d_ffn), h's dtype."""
        if adapter_ids is None:  # every row uses adapter 0: (1, D, r), (1, r, d_out), (1, d_out), broadcast over rows
            down, up, bias = self.down[:1], self.up[:1], self.bias[:1]
        else:  # multi-tenant: row i gathers the weights of adapter adapter_ids[i]: (B, D, r), (B, r, d_out), (B, d_out)
            down, up, bias = self.down[adapter_ids], self.up[adapter_ids], self.bias[adapter_ids]
        pooled = h[:, None].to(down.dtype)  # (B, 1, D); the adapter may be fp32 over a bf16 model (train.py)
        l = F.gelu(pooled @ down) @ up + bias[:, None]  # Eq. 6: l = g(Pooler(h) W_down) W_up + b_up  (B, 1, d_out)
        return l.to(h.dtype).split(self.split_sizes, dim=-1)  # l_q, l_v, l_u = Split(l)  <- where the vectors are born


class ScaledLinear(baselines.SharedLinear):
    """A frozen projection (the loaded Linear's own weight) whose output is scaled per row by a vector its
    PARABlock hands it."""

    def __init__(self, linear: nn.Linear):
        super().__init__(linear)
        self.l = None  # (B, 1, out): l_q, l_v or l_u of each row, set at start_pos == 0, reused by every decode step

    def forward(self, x):
        if self.l is None:
            raise RuntimeError("PARA has no vectors for this batch: run the prompt (start_pos=0) before decoding")
        return self.l * super().forward(x)  # Eq. 4: Q' = l_q ⊙ Q, V' = l_v ⊙ V;  Eq. 5: U' = l_u ⊙ U  <- where they are used

    def set_rows(self, adapter_ids, prompt_len):
        self.l = None  # a new batch: stale vectors must never be reused

    def reorder_rows(self, index):
        if self.l is not None:
            self.l = self.l.index_select(0, index)


class PARABlock(TransformerBlock):
    """model.py's TransformerBlock plus a vector generator; wq, wv and w3 become ScaledLinear."""

    def __init__(self, block: TransformerBlock, args: ModelArgs, r: int, n_adapters: int):
        nn.Module.__init__(self)  # not TransformerBlock.__init__, which would allocate fresh weights:
        for name, child in block.named_children():  # adopt the loaded block's modules instead
            self.add_module(name, child)
        w = block.attention.wq.weight
        self.vector_generator = VectorGenerator(args, r, n_adapters, device=w.device, dtype=w.dtype)
        self.attention.wq, self.attention.wv = ScaledLinear(self.attention.wq), ScaledLinear(self.attention.wv)
        self.feed_forward.w3 = ScaledLinear(self.feed_forward.w3)
        self.adapter_ids = None  # (B,) bank index of each row, None: adapter 0 everywhere
        self.prompt_len = None  # (B,) the VG reads position prompt_len[i]-1 of row i; None: the last position

    def forward(self, x, rot, mask, cache=None, start_pos=0):
        if start_pos == 0:  # x holds the prompt (training, prefill); a decode step (start_pos > 0) skips the VG
            # Pooler(h): the last prompt token, at this layer's input (left-padded prompts all end at -1)
            rows = torch.arange(x.shape[0], device=x.device)
            last = x[:, -1] if self.prompt_len is None else x[rows, self.prompt_len - 1]  # (B, D)
            # the VG sees the state as the attention sublayer does, normed: same input scale at every depth
            l_q, l_v, l_u = self.vector_generator(self.attention_norm(last), self.adapter_ids)  # Eq. 3
            self.attention.wq.l, self.attention.wv.l, self.feed_forward.w3.l = l_q, l_v, l_u
        # With grad checkpointing model.py recomputes this call in backward with the same inputs and the same
        # adapter_ids/prompt_len, so the vectors are recomputed identically.
        return super().forward(x, rot, mask, cache, start_pos)

    def set_rows(self, adapter_ids, prompt_len):
        self.adapter_ids, self.prompt_len = adapter_ids, prompt_len

    def reorder_rows(self, index):
        self.adapter_ids = None if self.adapter_ids is None else self.adapter_ids.index_select(0, index)
        self.prompt_len = None if self.prompt_len is None else self.prompt_len.index_select(0, index)


def add_para(model: Transformer, r: int, n_adapters: int) -> dict:
    for i, block in enumerate(model.layers):
        model.layers[i] = PARABlock(block, model.args, r, n_adapters)
    return {"r": r}


# -----------------------------------------------------------------------------
# The adapter interface, shared by PARA, (IA)^3 and LoRA


def add_adapter(model: Transformer, method: str = "para", r: int = 12, n_adapters: int = 1, **method_kwargs):
    """Attach a fresh bank of n_adapters adapters in place; the model's outputs are unchanged until they train."""
    if getattr(model, "adapter_config", None):
        raise ValueError(f"the model already has a {model.adapter_config['method']} adapter")
    if method == "para":
        settings = add_para(model, r, n_adapters, **method_kwargs)
    elif method == "ia3":
        settings = baselines.add_ia3(model, n_adapters, **method_kwargs)  # no rank: one vector per projection
    elif method == "lora":
        settings = baselines.add_lora(model, r, n_adapters, **method_kwargs)
    else:
        raise ValueError(f"unknown adapter method {method!r}: choose para, ia3 or lora")
    model.adapter_config, model.n_adapters = {"method": method, **settings}, n_adapters
    return model


def row_modules(model):
    return [m for m in model.modules() if hasattr(m, "reorder_rows")]


def set_rows(model: Transformer, adapter_ids=None, prompt_len=None):
    """Before a forward: row i uses adapter adapter_ids[i] and its prompt ends at prompt_len[i]-1 (None: at -1)."""
    bank = next((p for name, p in model.named_parameters() if is_adapter_param(name)), None)  # (A, ...)
    if bank is None:
        return  # a plain model
    if adapter_ids is not None:
        adapter_ids = torch.as_tensor(adapter_ids, dtype=torch.long, device=bank.device)
        if adapter_ids.min() < 0 or adapter_ids.max() >= bank.shape[0]:
            raise IndexError(f"adapter_ids must lie in [0, {bank.shape[0]}), got {adapter_ids.tolist()}")
        if bank.shape[0] == 1:
            adapter_ids = None  # a bank of one: the plain, non-gathered path
    if prompt_len is not None:
        prompt_len = torch.as_tensor(prompt_len, dtype=torch.long, device=bank.device)
    for m in row_modules(model):
        m.set_rows(adapter_ids, prompt_len)


def reorder_rows(model: Transformer, index):
    """Keep rows `index` (LongTensor (B',)) of every per-row state, in that order, like KVCache.reorder."""
    for m in row_modules(model):
        m.reorder_rows(index)


def is_adapter_param(name: str) -> bool:
    return any(key in name for key in ADAPTER_PARAMS)


def mark_only_adapter_as_trainable(model: nn.Module):
    for name, p in model.named_parameters():
        p.requires_grad = is_adapter_param(name)


def adapter_state_dict(model: nn.Module) -> dict:
    """The adapter's tensors only, each with its leading bank dimension A."""
    return {k: v for k, v in model.state_dict().items() if is_adapter_param(k)}


def count_parameters(args: ModelArgs, method: str = "para", r: int = 12, **method_kwargs) -> int:
    """Trainable parameters of one adapter, counted on the meta device: no weights are allocated."""
    args = dataclasses.replace(args, vocab_size=max(args.vocab_size, 1))  # the adapter does not touch the vocabulary
    with torch.device("meta"):
        model = Transformer(args)
    add_adapter(model, method, r=r, **method_kwargs)
    return sum(t.numel() for t in adapter_state_dict(model).values())


# -----------------------------------------------------------------------------
# Adapter files: one adapter's tensors (no bank dimension), its config and the base model it was trained on


def base_shape(args: ModelArgs) -> dict:
    return {f: getattr(args, f) for f in BASE_FIELDS}


def save_adapter(model: Transformer, path: str, base: Optional[str] = None, index: int = 0):
    """Write adapter `index` of the bank to `path` atomically; `base` names the base model (a name, not a path)."""
    tensors = {k: v[index].detach().cpu().clone() for k, v in adapter_state_dict(model).items()}  # clone: no whole bank
    payload = {
        "format": FILE_FORMAT,
        "config": model.adapter_config,
        "base": {"name": base and os.path.basename(os.path.normpath(base)), **base_shape(model.args)},
        "shapes": {k: list(t.shape) for k, t in tensors.items()},
        "tensors": tensors,
    }
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)  # a reader sees the old file or the new one, never half of one
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def read_adapter_file(path: str) -> dict:
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)  # data only: a file cannot run code
    except FileNotFoundError:
        raise
    except Exception as e:
        reason = (str(e).splitlines() or [type(e).__name__])[0]
        raise ValueError(f"{path!r} is not a readable adapter file (truncated or corrupt?): {reason}") from None
    ok = (isinstance(payload, dict) and payload.get("format") == FILE_FORMAT
          and all(isinstance(payload.get(k), dict) for k in ("config", "base", "shapes", "tensors"))
          and {k: list(t.shape) for k, t in payload["tensors"].items()} == payload["shapes"])
    if not ok:
        raise ValueError(f"{path!r} is not a {FILE_FORMAT} adapter file, or its tensors don't match its header")
    return payload


def load_adapter(model: Transformer, paths, base: Optional[str] = None):
    """Attach the adapters in `paths` as a bank (row adapter_ids index this list), or refill a matching bank."""
    paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    files = [read_adapter_file(p) for p in paths]
    config = files[0]["config"]
    ours = base_shape(model.args)
    for p, f in zip(paths, files):
        if f["config"] != config or f["shapes"] != files[0]["shapes"]:
            raise ValueError(f"{p!r} is a {f['config']} adapter but {paths[0]!r} is {config}: "
                             "a bank needs one method and one config")
        theirs = {k: f["base"].get(k) for k in BASE_FIELDS}
        if theirs != ours:
            diff = ", ".join(f"{k} {theirs[k]} != {ours[k]}" for k in BASE_FIELDS if theirs[k] != ours[k])
            raise ValueError(f"{p!r} was trained on another base model ({f['base'].get('name')}: {diff} here)")
        if base and f["base"].get("name") and f["base"]["name"] != os.path.basename(os.path.normpath(base)):
            raise ValueError(f"{p!r} was trained on base model {f['base']['name']!r}, not {base!r}")
    if not getattr(model, "adapter_config", None):
        add_adapter(model, n_adapters=len(files), **config)
    elif model.adapter_config != config or model.n_adapters != len(files):
        raise ValueError(f"the model already holds {model.n_adapters} {model.adapter_config} adapter(s); "
                         f"cannot load {len(files)} {config} adapter(s) into it")
    want = {k: list(v.shape[1:]) for k, v in adapter_state_dict(model).items()}
    for p, f in zip(paths, files):
        if f["shapes"] != want:
            raise ValueError(f"{p!r} holds tensors {sorted(f['shapes'])[:3]}... that don't fit this model's adapter")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for k in want:
            params[k].copy_(torch.stack([f["tensors"][k] for f in files]))
    return model


if __name__ == "__main__":  # python para.py: trainable parameters of each method on Llama-2 and SmolLM2
    models = {"Llama-2 7B": ModelArgs(dim=4096, n_layers=32, n_heads=32),
              "Llama-2 13B": ModelArgs(dim=5120, n_layers=40, n_heads=40),
              "Llama-2 70B": ModelArgs(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, ffn_dim_multiplier=1.3,
                                       multiple_of=4096),
              "SmolLM2-135M": ModelArgs(dim=576, n_layers=30, n_heads=9, n_kv_heads=3, hidden_dim=1536)}
    settings = [("para", dict(r=12)), ("ia3", {}), ("lora", dict(r=8)), ("lora", dict(r=16)), ("lora", dict(r=18))]
    for name, args in models.items():
        print(name, "  ".join(f"{m}{s}: {count_parameters(args, m, **s):,}" for m, s in settings))
