"""The baselines (baselines.py): (IA)^3 and LoRA with PEFT's semantics for Llama, checked against HF with hooks.
The behaviours they share with PARA (bit-identical at init, batches, tenants, training, files) are in test_para.py."""
import math

import pytest
import torch

import baselines
import para
from test_para import ARGS, R, adapted, base_model, hf_twin, meta_to_hf_rows
from tiny_llama import WIDE

TOKENS = torch.tensor([[5, 9, 2, 7, 1, 3, 2, 9], [3, 8, 4, 4, 2, 1, 6, 7]])


def test_ia3_vectors_start_at_one_on_k_v_and_the_ffn_intermediate():
    block = para.add_adapter(base_model(), "ia3").layers[0]
    d_kv = ARGS.n_kv_heads * ARGS.head_dim
    ffn = block.feed_forward
    for module, size in ((block.attention.wk, d_kv), (block.attention.wv, d_kv), (ffn.w2, ARGS.hidden_dim)):
        assert torch.equal(module.ia3_vector, torch.ones(1, size))
    assert not isinstance(block.attention.wq, baselines.IA3) and not isinstance(block.feed_forward.w3, baselines.IA3)


def test_lora_starts_with_kaiming_uniform_A_and_zero_B():
    torch.manual_seed(0)
    wq = para.add_adapter(base_model(), "lora", r=R, alpha=16).layers[0].attention.wq
    bound = 1 / math.sqrt(ARGS.dim)  # kaiming_uniform(a=√5): gain √(2/6), bound gain·√(3/fan_in)
    assert wq.lora_A.shape == (1, R, ARGS.dim) and wq.lora_B.shape == (1, ARGS.dim, R)
    assert wq.lora_A.abs().max() <= bound and wq.lora_A.abs().max() > 0.9 * bound
    assert torch.equal(wq.lora_B, torch.zeros_like(wq.lora_B))
    assert wq.scaling == 16 / R


def test_ia3_equals_hf_llama_with_scaled_k_v_and_ffn_intermediate_as_hooks():
    model = adapted("ia3")
    hf, a = hf_twin(model), model.args
    for i, layer in enumerate(hf.model.layers):
        ours = model.layers[i]
        l_k = meta_to_hf_rows(ours.attention.wk.ia3_vector[0], a.n_kv_heads)  # K rows follow wk into HF's RoPE layout
        l_v, l_ff = ours.attention.wv.ia3_vector[0], ours.feed_forward.w2.ia3_vector[0]
        layer.self_attn.k_proj.register_forward_hook(lambda m, inp, out, l=l_k: l * out)
        layer.self_attn.v_proj.register_forward_hook(lambda m, inp, out, l=l_v: l * out)
        layer.mlp.down_proj.register_forward_pre_hook(lambda m, inp, l=l_ff: (l * inp[0],))  # silu(G)*U, before W_D
    with torch.no_grad():
        para.set_rows(model)
        ours, theirs = model(TOKENS), hf(TOKENS).logits
    torch.testing.assert_close(ours, theirs, **WIDE)
    print(f"(IA)^3 vs HF + hooks: max abs logit difference {(ours - theirs).abs().max().item():.2e}")


def test_lora_equals_hf_llama_with_low_rank_updates_as_hooks():
    model = adapted("lora")
    hf, a = hf_twin(model), model.args
    for i, layer in enumerate(hf.model.layers):
        for ours, theirs, n_heads in ((model.layers[i].attention.wq, layer.self_attn.q_proj, a.n_heads),
                                      (model.layers[i].attention.wv, layer.self_attn.v_proj, None)):
            A, B = ours.lora_A[0], ours.lora_B[0]  # (r, in), (out, r)
            B = meta_to_hf_rows(B, n_heads) if n_heads else B  # B's rows are wq's rows: HF's RoPE layout
            theirs.register_forward_hook(lambda m, inp, out, A=A, B=B, s=ours.scaling: out + s * (inp[0] @ A.T) @ B.T)
    with torch.no_grad():
        para.set_rows(model)
        ours, theirs = model(TOKENS), hf(TOKENS).logits
    torch.testing.assert_close(ours, theirs, **WIDE)
    print(f"LoRA vs HF + hooks: max abs logit difference {(ours - theirs).abs().max().item():.2e}")


def test_merged_lora_gives_the_unmerged_logits():
    model = adapted("lora")
    with torch.no_grad():
        para.set_rows(model)
        unmerged = model(TOKENS)
        baselines.merge_lora(model)
        assert not any(isinstance(m, baselines.LoRALinear) for m in model.modules())
        torch.testing.assert_close(model(TOKENS), unmerged, **WIDE)  # W + BA is rounded once more


def test_merging_a_bank_of_lora_adapters_is_refused():
    with pytest.raises(ValueError, match="bank of 2"):
        baselines.merge_lora(para.add_adapter(base_model(), "lora", r=R, n_adapters=2))


def test_lora_targets_other_matrices_when_asked():
    block = para.add_adapter(base_model(), "lora", r=R, targets=("wk", "w2")).layers[0]
    assert isinstance(block.attention.wk, baselines.LoRALinear)
    assert isinstance(block.feed_forward.w2, baselines.LoRALinear)
    assert not isinstance(block.attention.wq, baselines.LoRALinear)
    with pytest.raises(ValueError, match="unknown LoRA target"):
        para.add_adapter(base_model(), "lora", r=R, targets=("q_proj",))
