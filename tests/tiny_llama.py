"""Test-side helpers: tiny random Llamas, Meta <-> HF conversion written independently of model.py,
a Meta checkpoint writer, and a tiny sentencepiece model trained with Llama 2's settings."""
import json
import shutil

import torch

import adapters
from model import ModelArgs, Transformer

# -----------------------------------------------------------------------------
# configs: params.json dicts, as Meta writes them (vocab_size -1 means "the tokenizer's size")

MHA = dict(dim=64, n_layers=2, n_heads=4, multiple_of=32, norm_eps=1e-5, vocab_size=-1)
GQA = dict(dim=64, n_layers=2, n_heads=8, n_kv_heads=2, multiple_of=32, norm_eps=1e-5, vocab_size=-1)
FFN_MULTIPLIER = dict(MHA, ffn_dim_multiplier=1.3)  # hidden 224 (would be 192 without the multiplier)
CONFIGS = {"mha": MHA, "gqa": GQA, "mqa": dict(GQA, n_kv_heads=1), "ffn_dim_multiplier": FFN_MULTIPLIER,
           "norm_eps_1e-6": dict(MHA, norm_eps=1e-6), "rope_theta_1e6": dict(GQA, rope_theta=1e6)}
SP_VOCAB = 384  # the tiny sentencepiece model: 3 control + 256 byte pieces + characters and merges


def meta_ffn_hidden_dim(dim, multiple_of, ffn_dim_multiplier=None):
    """Meta's SwiGLU hidden size (llama/model.py FeedForward), written out for the tests."""
    hidden = 4 * dim
    hidden = int(2 * hidden / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * -(-hidden // multiple_of)  # round up


def random_model(params, vocab_size, seed=0, max_seq_len=64):
    """Our Transformer with seeded random weights; norms too, so that a swapped norm cannot go unnoticed."""
    args = ModelArgs(**{**params, "vocab_size": vocab_size}, max_seq_len=max_seq_len)
    torch.manual_seed(seed)
    model = Transformer(args)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.copy_(1 + 0.2 * torch.randn_like(p))
    return model.eval()


WIDE_ARGS = ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64, multiple_of=16, max_seq_len=64)


def wide_model(args=WIDE_ARGS, seed=0):
    """Our Transformer with O(1) activations and well separated logits (no near-ties for beam search to break
    differently); random norms, so that a wrong norm shows. The adapter tests run on it."""
    torch.manual_seed(seed)
    model = Transformer(args)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(1 + 0.2 * torch.randn_like(p) if p.ndim == 1 else 2 * torch.randn_like(p) / p.shape[1] ** 0.5)
    return model.eval()


R = 4  # the adapters' rank (PARA's bottleneck, LoRA's rank) on the tiny models


@torch.no_grad()
def randomise_adapter(model, seed):
    """Move every adapter tensor away from its initial value, so that a wrong position, row or order changes the
    outputs (PARA's vectors then lie around 1 ± 0.4 and differ from prompt to prompt)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if adapters.is_adapter_param(name):
            p.add_(0.2 * torch.randn(p.shape, generator=g))


SETTINGS = {"para": {"r": R}, "ia3": {}, "lora": {"r": R}, "adalora": {"r": R}, "houlsby": {"size": R}}


def fresh(method, model=None, n_adapters=1):
    """wide_model (or `model`) with a fresh adapter of `method`, or a bank of n_adapters."""
    return adapters.add_adapter(wide_model() if model is None else model, method, n_adapters, **SETTINGS[method])


def adapted(method, seed=1):
    """wide_model with one non-trivial adapter of `method`."""
    model = fresh(method)
    randomise_adapter(model, seed)
    return model


# -----------------------------------------------------------------------------
# How close two fp32 computations of the same logits must be
#
# Two correct fp32 paths (ours and HF's, merged and unmerged LoRA, the KV cache and a recompute) differ by
# rounding alone, and each lies about as far from the exact logits as fp32 lies from fp64. That spread is
# the measured reference: `python tests/spread.py` prints it for each family of test models, with a control,
# the change made by scaling one key head by 1.001, which the tolerance must still catch. Measured on AMD EPYC,
# torch 2.13 (Intel Xeon gave comparisons of the same size: up to 1.1e-5 on the wide models):
# - random_model (PyTorch's init, dim 64, logits up to |2.4|): spread up to 7e-7, control at least 5e-5.
#   assert_close's fp32 default (atol 1e-5 + rtol 1.3e-6) is 10x the largest two-path difference; it stays.
# - wide_model, random_hf_model and the HF models with their inits (logits up to |8|): spread up to 1.2e-5,
#   so two fp32 paths differ by up to 2.4e-5 (seen: merged against unmerged LoRA, whose merge rounds W + BA
#   once more), above the default's 1e-5. WIDE allows 1e-4, four times that; the control moves these logits
#   by at least 6e-4, six times WIDE.
WIDE = dict(atol=1e-4, rtol=0)

# -----------------------------------------------------------------------------
# Meta -> HF, the direction of HF's own conversion script. HF's RoPE rotates the pair (j, j + hd/2)
# by angle pos*theta_j (rotate_half); Meta's rotates (2j, 2j+1) by the same angle. So, per head,
# HF row j must hold Meta row 2j and HF row hd/2 + j must hold Meta row 2j + 1.

def meta_to_hf_rope(w, n_heads):
    """Reorder the rows of a Meta wq/wk (n_heads*hd, dim), or of anything that follows its rows (a vector that
    scales Q, a LoRA B), into HF's rotate-half layout."""
    hd = w.shape[0] // n_heads
    within_head = torch.cat([torch.arange(0, hd, 2), torch.arange(1, hd, 2)])  # (hd,) Meta row for each HF row
    rows = (torch.arange(n_heads)[:, None] * hd + within_head).flatten()
    return w[rows]


def meta_to_hf_state_dict(sd, n_heads, n_kv_heads):
    """Meta names and RoPE layout -> LlamaForCausalLM names and layout."""
    names = {"attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj", "attention.wv": "self_attn.v_proj",
             "attention.wo": "self_attn.o_proj", "feed_forward.w1": "mlp.gate_proj", "feed_forward.w2": "mlp.down_proj",
             "feed_forward.w3": "mlp.up_proj", "attention_norm": "input_layernorm",
             "ffn_norm": "post_attention_layernorm"}
    out = {}
    for key, w in sd.items():
        if key.startswith("layers."):
            _, i, sub = key.removesuffix(".weight").split(".", 2)
            if sub == "attention.wq":
                w = meta_to_hf_rope(w, n_heads)
            elif sub == "attention.wk":
                w = meta_to_hf_rope(w, n_kv_heads)
            out[f"model.layers.{i}.{names[sub]}.weight"] = w
        else:
            out[{"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
                 "output.weight": "lm_head.weight"}[key]] = w
    return out


def hf_config(params, vocab_size, max_seq_len=64, **extra):
    """LlamaConfig for a params.json dict; the FFN size comes from the tests' own copy of Meta's formula."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=params["dim"], num_hidden_layers=params["n_layers"],
        num_attention_heads=params["n_heads"], num_key_value_heads=params.get("n_kv_heads", params["n_heads"]),
        intermediate_size=meta_ffn_hidden_dim(params["dim"], params["multiple_of"], params.get("ffn_dim_multiplier")),
        rms_norm_eps=params["norm_eps"], rope_theta=params.get("rope_theta", 10000.0),
        max_position_embeddings=max_seq_len, **extra)


def hf_twin(model):
    """LlamaForCausalLM holding our model's base weights (an adapter's are left out), converted by this file."""
    from transformers import LlamaConfig, LlamaForCausalLM

    a = model.args
    hf = LlamaForCausalLM(LlamaConfig(
        vocab_size=a.vocab_size, hidden_size=a.dim, intermediate_size=a.hidden_dim, num_hidden_layers=a.n_layers,
        num_attention_heads=a.n_heads, num_key_value_heads=a.n_kv_heads, rms_norm_eps=a.norm_eps,
        rope_theta=a.rope_theta, max_position_embeddings=a.max_seq_len, tie_word_embeddings=False))
    base = {k: v for k, v in model.state_dict().items() if not adapters.is_adapter_param(k)}
    hf.load_state_dict(meta_to_hf_state_dict(base, a.n_heads, a.n_kv_heads), strict=True)
    return hf.eval()


def random_hf_model(config, seed=0):
    """LlamaForCausalLM with seeded random weights of O(1) activations (HF's own init, std 0.02, gives tiny logits)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    hf = LlamaForCausalLM(config)
    with torch.no_grad():
        for p in hf.parameters():
            p.copy_(1 + 0.2 * torch.randn_like(p) if p.ndim == 1 else torch.randn_like(p) / p.shape[1] ** 0.5)
    return hf.eval()


# -----------------------------------------------------------------------------
# files on disk

# Meta's model-parallel split: column-parallel layers on dim 0, row-parallel layers (and the embedding) on dim 1
META_SPLIT_DIM = {"wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "output": 0, "wo": 1, "w2": 1, "tok_embeddings": 1}


def write_meta_checkpoint(folder, params, sd, tokenizer_model, n_shards=1):
    """params.json + consolidated.NN.pth (split as Meta splits them; norms and rope.freqs in each) + tokenizer.model."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "params.json").write_text(json.dumps(params))
    head_dim = params["dim"] // params["n_heads"]
    rope_freqs = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2).float() / head_dim))  # Meta ships this table
    shards = [{"rope.freqs": rope_freqs} for _ in range(n_shards)]
    for key, w in sd.items():
        kind = key.split(".")[-2]
        parts = w.chunk(n_shards, dim=META_SPLIT_DIM[kind]) if kind in META_SPLIT_DIM else [w] * n_shards
        assert len(parts) == n_shards
        for shard, part in zip(shards, parts):
            shard[key] = part.clone()  # clone: save each piece alone, not the whole storage it views
    for i, shard in enumerate(shards):
        torch.save(shard, folder / f"consolidated.{i:02d}.pth")
    if tokenizer_model is not None:
        shutil.copy(tokenizer_model, folder / "tokenizer.model")
    return folder


CORPUS = """The quick brown fox jumps over the lazy dog. Numbers like 12345 and 3.14159 appear here.
Llamas live in the Andes; they eat grass, hum softly and spit when annoyed.
def main(argv):\n    return sum(int(x) for x in argv)  # code, with indentation
Unicode: café, naïve, Straße, 中文, 日本語, emoji 🦙 and 🔥.
    indented   text with   runs of spaces\tand a tab
"""


def train_sentencepiece(folder):
    """A tiny BPE sentencepiece model with Llama 2's trainer settings; returns the path of its .model file."""
    import sentencepiece as spm

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "corpus.txt").write_text(CORPUS * 20)
    spm.SentencePieceTrainer.train(
        input=str(folder / "corpus.txt"), model_prefix=str(folder / "tiny"), vocab_size=SP_VOCAB, model_type="bpe",
        byte_fallback=True, split_digits=True, allow_whitespace_only_pieces=True, remove_extra_whitespaces=False,
        normalization_rule_name="identity", add_dummy_prefix=True, character_coverage=1.0,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2)
    return folder / "tiny.model"
