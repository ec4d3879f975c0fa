"""
The paper's baselines, with para.py's adapter interface (para.add_adapter(model, "ia3" | "lora", ...)).

(IA)^3 (Liu et al. 2022): learned vectors, initialised to 1, scale K = x Wk, V = x Wv and the FFN
    intermediate silu(x W1) * x W3 before W2 (PEFT's defaults for Llama). Like PARA, one elementwise
    multiply per projection, but the vectors are the same for every prompt.
LoRA (Hu et al. 2021): W x + (alpha/r) B A x on wq and wv by default; A ~ kaiming-uniform(a=√5), B = 0.
    Kept unmerged, as in multi-tenant serving, so the low-rank product runs at every decode step (the
    cost the paper's Table 4 measures); merge_lora folds a single adapter into W.

Every adapter tensor has a leading bank dimension A: row i of a batch uses adapter adapter_ids[i]. A multi-tenant
batch gathers each row's vectors or A/B matrices in every forward (tiny next to the base matmul, and nothing to
go stale under autograd); a bank of one uses its tensors directly.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

ATTENTION = ("wq", "wk", "wv", "wo")
FEED_FORWARD = ("w1", "w2", "w3")


class SharedLinear(nn.Linear):
    """An nn.Linear over another one's weight and bias: the same tensors (no copy), under the same state-dict names.
    The adapted layers (here and para.ScaledLinear) subclass it rather than wrap the base Linear, because a
    wrapper costs one more module call per projection and decode step."""

    def __init__(self, linear: nn.Linear):
        super().__init__(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        self.weight, self.bias = linear.weight, linear.bias  # replace the meta placeholders: nothing was allocated


class PerRow(SharedLinear):
    """A base Linear whose adapter may differ per row: adapter_ids (B,) or None (adapter 0)."""

    def __init__(self, base: nn.Linear):
        super().__init__(base)
        self.adapter_ids = None

    def set_rows(self, adapter_ids, prompt_len):
        self.adapter_ids = adapter_ids

    def reorder_rows(self, index):
        self.adapter_ids = None if self.adapter_ids is None else self.adapter_ids.index_select(0, index)


class IA3(PerRow):
    """l ⊙ (x W), or with on_input (the FFN's w2) (l ⊙ x) W."""

    def __init__(self, base: nn.Linear, n_adapters: int, on_input: bool = False):
        super().__init__(base)
        self.on_input = on_input
        n = self.in_features if on_input else self.out_features
        w = self.weight
        self.ia3_vector = nn.Parameter(torch.ones(n_adapters, n, device=w.device, dtype=w.dtype))  # 1: the identity

    def forward(self, x):
        if self.adapter_ids is None:
            l = self.ia3_vector[0]  # (n,)
        else:
            l = self.ia3_vector[self.adapter_ids][:, None]  # (B, 1, n): each row its own vector
        if self.on_input:
            return super().forward(l.to(x.dtype) * x)
        y = super().forward(x)  # x W^T, the base projection
        return l.to(y.dtype) * y  # .to: a no-op unless the adapter is kept in fp32 over a bf16 model


class LoRALinear(PerRow):
    """x W^T + (alpha/r) (x A^T) B^T, unmerged."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, n_adapters: int):
        super().__init__(base)
        w = self.weight
        self.scaling = alpha / r
        self.lora_A = nn.Parameter(torch.empty(n_adapters, r, self.in_features, device=w.device, dtype=w.dtype))
        for A in self.lora_A:  # PEFT's default init, per adapter: uniform(±1/sqrt(in_features))
            nn.init.kaiming_uniform_(A, a=math.sqrt(5))
        self.lora_B = nn.Parameter(torch.zeros(n_adapters, self.out_features, r, device=w.device, dtype=w.dtype))

    def forward(self, x):
        y, x = super().forward(x), x.to(self.lora_A.dtype)  # x W^T; the adapter may be kept in fp32 over a bf16 model
        if self.adapter_ids is None:  # one adapter for the whole batch: two thin matmuls
            delta = F.linear(F.linear(x, self.lora_A[0]), self.lora_B[0])
        else:
            A, B = self.lora_A[self.adapter_ids], self.lora_B[self.adapter_ids]  # (B, r, in), (B, out, r): per row
            delta = (x @ A.transpose(1, 2)) @ B.transpose(1, 2)  # batched low-rank product
        return y + (delta * self.scaling).to(y.dtype)


def add_ia3(model, n_adapters: int) -> dict:
    for block in model.layers:
        att, ffn = block.attention, block.feed_forward
        att.wk, att.wv = IA3(att.wk, n_adapters), IA3(att.wv, n_adapters)
        ffn.w2 = IA3(ffn.w2, n_adapters, on_input=True)  # scales silu(G) * U, the input of the down projection
    return {}


def add_lora(model, r: int, n_adapters: int, alpha: float = 8, targets=("wq", "wv")) -> dict:
    """alpha defaults to PEFT's lora_alpha (8)."""
    for t in targets:
        if t not in ATTENTION + FEED_FORWARD:
            raise ValueError(f"unknown LoRA target {t!r}: choose from {ATTENTION + FEED_FORWARD}")
    for block in model.layers:
        for t in targets:
            parent = block.attention if t in ATTENTION else block.feed_forward
            setattr(parent, t, LoRALinear(getattr(parent, t), r, alpha, n_adapters))
    return {"r": r, "alpha": alpha, "targets": list(targets)}


@torch.no_grad()
def merge_lora(model):
    """Fold a single LoRA adapter into the base weights, W += (alpha/r) B A, and make the layers plain Linears again."""
    if getattr(model, "adapter_config", None) is None or model.adapter_config["method"] != "lora":
        raise ValueError("merge_lora needs a model with a LoRA adapter")
    if model.n_adapters != 1:
        raise ValueError(f"cannot merge a bank of {model.n_adapters} adapters into one set of weights")
    for block in model.layers:
        for parent in (block.attention, block.feed_forward):
            for name, m in list(parent.named_children()):
                if isinstance(m, LoRALinear):
                    delta = (m.lora_B[0].float() @ m.lora_A[0].float()) * m.scaling  # (out, in)
                    m.weight += delta.to(m.weight.dtype)
                    setattr(parent, name, SharedLinear(m))  # the merged weight, without the LoRA tensors
    model.adapter_config, model.n_adapters = None, 0
    return model
