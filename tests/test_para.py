"""PARA (para.py) and the adapter interface it shares with (IA)^3 and LoRA (baselines.py), as a specification.

Tiny random Llamas on CPU in fp32. "Non-trivial" adapters have random weights, so that a wrong position,
row or order would change the outputs."""
import pytest
import torch
import torch.nn.functional as F

import generate
import para
from generate import KVCache
from model import ModelArgs, Transformer
from tiny_llama import WIDE, WIDE_ARGS, wide_model

METHODS = ["para", "ia3", "lora"]
ARGS = WIDE_ARGS
R = 4
MAX_NEW = 8
PROMPTS = [[5, 9, 2, 7, 1, 3], [3, 8], [11, 4, 6, 60]]  # unequal lengths: batches are left-padded


def base_model(seed=0, args=ARGS):
    return wide_model(args, seed)


@torch.no_grad()
def randomise_adapter(model, seed):
    """Move every adapter tensor away from its initial value (PARA's vectors then lie around 1 ± 0.4 and differ
    from prompt to prompt)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if para.is_adapter_param(name):
            p.add_(0.2 * torch.randn(p.shape, generator=g))


def adapted(method, seed=1):
    """The base model with one non-trivial adapter."""
    model = para.add_adapter(base_model(), method, r=R)
    randomise_adapter(model, seed)
    return model


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
    out = generate.generate(model, NoText(), prompts, MAX_NEW, num_beams=num_beams, adapter_ids=adapter_ids,
                            eos_id=eos_id)
    return [g.tokens for g in out]


def early_eos(model, prompts):
    """A token greedy decoding produces at step 3 of the first prompt: as EOS it ends some rows before others,
    so that finished rows leave the batch (para.reorder_rows with fewer rows)."""
    return generated(model, prompts[:1])[0][3]


@torch.no_grad()
def greedy_recompute(model, prompt, max_new_tokens):
    """The reference: no cache, the whole sequence at every step; the VG reads the prompt's last token."""
    seq, steps = list(prompt), []
    for _ in range(max_new_tokens):
        para.set_rows(model, prompt_len=torch.tensor([len(prompt)]))
        steps.append(model(torch.tensor([seq]))[0, -1])
        seq.append(int(steps[-1].argmax()))
    return seq[len(prompt):], torch.stack(steps)


# -----------------------------------------------------------------------------
# initialisation


def test_fresh_vector_generator_outputs_exactly_one():
    model = para.add_adapter(base_model(), "para", r=R)
    h = torch.randn(3, ARGS.dim)
    for l, size in zip(model.layers[0].vector_generator(h), (32, 16, ARGS.hidden_dim)):  # d_q = 4 * 8, d_kv = 2 * 8
        assert l.shape == (3, 1, size)
        assert torch.equal(l, torch.ones_like(l))


@pytest.mark.parametrize("method", METHODS)
def test_adapter_takes_over_the_base_weights_without_copying_or_renaming_them(method):
    model = base_model()
    before = dict(model.named_parameters())
    para.add_adapter(model, method, r=R)
    after = {k: p for k, p in model.named_parameters() if not para.is_adapter_param(k)}
    assert set(after) == set(before) and all(after[k] is before[k] for k in before)


@pytest.mark.parametrize("method", METHODS)
def test_fresh_adapter_leaves_logits_bit_identical(method):
    model = base_model()
    tokens = torch.tensor([[1, 5, 9, 2, 7], [3, 8, 8, 4, 2]])
    with torch.no_grad():
        expected = model(tokens)
        para.add_adapter(model, method, r=R)
        para.set_rows(model, prompt_len=torch.tensor([3, 5]))
        assert torch.equal(model(tokens), expected)  # 0 ULP: the vectors are exactly 1 (PARA, (IA)^3), B = 0 (LoRA)


def test_fresh_para_leaves_smollm2_logits_bit_identical(smollm):
    model, tokenizer = smollm
    tokens = torch.tensor([tokenizer.encode("The capital of France is")])
    with torch.device("meta"):  # the fixture is shared: adapt a second model over the same weight tensors
        twin = Transformer(model.args)
    twin.load_state_dict(model.state_dict(), assign=True)
    twin.freqs_cis = model.freqs_cis
    para.add_adapter(twin.eval(), "para", r=12)
    with torch.no_grad():
        para.set_rows(twin)
        assert torch.equal(twin(tokens), model(tokens))


def test_vector_generator_weights_are_initialised_as_the_paper_says():
    torch.manual_seed(0)
    big = ModelArgs(dim=256, n_layers=1, n_heads=4, vocab_size=8, multiple_of=16)
    vg = para.add_adapter(Transformer(big), "para", r=64).layers[0].vector_generator
    assert vg.down.shape == (1, 256, 64) and vg.up.shape == (1, 64, 256 + 256 + big.hidden_dim)
    assert abs(vg.down.std().item() - 0.02) < 0.001 and abs(vg.down.mean().item()) < 0.001  # N(0, 0.02), 16k samples
    assert torch.equal(vg.up, torch.zeros_like(vg.up)) and torch.equal(vg.bias, torch.ones_like(vg.bias))


@pytest.mark.parametrize("method", METHODS)
def test_fp32_adapter_over_a_bf16_model_is_exact_at_init_and_keeps_bf16_activations(method):
    model = base_model().to(torch.bfloat16)
    tokens = torch.tensor([[1, 5, 9, 2, 7]])
    with torch.no_grad():
        expected = model(tokens)
        para.add_adapter(model, method, r=R)
        for name, p in model.named_parameters():
            if para.is_adapter_param(name):
                p.data = p.data.float()  # as train.py keeps them, for AdamW
        para.set_rows(model)
        assert torch.equal(model(tokens), expected)
        randomise_adapter(model, 1)
        dtypes = []
        model.layers[-1].register_forward_hook(lambda m, inp, out: dtypes.append(out.dtype))
        model(tokens)
    assert dtypes == [torch.bfloat16]


# -----------------------------------------------------------------------------
# generation: the vectors come from the prompt once and are reused by every decode step


def test_cached_para_decoding_gives_the_logits_of_recomputing_the_whole_sequence():
    model = adapted("para")
    tokens, pad_len = generate.left_pad(PROMPTS, 0, "cpu")
    P = tokens.shape[1]
    cache = KVCache(ARGS.n_layers, len(PROMPTS), P + MAX_NEW, ARGS.n_kv_heads, ARGS.head_dim)
    with torch.no_grad():
        para.set_rows(model)  # generation: every prompt ends at the last column
        logits = [generate.prefill(model, tokens, pad_len, cache)]  # (B, V) each
        for t in range(MAX_NEW - 1):
            logits.append(generate.decode_step(model, logits[-1].argmax(-1), P + t, pad_len, cache))
    logits = torch.stack(logits, 1)  # (B, N, V)
    for i, prompt in enumerate(PROMPTS):
        ref_tokens, ref_logits = greedy_recompute(model, prompt, MAX_NEW)
        torch.testing.assert_close(logits[i], ref_logits, **WIDE)
        assert generated(model, [prompt]) == [ref_tokens]


@pytest.mark.parametrize("num_beams", [1, 3])
def test_vector_generator_runs_once_per_layer_per_generation(num_beams):
    model = adapted("para")
    eos = early_eos(model, PROMPTS)
    calls = count_vector_generator_calls(model)
    out = generated(model, PROMPTS, num_beams, eos_id=eos)
    assert min(map(len, out)) < MAX_NEW  # some rows left the batch early
    assert len(calls) == ARGS.n_layers  # at prefill only: decode steps reuse the vectors


def test_decode_step_without_a_prompt_is_refused():
    model = adapted("para")
    generated(model, PROMPTS[:1])
    para.set_rows(model)  # a new batch: the vectors of the earlier batch are dropped
    cache = KVCache(ARGS.n_layers, 1, 8, ARGS.n_kv_heads, ARGS.head_dim)
    with pytest.raises(RuntimeError, match="run the prompt"):
        model(torch.tensor([[4]]), 3, None, cache)


@pytest.mark.parametrize("num_beams", [1, 3])
@pytest.mark.parametrize("method", METHODS)
def test_left_padded_batch_generates_what_each_prompt_generates_alone(method, num_beams):
    model = adapted(method)
    eos = early_eos(model, PROMPTS)
    alone = [generated(model, [p], num_beams, eos_id=eos)[0] for p in PROMPTS]
    assert len({len(t) for t in alone}) > 1  # rows finish at different steps
    assert generated(model, PROMPTS, num_beams, eos_id=eos) == alone


@pytest.mark.parametrize("num_beams", [1, 3])
@pytest.mark.parametrize("method", METHODS)
def test_multi_tenant_batch_gives_each_row_what_its_adapter_gives_alone(method, num_beams, tmp_path):
    paths = []
    for seed in range(3):  # three tenants, three different adapters of one method
        paths.append(tmp_path / f"{seed}.pt")
        para.save_adapter(adapted(method, seed=seed), paths[-1])
    alone = [generated(para.load_adapter(base_model(), [paths[i]]), [p], num_beams)[0] for i, p in enumerate(PROMPTS)]
    assert generated(base_model(), PROMPTS, num_beams) != alone  # the tenants' adapters matter
    bank = para.load_adapter(base_model(), paths)
    assert generated(bank, PROMPTS, num_beams, adapter_ids=torch.tensor([0, 1, 2])) == alone
    order = [2, 0, 0, 1]  # other rows, one adapter twice
    shuffled = generated(bank, [PROMPTS[i] for i in order], num_beams, adapter_ids=torch.tensor(order))
    assert shuffled == [alone[i] for i in order]


@pytest.mark.parametrize("method", METHODS)
def test_rows_without_adapter_ids_use_the_first_adapter_of_a_bank(method, tmp_path):
    for seed in range(3):
        para.save_adapter(adapted(method, seed=seed), tmp_path / f"{seed}.pt")
    bank = para.load_adapter(base_model(), [tmp_path / f"{seed}.pt" for seed in range(3)])
    first = para.load_adapter(base_model(), [tmp_path / "0.pt"])
    tokens = torch.tensor([[5, 9, 2, 7], [3, 8, 4, 4], [1, 2, 3, 4]])
    with torch.no_grad():
        for m in (bank, first):
            para.set_rows(m)
        torch.testing.assert_close(bank(tokens), first(tokens), **WIDE)


def test_adapter_ids_outside_the_bank_are_refused():
    model = para.add_adapter(base_model(), "para", r=R, n_adapters=2)
    with pytest.raises(IndexError, match=r"\[0, 2\)"):
        para.set_rows(model, adapter_ids=torch.tensor([0, 2]))


# -----------------------------------------------------------------------------
# training


def test_right_padded_training_batch_reads_each_rows_last_prompt_token():
    model = adapted("para")
    rows = [[5, 9, 2, 7, 1, 3, 2], [3, 8, 4], [11, 4, 6, 60, 2]]  # prompt + target, right-padded to 7
    prompt_len = torch.tensor([4, 2, 3])
    tokens = torch.tensor([r + [0] * (7 - len(r)) for r in rows])
    with torch.no_grad():
        para.set_rows(model, prompt_len=prompt_len)
        batch = model(tokens)
        for i, r in enumerate(rows):
            para.set_rows(model, prompt_len=prompt_len[i:i + 1])
            torch.testing.assert_close(batch[i, :len(r)], model(torch.tensor([r]))[0], **WIDE)


def train_steps(model, steps=3):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)  # every parameter: only grads decide
    tokens = torch.tensor([[5, 9, 2, 7, 1, 3], [3, 8, 4, 4, 2, 1]])
    for _ in range(steps):
        para.set_rows(model, prompt_len=torch.tensor([3, 2]))
        loss = F.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        yield loss
        opt.step()


@pytest.mark.parametrize("method", METHODS)
def test_training_changes_only_the_adapter(method):
    model = para.add_adapter(base_model(), method, r=R).train()
    para.mark_only_adapter_as_trainable(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for _ in train_steps(model):
        for name, p in model.named_parameters():
            assert (p.grad is not None) == para.is_adapter_param(name), name
    after = model.state_dict()
    for k in before:
        if para.is_adapter_param(k):
            assert not torch.equal(after[k], before[k]), f"{k} did not train"
        else:
            assert torch.equal(after[k], before[k]), f"base weight {k} changed"


def test_grad_checkpointing_gives_the_same_gradients():
    grads = []
    for checkpointing in (False, True):
        model = adapted("para").train()
        para.mark_only_adapter_as_trainable(model)
        model.grad_checkpointing = checkpointing  # backward recomputes each block, VG included
        next(train_steps(model, 1))
        grads.append({k: p.grad for k, p in model.named_parameters() if p.requires_grad})
    for k in grads[0]:  # the same operations on the same inputs, recomputed: bit-identical on the CPU
        assert torch.equal(grads[1][k], grads[0][k]), k


# -----------------------------------------------------------------------------
# the reference: HF's LlamaForCausalLM with the paper's equations applied through hooks


def meta_to_hf_rows(v, n_heads):
    """Meta's RoPE row order -> HF's: per head, Meta row 2i is HF row i and 2i+1 is HF row hd/2+i."""
    hd = v.shape[0] // n_heads
    return v.view(n_heads, hd // 2, 2, *v.shape[1:]).transpose(1, 2).reshape(v.shape)


def hf_twin(model):
    """LlamaForCausalLM holding our base weights, converted by hand."""
    from transformers import LlamaConfig, LlamaForCausalLM

    a = model.args
    hf = LlamaForCausalLM(LlamaConfig(
        vocab_size=a.vocab_size, hidden_size=a.dim, intermediate_size=a.hidden_dim, num_hidden_layers=a.n_layers,
        num_attention_heads=a.n_heads, num_key_value_heads=a.n_kv_heads, rms_norm_eps=a.norm_eps,
        rope_theta=a.rope_theta, max_position_embeddings=a.max_seq_len, tie_word_embeddings=False)).eval()
    names = {"attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj", "attention.wv": "self_attn.v_proj",
             "attention.wo": "self_attn.o_proj", "feed_forward.w1": "mlp.gate_proj", "feed_forward.w2": "mlp.down_proj",
             "feed_forward.w3": "mlp.up_proj", "attention_norm": "input_layernorm",
             "ffn_norm": "post_attention_layernorm"}
    sd = {}
    for k, w in model.state_dict().items():
        if para.is_adapter_param(k):
            continue
        k = k.removesuffix(".weight")
        if k.startswith("layers."):
            _, i, sub = k.split(".", 2)
            if sub in ("attention.wq", "attention.wk"):
                w = meta_to_hf_rows(w, a.n_heads if sub == "attention.wq" else a.n_kv_heads)
            sd[f"model.layers.{i}.{names[sub]}.weight"] = w
        else:
            sd[{"tok_embeddings": "model.embed_tokens", "norm": "model.norm", "output": "lm_head"}[k] + ".weight"] = w
    hf.load_state_dict(sd, strict=True)
    return hf


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
            l = F.gelu(layer.input_layernorm(last) @ vg.down[0]) @ vg.up[0] + vg.bias[0]  # (B, d_q + d_kv + d_ffn)
            l_q, l_v, l_u = l.split([a.dim, a.n_kv_heads * a.head_dim, a.hidden_dim], dim=-1)
            vectors[i] = (meta_to_hf_rows(l_q.T, a.n_heads).T, l_v, l_u)  # l_q in HF's RoPE layout, like wq
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
    tokens = torch.tensor([[5, 9, 2, 7, 1, 3, 2, 9], [3, 8, 4, 4, 2, 1, 6, 7]])
    prompt_len = torch.tensor([5, 3])  # prompt + target, as in training
    hf = hf_twin(model)
    add_para_hooks(hf, model, prompt_len)
    with torch.no_grad():
        para.set_rows(model, prompt_len=prompt_len)
        ours, theirs = model(tokens), hf(tokens).logits
        plain = hf_twin(para.add_adapter(base_model(), "para", r=R))(tokens).logits
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
    assert para.count_parameters(ModelArgs(dim=4096, n_layers=32, n_heads=32), "para", r=12) == 9_560_064


def test_para_parameter_count_on_smollm2_follows_the_per_layer_formula():
    smollm2 = ModelArgs(dim=576, n_layers=30, n_heads=9, n_kv_heads=3, hidden_dim=1536, vocab_size=49152)
    expected = para_count_by_formula(576, 30, d_q=576, d_kv=3 * 64, d_ffn=1536, r=12)
    assert para.count_parameters(smollm2, "para", r=12) == expected


def test_baseline_parameter_counts_on_llama2_7b():
    args = ModelArgs(dim=4096, n_layers=32, n_heads=32)
    assert para.count_parameters(args, "ia3") == 32 * (4096 + 4096 + 11008)  # l_k, l_v, l_ff
    assert para.count_parameters(args, "lora", r=8) == 32 * 2 * 8 * (4096 + 4096)  # A and B on wq, wv


@pytest.mark.parametrize("method", METHODS)
def test_counting_on_the_meta_device_matches_a_built_adapter(method):
    model = para.add_adapter(base_model(), method, r=R)
    built = sum(p.numel() for n, p in model.named_parameters() if para.is_adapter_param(n))
    assert para.count_parameters(ARGS, method, r=R) == built


# -----------------------------------------------------------------------------
# adapter files


@pytest.mark.parametrize("method", METHODS)
def test_saved_adapter_loads_back_to_identical_logits(method, tmp_path):
    model = adapted(method)
    para.save_adapter(model, tmp_path / "a.pt", base="tiny")
    loaded = para.load_adapter(base_model(), [tmp_path / "a.pt"], base="tiny")
    tokens = torch.tensor([[5, 9, 2, 7, 1, 3]])
    with torch.no_grad():
        for m in (model, loaded):
            para.set_rows(m)
        assert torch.equal(loaded(tokens), model(tokens))


def test_adapter_file_holds_only_adapter_tensors_and_its_config(tmp_path):
    para.save_adapter(adapted("lora"), tmp_path / "a.pt", base="some/folder/tiny-llama")
    payload = torch.load(tmp_path / "a.pt", weights_only=True)
    assert all(para.is_adapter_param(k) for k in payload["tensors"])
    assert payload["config"] == {"method": "lora", "r": R, "alpha": 8, "targets": ["wq", "wv"]}
    assert payload["base"]["name"] == "tiny-llama" and payload["base"]["dim"] == ARGS.dim  # a name, not a path
    assert payload["shapes"]["layers.0.attention.wq.lora_A"] == [R, ARGS.dim]  # no bank dimension in a file


def test_loading_into_a_model_with_a_matching_adapter_refills_it(tmp_path):
    model = adapted("para")
    para.save_adapter(model, tmp_path / "a.pt")
    target = para.add_adapter(base_model(), "para", r=R)  # e.g. a training run reloading its best checkpoint
    para.load_adapter(target, [tmp_path / "a.pt"])
    tokens = torch.tensor([[5, 9, 2, 7, 1, 3]])
    with torch.no_grad():
        for m in (model, target):
            para.set_rows(m)
        assert torch.equal(target(tokens), model(tokens))


def test_loading_into_a_model_with_another_adapter_is_refused(tmp_path):
    para.save_adapter(adapted("para"), tmp_path / "a.pt")
    with pytest.raises(ValueError, match="already holds"):
        para.load_adapter(para.add_adapter(base_model(), "lora", r=R), [tmp_path / "a.pt"])


@pytest.mark.parametrize("other", [dict(dim=48), dict(n_layers=3), dict(n_kv_heads=4), dict(vocab_size=65)])
def test_adapter_for_another_base_shape_is_refused(other, tmp_path):
    para.save_adapter(adapted("para"), tmp_path / "a.pt")
    args = ModelArgs(**{**{f: getattr(ARGS, f) for f in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size",
                                                          "multiple_of", "max_seq_len")}, **other})
    with pytest.raises(ValueError, match="another base model"):
        para.load_adapter(base_model(args=args), [tmp_path / "a.pt"])


def test_adapter_for_another_named_base_is_refused(tmp_path):
    para.save_adapter(adapted("para"), tmp_path / "a.pt", base="llama-2-7b")
    with pytest.raises(ValueError, match="not 'llama-2-7b-chat'"):
        para.load_adapter(base_model(), [tmp_path / "a.pt"], base="llama-2-7b-chat")


def test_bank_of_adapters_with_different_configs_is_refused(tmp_path):
    para.save_adapter(adapted("para"), tmp_path / "a.pt")
    para.save_adapter(para.add_adapter(base_model(), "para", r=R + 1), tmp_path / "b.pt")
    with pytest.raises(ValueError, match="a bank needs one method and one config"):
        para.load_adapter(base_model(), [tmp_path / "a.pt", tmp_path / "b.pt"])


@pytest.mark.parametrize("damage", ["truncated", "garbage", "not_an_adapter"])
def test_damaged_adapter_file_gives_a_clear_error(damage, tmp_path):
    path = tmp_path / "a.pt"
    para.save_adapter(adapted("para"), path)
    data = path.read_bytes()
    if damage == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        path.write_bytes(bytes(range(256)) * 8)
    else:
        torch.save({"weights": torch.zeros(3)}, path)
    with pytest.raises(ValueError, match="adapter file") as e:
        para.load_adapter(base_model(), [path])
    assert str(path) in str(e.value)


def test_save_leaves_no_temporary_file(tmp_path):
    para.save_adapter(adapted("ia3"), tmp_path / "a.pt")
    para.save_adapter(adapted("ia3", seed=2), tmp_path / "a.pt")  # overwrite in place
    assert [p.name for p in tmp_path.iterdir()] == ["a.pt"]
