"""The baselines (baselines.py) with the semantics of their references: (IA)^3 and LoRA as PEFT defines them for
Llama, AdaLoRA against PEFT's own implementation, and the Houlsby adapter, each checked against HF's
LlamaForCausalLM. The behaviours they share with PARA (bit-identical at init, batches, tenants, training, files)
are in test_para.py."""
import math

import pytest
import torch
import torch.nn.functional as F

import adapters
import baselines
from model import ModelArgs
from tiny_llama import R, WIDE, adapted, fresh, hf_twin, meta_to_hf_rope, wide_model

TOKENS = torch.tensor([[5, 9, 2, 7, 1, 3, 2, 9], [3, 8, 4, 4, 2, 1, 6, 7]])
LLAMA2_7B = ModelArgs(dim=4096, n_layers=32, n_heads=32)


def logits_with_and_without_hooks(model, add_hooks):
    """(ours, HF's with the method as hooks, HF's plain) on TOKENS."""
    hf = hf_twin(model)
    with torch.no_grad():
        plain = hf(TOKENS).logits
        add_hooks(hf)
        return model(TOKENS), hf(TOKENS).logits, plain


# -----------------------------------------------------------------------------
# (IA)^3 and LoRA


def test_ia3_vectors_start_at_one_on_k_v_and_the_ffn_intermediate():
    block = fresh("ia3").layers[0]
    d_kv = block.attention.wk.out_features
    ffn = block.feed_forward  # the intermediate silu(G) ⊙ U, scaled as U: w3's output
    for module, size in ((block.attention.wk, d_kv), (block.attention.wv, d_kv), (ffn.w3, ffn.w2.in_features)):
        assert torch.equal(module.ia3_vector, torch.ones(size))
    assert not isinstance(block.attention.wq, baselines.IA3Linear) and not isinstance(ffn.w2, baselines.IA3Linear)


def test_ia3_on_paras_targets_is_its_static_twin_scaling_the_outputs_of_wq_wv_and_w3():
    block = adapters.add_adapter(wide_model(), "ia3", targets=["wq", "wv", "w3"]).layers[0]
    att, ffn = block.attention, block.feed_forward
    assert all(isinstance(m, baselines.IA3Linear) for m in (att.wq, att.wv, ffn.w3))
    assert not isinstance(att.wk, baselines.IA3Linear) and not isinstance(ffn.w2, baselines.IA3Linear)


def test_lora_starts_with_kaiming_uniform_A_and_zero_B():
    torch.manual_seed(0)
    wq = adapters.add_adapter(wide_model(), "lora", r=R, alpha=16).layers[0].attention.wq
    bound = 1 / math.sqrt(wq.in_features)  # kaiming_uniform(a=√5): gain √(2/6), bound gain·√(3/fan_in)
    assert wq.lora_A.shape == (R, wq.in_features) and wq.lora_B.shape == (wq.out_features, R)
    assert wq.lora_A.abs().max() <= bound and wq.lora_A.abs().max() > 0.9 * bound
    assert torch.equal(wq.lora_B, torch.zeros_like(wq.lora_B))
    assert wq.scaling == 16 / R


def test_ia3_equals_hf_llama_with_scaled_k_v_and_ffn_intermediate_as_hooks():
    model = adapted("ia3")
    a = model.args

    def hooks(hf):
        for ours, layer in zip(model.layers, hf.model.layers):
            l_k = meta_to_hf_rope(ours.attention.wk.ia3_vector, a.n_kv_heads)  # K rows follow wk into HF's layout
            l_v, l_ff = ours.attention.wv.ia3_vector, ours.feed_forward.w3.ia3_vector
            layer.self_attn.k_proj.register_forward_hook(lambda m, inp, out, l=l_k: l * out)
            layer.self_attn.v_proj.register_forward_hook(lambda m, inp, out, l=l_v: l * out)
            layer.mlp.down_proj.register_forward_pre_hook(lambda m, inp, l=l_ff: (l * inp[0],))  # silu(G)*U, before W2

    ours, theirs, plain = logits_with_and_without_hooks(model, hooks)
    assert (ours - plain).abs().max() > 0.1  # the adapter really changes the outputs
    torch.testing.assert_close(ours, theirs, **WIDE)
    print(f"(IA)^3 vs HF + hooks: max abs logit difference {(ours - theirs).abs().max().item():.2e}")


def test_lora_equals_hf_llama_with_low_rank_updates_as_hooks():
    model = adapted("lora")

    def hooks(hf):
        for ours, layer in zip(model.layers, hf.model.layers):
            for mine, theirs, n_heads in ((ours.attention.wq, layer.self_attn.q_proj, model.args.n_heads),
                                          (ours.attention.wv, layer.self_attn.v_proj, None)):
                A, B = mine.lora_A, mine.lora_B  # (r, in), (out, r)
                B = meta_to_hf_rope(B, n_heads) if n_heads else B  # B's rows are wq's rows: HF's RoPE layout
                theirs.register_forward_hook(lambda m, inp, out, A=A, B=B, s=mine.scaling: out + s * (inp[0] @ A.T) @ B.T)

    ours, theirs, plain = logits_with_and_without_hooks(model, hooks)
    assert (ours - plain).abs().max() > 0.1
    torch.testing.assert_close(ours, theirs, **WIDE)
    print(f"LoRA vs HF + hooks: max abs logit difference {(ours - theirs).abs().max().item():.2e}")


def test_merged_lora_gives_the_unmerged_logits():
    model = adapted("lora")
    with torch.no_grad():
        unmerged = model(TOKENS)
        baselines.merge_lora(model)
        assert not any(isinstance(m, baselines.LoRALinear) for m in model.modules())
        torch.testing.assert_close(model(TOKENS), unmerged, **WIDE)  # W + BA is rounded once more


def test_merging_a_bank_of_lora_adapters_is_refused():
    with pytest.raises(ValueError, match="bank of 2"):
        baselines.merge_lora(fresh("lora", n_adapters=2))


def test_lora_targets_other_matrices_when_asked():
    block = adapters.add_adapter(wide_model(), "lora", r=R, targets=("wk", "w2")).layers[0]
    assert isinstance(block.attention.wk, baselines.LoRALinear)
    assert isinstance(block.feed_forward.w2, baselines.LoRALinear)
    assert not isinstance(block.attention.wq, baselines.LoRALinear)
    with pytest.raises(adapters.UserError, match="unknown target 'q_proj'"):
        adapters.add_adapter(wide_model(), "lora", r=R, targets=("q_proj",))


# -----------------------------------------------------------------------------
# the Houlsby adapter


def test_houlsby_equals_hf_llama_with_a_bottleneck_after_each_sublayer_as_hooks():
    model = adapted("houlsby")

    def bottleneck(a):  # z + up(GELU(down(z))) on the sublayer's output z
        return lambda m, inp, z: z + F.gelu(z @ a.houlsby_down.T + a.houlsby_down_bias) @ a.houlsby_up.T + a.houlsby_up_bias

    def hooks(hf):
        for ours, layer in zip(model.layers, hf.model.layers):
            layer.self_attn.o_proj.register_forward_hook(bottleneck(ours.attention.wo))
            layer.mlp.down_proj.register_forward_hook(bottleneck(ours.feed_forward.w2))

    ours, theirs, plain = logits_with_and_without_hooks(model, hooks)
    assert (ours - plain).abs().max() > 0.1
    torch.testing.assert_close(ours, theirs, **WIDE)


def test_houlsby_bottleneck_matched_to_para_on_llama2_7b_is_18_with_9_700_480_parameters():
    # two adapters a layer, each 2 * 4096 * m + m + 4096; m = 18 is the nearest to PARA's 9,560,064 (the paper
    # reports 9.4M for its Houlsby baseline: m = 17 would give 9,176,128)
    assert adapters.size_matching_para(LLAMA2_7B, "houlsby") == 18
    assert adapters.count_parameters(LLAMA2_7B, "houlsby", size=18) == 32 * 2 * (2 * 4096 * 18 + 18 + 4096)
    assert adapters.count_parameters(LLAMA2_7B, "houlsby", size=17) == 9_176_128


def test_baseline_parameter_counts_on_llama2_7b():
    assert adapters.count_parameters(LLAMA2_7B, "ia3") == 32 * (4096 + 4096 + 11008)  # l_k, l_v, l_ff
    assert adapters.count_parameters(LLAMA2_7B, "lora", r=8) == 32 * 2 * 8 * (4096 + 4096)  # A and B on wq, wv
    assert adapters.size_matching_para(LLAMA2_7B, "lora") == 18
    assert adapters.count_parameters(LLAMA2_7B, "adalora", r=12) == 32 * 2 * (12 * 4096 + 12 + 4096 * 12)  # A, E, B


# -----------------------------------------------------------------------------
# AdaLoRA, against PEFT's AdaLoRA (the authors' code, as PEFT packages it)

T, TINIT, TFINAL, DELTA_T, TARGET_R = 30, 5, 5, 2, 2  # a whole budget schedule in 30 steps; R = 4 triplets each


def test_adalora_starts_with_zero_singular_values_and_small_gaussian_P_and_Q():
    torch.manual_seed(0)
    wq = adapters.add_adapter(wide_model(), "adalora", r=R).layers[0].attention.wq
    assert wq.lora_A.shape == (R, wq.in_features) and wq.lora_E.shape == (R, 1) and wq.lora_B.shape == (wq.out_features, R)
    assert torch.equal(wq.lora_E, torch.zeros(R, 1))
    assert 0.01 < wq.lora_A.std() < 0.03 and 0.01 < wq.lora_B.std() < 0.03  # N(0, 0.02)


def peft_twin(model):
    """PEFT's AdaLoRA on HF's LlamaForCausalLM with our base weights and our adapter's P, Λ, Q (B's rows of q_proj
    in HF's RoPE layout), and a map from our A, E, B tensors to PEFT's."""
    from peft import AdaLoraConfig, get_peft_model

    twin = get_peft_model(hf_twin(model), AdaLoraConfig(
        task_type="CAUSAL_LM", target_modules=["q_proj", "v_proj"], init_r=R, target_r=TARGET_R, lora_alpha=8,
        total_step=T, tinit=TINIT, tfinal=TFINAL, deltaT=DELTA_T, beta1=0.85, beta2=0.85))
    theirs = dict(twin.base_model.model.named_parameters())
    pairs = []  # (our tensor, PEFT's tensor, permute rows?)
    for i, block in enumerate(model.layers):
        for mine, name, n_heads in ((block.attention.wq, "q_proj", model.args.n_heads), (block.attention.wv, "v_proj", None)):
            for t in ("A", "E", "B"):
                p = theirs[f"model.layers.{i}.self_attn.{name}.lora_{t}.default"]
                pairs.append((getattr(mine, f"lora_{t}"), p, n_heads if t == "B" else None))
    with torch.no_grad():
        for ours, p, n_heads in pairs:
            p.copy_(meta_to_hf_rope(ours, n_heads) if n_heads else ours)
    return twin, pairs


def test_adalora_gives_the_logits_of_peft_adalora_with_the_same_P_lambda_Q():
    model = adapted("adalora")
    twin, _ = peft_twin(model)
    with torch.no_grad():
        ours, theirs, plain = model(TOKENS), twin(input_ids=TOKENS).logits, hf_twin(model)(TOKENS).logits
    assert (ours - plain).abs().max() > 0.1
    # PEFT scales by alpha / (r + 1e-5), we by alpha / r: 1e-6 of the update, far inside the fp32 tolerance
    torch.testing.assert_close(ours, theirs, **WIDE)
    print(f"AdaLoRA vs PEFT: max abs logit difference {(ours - theirs).abs().max().item():.2e}")


def test_adalora_orthogonality_term_is_pefts():
    model = adapted("adalora")
    twin, _ = peft_twin(model)
    allocator = baselines.RankAllocator(model, T, TARGET_R, TINIT, TFINAL, DELTA_T)
    labels = TOKENS.clone()
    with torch.no_grad():
        out = twin(input_ids=TOKENS, labels=labels)  # PEFT adds 0.5 R to the loss it returns with labels
        cross_entropy = F.cross_entropy(out.logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())
        torch.testing.assert_close(0.5 * allocator.regularizer(), out.loss - cross_entropy, rtol=1e-5, atol=1e-6)


def test_adalora_keeps_the_budget_and_the_masks_of_peft_at_every_step_given_the_same_gradients():
    # Both allocators see the same weights and gradients at every step (no optimizer), so that when each reads
    # the weights (we before the optimizer step, as the paper does; PEFT after it) makes no difference.
    model = adapted("adalora")
    twin, pairs = peft_twin(model)
    allocator = baselines.RankAllocator(model, T, TARGET_R, TINIT, TFINAL, DELTA_T)
    rank_allocator = twin.base_model.rankallocator
    g = torch.Generator().manual_seed(0)
    budgets, masked_steps = [], []
    for t in range(1, T + 3):
        for ours, p, n_heads in pairs:
            grad = torch.randn(ours.shape, generator=g)
            ours.grad, p.grad = grad, meta_to_hf_rope(grad, n_heads) if n_heads else grad
        budgets.append((allocator.budget(t), rank_allocator.budget_schedule(t)[0]))
        allocator.update(t)
        allocator.mask()
        twin.base_model.update_and_allocate(t)
        for ours, p, n_heads in pairs:
            if ours.shape[1] == 1:  # E: the same singular values pruned, the same kept
                assert torch.equal(ours, p), f"step {t}"
        masked_steps.append(sum(int((ours == 0).sum()) for ours, _, _ in pairs if ours.shape[1] == 1))
    assert [ours for ours, _ in budgets] == [theirs for _, theirs in budgets]
    assert budgets[TINIT - 1][0] == 2 * 2 * R and budgets[T - TFINAL - 1][0] == 2 * 2 * TARGET_R  # 4 matrices
    assert masked_steps[-1] >= 4 * (R - TARGET_R)  # the budget was enforced: at least b_0 - b_T pruned
