"""
SSP, Sparse Structure Search for delta tuning (Hu et al., NeurIPS 2022), on model.py's LLaMA-2: a gradient-based
search chooses, under a budget of trainable parameters, which modules get which kind of delta; the chosen structure
is then retrained from scratch as an ordinary static adapter. This is the authors' mix space ("S3PET-M"), as their
public code (S3Delta) defines it; what differs from it is said where it differs (README, "SSP", lists them all).

The search space: one candidate per (position, kind of delta), each with its own architecture parameter alpha_i.

    on each block's wq, wk, wv, wo, w1, w3, w2 (y = x W^T):
        "lowrank"  LoRA, parallel:   y += (alpha/r_c) (x A^T) B^T      A (r_c, in) kaiming-uniform(a=√5), B = 0
        "bias"     BitFit:           y += b                            b (out,) = 0
    on the outputs of wo and w2 (the attention and FFN sublayer outputs, where the Houlsby adapter sits):
        "lra"      Compacter's low-rank adapter, sequential: y += up(gelu_tanh(down(y)))
                   down, up: rank-1 weights (W_left W_right) and biases; d -> d/32 -> d; glorot-uniform (gain √2)
    on each block's attention_norm and ffn_norm (norm(x) = rms(x) * g):
        "lnfit"    LNFit, parallel:  norm(x) += rms(x) * w             w (d,) = 0: a learned change of the gain
        "bias"     BitFit:           norm(x) += b                      b (d,) = 0

  S3Delta's parallel candidates read the module's input; its sequential ones all read the module's output with the
  parallel deltas added, and every delta, scaled by its gate z_i, is added to that output. Our T5 -> LLaMA map:
  q,k,v,o -> wq,wk,wv,wo; T5's FFN wi -> w1 and w3 (SwiGLU has two input matrices), wo -> w2; each layer_norm ->
  attention_norm, ffn_norm (both RMS norms without a bias, as T5's). 20 candidates per block.
  - LoRA's scale is the authors' definition, lora_alpha / r with lora_alpha = 16 (OpenDelta's LoraConfig): 16 at
    their rank 1, 0.25 at our r_c = 64.
  - r_c = 64, not the authors' 1 (forced): their space mapped literally onto Llama-2 7B holds 5.2M parameters, below
    the 8.6M budget of the PARA paper's Table 2; at r_c = 64 the budget is about 5% of the space, the share the
    authors' own S3PET-M runs searched (5.4% on T5-large).
  - LNFit normalises with the backbone norm's own eps (S3Delta's 1e-6 is T5's norm's own).
  - Every candidate but one is the identity when fresh. The "lra" is not: both its factors are random and only its
    biases start at 0 (as in S3Delta), so a structure holding one changes the outputs from the first step.
  - The final norm's two candidates (in S3Delta's space) are left out: a bank serves each row its own adapter
    through the blocks (adapter_ids), and model.py's final norm, applied after the rows are flattened, sees no
    rows. They are 2 * dim parameters of a 8.6M budget.

The search (S3Delta's defaults and the settings of all its scripts):
  - gates: p_i = sigmoid(alpha_i - b); the shift b is solved at every sampling so that sum_i p_i n_i equals the
    budget B (n_i: candidate i's parameters): the budget holds in expectation at every step, by construction, with no
    penalty. b carries no gradient; the p's are rescaled by their sum, detached, so that a gradient cannot move that
    sum ("shift_detach"). S3Delta solves for b with scipy's fsolve; here a bisection (one equation, one unknown,
    monotone), warm-started from the last b as theirs is.
  - relaxation: binary concrete at temperature 1, z_i = sigmoid(logit p_i + logit u_i), u ~ U(0, 1): soft gates in
    (0, 1) that multiply each candidate's delta. On dev, z = p.
  - bi-level, second-order DARTS: the training examples are split at random 50/50; the delta weights w learn on one
    half, the alphas on the other. Each step: a virtual AdamW step of w on a training-half batch (w'), the alpha-half
    loss at w' and its gradients, a finite-difference Hessian-vector product (eps = 0.01 / |dL/dw'|) for the
    second-order term, alpha's gradient dL/dalpha - lr_w * Hessian term; then w's own step on a fresh sample.
    One u for the alpha passes, a new one for w's step.
  - alphas: AdamW, lr 0.1, weight decay 0; w: AdamW at the run's learning rate, weight decay 0; both clipped to a
    gradient norm of 2.0, both decaying linearly to 0 over the search, no warmup.
  - the virtual model shares the frozen backbone: only the delta tensors change for w', and are restored after.
  - the search checkpoint kept is the one of the lowest dev loss (the supernet with z = p): this project's rule. S3Delta
    keeps the best dev metric by generation.
Derivation: p at the kept alphas (b solved again), candidates by p descending, each kept if it still fits in the
budget (a greedy fill). The retrain trains only those, freshly initialised, with gates fixed at 1 (train.py's
recipe, like every other method).

    model = load(...); add_ssp(model, r=64, budget=B)           # the space, every candidate gated (the supernet)
    search = Search(model, ...); search.step(...) ...; structure = derive(...)
    add_ssp(model, r=64, budget=B, structure=structure)          # the chosen structure alone: a static adapter
"""
import json
import math
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from baselines import ATTENTION, FEED_FORWARD, AdaptedLinear, cast_back, fp32_parameter
from errors import UserError

R_C = 64  # the rank of every LoRA candidate (the authors': 1; see above)
LORA_ALPHA = 16  # OpenDelta's default lora_alpha, which S3Delta's mix space keeps: the scale is LORA_ALPHA / r
REDUCTION = 32  # the low-rank adapter's bottleneck is d / 32 (S3Delta's LowRankAdapter default)
NORMS = ("attention_norm", "ffn_norm")
ADAPTED_OUTPUTS = ("wo", "w2")  # the sublayer outputs the low-rank adapter follows
LOW_RANK, BIAS, LN_GAIN, ADAPTER = "lowrank", "bias", "lnfit", "lra"  # the kinds of delta
KINDS = (LOW_RANK, BIAS, LN_GAIN, ADAPTER)
EPS = 1e-7  # S3Delta's: the budget is met at B (1 - EPS); p and u are kept off exactly 0 and 1 by it
ALPHA_LR, GRAD_CLIP = 0.1, 2.0  # the alphas' learning rate and both clips, in every S3Delta script


# -----------------------------------------------------------------------------
# The search space


@dataclass(frozen=True)
class Candidate:
    name: str  # "layers.3.wq.lowrank": its layer, position and kind; a structure is a list of these names
    layer: int
    position: str  # wq ... w2, attention_norm, ffn_norm
    kind: str
    size: int  # its trainable parameters, n_i


def lra_size(d):
    m = d // REDUCTION
    return (d + m + m) + (m + d + d)  # down: W_left (d, 1), W_right (1, m), bias (m); up: (m, 1), (1, d), bias (d)


def search_space(model, r=R_C):
    """Every candidate of the model, in a fixed order: block by block, position by position."""
    space = []
    for i, block in enumerate(model.layers):
        for position in ATTENTION + FEED_FORWARD:
            linear = projection(block, position)
            d_in, d_out = linear.in_features, linear.out_features
            kinds = {LOW_RANK: r * (d_in + d_out), BIAS: d_out} | ({ADAPTER: lra_size(d_out)}
                                                                   if position in ADAPTED_OUTPUTS else {})
            space += [Candidate(f"layers.{i}.{position}.{k}", i, position, k, n) for k, n in kinds.items()]
        for position in NORMS:
            d = getattr(block, position).weight.shape[0]
            space += [Candidate(f"layers.{i}.{position}.{k}", i, position, k, d) for k in (LN_GAIN, BIAS)]
    return space


def projection(block, position):
    return getattr(block.attention if position in ATTENTION else block.feed_forward, position)


def check_budget(space, budget):
    total, smallest = sum(c.size for c in space), min(c.size for c in space)
    if budget >= total:
        raise UserError(f"SSP's budget of {budget:,} parameters is not below its search space's {total:,}: there is "
                        "nothing to choose. Lower --ssp_budget, or raise --r (the LoRA candidates' rank)")
    if budget < smallest:
        raise UserError(f"SSP's budget of {budget:,} parameters is below its smallest candidate's {smallest:,}: no "
                        "structure fits in it. Raise --ssp_budget")


# -----------------------------------------------------------------------------
# The candidates on a loaded model: a projection or a norm changes its class in place and gets the tensors of the
# kinds chosen on it. In the search every candidate is there and its delta is scaled by its gate; retrained, only
# the chosen ones, ungated (S3Delta's for_baseline).


class Gates:
    """The gates z (n,) of one sampling, shared by every layer of the supernet (the search sets them)."""
    z = None  # None until the first sampling: every delta counts fully


class SSPLayer:
    TENSORS: tuple = ()  # set per layer: the tensors of the kinds it holds, in the order adapt() takes them
    gates = None  # the supernet's Gates; None once retrained (and in a bank)
    gate_of: dict = {}  # kind -> the index of its candidate in the space

    def tensors(self):
        return tuple(getattr(self, name) for name in self.TENSORS)

    def gated(self, delta, kind):
        z = self.gates.z if self.gates is not None else None
        return delta if z is None else z[self.gate_of[kind]] * delta


class SSPLinear(SSPLayer, AdaptedLinear):
    def adapt(self, x, y, *tensors):  # each tensor its own, or each row's with a leading batch dimension (a bank)
        t = dict(zip(self.TENSORS, tensors))
        out = y.float()
        if "ssp_A" in t:  # A (r, in), B (out, r): parallel, from the input x
            out = out + self.gated(self.scaling * ((x.float() @ t["ssp_A"].mT) @ t["ssp_B"].mT), LOW_RANK)
        parallel = out  # what the sequential candidates read
        if "ssp_bias" in t:  # (out,)
            out = out + self.gated(t["ssp_bias"], BIAS)
        if "ssp_down_left" in t:  # W_left (d, 1), W_right (1, m), bias (m,); up: (m, 1), (1, d), (d,)
            hidden = gelu_tanh((parallel @ t["ssp_down_left"]) @ t["ssp_down_right"] + t["ssp_down_bias"])
            out = out + self.gated((hidden @ t["ssp_up_left"]) @ t["ssp_up_right"] + t["ssp_up_bias"], ADAPTER)
        return cast_back(out, y)


def gelu_tanh(x):
    return F.gelu(x, approximate="tanh")  # S3Delta's gelu_new


class SSPNorm(SSPLayer, nn.Module):
    """A loaded RMS norm (of any backbone: base_class keeps its own forward, Gemma's (1 + w) too) with candidates."""

    base_class: type

    def forward(self, x):
        return self.adapt(x, self.base_class.forward(self, x), *self.tensors())

    def adapt(self, x, y, *tensors):
        t = dict(zip(self.TENSORS, tensors))
        out = y.float()
        if "ssp_gain" in t:  # (d,): LNFit reads the norm's input, RMS-normalised, with the norm's own eps
            out = out + self.gated(F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps) * t["ssp_gain"], LN_GAIN)
        if "ssp_bias" in t:
            out = out + self.gated(t["ssp_bias"], BIAS)
        return cast_back(out, y)


def fresh_tensors(candidate, module, r, device):
    """{name: initial value} of one candidate, initialised as S3Delta initialises it."""
    if candidate.kind == LOW_RANK:
        A = torch.empty(r, module.in_features, device=device)
        nn.init.kaiming_uniform_(A, a=math.sqrt(5))
        return {"ssp_A": A, "ssp_B": torch.zeros(module.out_features, r, device=device)}
    if candidate.kind == ADAPTER:
        d = module.out_features
        m = d // REDUCTION
        shapes = {"ssp_down_left": (d, 1), "ssp_down_right": (1, m), "ssp_up_left": (m, 1), "ssp_up_right": (1, d)}
        factors = {k: nn.init.xavier_uniform_(torch.empty(s, device=device), gain=math.sqrt(2))
                   for k, s in shapes.items()}
        return factors | {"ssp_down_bias": torch.zeros(m, device=device), "ssp_up_bias": torch.zeros(d, device=device)}
    d = module.out_features if isinstance(module, nn.Linear) else module.weight.shape[0]
    return {"ssp_gain" if candidate.kind == LN_GAIN else "ssp_bias": torch.zeros(d, device=device)}


def add_ssp(model, r: int = R_C, budget: int = 0, structure=None) -> dict:
    """Attach SSP in place: the whole space, gated (structure None: the search's supernet), or only the candidates
    of `structure`, ungated (the retrain). The budget is checked against the space (adapters.py gives its default)."""
    space = search_space(model, r)
    check_budget(space, budget)
    chosen = space if structure is None else structure_candidates(space, structure)
    index = {c.name: i for i, c in enumerate(space)}  # a candidate's gate is z[its index in the space]
    gates = Gates() if structure is None else None
    model.ssp_gates = gates
    for c in chosen:
        block = model.layers[c.layer]
        module = projection(block, c.position) if c.position not in NORMS else getattr(block, c.position)
        if not isinstance(module, SSPLayer):
            base_class = type(module)
            module.__class__ = SSPLinear if isinstance(module, nn.Linear) else SSPNorm
            module.base_class, module.TENSORS, module.gates, module.gate_of = base_class, (), gates, {}
            module.scaling = LORA_ALPHA / r
        for name, value in fresh_tensors(c, module, r, module.weight.device).items():
            setattr(module, name, fp32_parameter(value))
            module.TENSORS += (name,)
        module.gate_of[c.kind] = index[c.name]
    return {"r": r, "budget": budget, "structure": None if structure is None else [c.name for c in chosen]}


def structure_candidates(space, structure):
    """The candidates a structure names, in the space's order; an unknown or repeated name is refused."""
    by_name = {c.name: c for c in space}
    unknown = [n for n in structure if n not in by_name]
    if unknown or len(set(structure)) < len(structure):
        what = f"unknown candidates {unknown[:3]}" if unknown else "a candidate named twice"
        raise UserError(f"SSP structure with {what}: a candidate is layers.<i>.<position>.<kind>, position one of "
                        f"{', '.join(ATTENTION + FEED_FORWARD + NORMS)}, kind one of {', '.join(KINDS)}")
    return [c for c in space if c.name in set(structure)]


def remove_ssp(model):
    """Take the candidates off (after the search): every module gets its own class back, without the tensors."""
    for module in model.modules():
        if isinstance(module, SSPLayer):
            base_class = module.base_class
            for name in (*module.TENSORS, "TENSORS", "gates", "gate_of", "scaling", "base_class"):
                delattr(module, name)
            module.__class__ = base_class
    model.ssp_gates = None


def union(configs):
    """One bank's config for SSP tenants of different structures: the union of their candidates (a tenant's row
    holds zeros where it has none, and a zero candidate adds exactly 0: LoRA's B, a bias, LNFit's w, every tensor
    of the low-rank adapter), at their common r_c."""
    if len({c["r"] for c in configs}) > 1:
        raise UserError(f"SSP adapters of different LoRA ranks r_c ({sorted({c['r'] for c in configs})}) cannot "
                        "share a bank")
    names = {n for c in configs for n in c["structure"]}
    order = {(position, kind): i for i, (position, kind) in enumerate(
        (p, k) for p in ATTENTION + FEED_FORWARD + NORMS for k in KINDS)}

    def key(name):
        _, layer, position, kind = name.split(".")
        return int(layer), order.get((position, kind), len(order))
    return {"method": configs[0]["method"], "r": configs[0]["r"], "budget": max(c["budget"] for c in configs),
            "structure": sorted(names, key=key)}


# -----------------------------------------------------------------------------
# The gates: the shift b, the probabilities p, the relaxed samples z


def solve_shift(alpha, sizes, budget, b):
    """The shift b at which sum_i sigmoid(alpha_i - b) n_i = budget (1 - EPS), by bisection in float64, from a
    bracket grown around the last b. The left side falls as b grows, from the space's size to 0."""
    a = alpha.detach().double().cpu()

    def excess(b):
        return (torch.sigmoid(a - b) * sizes).sum().item() - budget * (1 - EPS)

    lo, hi, step = b - 1.0, b + 1.0, 1.0
    while excess(lo) <= 0:
        lo, step = lo - step, 2 * step
    while excess(hi) >= 0:
        hi, step = hi + step, 2 * step
    while True:
        mid = (lo + hi) / 2
        if mid in (lo, hi):  # float64's resolution: the bracket cannot narrow further
            return mid
        lo, hi = (mid, hi) if excess(mid) > 0 else (lo, mid)


def probabilities(alpha, b):
    """p (n,) float64, with gradients to alpha: sigmoid(alpha - b), kept off 0 and 1, its sum detached."""
    p = torch.sigmoid(alpha.double() - b)
    p = torch.where(p >= 1, 1 - EPS, torch.where(p <= 0, EPS, p))
    return p / p.sum() * p.sum().detach()


def relaxed(p, u):
    """The binary concrete sample at temperature 1: z = sigmoid(logit p + logit u) in (0, 1)."""
    u = u.clamp(EPS, 1 - EPS)
    return torch.sigmoid(torch.log(p / (1 - p)) + torch.log(u / (1 - u)))


def derive(space, alpha, budget):
    """The structure: candidates by p descending (b solved for these alphas), each kept while it still fits."""
    sizes = torch.tensor([c.size for c in space], dtype=torch.float64)
    p = probabilities(alpha.detach().cpu(), solve_shift(alpha, sizes, budget, 0.0))
    chosen, used = set(), 0
    for i in sorted(range(len(space)), key=lambda i: -p[i].item()):  # stable: ties keep the space's order
        if used + space[i].size <= budget:
            chosen.add(i)
            used += space[i].size
    return [c.name for i, c in enumerate(space) if i in chosen]


# -----------------------------------------------------------------------------
# The search


class Search:
    """The architecture parameters, their optimizer, and S3Delta's bi-level step on a supernet (add_ssp with no
    structure). grads(batch, tensors) -> (loss, its gradients with respect to tensors) is the caller's: train.py's,
    over micro-batches. What --resume needs is state_dict()."""

    def __init__(self, model, budget, seed):
        self.model, self.budget, self.gates = model, budget, model.ssp_gates
        self.space = search_space(model, model.adapter_config["r"])
        self.sizes = torch.tensor([c.size for c in self.space], dtype=torch.float64)  # n_i
        device = model.tok_embeddings.weight.device
        self.alpha = nn.Parameter(torch.zeros(len(self.space), device=device))  # S3Delta's init: every alpha 0
        self.optimizer = torch.optim.AdamW([self.alpha], lr=ALPHA_LR, weight_decay=0.0)
        self.b = 0.0  # the last shift: the next solve starts from it
        self.uniforms = torch.Generator().manual_seed(seed)  # the u's, on the CPU: the same on every device
        self.expected_size = None  # sum_i p_i n_i of the last sampling: the budget, by construction

    def sample(self, u=None):
        """Solve b for the current alphas, then set the gates: z ~ binary concrete(p; u), or p itself (u None)."""
        self.b = solve_shift(self.alpha, self.sizes, self.budget, self.b)
        p = probabilities(self.alpha, self.b)
        self.expected_size = (p.detach().cpu() * self.sizes).sum().item()
        self.gates.z = (p if u is None else relaxed(p, u.to(p.device))).float()

    def uniform(self):
        return torch.rand(len(self.space), generator=self.uniforms, dtype=torch.float64)

    def step(self, weights, w_optimizer, grads, train_batch, alpha_batch, lr_w, lr_alpha):
        """One search step: the alphas (second-order DARTS), then the weights. Returns the weights' loss."""
        self.sample(self.uniform())  # one u for the alpha passes (S3Delta's sample_once_per_step)
        w = [p.detach().clone() for p in weights]
        # the virtual step: w' = one AdamW step of w on the training half, from a copy of the optimizer's moments
        _, g = grads(train_batch, weights)
        virtual_adamw(weights, g, w_optimizer, lr_w)
        # the alpha half at w': dL/dalpha and dL/dw'
        _, (d_alpha, *d_w) = grads(alpha_batch, [self.alpha, *weights])
        # the second-order term, d2L_train/(dalpha dw) dL/dw', by finite differences at w +- eps dL/dw'
        eps = 0.01 / (torch.cat([d.flatten() for d in d_w]).norm() + 1e-6)
        plus, minus = (self.at(weights, w, d_w, sign * eps, lambda: grads(train_batch, [self.alpha])[1][0])
                       for sign in (1, -1))
        with torch.no_grad():
            for p, saved in zip(weights, w):
                p.copy_(saved)  # the real weights back, exactly
        self.alpha.grad = d_alpha - lr_w * (plus - minus) / (2 * eps)
        torch.nn.utils.clip_grad_norm_([self.alpha], GRAD_CLIP)
        self.optimizer.param_groups[0]["lr"] = lr_alpha
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        # the weights' own step, on a fresh sample at the new alphas
        self.sample(self.uniform())
        loss, g = grads(train_batch, weights)
        for p, grad in zip(weights, g):
            p.grad = grad
        torch.nn.utils.clip_grad_norm_(weights, GRAD_CLIP)
        for group in w_optimizer.param_groups:
            group["lr"] = lr_w
        w_optimizer.step()
        w_optimizer.zero_grad(set_to_none=True)
        return loss

    @staticmethod
    def at(weights, w, direction, eps, f):
        """f() with the weights at w + eps * direction."""
        with torch.no_grad():
            for p, saved, d in zip(weights, w, direction):
                p.copy_(saved + eps * d)
        return f()

    def state_dict(self):
        return {"alpha": self.alpha.detach().cpu(), "optimizer": self.optimizer.state_dict(), "b": self.b,
                "uniforms": self.uniforms.get_state()}

    def load_state_dict(self, state):
        with torch.no_grad():
            self.alpha.copy_(state["alpha"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.b = state["b"]
        self.uniforms.set_state(state["uniforms"])


@torch.no_grad()
def virtual_adamw(weights, grads, optimizer, lr):
    """One AdamW step of the weights, in place, with copies of the optimizer's moments (which stay as they were):
    torch's AdamW, written out (S3Delta calls torch's functional adamw on deep copies of the state)."""
    group = optimizer.param_groups[0]
    (beta1, beta2), eps, decay = group["betas"], group["eps"], group["weight_decay"]
    for p, g in zip(weights, grads):
        state = optimizer.state.get(p, {})
        step = float(state["step"]) + 1 if state else 1.0
        m = state["exp_avg"] * beta1 + (1 - beta1) * g if state else (1 - beta1) * g
        v = state["exp_avg_sq"] * beta2 + (1 - beta2) * g * g if state else (1 - beta2) * g * g
        p.mul_(1 - lr * decay)
        denom = (v.sqrt() / math.sqrt(1 - beta2 ** step)) + eps
        p.addcdiv_(m, denom, value=-lr / (1 - beta1 ** step))


# -----------------------------------------------------------------------------
# the search stage's loop, run by train.py before the retrain


def search_structure(args, model, tokenizer, train, dev, seed, batch_size, out_dir, settings, inputs, autocast,
                     device):
    """SSP's search on the frozen model (Search, above); returns the structure derived from the alphas of the lowest dev
    loss, and what results.json says of the search. The training examples are split 50/50 at random (seeded): the
    delta weights learn on one half, the alphas on the other, one batch of each per step, for --epochs over the
    first half (or --max_steps). search.pt (written at every dev evaluation, every --ckpt_minutes and at the end)
    continues it exactly under --resume; once it holds the structure, the search is done. train.py calls it with
    its run's flags and data, and this loop uses train.py's pieces: the loss, the micro-batches, the schedule."""
    # here, not at the top: train.py and adapters.py import this file
    import adapters
    from loaders import torch_load
    from train import check_same_run, lr_at, lr_of, target_loss

    path, log_path = out_dir / "search.pt", out_dir / "search.jsonl"
    saved = torch_load(path) if path.exists() else None  # claim_out_dir kept it only under --resume
    if saved is not None:
        check_same_run(saved, settings, inputs, path)
        if saved["structure"] is not None:
            print(f"search: done, {len(saved['structure'])} candidates chosen ({path})")
            return saved["structure"], search_summary(saved["state"], saved["structure"])
    if len(train) < 2:
        raise UserError("SSP's search splits the training examples in two halves: it needs at least 2")
    weights, w_optimizer, search = supernet(args, model, seed)
    budget = search.budget
    split = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed)).tolist()
    halves = ([train[i] for i in split[:len(train) // 2]], [train[i] for i in split[len(train) // 2:]])
    total = min(args.epochs * math.ceil(len(halves[0]) / batch_size), args.max_steps or math.inf)
    state = {"step": 0, "best_loss": math.inf, "best_alpha": search.alpha.detach().cpu().clone(), "time": 0.0}
    print(f"search: {len(search.space)} candidates, {int(search.sizes.sum()):,} parameters; budget {budget:,}; "
          f"{len(halves[0])} + {len(halves[1])} examples, {total} steps")
    if saved is not None:
        state = restore_search(saved, split, weights, w_optimizer, search, log_path)
    grads = micro_batch_grads(args, model, tokenizer, autocast, device)

    log, last_ckpt = open(log_path, "ab"), time.time()
    structure = None
    while structure is None:
        t, t0 = state["step"], time.time()
        model.train()
        lr_w, lr_alpha = lr_at(t, lr_of(args), 0, total), lr_at(t, ALPHA_LR, 0, total)  # linear decay, no warmup
        loss = search.step(weights, w_optimizer, grads, half_batch(halves, 0, t, seed, batch_size),
                           half_batch(halves, 1, t, seed, batch_size), lr_w, lr_alpha)
        state["step"], state["time"] = state["step"] + 1, state["time"] + time.time() - t0
        records = [{"step": t + 1, "loss": loss, "lr": lr_w, "alpha_lr": lr_alpha, "shift": search.b,
                    "expected_params": search.expected_size}]
        evaluated = state["step"] % args.eval_interval == 0 or state["step"] >= total
        if evaluated:  # the supernet with z = p on dev: the lowest loss keeps its alphas
            with torch.no_grad():
                search.sample()
            total_loss = target_loss(model, dev, args.micro_batch_size, tokenizer.pad_id, device, autocast)
            dev_loss = (total_loss[0] / total_loss[1]).item()
            if dev_loss < state["best_loss"]:
                state["best_loss"], state["best_alpha"] = dev_loss, search.alpha.detach().cpu().clone()
            records.append({"step": t + 1, "dev_loss": dev_loss, "best_dev_loss": state["best_loss"]})
            print(f"search step {t + 1}: dev loss {dev_loss:.4f}" + " (best)" * (dev_loss == state["best_loss"]))
        if state["step"] >= total:
            structure = derive(search.space, state["best_alpha"], budget)
        log.write(b"".join((json.dumps(record) + "\n").encode() for record in records))
        log.flush()
        if evaluated or structure or time.time() - last_ckpt >= 60 * args.ckpt_minutes:
            save_search(path, weights, w_optimizer, search, state, split, structure, log.tell(), settings, inputs)
            last_ckpt = time.time()
    log.close()
    size = sum(c.size for c in search.space if c.name in set(structure))
    print(f"search: done, {len(structure)} candidates, {size:,} parameters (budget {budget:,})")
    adapters.remove_adapter(model)
    return structure, search_summary(state, structure)


def supernet(args, model, seed):
    """Every candidate of the space on the model, gated: (their tensors, AdamW over them, the Search of their
    gates)."""
    import adapters
    from train import adapter_settings, lr_of

    adapters.add_adapter(model, args.method, **adapter_settings(args, model))
    adapters.mark_only_adapter_as_trainable(model)
    model.grad_checkpointing = args.grad_checkpointing
    weights = [p for p in model.parameters() if p.requires_grad]
    w_optimizer = torch.optim.AdamW(weights, lr=lr_of(args), weight_decay=0.0)  # S3Delta's: no weight decay
    return weights, w_optimizer, Search(model, model.adapter_config["budget"], seed)


def half_batch(halves, half, step, seed, batch_size):
    """The batch of `step` from one half of the training examples: its shuffle is a function of (seed, half, epoch),
    so the step number is the data position, as in train.py."""
    epoch, index = divmod(step, math.ceil(len(halves[half]) / batch_size))
    order = torch.randperm(len(halves[half]), generator=torch.Generator().manual_seed(
        seed * 1_000_003 + 2 * epoch + half)).tolist()
    return [halves[half][i] for i in order[index * batch_size:(index + 1) * batch_size]]


def micro_batch_grads(args, model, tokenizer, autocast, device):
    """grads(examples, tensors) -> (loss, its gradients with respect to tensors), summed over micro-batches of
    train.py's loss: what Search.step calls for each of its passes."""
    from train import answer_loss, collate, micro_batches

    def grads(examples, tensors):
        n_targets, loss, summed = sum(len(t) for _, t in examples), 0.0, [torch.zeros_like(t) for t in tensors]
        for micro in micro_batches(examples, args.micro_batch_size):
            tokens, targets, prompt_len = collate(micro, tokenizer.pad_id, device)
            with autocast:
                part = answer_loss(model, tokens, targets, prompt_len) / n_targets
            # retain_graph: the gates' graph (alphas -> z) serves every micro-batch
            for s, g in zip(summed, torch.autograd.grad(part, tensors, retain_graph=True, allow_unused=True)):
                if g is not None:
                    s += g
            loss += part.item()
        return loss, summed

    return grads


def save_search(path, weights, w_optimizer, search, state, split, structure, log_bytes, settings, inputs):
    """search.pt, atomically: everything --resume needs to continue the search exactly (or, with the structure, to
    skip it)."""
    from data import atomic_write

    saved = {"weights": [p.detach().cpu() for p in weights], "w_optimizer": w_optimizer.state_dict(),
             "search": search.state_dict(), "state": state, "split": split, "structure": structure,
             "log_bytes": log_bytes, "settings": settings, "inputs": inputs}
    atomic_write(path, lambda tmp: torch.save(saved, tmp))


def restore_search(saved, split, weights, w_optimizer, search, log_path):
    """The search as search.pt holds it; search.jsonl cut back to what it had logged. Returns the loop's state."""
    import runs

    if saved["split"] != split:  # a function of the seed and the examples, both checked: never expected
        raise UserError(f"cannot --resume {log_path.parent / 'search.pt'}: its 50/50 split of the training examples "
                        "is not this run's")
    with torch.no_grad():
        for p, t in zip(weights, saved["weights"]):
            p.copy_(t)
    w_optimizer.load_state_dict(saved["w_optimizer"])
    search.load_state_dict(saved["search"])
    runs.cut_log(log_path, saved["log_bytes"])
    print(f"search: resumed at step {saved['state']['step']}")
    return saved["state"]


def search_summary(state, structure):
    return {"search_steps": state["step"], "search_time_s": round(state["time"], 1),
            "search_best_dev_loss": state["best_loss"], "searched_candidates": len(structure)}
