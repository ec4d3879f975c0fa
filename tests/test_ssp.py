"""SSP (ssp.py): its candidates, the budget its gates hold, the search and the retrain as train.py runs them on the
tiny task (resumable, bit for bit), and the retrained structure as an ordinary adapter: saved, loaded, generating,
and banked with tenants of other structures. CPU, fp32, seconds each."""
import json
import random

import pytest
import torch

import adapters
import generate
import ssp
import train
from errors import UserError
from loaders import load
from test_train import Killed, flags, read_log, tiny_model, tiny_task, without_timing  # noqa: F401 (fixtures)
from tiny_llama import WIDE, randomise_adapter, wide_model

class NoText:
    """What generate() reads from a tokenizer: the tiny models have ids but no text."""
    pad_id, eos_id = 0, -1

    def decode(self, ids):
        return " ".join(map(str, ids))


def generated(model, prompts, adapter_ids=None):
    return [g.tokens for g in generate.generate(model, NoText(), prompts, max_new_tokens=6, adapter_ids=adapter_ids)]


SSP = next(m for m, method in adapters.METHODS.items() if method.searches)  # the registry's name for it
TOKENS = torch.tensor([[5, 9, 2, 7, 1, 3, 2, 9], [3, 8, 4, 4, 2, 1, 6, 7]])
R_C = 4  # the LoRA candidates' rank on the tiny models


def space(model=None, r=R_C):
    return ssp.search_space(wide_model() if model is None else model, r)


def with_structure(names, budget=None, model=None):
    model = wide_model() if model is None else model
    total = sum(c.size for c in space(model))
    return adapters.add_adapter(model, SSP, r=R_C, budget=budget or total - 1, structure=list(names))


# -----------------------------------------------------------------------------
# the candidates


def test_the_space_has_20_candidates_per_block_with_the_authors_sizes():
    cands = space()
    model = wide_model()
    assert len(cands) == 20 * model.args.n_layers
    by_name = {c.name: c for c in cands}
    d, hidden, d_kv = model.args.dim, model.args.hidden_dim, model.args.n_kv_heads * model.args.head_dim
    assert by_name["layers.0.wk.lowrank"].size == R_C * (d + d_kv)
    assert by_name["layers.1.w2.bias"].size == d
    assert by_name["layers.0.wo.lra"].size == 3 * d + 3 * (d // 32)  # d -> d/32 -> d, rank-1 factors and biases
    assert by_name["layers.0.ffn_norm.lnfit"].size == d
    assert "layers.0.wq.lra" not in by_name and "layers.0.w3.lra" not in by_name  # after wo and w2 only
    # on Llama-2 7B: 162,603,008 parameters in the space, at the budget 8.6M
    from adapters import LLAMA2_7B, count_parameters, ssp_budget
    assert count_parameters(LLAMA2_7B, SSP, r=ssp.R_C) == 162_603_008
    assert ssp_budget(LLAMA2_7B) == 8_600_000


def test_fresh_candidates_other_than_the_low_rank_adapter_leave_the_logits_bit_identical():
    base = wide_model()(TOKENS)
    identity = [c.name for c in space() if c.kind != ssp.ADAPTER]
    with torch.no_grad():
        assert torch.equal(with_structure(identity)(TOKENS), base)
        # S3Delta's low-rank adapter starts with random factors (only its biases are 0): not the identity
        lra = [c.name for c in space() if c.kind == ssp.ADAPTER]
        assert not torch.allclose(with_structure(lra)(TOKENS), base)
        # the supernet, every candidate, with the low-rank adapters' gates at 0: the base model, bit for bit
        model = adapters.add_adapter(wide_model(), SSP, r=R_C, budget=1000)
        z = torch.tensor([0.0 if c.kind == ssp.ADAPTER else 0.7 for c in space()])
        model.ssp_gates.z = z
        assert torch.equal(model(TOKENS), base)


def test_a_gate_scales_its_candidates_delta():
    model = adapters.add_adapter(wide_model(), SSP, r=R_C, budget=1000)
    randomise_adapter(model, 1)
    cands = space()
    logits = {}
    for scale in (1.0, 0.5):
        model.ssp_gates.z = torch.tensor([scale if c.name == "layers.0.wv.bias" else 0.0 for c in cands])
        with torch.no_grad():
            logits[scale] = model(TOKENS)
    only = with_structure(["layers.0.wv.bias"])
    with torch.no_grad():
        only.layers[0].attention.wv.ssp_bias.copy_(0.5 * model.layers[0].attention.wv.ssp_bias)
        torch.testing.assert_close(logits[0.5], only(TOKENS), **WIDE)
    assert not torch.allclose(logits[1.0], logits[0.5])


# -----------------------------------------------------------------------------
# the gates and the derivation


def test_the_shift_meets_the_budget_in_expectation_for_any_alphas():
    cands = space()
    sizes = torch.tensor([c.size for c in cands], dtype=torch.float64)
    budget = int(0.05 * sizes.sum())
    b = 0.0
    for seed in range(5):
        alpha = torch.randn(len(cands), generator=torch.Generator().manual_seed(seed)) * 3
        b = ssp.solve_shift(alpha, sizes, budget, b)
        expected = (ssp.probabilities(alpha, b) * sizes).sum().item()
        assert abs(expected - budget) <= 1e-6 * budget


def test_the_derived_structure_is_the_greedy_fill_by_probability_under_the_budget():
    cands = space()
    alpha = torch.randn(len(cands), generator=torch.Generator().manual_seed(0))
    budget = int(0.05 * sum(c.size for c in cands))
    structure = ssp.derive(cands, alpha, budget)
    chosen = [c for c in cands if c.name in structure]
    assert sum(c.size for c in chosen) <= budget
    # every candidate left out would not fit beside those of higher p
    order = sorted(range(len(cands)), key=lambda i: -alpha[i].item())  # p is monotone in alpha
    used = 0
    for i in order:
        fits = used + cands[i].size <= budget
        assert (cands[i].name in structure) == fits
        used += cands[i].size * fits


# -----------------------------------------------------------------------------
# the search and the retrain, through train.py


def ssp_flags(task, model, out_dir, *extra):
    """The tiny run (train_test.flags) as SSP: rank 4, a budget of about 5% of the tiny space, 4 steps per stage."""
    argv = flags(task, model, out_dir, SSP, "--ssp_budget", BUDGET, "--max_steps", 4, "--eval_interval", 2,
                 "--lr", 3e-2, *extra)
    return argv


BUDGET = 2500  # the tiny model's space: 66,432 parameters at r_c = 4


def test_a_search_keeps_the_budget_in_expectation_at_every_step_and_its_structure_fits_it(tiny_task, tiny_model,
                                                                                           tmp_path):
    train.main(ssp_flags(tiny_task, tiny_model, tmp_path / "out"))
    out = tmp_path / "out"
    steps = [r for r in read_log(out / "search.jsonl") if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    for r in steps:
        assert abs(r["expected_params"] - BUDGET) <= 1e-6 * BUDGET, r
    payload = torch.load(out / "adapter.pt", weights_only=True)
    structure = payload["config"]["structure"]
    model, _ = load(str(tiny_model))
    sizes = {c.name: c.size for c in ssp.search_space(model, R_C)}
    assert 0 < sum(sizes[n] for n in structure) <= BUDGET
    results = json.loads((out / "results.json").read_text())
    assert results["trainable_parameters"] == sum(sizes[n] for n in structure)
    assert results["dev"] is not None and results["test"] is not None
    assert results["search_steps"] == 4 and results["searched_candidates"] == len(structure)
    assert torch.load(out / "search.pt", weights_only=True)["structure"] == structure


def killed_in(argv, monkeypatch, search_step=None, retrain_step=None):
    """train.main(argv), killed as step `search_step` of the search (lr_at without warmup: the search's schedule),
    or step `retrain_step` of the retrain (train_loop's, with its warmup), begins."""
    lr_at = train.lr_at

    def killed(s, lr, warmup, total):
        if (warmup == 0 and s == (search_step or 0) - 1) or (warmup > 0 and s == (retrain_step or 0) - 1):
            raise Killed()
        return lr_at(s, lr, warmup, total)

    monkeypatch.setattr(train, "lr_at", killed)
    with pytest.raises(Killed):
        train.main(argv)
    monkeypatch.undo()


def run_files(out):
    search = torch.load(out / "search.pt", weights_only=True)
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    return search, ckpt, without_timing(read_log(out / "search.jsonl")), without_timing(read_log(out / "log.jsonl"))


@pytest.mark.parametrize("stage", ["search", "retrain"])
def test_a_run_killed_in_either_stage_resumes_to_exactly_the_run_never_killed(stage, tiny_task, tiny_model,
                                                                             tmp_path, monkeypatch):
    extra = ("--ckpt_minutes", 0, "--eval_splits", "none")  # a checkpoint at every step
    train.main(ssp_flags(tiny_task, tiny_model, tmp_path / "whole", *extra))
    killed_in(ssp_flags(tiny_task, tiny_model, tmp_path / "killed", *extra), monkeypatch,
              **{f"{stage}_step": 3})
    if stage == "search":
        assert not (tmp_path / "killed" / "ckpt.pt").exists()
        assert torch.load(tmp_path / "killed" / "search.pt", weights_only=True)["state"]["step"] == 2
    train.main(ssp_flags(tiny_task, tiny_model, tmp_path / "killed", *extra, "--resume"))
    (s1, c1, sl1, l1), (s2, c2, sl2, l2) = run_files(tmp_path / "whole"), run_files(tmp_path / "killed")
    assert s1["structure"] == s2["structure"]
    assert torch.equal(s1["search"]["alpha"], s2["search"]["alpha"]) and s1["search"]["b"] == s2["search"]["b"]
    assert all(torch.equal(a, b) for a, b in zip(s1["weights"], s2["weights"]))
    assert sl1 == sl2 and l1 == l2
    for name, t in c1["adapter"].items():
        assert torch.equal(c2["adapter"][name], t), name


def test_a_given_structure_is_retrained_without_a_search(tiny_task, tiny_model, tmp_path):
    structure = "layers.0.wq.lowrank,layers.1.ffn_norm.lnfit,layers.1.w2.lra"
    train.main(ssp_flags(tiny_task, tiny_model, tmp_path / "out", "--ssp_structure", structure,
                         "--eval_splits", "none"))
    assert not (tmp_path / "out" / "search.pt").exists()
    config = torch.load(tmp_path / "out" / "adapter.pt", weights_only=True)["config"]
    assert set(config["structure"]) == set(structure.split(","))  # kept in the space's order


# -----------------------------------------------------------------------------
# the retrained structure as an adapter


def trained_tenant(names, seed, path):
    model = with_structure(names, budget=5000)
    randomise_adapter(model, seed)
    adapters.save_adapter(model, path)
    return model


def two_structures():
    cands = [c.name for c in space()]
    rng = random.Random(0)
    a = rng.sample(cands, 12) + ["layers.0.wo.lra", "layers.1.attention_norm.lnfit"]
    b = rng.sample([c for c in cands if c not in a], 10) + ["layers.1.w2.lra", "layers.0.ffn_norm.bias"]
    return a, b


def test_a_retrained_structure_saves_loads_and_generates_as_it_did(tmp_path):
    a, _ = two_structures()
    model = trained_tenant(a, 1, tmp_path / "a.pt")
    loaded = adapters.load_adapter(wide_model(), [tmp_path / "a.pt"])
    assert loaded.adapter_config["structure"] == model.adapter_config["structure"]
    with torch.no_grad():
        assert torch.equal(loaded(TOKENS), model(TOKENS))
        assert not torch.allclose(loaded(TOKENS), wide_model()(TOKENS))
    prompts = [[5, 9, 2, 7], [3, 8]]
    assert generated(loaded, prompts) == generated(model, prompts)


def test_a_bank_of_ssp_tenants_of_different_structures_gives_each_row_what_its_adapter_gives_alone(tmp_path):
    a, b = two_structures()
    alone = [trained_tenant(a, 1, tmp_path / "a.pt"), trained_tenant(b, 2, tmp_path / "b.pt"), wide_model()]
    bank = adapters.load_adapter(wide_model(), [tmp_path / "a.pt", tmp_path / "b.pt", None])  # None: the base model
    assert set(bank.adapter_config["structure"]) == set(a) | set(b)
    ids = torch.tensor([0, 1, 2, 1])
    tokens = torch.cat([TOKENS, TOKENS])
    with torch.no_grad():
        rows = bank(tokens, adapter_ids=ids)
        for row, i in enumerate(ids.tolist()):
            torch.testing.assert_close(rows[row], alone[i](tokens[row:row + 1])[0], **WIDE)
        torch.testing.assert_close(rows[2], wide_model()(tokens[2:3])[0], **WIDE)
    prompts = [[5, 9, 2, 7, 1], [3, 8], [11, 4, 6]]
    banked = generated(bank, prompts, adapter_ids=torch.tensor([0, 1, 2]))
    assert banked == [generated(model, [prompt])[0] for prompt, model in zip(prompts, alone)]
    assert banked != generated(wide_model(), prompts)  # the tenants' adapters matter


def test_a_bank_holds_one_method_so_a_para_tenant_beside_ssp_tenants_is_refused(tmp_path):
    a, _ = two_structures()
    trained_tenant(a, 1, tmp_path / "a.pt")
    adapters.save_adapter(adapters.add_adapter(wide_model(), adapters.PARA, r=4), tmp_path / "para.pt")
    with pytest.raises(UserError, match="a bank needs one method"):
        adapters.load_adapter(wide_model(), [tmp_path / "a.pt", tmp_path / "para.pt"])


# -----------------------------------------------------------------------------
# bad inputs


def test_bad_budgets_structures_and_banks_are_refused_with_a_message():
    total = sum(c.size for c in space())
    with pytest.raises(UserError, match="not below its search space"):
        adapters.add_adapter(wide_model(), SSP, r=R_C, budget=total)
    with pytest.raises(UserError, match="below its smallest candidate"):
        adapters.add_adapter(wide_model(), SSP, r=R_C, budget=3)
    with pytest.raises(UserError, match="unknown candidates"):
        with_structure(["layers.0.wq.lowrank", "layers.9.wq.lowrank"])
    with pytest.raises(UserError, match="named twice"):
        with_structure(["layers.0.wq.bias", "layers.0.wq.bias"])
    with pytest.raises(UserError, match="different LoRA ranks"):
        ssp.union([{"method": SSP, "r": 4, "budget": 1, "structure": []}, {"method": SSP, "r": 8, "budget": 1,
                                                                          "structure": []}])


def test_a_budget_above_the_space_stops_train_py_before_the_search(tiny_task, tiny_model, tmp_path):
    with pytest.raises(UserError, match="not below its search space"):
        train.main(flags(tiny_task, tiny_model, tmp_path / "out", SSP, "--ssp_budget", 10**9))


def test_the_server_banks_ssp_tenants_of_different_structures_beside_the_base_model(tmp_path):
    import serve

    a, b = two_structures()
    alone = {"a": trained_tenant(a, 1, tmp_path / "a.pt"), "b": trained_tenant(b, 2, tmp_path / "b.pt")}
    model = wide_model()
    bank = serve.Bank(model, {"a": str(tmp_path / "a.pt"), "b": str(tmp_path / "b.pt")})
    ids = torch.tensor([bank.ids(bank.rows["a"]), bank.ids(bank.rows["b"]), bank.ids(serve.BASE)])  # (3, groups)
    tokens = torch.cat([TOKENS, TOKENS[:1]])
    with torch.no_grad():
        rows = model(tokens, **adapters.block_args(model, adapter_ids=ids, vectors={}))
        torch.testing.assert_close(rows[0], alone["a"](tokens[:1])[0], **WIDE)
        torch.testing.assert_close(rows[1], alone["b"](tokens[1:2])[0], **WIDE)
        torch.testing.assert_close(rows[2], wide_model()(tokens[2:])[0], **WIDE)  # row 0: the base model


def test_ssp_tenants_share_a_batch_with_a_para_tenant(tmp_path):
    """Adapters of several methods in one batch (mixed.py): SSP's group adapts norms too, beside PARA's group."""
    import serve

    a, _ = two_structures()
    alone = {"a": trained_tenant(a, 1, tmp_path / "a.pt")}
    para_model = adapters.add_adapter(wide_model(), "para", r=4)
    randomise_adapter(para_model, 3)
    adapters.save_adapter(para_model, tmp_path / "p.pt")
    model = wide_model()
    bank = serve.Bank(model, {"a": str(tmp_path / "a.pt"), "p": str(tmp_path / "p.pt")})
    assert len(bank.configs) == 2
    ids = torch.tensor([bank.ids(bank.rows["a"]), bank.ids(bank.rows["p"]), bank.ids(serve.BASE)])
    tokens = torch.cat([TOKENS, TOKENS[:1]])
    with torch.no_grad():
        rows = model(tokens, **adapters.block_args(model, adapter_ids=ids, vectors={}))
        torch.testing.assert_close(rows[0], alone["a"](tokens[:1])[0], **WIDE)
        torch.testing.assert_close(rows[1], para_model(tokens[1:2])[0], **WIDE)
        torch.testing.assert_close(rows[2], wide_model()(tokens[2:])[0], **WIDE)


# -----------------------------------------------------------------------------
# the bi-level step


def test_the_virtual_step_is_torchs_adamw_step_and_leaves_the_optimizer_as_it_was():
    import copy

    torch.manual_seed(0)
    w = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(7))]
    optimizer = torch.optim.AdamW(w, lr=1e-2, weight_decay=0.1)
    for _ in range(2):  # moments that are not zero
        for p in w:
            p.grad = torch.randn_like(p)
        optimizer.step()
    grads = [torch.randn_like(p) for p in w]
    reference = copy.deepcopy(w)
    reference_optimizer = torch.optim.AdamW(reference, weight_decay=0.1)
    reference_optimizer.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    reference_optimizer.param_groups[0]["lr"] = 3e-2  # the virtual step's rate: the one given
    for p, g in zip(reference, grads):
        p.grad = g.clone()
    reference_optimizer.step()
    state = copy.deepcopy(optimizer.state_dict())
    ssp.virtual_adamw(w, grads, optimizer, lr=3e-2)
    for p, q in zip(w, reference):
        torch.testing.assert_close(p, q, atol=1e-7, rtol=0)
    assert str(optimizer.state_dict()) == str(state)  # the real moments did not move


def search_on_wide_model(seed=0):
    model = adapters.add_adapter(wide_model(), SSP, r=R_C, budget=3000).train()
    adapters.mark_only_adapter_as_trainable(model)
    weights = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(weights, lr=1e-2, weight_decay=0.0)
    search = ssp.Search(model, 3000, seed)

    def grads(batch, tensors):
        loss = torch.nn.functional.cross_entropy(model(batch[:, :-1]).flatten(0, 1), batch[:, 1:].flatten())
        g = torch.autograd.grad(loss, tensors, retain_graph=True, allow_unused=True)
        return loss.item(), [torch.zeros_like(t) if d is None else d for t, d in zip(tensors, g)]
    return model, weights, optimizer, search, grads


def test_a_search_step_moves_the_alphas_and_leaves_the_weights_only_to_their_own_step(monkeypatch):
    model, weights, optimizer, search, grads = search_on_wide_model()
    before = [p.detach().clone() for p in weights]
    at_own_step = []
    step = optimizer.step
    monkeypatch.setattr(optimizer, "step", lambda: (at_own_step.append([p.detach().clone() for p in weights]),
                                                   step())[1])
    batch_w, batch_a = TOKENS, TOKENS.flip(1)
    search.step(weights, optimizer, grads, batch_w, batch_a, lr_w=1e-2, lr_alpha=0.1)
    # the virtual step and the finite differences gave the weights back exactly before their own step
    assert all(torch.equal(a, b) for a, b in zip(at_own_step[0], before))
    assert not torch.equal(search.alpha.detach(), torch.zeros_like(search.alpha))
    assert any(not torch.equal(p, b) for p, b in zip(weights, before))
    assert abs(search.expected_size - 3000) <= 1e-6 * 3000  # at the new alphas, after the weights' sample


def test_with_a_weight_rate_of_0_the_alphas_get_the_first_order_gradient():
    # dL_val/dalpha at w' minus lr_w times the Hessian term: with lr_w = 0 the virtual step is the identity and the
    # alphas get the first-order gradient dL_val/dalpha at w
    model, weights, optimizer, search, grads = search_on_wide_model()
    randomise_adapter(model, 1)
    u_state = search.uniforms.get_state()
    search.sample(search.uniform())
    _, (first_order,) = grads(TOKENS.flip(1), [search.alpha])
    search.uniforms.set_state(u_state)
    search.b = 0.0
    captured = {}
    search.optimizer.step = lambda: captured.setdefault("grad", search.alpha.grad.clone())  # the clipped gradient
    search.step(weights, optimizer, grads, TOKENS, TOKENS.flip(1), lr_w=0.0, lr_alpha=0.1)
    torch.testing.assert_close(captured["grad"], clipped(first_order), atol=1e-6, rtol=1e-4)


def clipped(g):
    return g * min(1.0, ssp.GRAD_CLIP / (g.norm().item() + 1e-6))


def test_the_alphas_gradient_is_dartss_second_order_one_against_an_exact_hessian_vector_product():
    model, weights, optimizer, search, grads = search_on_wide_model()
    randomise_adapter(model, 1)
    lr_w, train_batch, alpha_batch = 1e-2, TOKENS, TOKENS.flip(1)
    u_state = search.uniforms.get_state()
    # by autograd: w' = w after the virtual step; v = dL_val/dw' at w'; the term d/dalpha <dL_train/dw, v> at w
    search.sample(search.uniform())
    w = [p.detach().clone() for p in weights]
    ssp.virtual_adamw(weights, grads(train_batch, weights)[1], optimizer, lr_w)
    _, (d_alpha, *v) = grads(alpha_batch, [search.alpha, *weights])
    with torch.no_grad():
        for p, saved in zip(weights, w):
            p.copy_(saved)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):  # the CPU's fused attention has no second derivative
        logits = model(train_batch[:, :-1]).flatten(0, 1)
        g_w = torch.autograd.grad(torch.nn.functional.cross_entropy(logits, train_batch[:, 1:].flatten()), weights,
                                  create_graph=True)
        hessian_v = torch.autograd.grad(sum((g * d).sum() for g, d in zip(g_w, v)), search.alpha)[0]
    expected = clipped(d_alpha - lr_w * hessian_v)  # no clip here: its norm is below 2
    # the step's, with finite differences, from the same u
    search.uniforms.set_state(u_state)
    search.b, captured = 0.0, {}
    search.optimizer.step = lambda: captured.setdefault("grad", search.alpha.grad.clone())
    search.step(weights, optimizer, grads, train_batch, alpha_batch, lr_w=lr_w, lr_alpha=0.1)
    term = lr_w * hessian_v
    assert term.norm() > 0.5 * d_alpha.norm()  # the second-order term is large here: its sign and size are checked
    # S3Delta's finite differences (eps = 0.01 / |v|) carry an error of a few percent of that term (measured: 5%;
    # it shrinks as eps^2 with a smaller eps); first-order DARTS would be off by 100% of it, a wrong sign by 200%
    assert (captured["grad"] - expected).norm() < 0.1 * term.norm()


@pytest.mark.parametrize("version", [1, 3])
def test_on_gemma_fresh_candidates_change_no_bit_alone_or_in_a_bank_and_lnfit_changes_gemmas_gain(version):
    from gemma import Gemma, GemmaArgs

    args = GemmaArgs(version=version, dim=32, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=16, hidden_dim=64,
                     vocab_size=64, max_seq_len=64, sliding_window=4)

    def gemma():
        torch.manual_seed(0)
        model = Gemma(args)
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(0.2 * torch.randn_like(p) if p.ndim == 1 else 2 * torch.randn_like(p) / p.shape[1] ** 0.5)
        return model.eval()

    with torch.no_grad():
        base = gemma()(TOKENS)
        identity = [c.name for c in space(gemma()) if c.kind != ssp.ADAPTER]
        model = with_structure(identity, model=gemma())
        assert torch.equal(model(TOKENS), base)
        settings = {k: v for k, v in model.adapter_config.items() if k != "method"}
        bank = adapters.add_adapter(gemma(), SSP, n_adapters=2, **settings)
        assert torch.equal(bank(TOKENS, adapter_ids=torch.tensor([0, 1])), base)
        # LNFit: the norm's output gains rms(x) * w, on Gemma's own (1 + g) norm
        norm = model.layers[0].ffn_norm
        x = torch.randn(2, 3, args.dim)
        before = norm(x)
        norm.ssp_gain.fill_(0.5)
        torch.testing.assert_close(norm(x), before + 0.5 * torch.nn.functional.rms_norm(x, (args.dim,), eps=norm.eps))
