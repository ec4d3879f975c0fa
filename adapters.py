"""
The adapter interface shared by PARA (para.py) and the baselines (baselines.py): attach a method to a loaded
model, train only its tensors, count them, save and load adapter files, and serve a bank of adapters in one
batch (multi-tenant serving: one base model, row i of a batch using adapter adapter_ids[i]).

    python adapters.py        # trainable parameters of each method on Llama-2 7B/13B/70B and SmolLM2-135M
"""
import dataclasses
import os
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

import baselines
import para
from data import atomic_write
from errors import UserError
from model import ModelArgs, Transformer, TransformerBlock

# method -> (function attaching it, the settings an adapter file may give and their types)
WHOLE, NUMBER, NAMES = (int,), (int, float), (list, tuple)
METHODS = {
    "para": (para.add_para, {"r": WHOLE}),
    "ia3": (baselines.add_ia3, {"targets": NAMES}),
    "lora": (baselines.add_lora, {"r": WHOLE, "alpha": NUMBER, "targets": NAMES}),
    "adalora": (baselines.add_adalora, {"r": WHOLE, "alpha": NUMBER, "targets": NAMES}),
    "houlsby": (baselines.add_houlsby, {"size": WHOLE}),
}
TYPE_NAMES = {WHOLE: "a whole number", NUMBER: "a number", NAMES: "a list of matrix names"}
ADAPTER_PARAMS = ("vector_generator.", "ia3_", "lora_", "houlsby_")  # the adapters' tensor names contain one
FILE_FORMAT = "para-adapter-v1"
BASE_FIELDS = ("dim", "n_layers", "n_heads", "n_kv_heads", "hidden_dim", "vocab_size")  # a base model's shape
PARA_R = 12  # the paper's bottleneck: the baselines' sizes are matched to PARA's parameter count at this r


def add_adapter(model: Transformer, method: str = "para", n_adapters: int = 1, **settings):
    """Attach a fresh adapter (or a bank of n_adapters copies of one) in place; the outputs are unchanged."""
    if getattr(model, "adapter_config", None):
        raise UserError(f"the model already has a {model.adapter_config['method']} adapter")
    check_settings(method, settings)
    add, _ = METHODS[method]
    config = {"method": method, **add(model, **settings)}
    if n_adapters > 1:
        make_bank(model, n_adapters)
    model.adapter_config, model.n_adapters = config, n_adapters
    return model


def check_settings(method, settings, source="the adapter's settings"):
    """Refuse an unknown method, an unknown setting or a setting of the wrong type, naming where it came from."""
    if method not in METHODS:
        raise UserError(f"unknown adapter method {method!r} in {source}: choose from {', '.join(METHODS)}")
    types = METHODS[method][1]
    for key, value in settings.items():
        if key not in types:
            raise UserError(f"{source}: {method} has no setting {key!r} (its settings: {', '.join(types) or 'none'})")
        if not isinstance(value, types[key]) or isinstance(value, bool):
            raise UserError(f"{source}: {method}'s {key!r} must be {TYPE_NAMES[types[key]]}, got {value!r}")
        if key in ("r", "size") and value < 1:
            raise UserError(f"{source}: {method}'s {key!r} must be at least 1, got {value}")


def is_adapter_param(name: str) -> bool:
    return any(key in name for key in ADAPTER_PARAMS)


def mark_only_adapter_as_trainable(model: nn.Module):
    for name, p in model.named_parameters():
        p.requires_grad = is_adapter_param(name)


def adapter_state_dict(model: nn.Module) -> dict:
    """The adapter's tensors only (a bank's with their leading dimension n_adapters)."""
    return {k: v for k, v in model.state_dict().items() if is_adapter_param(k)}


def count_parameters(args: ModelArgs, method: str = "para", **settings) -> int:
    """Trainable parameters of one adapter, counted on the meta device: no weights are allocated."""
    args = dataclasses.replace(args, vocab_size=max(args.vocab_size, 1))  # the adapter does not touch the vocabulary
    with torch.device("meta"):
        model = Transformer(args)
        add_adapter(model, method, **settings)
    return sum(t.numel() for t in adapter_state_dict(model).values())


def size_matching_para(args: ModelArgs, method: str) -> int:
    """LoRA's rank or the Houlsby bottleneck whose parameter count is closest to PARA's at r = 12."""
    target = count_parameters(args, "para", r=PARA_R)
    knob = {"lora": "r", "houlsby": "size"}[method]
    per_unit = count_parameters(args, method, **{knob: 2}) - count_parameters(args, method, **{knob: 1})
    fixed = count_parameters(args, method, **{knob: 1}) - per_unit  # Houlsby's output biases
    return max(1, round((target - fixed) / per_unit))


# -----------------------------------------------------------------------------
# Multi-tenant serving: a bank of n adapters of one method, each tensor stacked (n, *shape) under its name.
# Row i of a batch uses adapter adapter_ids[i]; a call without adapter_ids uses adapter 0 for every row.


def stacked(p: torch.Tensor, n: int) -> nn.Parameter:
    return nn.Parameter(p.detach()[None].repeat(n, *[1] * p.ndim))  # n copies: (n, *p.shape)


def per_row(tensor, adapter_ids):
    """Each row's copy of a stacked adapter tensor: (B, 1, size) for a vector, so that it scales every token of
    its row; (B, *shape) for a matrix, for a batched matmul."""
    if adapter_ids is None:
        return tensor[0]
    rows = tensor[adapter_ids]
    return rows[:, None] if rows.ndim == 2 else rows


class VectorGeneratorBank(para.VectorGenerator):
    """n vector generators: at the prompt, row i computes its vectors with adapter adapter_ids[i]'s weights."""

    def __init__(self, vg: para.VectorGenerator, n: int):
        nn.Module.__init__(self)
        self.split_sizes = vg.split_sizes
        self.down, self.up, self.bias = stacked(vg.down, n), stacked(vg.up, n), stacked(vg.bias, n)

    def forward(self, h, adapter_ids=None):
        down, up, bias = (per_row(t, adapter_ids) for t in (self.down, self.up, self.bias))  # (B, D, r), ...
        l = F.gelu(h.float()[:, None] @ down) @ up + bias  # Eq. 6, each row with its own weights: (B, 1, d_out)
        return l.split(self.split_sizes, dim=-1)


class Bank:
    """A bank layer: BankBlock hands it the adapter_ids (B,) of the rows being computed, for one call."""

    adapter_ids = None


class IA3Bank(Bank, baselines.IA3Linear):
    def __init__(self, layer: baselines.IA3Linear, n: int):
        para.SharedLinear.__init__(self, layer)  # the same base weight
        self.ia3_vector = stacked(layer.ia3_vector, n)

    def vectors(self):
        return per_row(self.ia3_vector, self.adapter_ids)


class LoRABank(Bank, baselines.LoRALinear):
    def __init__(self, layer: baselines.LoRALinear, n: int):
        para.SharedLinear.__init__(self, layer)
        self.scaling, self.lora_A, self.lora_B = layer.scaling, stacked(layer.lora_A, n), stacked(layer.lora_B, n)

    def low_rank(self):  # (B, r, in), (B, out, r): every decode step multiplies each row by its own A and B
        return per_row(self.lora_A, self.adapter_ids), per_row(self.lora_B, self.adapter_ids)


class AdaLoRABank(Bank, baselines.AdaLoRALinear):
    def __init__(self, layer: baselines.AdaLoRALinear, n: int):
        para.SharedLinear.__init__(self, layer)
        self.scaling = layer.scaling
        self.lora_A, self.lora_E, self.lora_B = (stacked(t, n) for t in (layer.lora_A, layer.lora_E, layer.lora_B))

    def low_rank(self):  # (B, r, in), (B, out, r)
        A, E, B = (per_row(t, self.adapter_ids) for t in (self.lora_A, self.lora_E, self.lora_B))
        return E * A, B


class HoulsbyBank(Bank, baselines.HoulsbyLinear):
    def __init__(self, layer: baselines.HoulsbyLinear, n: int):
        para.SharedLinear.__init__(self, layer)
        for name in ("houlsby_down", "houlsby_down_bias", "houlsby_up", "houlsby_up_bias"):
            setattr(self, name, stacked(getattr(layer, name), n))

    def bottleneck(self):
        return tuple(per_row(t, self.adapter_ids) for t in baselines.HoulsbyLinear.bottleneck(self))


BANKS = {baselines.IA3Linear: IA3Bank, baselines.LoRALinear: LoRABank, baselines.AdaLoRALinear: AdaLoRABank,
         baselines.HoulsbyLinear: HoulsbyBank}


class BankBlock(TransformerBlock):
    """A block whose adapted layers are banks; it hands them the adapter_ids of the rows of each call."""

    def __init__(self, block: TransformerBlock):
        nn.Module.__init__(self)
        for name, child in block.named_children():  # adopt the block's modules, as para.PARABlock does
            self.add_module(name, child)
        self.banks = [m for m in self.modules() if isinstance(m, Bank)]

    def forward(self, x, rot, mask, cache=None, start_pos=0, prompt_len=None, adapter_ids=None):
        for bank in self.banks:
            bank.adapter_ids = adapter_ids
        try:
            return super().forward(x, rot, mask, cache, start_pos)
        finally:  # they belong to this call's rows: no later call may see them
            for bank in self.banks:
                bank.adapter_ids = None


def make_bank(model: Transformer, n: int):
    """Turn the model's adapter into a bank of n copies of it, in place."""
    for i, block in enumerate(model.layers):
        if isinstance(block, para.PARABlock):
            block.vector_generator = VectorGeneratorBank(block.vector_generator, n)
            continue
        for parent in (block.attention, block.feed_forward):
            for name, layer in list(parent.named_children()):
                if type(layer) in BANKS:
                    setattr(parent, name, BANKS[type(layer)](layer, n))
        model.layers[i] = BankBlock(block)


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


def base_shape(args: ModelArgs) -> dict:
    return {f: getattr(args, f) for f in BASE_FIELDS}


def save_adapter(model: Transformer, path, base: Optional[str] = None, index: int = 0):
    """Write adapter `index` (of a bank; 0 otherwise) to `path` atomically; `base` names the base model."""
    bank = getattr(model, "n_adapters", 1) > 1
    tensors = {k: (v[index] if bank else v).detach().cpu().clone() for k, v in adapter_state_dict(model).items()}
    payload = {
        "format": FILE_FORMAT,
        "config": model.adapter_config,
        "base": {"name": base and os.path.basename(os.path.normpath(base)), **base_shape(model.args)},
        "shapes": {k: list(t.shape) for k, t in tensors.items()},
        "tensors": tensors,
    }
    atomic_write(path, lambda tmp: torch.save(payload, tmp))


def read_adapter_file(path) -> dict:
    """An adapter file's contents, checked: the format, the header, and tensors that are floating point and finite."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)  # data only: a file cannot run code
    except FileNotFoundError:
        raise UserError(f"adapter file {str(path)!r} not found") from None
    except Exception as e:
        reason = (str(e).splitlines() or [type(e).__name__])[0]
        if "weights_only" in str(e):  # torch suggests weights_only=False, which would run the file's code
            reason = "it holds Python objects other than tensors, and is not loaded"
        raise UserError(f"{str(path)!r} is not a readable adapter file (truncated or corrupt?): {reason}") from None
    ok = (isinstance(payload, dict) and payload.get("format") == FILE_FORMAT
          and all(isinstance(payload.get(k), dict) for k in ("config", "base", "shapes", "tensors"))
          and all(isinstance(t, torch.Tensor) for t in payload["tensors"].values())
          and {k: list(t.shape) for k, t in payload["tensors"].items()} == payload["shapes"])
    if not ok:
        raise UserError(f"{str(path)!r} is not a {FILE_FORMAT} adapter file, or its tensors don't match its header")
    config = dict(payload["config"])
    check_settings(config.pop("method", None), config, source=f"adapter file {str(path)!r}")
    for name, t in payload["tensors"].items():
        if not t.is_floating_point() or not torch.isfinite(t).all():
            what = f"{t.dtype} values" if not t.is_floating_point() else "NaN or infinite values"
            raise UserError(f"adapter file {str(path)!r}: tensor {name} holds {what}; it is damaged, or was "
                            "saved from a diverged run: use another adapter")
    return payload


def load_adapter(model: Transformer, paths, base: Optional[str] = None):
    """Attach the adapters in `paths` (a bank when there are several: adapter_ids index this list), or refill
    a matching adapter of the model."""
    paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    files = [read_adapter_file(p) for p in paths]
    config = files[0]["config"]
    ours = base_shape(model.args)
    for p, f in zip(paths, files):
        if f["config"] != config or f["shapes"] != files[0]["shapes"]:
            raise UserError(f"{str(p)!r} is a {f['config']} adapter but {str(paths[0])!r} is {config}: "
                            "a bank needs one method and one config")
        theirs = {k: f["base"].get(k) for k in BASE_FIELDS}
        if theirs != ours:
            diff = ", ".join(f"{k} {theirs[k]} != {ours[k]}" for k in BASE_FIELDS if theirs[k] != ours[k])
            raise UserError(f"{str(p)!r} was trained on another base model ({f['base'].get('name')}: {diff} here)")
        if base and f["base"].get("name") and f["base"]["name"] != os.path.basename(os.path.normpath(base)):
            raise UserError(f"{str(p)!r} was trained on base model {f['base']['name']!r}, not {base!r}")
    if not getattr(model, "adapter_config", None):
        add_adapter(model, n_adapters=len(files), **config)
    elif model.adapter_config != config or model.n_adapters != len(files):
        raise UserError(f"the model already holds {model.n_adapters} {model.adapter_config} adapter(s); "
                        f"cannot load {len(files)} {config} adapter(s) into it")
    params = dict(model.named_parameters())
    for p, f in zip(paths, files):
        want = {k: list(params[k].shape[1:] if len(files) > 1 else params[k].shape) for k in adapter_state_dict(model)}
        if f["shapes"] != want:
            raise UserError(f"{str(p)!r} holds tensors {sorted(f['shapes'])[:3]}... that don't fit this model's adapter")
    with torch.no_grad():
        for k in adapter_state_dict(model):
            tensors = [f["tensors"][k] for f in files]
            params[k].copy_(torch.stack(tensors) if len(files) > 1 else tensors[0])
    return model


if __name__ == "__main__":
    models = {"Llama-2 7B": ModelArgs(dim=4096, n_layers=32, n_heads=32),
              "Llama-2 13B": ModelArgs(dim=5120, n_layers=40, n_heads=40),
              "Llama-2 70B": ModelArgs(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, ffn_dim_multiplier=1.3,
                                       multiple_of=4096),
              "SmolLM2-135M": ModelArgs(dim=576, n_layers=30, n_heads=9, n_kv_heads=3, hidden_dim=1536)}
    for name, args in models.items():
        lora_r, size = size_matching_para(args, "lora"), size_matching_para(args, "houlsby")
        settings = [("para", dict(r=PARA_R)), ("ia3", {}), ("ia3", dict(targets=["wq", "wv", "w3"])),
                    ("lora", dict(r=8)), ("lora", dict(r=lora_r)), ("adalora", dict(r=12)), ("houlsby", dict(size=size))]
        print(f"{name}: " + ", ".join(f"{m} {s}: {count_parameters(args, m, **s):,}" for m, s in settings))
