"""model.py against HF's LlamaForCausalLM, on tiny random configs in fp32: the RoPE layout, the configs
that change the architecture (GQA, ffn_dim_multiplier, norm_eps, rope_theta), the KV cache, left padding,
the context limit, and what a bf16 model computes in fp32."""
import pytest
import torch
from torch.testing import assert_close
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRMSNorm, LlamaRotaryEmbedding, apply_rotary_pos_emb

from errors import UserError
from generate import KVCache
from loaders import hf_to_meta_rope
from model import ModelArgs, RMSNorm, apply_rope, rope_table
from tiny_llama import CONFIGS, GQA, MHA, WIDE, hf_twin, meta_ffn_hidden_dim, meta_to_hf_rope, random_model, wide_model

VOCAB = 256


def tokens(B=2, T=12, seed=0):
    return torch.randint(VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))


def new_cache(model, B):
    a = model.args
    return KVCache(a.n_layers, B, a.max_seq_len, a.n_kv_heads, a.head_dim)


# -----------------------------------------------------------------------------
# the FFN size and the RoPE layout

@pytest.mark.parametrize("dim, multiple_of, ffn_dim_multiplier, published", [
    (4096, 256, None, 11008),  # Llama 2 7B
    (5120, 256, None, 13824),  # 13B
    (8192, 4096, 1.3, 28672),  # 70B
])
def test_ffn_hidden_dim_follows_meta_formula_for_published_sizes(dim, multiple_of, ffn_dim_multiplier, published):
    args = ModelArgs(dim=dim, multiple_of=multiple_of, ffn_dim_multiplier=ffn_dim_multiplier, n_heads=32)
    assert args.hidden_dim == published
    assert meta_ffn_hidden_dim(dim, multiple_of, ffn_dim_multiplier) == published  # the formula the HF configs use


def test_hf_rotate_half_rope_equals_meta_adjacent_pair_rope_on_permuted_rows():
    nh, hd, T = 4, 16, 10
    q_meta = torch.randn(T, nh * hd)  # (T, nh*hd) one query per position, Meta's layout
    args = ModelArgs(dim=nh * hd, n_heads=nh, max_seq_len=T, rope_theta=10000.0)
    ours = apply_rope(q_meta.view(1, T, nh, hd), rope_table(args)[None, :, None]).view(T, nh * hd)

    config = LlamaConfig(hidden_size=nh * hd, num_attention_heads=nh, max_position_embeddings=T, rope_theta=10000.0)
    q_hf = meta_to_hf_rope(q_meta.T, nh).T.reshape(1, T, nh, hd).transpose(1, 2)  # (1, nh, T, hd)
    cos_hf, sin_hf = LlamaRotaryEmbedding(config)(q_hf, torch.arange(T)[None])
    theirs, _ = apply_rotary_pos_emb(q_hf, q_hf, cos_hf, sin_hf)  # (1, nh, T, hd)
    assert_close(meta_to_hf_rope(ours.T, nh).T, theirs.transpose(1, 2).reshape(T, nh * hd))


@pytest.mark.parametrize("n_heads", [8, 2, 1])
def test_hf_to_meta_rope_inverts_meta_to_hf(n_heads):
    w = torch.randn(n_heads * 16, 24)
    assert torch.equal(hf_to_meta_rope(meta_to_hf_rope(w, n_heads), n_heads), w)
    assert not torch.equal(meta_to_hf_rope(w, n_heads), w)


# -----------------------------------------------------------------------------
# logits against HF


@pytest.mark.parametrize("family", ["random_model", "wide_model"])
def test_the_logit_tolerances_catch_one_key_head_scaled_by_a_thousandth(family):
    # the control for every fp32 comparison of logits in tests/: the tolerance of each family of test models
    # (tiny_llama.py) lies above rounding yet below an error this small
    model, tolerance = (random_model(GQA, VOCAB), {}) if family == "random_model" else (wide_model(), WIDE)
    x = tokens() % model.args.vocab_size
    with torch.no_grad():
        before = model(x)
        model.layers[-1].attention.wk.weight[: model.args.head_dim] *= 1.001
        with pytest.raises(AssertionError):
            assert_close(model(x), before, **tolerance)

@pytest.mark.parametrize("name", CONFIGS)
def test_logits_match_hf_llama(name):
    params = CONFIGS[name]
    model = random_model(params, VOCAB)
    hf = hf_twin(model)
    x = tokens()
    with torch.no_grad():
        assert_close(model(x), hf(x).logits)


def test_logits_differ_from_hf_when_rope_rows_are_not_permuted():
    # the control for the test above: the permutation is what makes them agree
    model = random_model(MHA, VOCAB)
    hf = hf_twin(model)
    with torch.no_grad():
        for layer, hf_layer in zip(model.layers, hf.model.layers):
            hf_layer.self_attn.q_proj.weight.copy_(layer.attention.wq.weight)
            hf_layer.self_attn.k_proj.weight.copy_(layer.attention.wk.weight)
        x = tokens()
        assert (model(x) - hf(x).logits).abs().max() > 1e-2


def test_norm_eps_is_read_from_params():
    # tiny embeddings make mean(x^2) ~1e-8, so eps 1e-5 and 1e-6 give visibly different normalisations
    logits = {}
    for eps in (1e-5, 1e-6):
        params = dict(MHA, norm_eps=eps)
        model = random_model(params, VOCAB)
        with torch.no_grad():
            model.tok_embeddings.weight.mul_(1e-3)
        hf = hf_twin(model)
        assert model.args.norm_eps == hf.config.rms_norm_eps == eps
        with torch.no_grad():
            logits[eps] = model(tokens())
            assert_close(logits[eps], hf(tokens()).logits)
    assert (logits[1e-5] - logits[1e-6]).abs().max() > 1e-2


def test_last_only_returns_the_last_position_of_the_full_logits():
    model = random_model(GQA, VOCAB)
    with torch.no_grad():
        assert_close(model(tokens(), last_only=True), model(tokens())[:, -1:])


def test_logits_at_returns_the_chosen_positions_of_the_full_logits():
    model = random_model(GQA, VOCAB)
    at = torch.rand(tokens().shape, generator=torch.Generator().manual_seed(0)) < 0.3  # (B, T) bool
    with torch.no_grad():
        assert_close(model(tokens(), logits_at=at), model(tokens())[at])


# -----------------------------------------------------------------------------
# the KV cache and left padding: same logits as one plain forward pass

@pytest.mark.parametrize("chunks", [[(t, t + 1) for t in range(12)], [(0, 5), (5, 9), (9, 12)]],
                         ids=["one token at a time", "a prefill in chunks"])
@pytest.mark.parametrize("name", ["mha", "gqa"])
def test_feeding_the_sequence_through_the_cache_matches_one_forward_pass(name, chunks):
    model = random_model(CONFIGS[name], VOCAB)
    x = tokens()
    cache = new_cache(model, 2)
    with torch.no_grad():
        full = model(x)
        pieces = [model(x[:, a:b], start_pos=a, cache=cache) for a, b in chunks]
    assert_close(torch.cat(pieces, dim=1), full)


def left_pad(rows, pad_id=0):
    """(B, T) left-padded batch and pad_len (B,)."""
    T = max(len(r) for r in rows)
    pad_len = torch.tensor([T - len(r) for r in rows])
    return torch.stack([torch.cat([torch.full((T - len(r),), pad_id), r]) for r in rows]), pad_len


@pytest.mark.parametrize("name", ["mha", "gqa"])
def test_left_padded_batch_gives_each_row_its_own_logits(name):
    model = random_model(CONFIGS[name], VOCAB)
    rows = [tokens(1, n, seed=n)[0] for n in (12, 5, 9)]
    batch, pad_len = left_pad(rows)
    with torch.no_grad():
        out = model(batch, pad_len=pad_len)
        for b, r in enumerate(rows):
            assert_close(out[b, pad_len[b]:], model(r[None])[0])


@pytest.mark.parametrize("name", ["mha", "gqa"])
def test_left_padded_batch_decoded_through_the_cache_gives_each_row_its_own_logits(name):
    model = random_model(CONFIGS[name], VOCAB)
    rows = [tokens(1, n + 3, seed=n)[0] for n in (7, 3, 5)]  # prompts of 7, 3, 5 tokens, then 3 decoded tokens
    batch, pad_len = left_pad([r[:-3] for r in rows])
    T = batch.shape[1]
    cache = new_cache(model, 3)
    with torch.no_grad():
        model(batch, pad_len=pad_len, cache=cache)
        steps = [model(torch.stack([r[len(r) - 3 + i] for r in rows])[:, None], start_pos=T + i, pad_len=pad_len,
                       cache=cache) for i in range(3)]
        for b, r in enumerate(rows):
            assert_close(torch.cat(steps, dim=1)[b], model(r[None])[0, -3:])


# -----------------------------------------------------------------------------
# the context limit

def test_forward_refuses_a_prompt_longer_than_max_seq_len():
    model = random_model(MHA, VOCAB, max_seq_len=16)
    with pytest.raises(UserError, match="sequence of 17 tokens is longer than the model's context of 16"):
        model(tokens(1, 17))


def test_forward_refuses_start_pos_plus_tokens_beyond_max_seq_len():
    model = random_model(MHA, VOCAB, max_seq_len=16)
    cache = new_cache(model, 1)
    with pytest.raises(UserError, match="sequence of 17 tokens is longer than the model's context of 16"):
        model(tokens(1, 2), start_pos=15, cache=cache)


# -----------------------------------------------------------------------------
# a bf16 model still normalises and rotates in fp32

def test_rmsnorm_of_bf16_input_is_computed_in_fp32_like_hf():
    x = (3 * torch.randn(4, 7, 64)).bfloat16()
    ours, hf = RMSNorm(64, eps=1e-5), LlamaRMSNorm(64, eps=1e-5)  # HF: fp32 inside, cast back, then the weight
    with torch.no_grad():
        ours.weight.copy_(1 + 0.2 * torch.randn(64))
        hf.weight.copy_(ours.weight)
        ours.bfloat16(), hf.bfloat16()
        in_bf16 = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * ours.weight  # what we must not do
        assert torch.equal(ours(x), hf(x))
        assert not torch.equal(ours(x), in_bf16)


def test_rope_of_bf16_input_is_fp32_rope_rounded_once():
    args = ModelArgs(dim=64, n_heads=4, max_seq_len=32)
    rot = rope_table(args)[None, :, None]
    x = (3 * torch.randn(2, 32, 4, 16)).bfloat16()
    out = apply_rope(x, rot)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, apply_rope(x.float(), rot).bfloat16())


def test_complex_rope_equals_the_rotation_of_each_adjacent_pair_written_out():
    args = ModelArgs(dim=64, n_heads=4, max_seq_len=32, rope_theta=500.0)
    hd = args.head_dim
    # the angles pos * theta^(-2i/hd) from the formula, in fp64, not from rope_table: it is under test too
    angles = torch.outer(torch.arange(32, dtype=torch.float64), 500.0 ** (-torch.arange(0, hd, 2).double() / hd))
    c, s = angles.cos()[None, :, None], angles.sin()[None, :, None]  # (1, T, 1, hd/2)
    x = torch.randn(2, 32, 4, hd)
    x0, x1 = x.double()[..., 0::2], x.double()[..., 1::2]  # (B, T, nh, hd/2) the pairs (x[2i], x[2i+1])
    expected = torch.stack([x0 * c - x1 * s, x0 * s + x1 * c], dim=-1).flatten(-2)
    # rope_table's fp32 angles pos * theta_i (up to 31 rad) are rounded to 2^-24 of their size: up to 2e-6 rad,
    # 4e-6 with theta_i's own rounding, which turns a pair of size up to 4 (randn) by up to 1.6e-5. Measured:
    # 2.8e-6 on AMD, 2.6e-6 on Intel (5 seeds). atol 2e-5 covers the bound; the wrong theta (10000) is off by 6.4.
    torch.testing.assert_close(apply_rope(x, rope_table(args)[None, :, None]).double(), expected, rtol=0, atol=2e-5)
