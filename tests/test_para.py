"""PARA (para.py) and the adapter interface it shares with the baselines (adapters.py), as a specification.

Tiny random Llamas (tiny_llama.wide_model) on CPU in fp32. "Non-trivial" adapters have random weights, so that a
wrong position, row or order would change the outputs."""
import pytest
import torch
import torch.nn.functional as F

import adapters
import generate
import para
from generate import KVCache
from model import ModelArgs, Transformer
from tiny_llama import (R, SETTINGS, WIDE, WIDE_ARGS as ARGS, adapted, fresh, hf_twin, meta_to_hf_rope,
                        randomise_adapter, wide_model)

METHODS = list(SETTINGS)  # para, ia3, lora, adalora, houlsby
MAX_NEW = 8
PROMPTS = [[5, 9, 2, 7, 1, 3], [3, 8], [11, 4, 6, 60]]  # unequal lengths: batches are left-padded
TOKENS = torch.tensor([[5, 9, 2, 7, 1, 3, 2, 9], [3, 8, 4, 4, 2, 1, 6, 7]])


def forward(model, tokens, prompt_len):
    """The logits of any model, base or adapted, for right-padded rows whose prompts end at prompt_len (B,)."""
    return model(tokens, **adapters.block_args(model, prompt_len=prompt_len))


def count_vector_generator_calls(model):
    calls = []
    for block in model.layers:
        block.vector_generator.register_forward_hook(lambda *_: calls.append(1))
    return calls


class NoText:
    """What generate() reads from a tokenizer: the tiny models have ids but no text."""
    pad_id, eos_id = 0, -1

    def decode(self, ids):
        return " ".join(map(str, ids))


def generated(model, prompts, num_beams=1, adapter_ids=None, eos_id=-1):
    """generate.generate's new tokens of each prompt (greedy, or beam search)."""
    out = generate.generate(model, NoText(), prompts, max_new_tokens=MAX_NEW, num_beams=num_beams,
                            adapter_ids=adapter_ids, eos_id=eos_id)
    return [g.tokens for g in out]


def early_eos(model, prompts, num_beams=1, adapter_ids=None):
    """A token that, as EOS, ends some prompts' generations before others, so that finished rows leave the batch:
    the first of greedy decoding's tokens for the first prompt that does."""
    for token in generated(model, prompts, adapter_ids=adapter_ids)[0]:
        if len({len(t) for t in generated(model, prompts, num_beams, adapter_ids, eos_id=token)}) > 1:
            return token
    raise AssertionError("no token of the first generation ends the prompts at different steps")


@torch.no_grad()
def greedy_recompute(model, prompt, max_new_tokens):
    """The reference: no cache, the whole sequence at every step; the VG reads the prompt's last token."""
    seq, steps = list(prompt), []
    for _ in range(max_new_tokens):
        steps.append(forward(model, torch.tensor([seq]), prompt_len=torch.tensor([len(prompt)]))[0, -1])
        seq.append(int(steps[-1].argmax()))
    return seq[len(prompt):], torch.stack(steps)


# -----------------------------------------------------------------------------
# initialisation


def test_the_vector_generators_gelu_is_the_exact_gelu_and_as_accurate_as_f_gelu():
    """para.gelu, x Φ(x) by PyTorch's own kernels (F.gelu's call to oneDNN costs more than the rest of the VG's
    GELU): its fp32 value and gradient lie as close to the fp64 exact GELU as F.gelu's in fp32, or within two units
    in the last place of the largest value, whichever is looser."""
    x = torch.linspace(-12, 12, 200_001, dtype=torch.float64, requires_grad=True)
    F.gelu(x).sum().backward()
    ref, ref_grad = F.gelu(x).detach(), x.grad
    ulp = lambda v: torch.finfo(torch.float32).eps * 2.0 ** torch.tensor(v).log2().floor().item()
    errors = {}
    for name, fn in (("ours", para.gelu), ("F.gelu", F.gelu)):
        x32 = x.detach().float().requires_grad_()
        y = fn(x32)
        y.sum().backward()
        errors[name] = ((y.double() - ref).abs().max().item(), (x32.grad.double() - ref_grad).abs().max().item())
    assert errors["ours"][0] <= max(errors["F.gelu"][0], 2 * ulp(ref.abs().max().item())), errors
    assert errors["ours"][1] <= max(errors["F.gelu"][1], 2 * ulp(ref_grad.abs().max().item())), errors
    low = x.detach().bfloat16()  # under bf16 autocast (training): F.gelu's bf16 result, rounded once
    assert torch.equal(para.gelu(low), F.gelu(low))


def test_fresh_vector_generator_outputs_exactly_one():
    model = fresh("para")
    h = torch.randn(3, ARGS.dim)
    for l, size in zip(model.layers[0].vector_generator(h), (32, 16, ARGS.hidden_dim)):  # d_q = 4 * 8, d_kv = 2 * 8
        assert l.shape == (3, 1, size)
        assert torch.equal(l, torch.ones_like(l))


@pytest.mark.parametrize("method", METHODS)
def test_adapter_takes_over_the_base_weights_without_copying_or_renaming_them(method):
    model = wide_model()
    before = dict(model.named_parameters())
    fresh(method, model)
    after = {k: p for k, p in model.named_parameters() if not adapters.is_adapter_param(k)}
    assert set(after) == set(before) and all(after[k] is before[k] for k in before)


@pytest.mark.parametrize("method", METHODS)
def test_fresh_adapter_leaves_logits_bit_identical(method):
    model = wide_model()
    tokens = torch.tensor([[1, 5, 9, 2, 7], [3, 8, 8, 4, 2]])
    with torch.no_grad():
        expected = model(tokens)
        fresh(method, model)
        # 0 ULP: the vectors are exactly 1 (PARA, (IA)^3), B = 0 (LoRA), E = 0 (AdaLoRA), up = 0 (Houlsby)
        assert torch.equal(forward(model, tokens, prompt_len=torch.tensor([3, 5])), expected)


def test_fresh_para_leaves_smollm2_logits_bit_identical(smollm):
    model, tokenizer = smollm
    tokens = torch.tensor([tokenizer.encode("The capital of France is")])
    with torch.device("meta"):  # the fixture is shared: adapt a second model over the same weight tensors
        twin = Transformer(model.args)
    twin.load_state_dict(model.state_dict(), assign=True)
    twin.freqs_cis = model.freqs_cis
    adapters.add_adapter(twin.eval(), "para", r=12)
    with torch.no_grad():
        assert torch.equal(twin(tokens), model(tokens))


def test_vector_generator_weights_are_initialised_as_the_paper_says():
    torch.manual_seed(0)
    big = ModelArgs(dim=256, n_layers=1, n_heads=4, vocab_size=8, multiple_of=16)
    vg = adapters.add_adapter(Transformer(big), "para", r=64).layers[0].vector_generator
    assert vg.down.shape == (256, 64) and vg.up.shape == (64, 256 + 256 + big.hidden_dim)
    assert abs(vg.down.std().item() - 0.02) < 0.001 and abs(vg.down.mean().item()) < 0.001  # N(0, 0.02), 16k samples
    assert torch.equal(vg.up, torch.zeros_like(vg.up)) and torch.equal(vg.bias, torch.ones_like(vg.bias))


@pytest.mark.parametrize("method", METHODS)
def test_adapter_over_a_bf16_model_is_fp32_exact_at_init_and_keeps_bf16_activations(method):
    model = wide_model().to(torch.bfloat16)
    tokens = torch.tensor([[1, 5, 9, 2, 7]])
    with torch.no_grad():
        expected = model(tokens)
        fresh(method, model)
        assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if adapters.is_adapter_param(n))
        assert torch.equal(model(tokens), expected)
        randomise_adapter(model, 1)
        dtypes = []
        model.layers[-1].register_forward_hook(lambda m, inp, out: dtypes.append(out.dtype))
        model(tokens)
    assert dtypes == [torch.bfloat16]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_scaling_in_place_when_generating_gives_the_bits_of_the_fp32_product_rounded_once(dtype):
    # para.scale multiplies in place without autograd, and out of place (l * y.float(), rounded to y's dtype) with
    # it: a bf16 y is taken to fp32, scaled and rounded back into itself, once. Vectors near 1, as trained ones.
    g = torch.Generator().manual_seed(0)
    for l_shape, y_shape in (((2, 1, 48), (2, 7, 48)), ((48,), (3, 5, 48))):  # each row's vector; (IA)^3's one
        l = 1 + 0.01 * torch.randn(l_shape, generator=g)
        y = torch.randn(y_shape, generator=g).to(dtype)
        expected = (l * y.float()).to(dtype)
        assert torch.equal(para.scale(l, y.clone()), expected)  # with autograd: out of place
        scaled = y.clone()
        with torch.no_grad():
            out = para.scale(l, scaled)
        assert out.data_ptr() == scaled.data_ptr()  # in place: no new (B, T, d) tensor
        assert out.dtype == dtype and torch.equal(out, expected)
        if dtype == torch.bfloat16:  # and it matters: rounding the vectors to bf16 first gives other numbers
            assert not torch.equal(expected, y * l.to(dtype))


# AdaLoRA is left out: its update P Λ Q is a product of three factors that start at 0 and ±0.02, so one step at
# 1e-4 moves even the fp32 loss by only 2e-6
@pytest.mark.parametrize("method", ["para", "ia3", "lora", "houlsby"])
def test_in_bf16_training_one_optimizer_step_at_the_papers_learning_rate_changes_the_loss(method):
    # bf16 weights under bf16 autocast, as train.py runs them. bf16 resolves steps of 2^-8 near 1: a vector
    # 1 + 1e-4 cast to bf16 would be exactly 1, and the adapter would change nothing until it drifted past 0.004.
    # The adapters act in fp32 and hand on fp32 results (para.scale, baselines.cast_back), so one step already shows.
    model = fresh(method, wide_model().to(torch.bfloat16)).train()
    adapters.mark_only_adapter_as_trainable(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    prompt_len = torch.tensor([3, 2])

    def loss():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = forward(model, TOKENS[:, :-1], prompt_len=prompt_len)
        return F.cross_entropy(logits.flatten(0, 1), TOKENS[:, 1:].flatten())

    before = loss()
    before.backward()
    opt.step()
    with torch.no_grad():
        assert loss().item() != before.item()


# -----------------------------------------------------------------------------
# generation: the vectors come from the prompt once and are reused by every decode step


def test_cached_para_decoding_gives_the_logits_of_recomputing_the_whole_sequence():
    model = adapted("para")
    tokens, pad_len = generate.left_pad(PROMPTS, 0, "cpu")
    P = tokens.shape[1]
    cache = KVCache(ARGS.n_layers, len(PROMPTS), P + MAX_NEW, ARGS.n_kv_heads, ARGS.head_dim, pad_len=pad_len)
    with torch.no_grad():
        logits = [generate.prefill(model, tokens, cache)]  # (B, V) each; generation: every prompt ends at the last column
        for t in range(MAX_NEW - 1):
            logits.append(generate.decode_step(model, logits[-1].argmax(-1), P + t, cache))
    logits = torch.stack(logits, 1)  # (B, N, V)
    for i, prompt in enumerate(PROMPTS):
        ref_tokens, ref_logits = greedy_recompute(model, prompt, MAX_NEW)
        torch.testing.assert_close(logits[i], ref_logits, **WIDE)
        assert generated(model, [prompt]) == [ref_tokens]


@pytest.mark.parametrize("num_beams", [1, 3])
def test_vector_generator_runs_once_per_layer_per_generation(num_beams):
    model = adapted("para")
    eos = early_eos(model, PROMPTS, num_beams)
    calls = count_vector_generator_calls(model)
    out = generated(model, PROMPTS, num_beams, eos_id=eos)
    assert min(map(len, out)) < MAX_NEW  # some rows left the batch early
    assert len(calls) == ARGS.n_layers  # at prefill only: decode steps reuse the vectors


def test_decode_step_without_a_prompt_is_refused():
    model = adapted("para")
    generated(model, PROMPTS[:1])  # a generation before leaves nothing behind for the next batch
    cache = KVCache(ARGS.n_layers, 1, 8, ARGS.n_kv_heads, ARGS.head_dim)
    with pytest.raises(RuntimeError, match="run their prompt"):
        model(torch.tensor([[4]]), 3, cache=cache)


@pytest.mark.parametrize("method", METHODS)
def test_a_plain_forward_after_generating_other_rows_gives_what_it_gave_before(method, tmp_path):
    # nothing of a batch (its rows' prompt ends, adapters or vectors) may outlive the call that was given it
    for seed in range(3):
        adapters.save_adapter(adapted(method, seed=seed), tmp_path / f"{seed}.pt")
    bank = adapters.load_adapter(wide_model(), [tmp_path / f"{seed}.pt" for seed in range(3)])
    tokens = torch.tensor([[5, 9, 2, 7], [3, 8, 4, 4]])
    with torch.no_grad():
        before = bank(tokens)
        generated(bank, PROMPTS, num_beams=3, adapter_ids=[2, 1, 0])  # 3 rows, other adapters, other prompt ends
        assert torch.equal(bank(tokens), before)
        generated(bank, PROMPTS[:2], adapter_ids=[1, 2])
        assert torch.equal(bank(torch.cat([tokens, tokens[:1]])), torch.cat([before, before[:1]]))


@pytest.mark.parametrize("num_beams", [1, 3])
@pytest.mark.parametrize("method", METHODS)
def test_left_padded_batch_generates_what_each_prompt_generates_alone(method, num_beams):
    model = adapted(method)
    eos = early_eos(model, PROMPTS, num_beams)
    alone = [generated(model, [p], num_beams, eos_id=eos)[0] for p in PROMPTS]
    assert len({len(t) for t in alone}) > 1  # rows finish at different steps
    assert generated(model, PROMPTS, num_beams, eos_id=eos) == alone


@pytest.mark.parametrize("num_beams", [1, 3])
@pytest.mark.parametrize("method", METHODS)
def test_multi_tenant_batch_gives_each_row_what_its_adapter_gives_alone(method, num_beams, tmp_path):
    paths = []
    for seed in range(3):  # three tenants, three different adapters of one method
        paths.append(tmp_path / f"{seed}.pt")
        adapters.save_adapter(adapted(method, seed=seed), paths[-1])
    alone = [generated(adapters.load_adapter(wide_model(), [paths[i]]), [p], num_beams)[0]
             for i, p in enumerate(PROMPTS)]
    assert generated(wide_model(), PROMPTS, num_beams) != alone  # the tenants' adapters matter
    bank = adapters.load_adapter(wide_model(), paths)
    assert generated(bank, PROMPTS, num_beams, adapter_ids=torch.tensor([0, 1, 2])) == alone
    order = [2, 0, 0, 1]  # other rows, one adapter twice
    shuffled = generated(bank, [PROMPTS[i] for i in order], num_beams, adapter_ids=torch.tensor(order))
    assert shuffled == [alone[i] for i in order]


@pytest.mark.parametrize("method", METHODS)
def test_rows_without_adapter_ids_use_the_first_adapter_of_a_bank(method, tmp_path):
    for seed in range(3):
        adapters.save_adapter(adapted(method, seed=seed), tmp_path / f"{seed}.pt")
    bank = adapters.load_adapter(wide_model(), [tmp_path / f"{seed}.pt" for seed in range(3)])
    first = adapters.load_adapter(wide_model(), [tmp_path / "0.pt"])
    tokens = torch.tensor([[5, 9, 2, 7], [3, 8, 4, 4], [1, 2, 3, 4]])
    with torch.no_grad():
        torch.testing.assert_close(bank(tokens), first(tokens), **WIDE)


def test_adapter_ids_outside_the_bank_are_refused():
    model = fresh("para", n_adapters=2)
    with pytest.raises(adapters.UserError, match=r"\[0, 2\)"):
        generated(model, PROMPTS[:2], adapter_ids=[0, 2])


# -----------------------------------------------------------------------------
# training


def test_right_padded_training_batch_reads_each_rows_last_prompt_token():
    model = adapted("para")
    rows = [[5, 9, 2, 7, 1, 3, 2], [3, 8, 4], [11, 4, 6, 60, 2]]  # prompt + target, right-padded to 7
    prompt_len = torch.tensor([4, 2, 3])
    tokens = torch.tensor([r + [0] * (7 - len(r)) for r in rows])
    with torch.no_grad():
        batch = model(tokens, prompt_len=prompt_len)
        for i, r in enumerate(rows):
            torch.testing.assert_close(batch[i, :len(r)], model(torch.tensor([r]), prompt_len=prompt_len[i:i + 1])[0],
                                       **WIDE)


def train_steps(model, steps=3):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)  # every parameter: only grads decide
    tokens = torch.tensor([[5, 9, 2, 7, 1, 3], [3, 8, 4, 4, 2, 1]])
    for _ in range(steps):
        logits = forward(model, tokens[:, :-1], prompt_len=torch.tensor([3, 2]))
        loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        yield loss
        opt.step()


@pytest.mark.parametrize("method", METHODS)
def test_training_changes_only_the_adapter(method):
    model = adapted(method).train()  # non-trivial: from a fresh AdaLoRA (E = 0), A and B would get no gradient
    adapters.mark_only_adapter_as_trainable(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for _ in train_steps(model):
        for name, p in model.named_parameters():
            assert (p.grad is not None) == adapters.is_adapter_param(name), name
    after = model.state_dict()
    for k in before:
        if adapters.is_adapter_param(k):
            assert not torch.equal(after[k], before[k]), f"{k} did not train"
        else:
            assert torch.equal(after[k], before[k]), f"base weight {k} changed"


def test_grad_checkpointing_gives_the_same_gradients():
    grads = []
    for checkpointing in (False, True):
        model = adapted("para").train()
        adapters.mark_only_adapter_as_trainable(model)
        model.grad_checkpointing = checkpointing  # backward recomputes each block, VG included, with its prompt_len
        next(train_steps(model, 1))
        grads.append({k: p.grad for k, p in model.named_parameters() if p.requires_grad})
    for k in grads[0]:  # the same operations on the same inputs, recomputed: bit-identical on the CPU
        assert torch.equal(grads[1][k], grads[0][k]), k


# -----------------------------------------------------------------------------
# the reference: HF's LlamaForCausalLM with the paper's equations applied through hooks


def add_para_hooks(hf, model, prompt_len=None):
    """PARA's equations on HF's LlamaForCausalLM as hooks, with our VG's weights. A layer computes its vectors at its
    first call after vectors.clear() (the prompt), from the state at prompt_len-1 (None: the last position), and
    reuses them in later calls (decode steps). Returns the dict of vectors."""
    a, vectors = model.args, {}

    def vector_generator(i):  # Eq. 6 on HF's hidden state of the last prompt token, normed by input_layernorm
        def hook(layer, args, kwargs):
            if i in vectors:
                return
            x = args[0] if args else kwargs["hidden_states"]  # (B, T, D)
            last = x[:, -1] if prompt_len is None else x[torch.arange(x.shape[0]), prompt_len - 1]
            vg = model.layers[i].vector_generator
            l = F.gelu(layer.input_layernorm(last) @ vg.down) @ vg.up + vg.bias  # (B, d_q + d_kv + d_ffn)
            l_q, l_v, l_u = l.split([a.dim, a.n_kv_heads * a.head_dim, a.hidden_dim], dim=-1)
            vectors[i] = (meta_to_hf_rope(l_q.T, a.n_heads).T, l_v, l_u)  # l_q in HF's RoPE layout, like wq
        return hook

    def scale(i, which):  # Eq. 4 and 5: Q' = l_q ⊙ Q, V' = l_v ⊙ V, U' = l_u ⊙ U
        return lambda module, inputs, out: vectors[i][which][:, None] * out

    for i, layer in enumerate(hf.model.layers):
        layer.register_forward_pre_hook(vector_generator(i), with_kwargs=True)
        layer.self_attn.q_proj.register_forward_hook(scale(i, 0))
        layer.self_attn.v_proj.register_forward_hook(scale(i, 1))
        layer.mlp.up_proj.register_forward_hook(scale(i, 2))
    return vectors


def test_para_equals_hf_llama_with_the_papers_equations_as_hooks():
    model = adapted("para")
    prompt_len = torch.tensor([5, 3])  # prompt + target, as in training
    hf = hf_twin(model)
    add_para_hooks(hf, model, prompt_len)
    with torch.no_grad():
        ours, theirs = model(TOKENS, prompt_len=prompt_len), hf(TOKENS).logits
        plain = hf_twin(model)(TOKENS).logits
    assert (ours - plain).abs().max() > 0.1  # the adapter really changes the outputs
    torch.testing.assert_close(ours, theirs, **WIDE)
    print(f"PARA vs HF + hooks: max abs logit difference {(ours - theirs).abs().max().item():.2e}")


def test_para_beam_search_equals_hf_beam_search_with_the_papers_equations_as_hooks():
    model = adapted("para")
    hf = hf_twin(model)
    vectors = add_para_hooks(hf, model)
    eos = early_eos(model, PROMPTS)
    for prompt in PROMPTS:
        vectors.clear()
        with torch.no_grad():
            out = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                              max_new_tokens=MAX_NEW, num_beams=3, do_sample=False, eos_token_id=eos, pad_token_id=eos)
        theirs = out[0, len(prompt):].tolist()
        theirs = theirs[: theirs.index(eos)] if eos in theirs else theirs  # after EOS, HF pads
        assert generated(model, [prompt], num_beams=3, eos_id=eos) == [theirs]


# -----------------------------------------------------------------------------
# parameter counts


def para_count_by_formula(dim, n_layers, d_q, d_kv, d_ffn, r):
    d_out = d_q + d_kv + d_ffn
    return n_layers * (dim * r + r * d_out + d_out)  # W_down, W_up, b_up


def test_para_on_llama2_7b_at_rank_12_has_9_560_064_parameters():
    assert adapters.count_parameters(ModelArgs(dim=4096, n_layers=32, n_heads=32), "para", r=12) == 9_560_064


def test_para_parameter_count_on_smollm2_follows_the_per_layer_formula():
    smollm2 = ModelArgs(dim=576, n_layers=30, n_heads=9, n_kv_heads=3, hidden_dim=1536, vocab_size=49152)
    expected = para_count_by_formula(576, 30, d_q=576, d_kv=3 * 64, d_ffn=1536, r=12)
    assert adapters.count_parameters(smollm2, "para", r=12) == expected


@pytest.mark.parametrize("method", METHODS)
def test_counting_on_the_meta_device_matches_a_built_adapter(method):
    model = fresh(method)
    built = sum(p.numel() for n, p in model.named_parameters() if adapters.is_adapter_param(n))
    assert adapters.count_parameters(ARGS, method, **SETTINGS[method]) == built


# -----------------------------------------------------------------------------
# adapter files


@pytest.mark.parametrize("method", METHODS)
def test_saved_adapter_loads_back_to_identical_logits(method, tmp_path):
    model = adapted(method)
    adapters.save_adapter(model, tmp_path / "a.pt", base="tiny")
    loaded = adapters.load_adapter(wide_model(), [tmp_path / "a.pt"], base="tiny")
    tokens = torch.tensor([[5, 9, 2, 7, 1, 3]])
    with torch.no_grad():
        assert torch.equal(loaded(tokens), model(tokens))


def test_adapter_file_holds_only_adapter_tensors_and_its_config(tmp_path):
    adapters.save_adapter(adapted("lora"), tmp_path / "a.pt", base="some/folder/tiny-llama")
    payload = torch.load(tmp_path / "a.pt", weights_only=True)
    assert all(adapters.is_adapter_param(k) for k in payload["tensors"])
    assert payload["config"] == {"method": "lora", "r": R, "alpha": 8, "targets": ["wq", "wv"]}
    assert payload["base"]["name"] == "tiny-llama" and payload["base"]["dim"] == ARGS.dim  # a name, not a path
    assert payload["shapes"]["layers.0.attention.wq.lora_A"] == [R, ARGS.dim]


def test_an_adapter_of_a_bank_saves_alone(tmp_path):
    for seed in range(2):
        adapters.save_adapter(adapted("para", seed=seed), tmp_path / f"{seed}.pt")
    bank = adapters.load_adapter(wide_model(), [tmp_path / "0.pt", tmp_path / "1.pt"])
    adapters.save_adapter(bank, tmp_path / "again.pt", index=1)
    again, original = (torch.load(tmp_path / f, weights_only=True)["tensors"] for f in ("again.pt", "1.pt"))
    assert all(torch.equal(again[k], original[k]) for k in original)


def test_loading_into_a_model_with_a_matching_adapter_refills_it(tmp_path):
    model = adapted("para")
    adapters.save_adapter(model, tmp_path / "a.pt")
    target = fresh("para")  # e.g. a training run reloading its best checkpoint
    adapters.load_adapter(target, [tmp_path / "a.pt"])
    tokens = torch.tensor([[5, 9, 2, 7, 1, 3]])
    with torch.no_grad():
        assert torch.equal(target(tokens), model(tokens))


def test_loading_into_a_model_with_another_adapter_is_refused(tmp_path):
    adapters.save_adapter(adapted("para"), tmp_path / "a.pt")
    with pytest.raises(adapters.UserError, match="already holds"):
        adapters.load_adapter(fresh("lora"), [tmp_path / "a.pt"])


@pytest.mark.parametrize("other", [dict(dim=48), dict(n_layers=3), dict(n_kv_heads=4), dict(vocab_size=65)])
def test_adapter_for_another_base_shape_is_refused(other, tmp_path):
    adapters.save_adapter(adapted("para"), tmp_path / "a.pt")
    args = ModelArgs(**{**{f: getattr(ARGS, f) for f in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size",
                                                          "multiple_of", "max_seq_len")}, **other})
    with pytest.raises(adapters.UserError, match="another base model"):
        adapters.load_adapter(wide_model(args=args), [tmp_path / "a.pt"])


def test_adapter_for_another_named_base_is_refused(tmp_path):
    adapters.save_adapter(adapted("para"), tmp_path / "a.pt", base="llama-2-7b")
    with pytest.raises(adapters.UserError, match="not 'llama-2-7b-chat'"):
        adapters.load_adapter(wide_model(), [tmp_path / "a.pt"], base="llama-2-7b-chat")


def test_bank_of_adapters_with_different_configs_is_refused(tmp_path):
    adapters.save_adapter(adapted("para"), tmp_path / "a.pt")
    adapters.save_adapter(adapters.add_adapter(wide_model(), "para", r=R + 1), tmp_path / "b.pt")
    with pytest.raises(adapters.UserError, match="a bank needs one method and one config"):
        adapters.load_adapter(wide_model(), [tmp_path / "a.pt", tmp_path / "b.pt"])


def rewrite(path, change):
    """Load an adapter file's payload, let change(payload) damage it, write it back."""
    payload = torch.load(path, weights_only=True)
    change(payload)
    torch.save(payload, path)


@pytest.mark.parametrize("damage, message", [
    ("truncated", "not a readable adapter file"),
    ("garbage", "not a readable adapter file"),
    ("not_an_adapter", "not a para-adapter-v1 adapter file"),
    ("nan", "NaN or infinite values"),
    ("int64", "torch.int64 values"),
    ("unknown_setting", "para has no setting 'depth'"),
    ("r_as_text", "para's 'r' must be"),
    ("unknown_method", "unknown adapter method 'prefix'"),
])
def test_a_damaged_adapter_file_is_refused_naming_the_file(damage, message, tmp_path):
    path = tmp_path / "a.pt"
    adapters.save_adapter(adapted("para"), path)
    key = "layers.0.vector_generator.up"
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:1000])
    elif damage == "garbage":
        path.write_bytes(bytes(range(256)) * 8)
    elif damage == "not_an_adapter":
        torch.save({"weights": torch.zeros(3)}, path)
    elif damage == "nan":
        rewrite(path, lambda p: p["tensors"][key].fill_(float("nan")))
    elif damage == "int64":
        rewrite(path, lambda p: p["tensors"].__setitem__(key, p["tensors"][key].long()))
    elif damage == "unknown_setting":
        rewrite(path, lambda p: p["config"].__setitem__("depth", 3))
    elif damage == "r_as_text":
        rewrite(path, lambda p: p["config"].__setitem__("r", "4"))
    else:
        rewrite(path, lambda p: p["config"].__setitem__("method", "prefix"))
    with pytest.raises(adapters.UserError, match=message) as e:
        adapters.load_adapter(wide_model(), [path])
    assert str(path) in str(e.value)


class Exploit:
    def __reduce__(self):  # what unpickling would call: here, code that leaves a trace
        return (open, ("exploited", "w"))


def test_an_adapter_file_with_code_in_it_is_refused_without_running_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.save({"format": "para-adapter-v1", "config": Exploit()}, tmp_path / "a.pt")
    with pytest.raises(adapters.UserError, match="not a readable adapter file") as e:
        adapters.load_adapter(wide_model(), [tmp_path / "a.pt"])
    assert not (tmp_path / "exploited").exists()
    assert "weights_only=False" not in str(e.value)  # torch's own advice would run the file's code


def test_save_leaves_no_temporary_file(tmp_path):
    adapters.save_adapter(adapted("ia3"), tmp_path / "a.pt")
    adapters.save_adapter(adapted("ia3", seed=2), tmp_path / "a.pt")  # overwrite in place
    assert [p.name for p in tmp_path.iterdir()] == ["a.pt"]


# -----------------------------------------------------------------------------
# compiled decoding (generate.py --compile): the same tokens as eager decoding


@pytest.mark.parametrize("num_beams", [1, 3])
@pytest.mark.parametrize("adapter", ["none", "para", "para bank"])
def test_compiled_decoding_generates_the_tokens_of_eager_decoding(adapter, num_beams, tmp_path):
    if adapter == "none":
        model, ids = wide_model(), None
    elif adapter == "para":
        model, ids = adapted("para"), None
    else:  # a multi-tenant bank, each row its own adapter
        for seed in range(3):
            adapters.save_adapter(adapted("para", seed=seed), tmp_path / f"{seed}.pt")
        model, ids = adapters.load_adapter(wide_model(), [tmp_path / f"{seed}.pt" for seed in range(3)]), [2, 0, 1]
    eos = early_eos(model, PROMPTS, num_beams, ids)  # rows finish at different steps
    eager = generate.generate(model, NoText(), PROMPTS, max_new_tokens=MAX_NEW, num_beams=num_beams, eos_id=eos,
                              adapter_ids=ids)
    compiled = generate.generate(model, NoText(), PROMPTS, max_new_tokens=MAX_NEW, num_beams=num_beams, eos_id=eos,
                                 adapter_ids=ids, compile=True)
    assert [g.tokens for g in compiled] == [g.tokens for g in eager]
    assert len({len(g.tokens) for g in eager}) > 1


def test_compiled_decoding_runs_the_vector_generator_once_per_layer_per_generation():
    model = adapted("para")
    calls = count_vector_generator_calls(model)
    generate.generate(model, NoText(), PROMPTS, max_new_tokens=MAX_NEW, eos_id=-1, compile=True)
    assert len(calls) == ARGS.n_layers  # the prefill: the compiled decode steps only read the cache
