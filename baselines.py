"""
The paper's baselines, in para.py's style: each turns a loaded projection (an nn.Linear) into an adapted one.

(IA)^3 (Liu et al. 2022): learned vectors, initialised to 1, scale K = x Wk, V = x Wv and the FFN intermediate
    silu(x W1) ⊙ x W3 before W2 (PEFT's defaults for Llama). l ⊙ (silu(x W1) ⊙ x W3) = silu(x W1) ⊙ (l ⊙ x W3), so
    the FFN's vector scales w3's output, which keeps it apart from the bf16 rounding of the product (cast_back).
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

Each method's equation is written once, in its layer's adapt(x, y, *tensors), with y = x W^T the loaded projection's
output. Its tensors are the layer's own, or, in a bank of adapters (adapters.py), each row's own with a leading
batch dimension: the same broadcasting and batched matmuls serve both. They are fp32 whatever the model's dtype,
and act in fp32 (para.scale says why).
"""
import math

import torch
import torch.nn as nn

import para
from errors import UserError

ATTENTION = ("wq", "wk", "wv", "wo")
FEED_FORWARD = ("w1", "w2", "w3")


def fp32_parameter(tensor):
    return nn.Parameter(tensor.float())


def cast_back(out, y):
    """An adapter's fp32 result out, in the dtype of the base output y it changes; under autocast (bf16 training) it
    stays fp32 until the next operation takes it, as para.scale's product does, for the same reason."""
    return out if out.dtype == y.dtype or torch.is_autocast_enabled(y.device.type) else out.to(y.dtype)


class AdaptedLinear(nn.Linear):
    """A loaded projection with an adapter: an add_* function below turns the loaded nn.Linear into one in place
    (its class changes, its weight stays where it is) and gives it its TENSORS."""

    TENSORS: tuple = ()  # the adapter's tensors, in the order adapt() takes them

    def tensors(self):
        return tuple(getattr(self, name) for name in self.TENSORS)

    def forward(self, x):
        return self.adapt(x, super().forward(x), *self.tensors())  # super(): x W^T with the loaded weight


class IA3Linear(AdaptedLinear):
    TENSORS = ("ia3_vector",)

    def adapt(self, x, y, l):  # l (out,), or each row's (B, 1, out)
        return para.scale(l, y)  # l ⊙ (x W^T), as PARA's vectors scale (in fp32, in place when generating)


class LoRALinear(AdaptedLinear):
    TENSORS = ("lora_A", "lora_B")

    def adapt(self, x, y, A, B):  # A (r, in), B (out, r), or each row's (B, r, in), (B, out, r)
        delta = (x.float() @ A.mT) @ B.mT  # two thin matmuls, never the (out, in) product B A
        return cast_back(y.float() + self.scaling * delta, y)  # x W^T + (alpha/r) (x A^T) B^T


class AdaLoRALinear(LoRALinear):
    """LoRA's update with Q = lora_A (r, in), P = lora_B (out, r) and the singular values Λ = lora_E (r, 1), zero
    where the RankAllocator pruned a triplet."""

    TENSORS = ("lora_A", "lora_E", "lora_B")

    def adapt(self, x, y, A, E, B):
        return super().adapt(x, y, E * A, B)  # x W^T + (alpha/r) x (Λ Q)^T P^T


class HoulsbyLinear(AdaptedLinear):
    TENSORS = ("houlsby_down", "houlsby_down_bias", "houlsby_up", "houlsby_up_bias")

    def adapt(self, x, z, down, down_bias, up, up_bias):  # (m, d), (m,), (d, m), (d,), or each row's
        return cast_back(z.float() + para.gelu(z.float() @ down.mT + down_bias) @ up.mT + up_bias, z)  # z + up(GELU(down(z)))


def adapt(model, targets, cls, new_tensors):
    """Every block's target projections (Meta names) become cls, in place, with the tensors that
    new_tensors(linear, device) returns, {name: initial value}."""
    for t in targets:
        if t not in ATTENTION + FEED_FORWARD:
            raise UserError(f"unknown target {t!r}: choose from {', '.join(ATTENTION + FEED_FORWARD)}")
    for block in model.layers:
        for t in targets:
            linear = getattr(block.attention if t in ATTENTION else block.feed_forward, t)
            tensors = new_tensors(linear, linear.weight.device)
            linear.__class__ = cls
            for name, value in tensors.items():
                setattr(linear, name, fp32_parameter(value))


def add_ia3(model, targets=("wk", "wv", "w3")) -> dict:
    """PEFT's Llama defaults: K, V, and the FFN intermediate (as w3's output). wq, wv, w3: PARA's static twin."""
    adapt(model, targets, IA3Linear, lambda linear, device: {"ia3_vector": torch.ones(linear.out_features, device=device)})  # the identity
    return {"targets": list(targets)}


def add_lora(model, r: int = 8, alpha: float = 8, targets=("wq", "wv")) -> dict:
    """alpha defaults to PEFT's lora_alpha (8)."""
    def new(linear, device):
        linear.scaling = alpha / r
        A = torch.empty(r, linear.in_features, device=device)
        nn.init.kaiming_uniform_(A, a=math.sqrt(5))  # PEFT's default: uniform(±1/sqrt(in_features))
        return {"lora_A": A, "lora_B": torch.zeros(linear.out_features, r, device=device)}  # B = 0: a fresh adapter is the identity
    adapt(model, targets, LoRALinear, new)
    return {"r": r, "alpha": alpha, "targets": list(targets)}


def add_adalora(model, r: int = 12, alpha: float = 8, targets=("wq", "wv")) -> dict:
    """PEFT's defaults: init_r 12, lora_alpha 8, LoRA's targets."""
    def new(linear, device):
        linear.scaling = alpha / r  # PEFT: alpha / (r + 1e-5), and r stays the initial rank however many are pruned
        return {"lora_A": torch.randn(r, linear.in_features, device=device) * 0.02,
                "lora_E": torch.zeros(r, 1, device=device),  # Λ = 0: a fresh adapter is the identity
                "lora_B": torch.randn(linear.out_features, r, device=device) * 0.02}
    adapt(model, targets, AdaLoRALinear, new)
    return {"r": r, "alpha": alpha, "targets": list(targets)}


def add_houlsby(model, size: int) -> dict:
    """One adapter after each block's attention sublayer (wo's output) and FFN sublayer (w2's output)."""
    def new(linear, device):
        down = nn.Linear(linear.out_features, size, device=device)  # PyTorch's init: kaiming-uniform, like LoRA's A
        return {"houlsby_down": down.weight.detach(), "houlsby_down_bias": down.bias.detach(),
                "houlsby_up": torch.zeros(linear.out_features, size, device=device),  # 0: a fresh adapter is the identity
                "houlsby_up_bias": torch.zeros(linear.out_features, device=device)}
    adapt(model, ("wo", "w2"), HoulsbyLinear, new)
    return {"size": size}


@torch.no_grad()
def merge_lora(model):
    """Fold a single LoRA adapter into the base weights, W += (alpha/r) B A, and make the layers plain Linears again."""
    if getattr(model, "n_adapters", 1) != 1:
        raise ValueError(f"cannot merge a bank of {model.n_adapters} adapters into one set of weights")
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    if not layers or any(type(m) is not LoRALinear for m in layers):  # none, or AdaLoRA's
        raise ValueError("merge_lora needs a model with a LoRA adapter")
    for m in layers:
        m.weight += ((m.lora_B @ m.lora_A) * m.scaling).to(m.weight.dtype)  # (out, in)
        m.__class__ = nn.Linear  # the merged weight, without the LoRA tensors
        del m.lora_A, m.lora_B, m.scaling
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
