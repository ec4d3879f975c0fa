"""
The paper's baselines, in para.py's style: each adapted layer is an nn.Linear over the loaded weight.

(IA)^3 (Liu et al. 2022): learned vectors, initialised to 1, scale K = x Wk, V = x Wv and the FFN intermediate
    silu(x W1) ⊙ x W3 before W2 (PEFT's defaults for Llama). l ⊙ (silu(x W1) ⊙ x W3) = silu(x W1) ⊙ (l ⊙ x W3), so
    the FFN's vector scales w3's output, which keeps it apart from the bf16 rounding of the product (para.cast_back).
    Like PARA, one elementwise multiply per projection, but the vectors are the same for every prompt. On PARA's
    own projections (wq, wv, w3) it is PARA's "static twin".
LoRA (Hu et al. 2021): W x + (alpha/r) B A x on wq and wv by default; A ~ kaiming-uniform(a=√5), B = 0.
    Kept unmerged, as in multi-tenant serving, so the low-rank product runs at every decode step (the cost the
    paper's Table 4 measures); merge_lora folds a single adapter into W.
AdaLoRA (Zhang et al. 2023): W x + (alpha/r) P Λ Q x, an SVD-like triplet per matrix on LoRA's targets, whose
    singular values Λ a RankAllocator prunes during training, from r per matrix towards a smaller average budget,
    keeping the triplets that matter most to the loss. E (Λ's diagonal) starts at 0, P and Q ~ N(0, 0.02).
Houlsby adapter (Houlsby et al. 2019): a bottleneck z + up(GELU(down(z))) on the output z of each block's
    attention sublayer and FFN sublayer (after wo and after w2, before the residual add); up = 0 at the start.

Adapter tensors are fp32 whatever the model's dtype, and they act in fp32 (the vectors multiply, the updates
add): in bf16 a small update would round away (para.cast_back). adapters.py serves a bank of them in one batch
by overriding the one method of each layer that returns its tensors (vectors(), low_rank(), bottleneck()).
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from errors import UserError
from para import SharedLinear, cast_back

ATTENTION = ("wq", "wk", "wv", "wo")
FEED_FORWARD = ("w1", "w2", "w3")


def fp32_parameter(tensor):
    return nn.Parameter(tensor.float())


class IA3Linear(SharedLinear):
    """l ⊙ (x W^T)."""

    def __init__(self, base: nn.Linear):
        super().__init__(base)
        self.ia3_vector = fp32_parameter(torch.ones(self.out_features, device=self.weight.device))  # 1: the identity

    def vectors(self):
        return self.ia3_vector  # (n,)

    def forward(self, x):
        y = super().forward(x)
        return cast_back(self.vectors() * y.float(), y.dtype)


class LoRALinear(SharedLinear):
    """x W^T + (alpha/r) (x A^T) B^T, unmerged."""

    def __init__(self, base: nn.Linear, r: int, alpha: float):
        super().__init__(base)
        self.scaling = alpha / r
        device = self.weight.device
        self.lora_A = fp32_parameter(torch.empty(r, self.in_features, device=device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # PEFT's default: uniform(±1/sqrt(in_features))
        self.lora_B = fp32_parameter(torch.zeros(self.out_features, r, device=device))

    def low_rank(self):
        return self.lora_A, self.lora_B  # (r, in), (out, r)

    def forward(self, x):
        y = super().forward(x)
        A, B = self.low_rank()
        delta = (x.float() @ A.mT) @ B.mT  # two thin matmuls, never the (out, in) product B A
        return cast_back(y.float() + self.scaling * delta, y.dtype)


class AdaLoRALinear(LoRALinear):
    """x W^T + (alpha/r) x (E ⊙ A)^T B^T: LoRA's forward with Q = lora_A (r, in), P = lora_B (out, r) and the
    singular values Λ = lora_E (r, 1), zero where the RankAllocator pruned a triplet."""

    def __init__(self, base: nn.Linear, r: int, alpha: float):
        SharedLinear.__init__(self, base)  # not LoRALinear's: another initialisation
        self.scaling = alpha / r  # PEFT: alpha / (r + 1e-5), and r stays the initial rank however many are pruned
        device = self.weight.device
        self.lora_A = fp32_parameter(torch.randn(r, self.in_features, device=device) * 0.02)
        self.lora_E = fp32_parameter(torch.zeros(r, 1, device=device))  # 0: a fresh adapter is the base model
        self.lora_B = fp32_parameter(torch.randn(self.out_features, r, device=device) * 0.02)

    def low_rank(self):
        return self.lora_E * self.lora_A, self.lora_B  # Λ Q (r, in), P (out, r)


class HoulsbyLinear(SharedLinear):
    """z + up(GELU(down(z))) on this Linear's output z = x W^T: Houlsby's adapter after a sublayer."""

    def __init__(self, base: nn.Linear, size: int):
        super().__init__(base)
        d, device = self.out_features, self.weight.device
        down = nn.Linear(d, size, device=device)  # PyTorch's default init: kaiming-uniform, like LoRA's A
        self.houlsby_down, self.houlsby_down_bias = fp32_parameter(down.weight.detach()), fp32_parameter(down.bias.detach())
        self.houlsby_up = fp32_parameter(torch.zeros(d, size, device=device))  # 0: a fresh adapter is the identity
        self.houlsby_up_bias = fp32_parameter(torch.zeros(d, device=device))

    def bottleneck(self):
        return self.houlsby_down, self.houlsby_down_bias, self.houlsby_up, self.houlsby_up_bias

    def forward(self, x):
        z = super().forward(x)
        down, down_bias, up, up_bias = self.bottleneck()  # (m, d), (m,), (d, m), (d,)
        return cast_back(z.float() + F.gelu(z.float() @ down.mT + down_bias) @ up.mT + up_bias, z.dtype)


def replace(model, targets, make):
    """Every block's target Linears (Meta names) become make(linear, name)."""
    for t in targets:
        if t not in ATTENTION + FEED_FORWARD:
            raise UserError(f"unknown target {t!r}: choose from {', '.join(ATTENTION + FEED_FORWARD)}")
    for block in model.layers:
        for t in targets:
            parent = block.attention if t in ATTENTION else block.feed_forward
            setattr(parent, t, make(getattr(parent, t), t))


def add_ia3(model, targets=("wk", "wv", "w3")) -> dict:
    """PEFT's Llama defaults: K, V, and the FFN intermediate (as w3's output). wq, wv, w3: PARA's static twin."""
    replace(model, targets, lambda linear, t: IA3Linear(linear))
    return {"targets": list(targets)}


def add_lora(model, r: int = 8, alpha: float = 8, targets=("wq", "wv")) -> dict:
    """alpha defaults to PEFT's lora_alpha (8)."""
    replace(model, targets, lambda linear, t: LoRALinear(linear, r, alpha))
    return {"r": r, "alpha": alpha, "targets": list(targets)}


def add_adalora(model, r: int = 12, alpha: float = 8, targets=("wq", "wv")) -> dict:
    """PEFT's defaults: init_r 12, lora_alpha 8, LoRA's targets."""
    replace(model, targets, lambda linear, t: AdaLoRALinear(linear, r, alpha))
    return {"r": r, "alpha": alpha, "targets": list(targets)}


def add_houlsby(model, size: int) -> dict:
    """One adapter after each block's attention sublayer (wo's output) and FFN sublayer (w2's output)."""
    replace(model, ("wo", "w2"), lambda linear, t: HoulsbyLinear(linear, size))
    return {"size": size}


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
                    m.weight += ((m.lora_B @ m.lora_A) * m.scaling).to(m.weight.dtype)  # (out, in)
                    setattr(parent, name, SharedLinear(m))  # the merged weight, without the LoRA tensors
    model.adapter_config, model.n_adapters = None, 0
    return model


class RankAllocator:
    """AdaLoRA's budget (Zhang et al. 2023, Sec. 3.2-3.3): every triplet i of every adapted matrix k is scored,
    and only the best b(t) of all of them keep their singular value; the others are set to 0.

    Score: the sensitivity I = |w * dL/dw| of each entry of P, Λ, Q, smoothed, Ī <- β1 Ī + (1-β1) I, with its
    uncertainty Ū <- β2 Ū + (1-β2) |I - Ī|; s = Ī Ū; a triplet scores s(λ_i) + mean_j s(P_ji) + mean_j s(Q_ij).
    Budget: b_0 = n r triplets (n matrices) until step tinit, then a cubic decrease to b_T = n target_r at step
    T - tfinal, re-allocated every deltaT steps; the last tfinal steps keep the final allocation.

    train.py calls update(t) after the backward pass and before optimizer.step(), so that I reads the weights
    and gradients of the same step, as in the paper (PEFT reads the weights after the step), and mask() after
    optimizer.step(): the optimizer moves pruned values too, and mask() sets them back to 0 every step (PEFT
    only at a re-allocation, so they grow back in between when deltaT > 1). The budget schedule is PEFT's,
    with t the number of the optimizer step (1, 2, ...).
    """

    def __init__(self, model, total_steps, target_r=8, tinit=0, tfinal=0, deltaT=1, beta1=0.85, beta2=0.85):
        self.layers = [m for m in model.modules() if isinstance(m, AdaLoRALinear)]
        self.T, self.tinit, self.tfinal, self.deltaT, self.beta1, self.beta2 = \
            total_steps, tinit, tfinal, deltaT, beta1, beta2
        self.b0 = sum(m.lora_E.shape[0] for m in self.layers)
        self.bT = target_r * len(self.layers)
        self.avg_ipt, self.avg_unc = {}, {}  # Ī and Ū of every adapter tensor
        self.keep = None  # (n, r) bool: the triplets that keep their singular value, once allocated

    def budget(self, t):
        if t <= self.tinit:
            return self.b0
        if t > self.T - self.tfinal:
            return self.bT
        c = 1 - (t - self.tinit) / (self.T - self.tfinal - self.tinit)
        return int((self.b0 - self.bT) * c ** 3 + self.bT)

    @torch.no_grad()
    def update(self, t):
        """Step t's gradients are in .grad: update the scores; re-allocate the budget when it is time."""
        final = self.T - self.tfinal
        if t < final:
            for m in self.layers:
                for p in (m.lora_A, m.lora_E, m.lora_B):
                    ipt = (p * p.grad).abs()
                    avg = self.avg_ipt.setdefault(p, torch.zeros_like(p)).mul_(self.beta1).add_((1 - self.beta1) * ipt)
                    self.avg_unc.setdefault(p, torch.zeros_like(p)).mul_(self.beta2).add_((1 - self.beta2) * (ipt - avg).abs())
        if (self.tinit < t < final and t % self.deltaT == 0) or t == final:
            self.keep = self.allocate(self.budget(t))
        if t == final:  # the allocation is final: its scores are no longer needed (PEFT resets them too)
            self.avg_ipt, self.avg_unc = {}, {}

    def allocate(self, budget):
        """(n, r): True for the `budget` best triplets of all matrices (ties at the threshold are all pruned)."""
        if budget >= self.b0 or not self.avg_ipt:  # nothing to prune, or no score yet (a run of very few steps)
            return None
        s = {p: self.avg_ipt[p] * self.avg_unc[p] for p in self.avg_ipt}
        scores = torch.stack([s[m.lora_E].view(-1) + (s[m.lora_A].mean(1) + s[m.lora_B].mean(0))
                              for m in self.layers])  # (n, r)
        threshold = torch.kthvalue(scores.flatten(), self.b0 - budget).values
        return scores > threshold

    @torch.no_grad()
    def mask(self):
        if self.keep is not None:
            for m, keep in zip(self.layers, self.keep):
                m.lora_E.masked_fill_(~keep[:, None], 0.0)

    def regularizer(self):
        """The orthogonality term: the mean over all P and Q of ||P^T P - I||_F and ||Q Q^T - I||_F. (The paper
        writes a sum of squared norms; the authors' code and PEFT use this mean of plain norms, for which the
        default weight 0.5 was chosen, so we do too.)"""
        terms = []
        for m in self.layers:
            for gram in (m.lora_A @ m.lora_A.T, m.lora_B.T @ m.lora_B):  # (r, r)
                terms.append(torch.linalg.matrix_norm(gram - torch.eye(len(gram), device=gram.device)))
        return torch.stack(terms).mean()

    def state_dict(self):
        names = {p: i for i, p in enumerate(p for m in self.layers for p in (m.lora_A, m.lora_E, m.lora_B))}
        return {"avg_ipt": {names[p]: v for p, v in self.avg_ipt.items()},
                "avg_unc": {names[p]: v for p, v in self.avg_unc.items()}, "keep": self.keep}

    def load_state_dict(self, state):
        params = [p for m in self.layers for p in (m.lora_A, m.lora_E, m.lora_B)]
        self.avg_ipt = {params[i]: v.to(params[i].device) for i, v in state["avg_ipt"].items()}
        self.avg_unc = {params[i]: v.to(params[i].device) for i, v in state["avg_unc"].items()}
        self.keep = state["keep"]
