"""
The adapter interface shared by PARA (para.py) and the baselines (baselines.py): the registry of methods, attaching
one to a loaded model, training only its tensors, counting them, the per-row arguments its blocks take, adapter
files, and banks of adapters served in one batch (multi-tenant serving: one base model, row i of a batch using
adapter adapter_ids[i]).

    python adapters.py        # trainable parameters of each method on Llama-2 7B/13B/70B and SmolLM2-135M

Attaching never rebuilds a loaded module: the method changes its class in place (a TransformerBlock becomes a
PARABlock, an nn.Linear an IA3Linear) and adds its own tensors, so the base weights keep their tensors and names.

Full fine-tuning (Table 2's Full-FT, the paper's upper reference) is in the registry too, as the method whose
"adapter" is the whole model: it adds nothing and trains every weight, and what it saves is the model itself (a
checkpoint folder, loaders.save), never an adapter file.
"""
import dataclasses
import os
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

import baselines
import para
import ssp
from data import atomic_write
from errors import UserError, shorten
from loaders import FINE_TUNED, model_class, model_fingerprint, model_name
from model import ModelArgs, Transformer, TransformerBlock

# -----------------------------------------------------------------------------
# The registry: every method, once

WHOLE, NUMBER, NAMES = (int,), (int, float), (list, tuple)
TYPE_NAMES = {WHOLE: "a whole number", NUMBER: "a number", NAMES: "a list of names"}
PARA_R = 12  # the paper's bottleneck: the baselines are compared with PARA at its parameter count at this r
PAPER_LR = 1e-4  # the paper's learning rate, for every method (section 4.3)
# Full fine-tuning's: the paper gives none. Llama 2's own supervised fine-tuning used 2e-5 (Touvron et al. 2023,
# section 3.1), as Alpaca did on LLaMA 7B: a step moves every weight of the model, not a small added module, so full
# fine-tuning's usual rates (1e-5 to 3e-5) lie well below the adapters' 1e-4
FULL_FT_LR = 2e-5
STUDY_LRS = "3e-4,1e-3,3e-3"  # study.py's first grid of learning rates, tried on dev (half decades; it can grow)
MAX_SIZE = 1 << 20  # no rank or bottleneck is larger: a bigger one in a file is damage, refused before any allocation


@dataclass(frozen=True)
class Method:
    label: str  # how tables name it
    add: Callable  # add(model, **settings) attaches a fresh adapter and returns its settings
    settings: dict  # the settings its adapter files hold, and their types
    flags: dict  # train.py's flags it reads -> the setting each gives (None: a training flag, not a setting)
    size: str = ""  # the setting that sizes it (train.py's --r), "" if none
    symbol: str = "r"  # how a table writes that size
    default_size: int = 0  # train.py's size when --r is not given; 0: PARA's parameter count at PARA_R
    matched: bool = False  # bench.py and study.py size it to PARA's parameter count at PARA_R
    lr: float = PAPER_LR  # its learning rate when none is given
    reads_prompt: bool = False  # its blocks take each row's prompt_len and a store of vectors (block_args)
    prunes: bool = False  # train.py runs AdaLoRA's RankAllocator on it
    full: bool = False  # every base weight trains, and the model itself is saved (no adapter, no bank)
    lrs: str = STUDY_LRS  # study.py's first grid of learning rates for it
    searches: bool = False  # its structure is searched first when none is given (train.py runs the search: ssp.py)
    union: Optional[Callable] = None  # union(configs): one bank's config for tenants of different configs


PARA, IA3 = "para", "ia3"  # the two methods other files name: the subject, and its cost and static reference


# SSP's budget: the PARA paper's Table 2 gives 8.6M on Llama-2 7B; on another model it is scaled by PARA's own count
# there, as PARA's r = 12 count on that model over PARA's r = 12 count on 7B (8.6M x 1,105,920 / 9,560,064 = 994,859
# on SmolLM2-135M)
SSP_BUDGET_7B = 8_600_000
LLAMA2_7B = ModelArgs(dim=4096, n_layers=32, n_heads=32, vocab_size=32000)


def ssp_budget(args: ModelArgs) -> int:
    """SSP's default budget on a model of shape args: the paper's 8.6M, scaled by PARA's count (above)."""
    return round(SSP_BUDGET_7B * count_parameters(args, PARA, r=PARA_R) / count_parameters(LLAMA2_7B, PARA, r=PARA_R))


def add_ssp(model, r: int = ssp.R_C, budget: int = 0, structure=None):
    """ssp.add_ssp, with the default budget for this model when none is given."""
    return ssp.add_ssp(model, r, budget or ssp_budget(model.args), structure)


def add_full(model):
    """Full fine-tuning adds nothing to the model: its weights are what trains (mark_only_adapter_as_trainable)."""
    return {}


LORA_FLAGS = {"r": "r", "lora_alpha": "alpha", "lora_targets": "targets"}
METHODS = {
    PARA: Method("PARA", para.add_para, {"r": WHOLE}, {"r": "r"}, "r", default_size=PARA_R, reads_prompt=True),
    IA3: Method("(IA)^3", baselines.add_ia3, {"targets": NAMES}, {"ia3_targets": "targets"}),
    "lora": Method("LoRA", baselines.add_lora, {"r": WHOLE, "alpha": NUMBER, "targets": NAMES}, LORA_FLAGS, "r",
                   default_size=12, matched=True),
    "adalora": Method("AdaLoRA", baselines.add_adalora, {"r": WHOLE, "alpha": NUMBER, "targets": NAMES},
                      LORA_FLAGS | {f"adalora_{k}": None for k in ("target_r", "tinit", "tfinal", "deltaT", "beta",
                                                                      "orth_reg_weight")},
                      "r", default_size=12, prunes=True),
    "houlsby": Method("Houlsby", baselines.add_houlsby, {"size": WHOLE}, {"r": "size"}, "size", "m", matched=True),
    "full": Method("Full-FT", add_full, {}, {}, lr=FULL_FT_LR, full=True, lrs="1e-5,3e-5,1e-4"),
    # SSP's settings: r (r_c, the LoRA candidates' rank), budget, structure (None: search it first)
    "ssp": Method("SSP", add_ssp, {"r": WHOLE, "budget": WHOLE, "structure": NAMES},
                  {"r": "r", "ssp_budget": "budget", "ssp_structure": "structure"}, "r", "r_c", default_size=ssp.R_C,
                  searches=True, union=ssp.union),
}
NONE = "none"  # train.py --method none: the base model alone (zero-shot)
# Named variants, key -> (label, method, settings). PARA's "static twin" is (IA)^3 on exactly the projections PARA
# scales: vectors learned, but the same for every prompt; PARA minus its twin is what prompt-awareness adds.
VARIANTS = {"twin": ("static twin", IA3, {"targets": list(para.SCALED)})}


def label(method: str, settings: dict) -> str:
    """A table's name for an adapter: "PARA r=12", "LoRA r=19", "Houlsby m=15", "(IA)^3"."""
    m = METHODS[method]
    return f"{m.label} {m.symbol}={settings[m.size]}" if m.size else m.label


def compared_size(args: ModelArgs, method: str) -> dict:
    """The settings bench.py and study.py compare a method at: PARA's count at PARA_R, or its default size."""
    m = METHODS[method]
    if not m.size:
        return {}
    return {m.size: size_matching_para(args, method) if m.matched or not m.default_size else m.default_size}


# -----------------------------------------------------------------------------
# Attaching an adapter


def add_adapter(model: Transformer, method: str = PARA, n_adapters: int = 1, **settings):
    """Attach a fresh adapter (or a bank of n_adapters copies of one) in place; the outputs are unchanged."""
    if getattr(model, "adapter_config", None):
        raise UserError(f"the model already has a {model.adapter_config['method']} adapter")
    check_settings(method, settings)
    if METHODS[method].full and n_adapters > 1:
        raise UserError("full fine-tuning trains the model itself: there is no adapter to put in a bank")
    config = {"method": method, **METHODS[method].add(model, **settings)}
    if n_adapters > 1:
        make_bank(model, n_adapters)
    model.adapter_config, model.n_adapters = config, n_adapters
    return model


def check_settings(method, settings, source="the adapter's settings"):
    """Refuse an unknown method, an unknown setting or a setting of the wrong type, naming where it came from."""
    if method not in METHODS:
        raise UserError(f"unknown adapter method {method!r} in {source}: choose from {', '.join(METHODS)}")
    types = METHODS[method].settings
    for key, value in settings.items():
        if key not in types:
            raise UserError(f"{source}: {method} has no setting {key!r} (its settings: {', '.join(types) or 'none'})")
        if not isinstance(value, types[key]) or isinstance(value, bool):
            raise UserError(f"{source}: {method}'s {key!r} must be {TYPE_NAMES[types[key]]}, got {value!r}")
        if key in ("r", "size") and not 1 <= value <= MAX_SIZE:
            raise UserError(f"{source}: {method}'s {key!r} must lie in [1, {MAX_SIZE:,}], got {shorten(value)}")


def remove_adapter(model: Transformer):
    """Take a searched method's supernet off the model once its search is done (train.py): the base model again."""
    ssp.remove_ssp(model)
    model.adapter_config, model.n_adapters = None, 0


def block_args(model: Transformer, prompt_len=None, adapter_ids=None, vectors=None) -> dict:
    """The per-row arguments the model's blocks take (model.Transformer.forward hands them on), out of those a caller
    has: PARA's blocks take each row's prompt_len and a generation's store of vectors, a bank's blocks each row's
    adapter_ids, and model.py's own blocks none (none of the others changes what they compute)."""
    if getattr(model, "groups", None):  # adapters of several methods in one batch (mixed.py)
        import mixed  # here: mixed.py imports this file
        return {"adapter_ids": mixed.Rows(adapter_ids), "vectors": vectors}
    config = getattr(model, "adapter_config", None)
    args = {"prompt_len": prompt_len, "vectors": vectors} if config and METHODS[config["method"]].reads_prompt else {}
    if getattr(model, "n_adapters", 1) > 1:
        args["adapter_ids"] = adapter_ids
    return args


ADAPTER_PARAMS = ("vector_generator.", "ia3_", "lora_", "houlsby_", "ssp_")  # the adapters' tensor names contain one


def is_adapter_param(name: str) -> bool:
    return any(key in name for key in ADAPTER_PARAMS)


def mark_only_adapter_as_trainable(model: nn.Module):
    """Only the adapter's tensors train; under full fine-tuning, whose adapter is the model, every weight does."""
    config = getattr(model, "adapter_config", None)
    full = bool(config) and METHODS[config["method"]].full
    for name, p in model.named_parameters():
        p.requires_grad = full or is_adapter_param(name)


def adapter_state_dict(model: nn.Module) -> dict:
    """The adapter's tensors only (a bank's with their leading dimension n_adapters). Read from the parameters,
    not model.state_dict(): under FSDP, that one would gather the sharded base model with the other processes."""
    return {k: p.detach() for k, p in model.named_parameters() if is_adapter_param(k)}


def meta_adapter(args: ModelArgs, method: str, settings: dict) -> dict:
    """The tensors of one adapter on a model of shape args, built on the meta device: shapes, and no memory."""
    args = dataclasses.replace(args, vocab_size=max(args.vocab_size, 1))  # the adapter does not touch the vocabulary
    with torch.device("meta"):
        model = model_class(args)(args)
        add_adapter(model, method, **settings)
    return adapter_state_dict(model)


def count_parameters(args: ModelArgs, method: str = PARA, tied: bool = False, **settings) -> int:
    """Trainable parameters of one adapter, counted on the meta device: no weights are allocated. Full fine-tuning's
    are the model's own, args giving the vocabulary's size; an embedding tied to the LM head counts once (tied: as
    SmolLM2's, loaders.is_tied; a Gemma's always is)."""
    if METHODS[method].full:
        with torch.device("meta"):
            model = model_class(args)(args)
        if tied:
            model.output.weight = model.tok_embeddings.weight  # one matrix, as loaders.load ties them
        return sum(p.numel() for p in model.parameters())  # each parameter once
    return sum(t.numel() for t in meta_adapter(args, method, settings).values())


def size_matching_para(args: ModelArgs, method: str) -> int:
    """The size (LoRA's rank, the Houlsby bottleneck) whose parameter count is closest to PARA's at r = PARA_R."""
    target = count_parameters(args, "para", r=PARA_R)
    knob = METHODS[method].size
    per_unit = count_parameters(args, method, **{knob: 2}) - count_parameters(args, method, **{knob: 1})
    fixed = count_parameters(args, method, **{knob: 1}) - per_unit  # Houlsby's output biases
    return max(1, round((target - fixed) / per_unit))


# -----------------------------------------------------------------------------
# Multi-tenant serving: a bank of n adapters of one method, each tensor stacked (n, *shape) under its name.
# Row i of a batch uses adapter adapter_ids[i]; a call without adapter_ids uses adapter 0 for every row. A bank
# computes each method's own equation (para.py, baselines.py), with each row's tensors in place of one set.


def stacked(p: torch.Tensor, n: int) -> nn.Parameter:
    return nn.Parameter(p.detach()[None].repeat(n, *[1] * p.ndim))  # n copies: (n, *p.shape)


def per_row(tensor, adapter_ids):
    """Each row's copy of a stacked adapter tensor: (B, 1, size) for a vector, so that it scales every token of
    its row; (B, *shape) for a matrix, for a batched matmul. adapter_ids: (B,); None, adapter 0 for every row; or
    one int, the same adapter for every row: then its tensor as it is, not a copy per row, and the rows compute
    exactly what that adapter computes alone (a gather costs 10 - 20 µs a call in a prefill, on a CPU)."""
    if adapter_ids is None or isinstance(adapter_ids, int):
        return tensor[adapter_ids or 0]
    rows = tensor.index_select(0, adapter_ids)  # = tensor[adapter_ids]; a bank's VG in 0.6 - 0.75 of the time (CPU)
    return rows[:, None] if rows.ndim == 2 else rows


class VectorGeneratorBank(para.VectorGenerator):
    """n vector generators: at the prompt, row i computes its vectors with adapter adapter_ids[i]'s weights."""

    def forward(self, h, adapter_ids=None):
        return self.vectors(h, *(per_row(t, adapter_ids) for t in (self.down, self.up, self.bias)))  # (B, D, r), ...


class Bank:
    """A bank of one baseline's projections: its equation (adapt) with each row's tensors, at every decode step."""

    def forward(self, x, adapter_ids=None):
        return self.adapt(x, nn.Linear.forward(self, x), *(per_row(t, adapter_ids) for t in self.tensors()))


class IA3Bank(Bank, baselines.IA3Linear):
    pass


class LoRABank(Bank, baselines.LoRALinear):
    pass


class AdaLoRABank(Bank, baselines.AdaLoRALinear):
    pass


class HoulsbyBank(Bank, baselines.HoulsbyLinear):
    pass


class SSPLinearBank(Bank, ssp.SSPLinear):
    pass


class SSPNormBank(Bank, ssp.SSPNorm):
    """SSP's candidates on a norm, each row's: the block hands it the rows' adapter_ids (BankBlock)."""

    def forward(self, x, adapter_ids=None):
        return self.adapt(x, self.base_class.forward(self, x), *(per_row(t, adapter_ids) for t in self.tensors()))


BANKS = {baselines.IA3Linear: IA3Bank, baselines.LoRALinear: LoRABank, baselines.AdaLoRALinear: AdaLoRABank,
         baselines.HoulsbyLinear: HoulsbyBank, ssp.SSPLinear: SSPLinearBank, ssp.SSPNorm: SSPNormBank}


def project(linear, x, adapter_ids):
    """x through a projection (or a norm): a bank picks each row's adapter; a plain one is the same for every row."""
    return linear(x, adapter_ids) if isinstance(linear, Bank) else linear(x)


class BankBlock(TransformerBlock):
    """model.py's block, with the rows' adapter_ids (B,) handed to each projection that is a bank."""

    def forward(self, x, rot, mask, cache=None, start_pos=0, adapter_ids=None):
        att, ffn, ids = self.attention, self.feed_forward, adapter_ids
        a = project(self.attention_norm, x, ids)  # a norm is a bank too under SSP
        q, k, v = project(att.wq, a, ids), project(att.wk, a, ids), project(att.wv, a, ids)
        h = x + project(att.wo, att.attend(q, k, v, rot, mask, cache, start_pos), ids)
        f = project(self.ffn_norm, h, ids)
        return h + project(ffn.w2, F.silu(project(ffn.w1, f, ids)) * project(ffn.w3, f, ids), ids)


BANK_BLOCKS = {TransformerBlock: BankBlock}  # a backbone's block -> its bank block (gemma.py adds Gemma's)


def make_bank(model: Transformer, n: int):
    """Turn the model's adapter into a bank of n copies of it, in place."""
    for block in model.layers:
        if isinstance(block, para.PARABlock):
            vg = block.vector_generator
            vg.__class__ = VectorGeneratorBank
            vg.down, vg.up, vg.bias = (stacked(t, n) for t in (vg.down, vg.up, vg.bias))
            continue
        for layer in block.modules():
            if type(layer) in BANKS:
                layer.__class__ = BANKS[type(layer)]
                for name, t in zip(layer.TENSORS, layer.tensors()):
                    setattr(layer, name, stacked(t, n))
        block.__class__ = BANK_BLOCKS[type(block)]


def check_adapter_ids(model: Transformer, adapter_ids):
    """adapter_ids as a LongTensor on the model's device, or None where every row uses the only adapter."""
    if adapter_ids is None:
        return None
    n = getattr(model, "n_adapters", 0)
    adapter_ids = torch.as_tensor(adapter_ids, dtype=torch.long, device=model.tok_embeddings.weight.device)
    if len(adapter_ids) and (adapter_ids.min() < 0 or adapter_ids.max() >= max(n, 1)):
        raise UserError(f"adapter_ids must lie in [0, {n}) (the model holds {n} adapters), got {adapter_ids.tolist()}")
    return adapter_ids if n > 1 else None


# -----------------------------------------------------------------------------
# Adapter files: one adapter's tensors, its config, and the shape of the base model it was trained on

FILE_FORMAT = "para-adapter-v1"
BASE_FIELDS = ("dim", "n_layers", "n_heads", "n_kv_heads", "hidden_dim", "vocab_size")  # a base model's shape


def base_shape(args: ModelArgs) -> dict:
    return {f: getattr(args, f) for f in BASE_FIELDS}


def save_adapter(model: Transformer, path, base: Optional[str] = None, index: int = 0):
    """Write adapter `index` (of a bank; 0 otherwise) to `path` atomically. `base` is the base model's checkpoint
    path (or a name): the file records its name and, for a path, the fingerprint of its files, which load_adapter
    checks."""
    bank = getattr(model, "n_adapters", 1) > 1
    tensors = {k: (v[index] if bank else v).detach().cpu().clone() for k, v in adapter_state_dict(model).items()}
    exists = base is not None and os.path.exists(base)
    payload = {
        "format": FILE_FORMAT,
        "config": model.adapter_config,
        "base": {"name": base and model_name(base), "fingerprint": model_fingerprint(base) if exists else None,
                 **base_shape(model.args)},
        "shapes": {k: list(t.shape) for k, t in tensors.items()},
        "tensors": tensors,
    }
    atomic_write(path, lambda tmp: torch.save(payload, tmp))


def read_adapter_file(path) -> dict:
    """An adapter file's contents, checked: the format, the header, and tensors that are floating point and finite."""
    if not os.path.exists(path):
        raise UserError(f"adapter file {str(path)!r} not found")
    for model in (str(path), os.path.join(path, FINE_TUNED)):  # a model's folder (a full fine-tune's), or its run's
        if any(os.path.isfile(os.path.join(model, config)) for config in ("config.json", "params.json")):
            raise UserError(f"{str(path)!r} holds a model, not an adapter: load {model!r} with --ckpt_dir, the base "
                            "model's flag (a full fine-tune saves the model itself)")
    if not os.path.isfile(path):  # a folder, a FIFO (reading it would wait forever), a device
        raise UserError(f"adapter file {str(path)!r} is not a regular file: give the path of an adapter.pt")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)  # data only: a file cannot run code
    except Exception as e:
        reason = (str(e).splitlines() or [type(e).__name__])[0]
        if "weights_only" in str(e):  # torch suggests weights_only=False, which would run the file's code
            reason = "it holds Python objects other than tensors, and is not loaded"
        raise UserError(f"{str(path)!r} is not a readable adapter file (truncated or corrupt?): "
                        f"{shorten(reason)}") from None
    ok = (isinstance(payload, dict) and payload.get("format") == FILE_FORMAT
          and all(isinstance(payload.get(k), dict) for k in ("config", "base", "shapes", "tensors"))
          and all(isinstance(t, torch.Tensor) for t in payload["tensors"].values())
          and {k: list(t.shape) for k, t in payload["tensors"].items()} == payload["shapes"])
    if not ok and isinstance(payload, dict) and {"optimizer", "settings"} <= payload.keys():
        raise UserError(f"{str(path)!r} is train.py's checkpoint to --resume from, not an adapter file: the run's "
                        f"adapter is adapter.pt beside it (a full fine-tune's model: the {FINE_TUNED}/ folder beside "
                        "it, loaded with --ckpt_dir)")
    if not ok:
        raise UserError(f"{str(path)!r} is not a {FILE_FORMAT} adapter file, or its tensors don't match its header")
    config = dict(payload["config"])
    check_settings(config.pop("method", None), config, source=f"adapter file {str(path)!r}")
    if METHODS[payload["config"]["method"]].full:
        raise UserError(f"{str(path)!r} names full fine-tuning, which saves a model (loaded with --ckpt_dir), never an "
                        "adapter file")
    for name, t in payload["tensors"].items():
        if not t.is_floating_point() or not torch.isfinite(t).all():
            what = f"{t.dtype} values" if not t.is_floating_point() else "NaN or infinite values"
            raise UserError(f"adapter file {str(path)!r}: tensor {name} holds {what}; it is damaged, or was "
                            "saved from a diverged run: use another adapter")
    return payload


def check_adapter_file(path, payload, model_args: ModelArgs, base: Optional[str] = None, any_base=False):
    """Refuse an adapter file for another base model: another shape (always), or, when the caller names its base,
    other weights (by the fingerprint the file records) or another name (files that record none). any_base turns
    the last two into a warning: the same weights in another format have another fingerprint. Then refuse tensors
    that do not fit the adapter its config describes, checked on the meta device before anything is allocated."""
    theirs, ours = {k: payload["base"].get(k) for k in BASE_FIELDS}, base_shape(model_args)
    if theirs != ours:
        diff = ", ".join(f"{k} {theirs[k]} != {ours[k]}" for k in BASE_FIELDS if theirs[k] != ours[k])
        raise UserError(f"{str(path)!r} was trained on another base model ({payload['base'].get('name')}: {diff} here)")
    recorded, name = payload["base"].get("fingerprint"), payload["base"].get("name")
    other = None
    if base and recorded and os.path.exists(base) and recorded != model_fingerprint(base):
        other = f"{str(path)!r} was trained on other weights ({name}) than {str(base)!r}: its files' fingerprints differ"
    elif base and not recorded and name and name != model_name(base):
        other = f"{str(path)!r} was trained on base model {name!r}, not {model_name(base)!r}"
    if other and not any_base:
        raise UserError(f"{other}. If they are the same weights in another format, pass --any_base")
    if other:
        print(f"warning: {other} (--any_base: loaded anyway)")
    config = dict(payload["config"])
    want = {k: list(t.shape) for k, t in meta_adapter(model_args, config.pop("method"), config).items()}
    if payload["shapes"] != want:
        raise UserError(f"{str(path)!r} holds tensors {sorted(payload['shapes'])[:3]}... that don't fit the adapter "
                        f"its config describes ({payload['config']}) on this model: it is damaged or hand-edited")


def load_adapter(model: Transformer, paths, base: Optional[str] = None, any_base=False):
    """Attach the adapters in `paths` (a bank when there are several: adapter_ids index this list), or refill
    a matching adapter of the model. A None in paths is a fresh adapter, the identity: its rows get exactly the base
    model (a tenant without an adapter). `base`: the base model's checkpoint path (or name), checked against what
    each file records (check_adapter_file)."""
    paths = [paths] if isinstance(paths, (str, os.PathLike)) or paths is None else list(paths)
    files = [None if p is None else read_adapter_file(p) for p in paths]
    first = next((i for i, f in enumerate(files) if f), None)
    if first is None:
        raise UserError("no adapter file given")
    config = files[first]["config"]
    # a method with a union (SSP) banks tenants of different configs: the bank holds the union, and each row zeros
    # where its tenant has nothing (which adds exactly 0)
    union = METHODS[config["method"]].union if len(files) > 1 else None
    if union and all(f is None or f["config"]["method"] == config["method"] for f in files):
        config = union([f["config"] for f in files if f])
    else:
        union = None
    for p, f in zip(paths, files):
        if f is None:
            continue
        if not union and (f["config"] != config or f["shapes"] != files[first]["shapes"]):
            raise UserError(f"{str(p)!r} is a {f['config']} adapter but {str(paths[first])!r} is {config}: "
                            "a bank needs one method and one config")
        check_adapter_file(p, f, model.args, base, any_base)
    if not getattr(model, "adapter_config", None):
        add_adapter(model, n_adapters=len(files), **config)  # fresh: each is the identity until filled
    elif model.adapter_config != config or model.n_adapters != len(files):
        raise UserError(f"the model already holds {model.n_adapters} {model.adapter_config} adapter(s); "
                        f"cannot load {len(files)} {config} adapter(s) into it")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for k in adapter_state_dict(model):
            if union:  # a fresh SSP low-rank adapter is random: zeros are what "nothing here" means
                params[k].zero_()
            for i, f in enumerate(files):
                if f is not None and k in f["tensors"]:
                    (params[k][i] if len(files) > 1 else params[k]).copy_(f["tensors"][k])
    return model


if __name__ == "__main__":
    # the vocabulary counts for full fine-tuning alone (the embedding; SmolLM2's and Gemma's is tied to the LM head)
    models = {"Llama-2 7B": ModelArgs(dim=4096, n_layers=32, n_heads=32, vocab_size=32000),
              "Llama-2 13B": ModelArgs(dim=5120, n_layers=40, n_heads=40, vocab_size=32000),
              "Llama-2 70B": ModelArgs(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, ffn_dim_multiplier=1.3,
                                       multiple_of=4096, vocab_size=32000),
              "SmolLM2-135M": ModelArgs(dim=576, n_layers=30, n_heads=9, n_kv_heads=3, hidden_dim=1536,
                                        vocab_size=49152)}
    from gemma import GemmaArgs  # here: gemma.py imports this file

    models |= {"Gemma 2B": GemmaArgs(version=1, dim=2048, n_layers=18, n_heads=8, n_kv_heads=1, head_dim=256,
                                     hidden_dim=16384, vocab_size=256000),
               "Gemma 3 270M": GemmaArgs(dim=640, n_layers=18, n_heads=4, n_kv_heads=1, head_dim=256, hidden_dim=2048,
                                         vocab_size=262144)}
    for name, args in models.items():
        rows = [(label(m, compared_size(args, m)), m, compared_size(args, m)) for m in METHODS] + [*VARIANTS.values()]
        rows.insert(2, ("LoRA r=8 (PEFT's default)", "lora", {"r": 8}))
        tied = name.startswith("SmolLM2")  # its GGUF stores one matrix for the embedding and the LM head

        def count(row, m, s):  # a searched structure's count is not known before its search: its budget is printed
            if METHODS[m].searches:
                return (f"{row} (searched: its budget) {ssp_budget(args):,} of a space of "
                        f"{count_parameters(args, m, **s):,}")
            return f"{row} {count_parameters(args, m, tied, **s):,}"
        print(f"{name}: " + ", ".join(count(*row) for row in rows))
