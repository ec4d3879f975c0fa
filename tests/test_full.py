"""train.py --method full: full fine-tuning (the paper's Table 2 Full-FT, its upper reference) on test_train.py's tiny
random Llama and tiny task. Every weight trains; the model itself, best on dev, is saved as an HF folder
(loaders.save) that load() and generate.py --ckpt_dir read back bit for bit; a killed run resumes bit for bit; what
makes no sense is refused, saying what to do. loaders.save also round-trips Gemma and Gemma 3 (their config kept)
and the GGUF tokenizer of the small default model."""
import contextlib
import io
import json

import pytest
import torch
from safetensors.torch import load_file

import adapters
import generate
import loaders
import serve
import train
from errors import UserError
from loaders import FINE_TUNED, load
from model import ModelArgs
from test_train import (flags, read_log, run_killed_before_step, task_records, tiny_model, tiny_task,  # noqa: F401
                        torchrun, without_timing, write_task)
from tiny_llama import WIDE

FULL = next(m for m, method in adapters.METHODS.items() if method.full)  # the registry's name for it
LR = ("--lr", 1e-3)  # the tiny random model moves at 1e-3; full fine-tuning's default, 2e-5, is for real models
TOKENS = torch.tensor([[1, 5, 9, 2, 7, 3, 2, 9], [1, 8, 4, 4, 2, 6, 6, 7]])


def state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def full_run(tiny_task, tiny_model, tmp_path_factory):
    """A 30-step full fine-tune whose dev losses are scripted (0.5, 0.3, 0.4 at steps 10, 20, 30: the best is step
    20's); what it printed, the weights at each dev evaluation, and the model evaluation by generation used."""
    out, seen = tmp_path_factory.mktemp("full") / "out", {"dev": [], "scored": None}
    target_loss, evaluate, scripted = train.target_loss, train.evaluate, iter([0.5, 0.3, 0.4])

    def fake_target_loss(model, *args, **kwargs):
        seen["dev"].append(state(model))
        return torch.tensor([next(scripted), 1.0], dtype=torch.float64)

    def spy(run, *args):
        seen["scored"] = run.model  # its weights: the ones the answers were generated with
        return evaluate(run, *args)

    train.target_loss, train.evaluate = fake_target_loss, spy
    try:
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            results = train.main(flags(tiny_task, tiny_model, out, FULL, *LR, "--max_steps", 30, "--eval_interval",
                                       10, "--limit_eval", 8))
    finally:
        train.target_loss, train.evaluate = target_loss, evaluate
    return out, results, printed.getvalue(), seen


def test_full_fine_tuning_trains_every_weight_and_says_the_memory_it_needs(full_run, tiny_model):
    out, results, printed, _ = full_run
    base, _ = load(str(tiny_model))
    n = sum(p.numel() for p in base.parameters())
    assert results["trainable_parameters"] == n and results["steps"] == 30
    assert f"{FULL}: {n:,} trainable parameters (100.000% of {n:,})" in printed
    # printed before the first step: the weights, their gradients, AdamW's two moments and the best copy, in fp32
    assert f"full fine-tuning of {n:,} weights in fp32 needs" in printed
    assert train.full_ft_memory(n, "cpu", torch.float32, 1) in printed
    losses = [r["loss"] for r in read_log(out / "log.jsonl") if "loss" in r]
    assert sum(losses[-5:]) < 0.5 * sum(losses[:5]), losses  # it learns
    saved, _ = load(str(out / FINE_TUNED))
    base_state = state(base)
    assert {k for k, v in state(saved).items() if torch.equal(v, base_state[k])} == set()  # every weight moved
    assert not (out / "adapter.pt").exists()  # the model is the artefact, not an adapter


def test_the_saved_model_is_the_one_best_on_dev_and_gives_its_logits_exactly(full_run, tiny_model):
    out, _, _, seen = full_run
    saved, tokenizer = load(str(out / FINE_TUNED))
    best = seen["dev"][1]  # step 20's weights: the lowest dev loss
    assert state(saved).keys() == best.keys() and all(torch.equal(v, best[k]) for k, v in state(saved).items())
    assert any(not torch.equal(seen["dev"][2][k], best[k]) for k in best)  # the last weights were not kept
    assert state(seen["scored"]).keys() == best.keys()
    assert all(torch.equal(v, best[k]) for k, v in state(seen["scored"]).items())  # evaluation used the best
    with torch.no_grad():
        assert torch.equal(saved(TOKENS), seen["scored"].eval()(TOKENS))
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)  # the resume checkpoint holds the best weights too
    assert all(torch.equal(t, best[k]) for k, t in ckpt["best_adapter"].items())
    assert tokenizer.encode("red cat owl Answer:") == load(str(tiny_model))[1].encode("red cat owl Answer:")


def test_generate_py_loads_the_saved_model_with_ckpt_dir_and_refuses_it_as_an_adapter(full_run, capsys):
    out, _, _, _ = full_run
    generate.main(["--ckpt_dir", str(out / FINE_TUNED), "--prompt", "red cat owl Answer:", "--max_new_tokens", "2",
                   "--dtype", "fp32"])
    assert "tokens/s" in capsys.readouterr().out
    for path in (out / FINE_TUNED, out):  # the model, or its run's folder
        with pytest.raises(SystemExit):
            generate.main(["--ckpt_dir", str(out / FINE_TUNED), "--adapter", str(path), "--prompt", "red"])
        assert f"load {str(out / FINE_TUNED)!r} with --ckpt_dir" in capsys.readouterr().err
        _, args = serve.parse_args(["--adapter", f"tenant={path}"])
        with pytest.raises(UserError, match="holds a model, not an adapter: load .* with --ckpt_dir"):
            serve.start(args)
    with pytest.raises(UserError, match="checkpoint to --resume from, not an adapter file.*model/ folder"):
        adapters.read_adapter_file(out / "ckpt.pt")
    with pytest.raises(UserError, match="training run's folder: the model it fine-tuned is"):
        load(str(out))


RESUME = ("--epochs", 3, "--eval_interval", 4, "--limit_eval", 4, *LR)  # 18 steps, checkpoints every 4


def test_a_killed_full_fine_tune_resumes_to_exactly_the_model_of_an_uninterrupted_one(
        tiny_task, tiny_model, tmp_path, monkeypatch):
    whole = train.main(flags(tiny_task, tiny_model, tmp_path / "whole", FULL, *RESUME))
    run_killed_before_step(flags(tiny_task, tiny_model, tmp_path / "killed", FULL, *RESUME), 11, monkeypatch)
    assert torch.load(tmp_path / "killed" / "ckpt.pt", weights_only=True)["state"]["step"] == 8
    assert not (tmp_path / "killed" / FINE_TUNED).exists()  # written only when training ends
    resumed = train.main(flags(tiny_task, tiny_model, tmp_path / "killed", FULL, *RESUME, "--resume"))
    assert (resumed["dev"], resumed["test"], resumed["steps"]) == (whole["dev"], whole["test"], 18)
    a, b = (torch.load(tmp_path / d / "ckpt.pt", weights_only=True) for d in ("whole", "killed"))
    for key in ("adapter", "best_adapter"):  # every weight of the model, and the best ones
        assert a[key].keys() == b[key].keys() == dict(load(str(tiny_model))[0].named_parameters()).keys()
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
    moments = lambda ckpt: [t for s in ckpt["optimizer"]["state"].values() for t in (s["exp_avg"], s["exp_avg_sq"])]
    assert all(torch.equal(x, y) for x, y in zip(moments(a), moments(b)))
    assert without_timing(read_log(tmp_path / "killed" / "log.jsonl")) == \
        without_timing(read_log(tmp_path / "whole" / "log.jsonl"))
    files = {d: load_file(tmp_path / d / FINE_TUNED / "model.safetensors") for d in ("whole", "killed")}
    assert files["whole"].keys() == files["killed"].keys()
    assert all(torch.equal(files["whole"][k], files["killed"][k]) for k in files["whole"])

    # killed while writing the model (after its last checkpoint): --resume removes the half folder, writes it again
    (tmp_path / "killed" / FINE_TUNED / "model.safetensors").rename(tmp_path / "first.safetensors")
    (tmp_path / "killed" / FINE_TUNED).rename(tmp_path / "killed" / f".{FINE_TUNED}.99999-0badf00d.para-tmp")
    (tmp_path / "killed" / "results.json").unlink()
    train.main(flags(tiny_task, tiny_model, tmp_path / "killed", FULL, *RESUME, "--resume"))
    assert not list((tmp_path / "killed").glob("*.para-tmp"))
    again = load_file(tmp_path / "killed" / FINE_TUNED / "model.safetensors")
    assert all(torch.equal(again[k], files["whole"][k]) for k in again)


def test_two_gloo_processes_fine_tune_the_model_of_one_process(tiny_model, tmp_path):
    # DDP: each process holds the whole model; the gradients of every weight are summed in one all-reduce
    task = write_task(tmp_path / "task", {"train": task_records(20, 0), "dev": task_records(6, 1),
                                          "test": task_records(4, 2)})
    common = (*LR, "--batch_size", 8, "--micro_batch_size", 2, "--epochs", 2, "--eval_interval", 3, "--device", "cpu",
              "--eval_splits", "none")
    torchrun(flags(task, tiny_model, tmp_path / "two", FULL, *common))
    one = train.main(flags(task, tiny_model, tmp_path / "one", FULL, *common))
    two = json.loads((tmp_path / "two" / "results.json").read_text())
    assert two["world_size"] == 2 and two["steps"] == one["steps"] == 6
    a, b = (state(load(str(tmp_path / d / FINE_TUNED))[0]) for d in ("two", "one"))
    for name in a:  # the same gradients summed in another order (as test_train's DDP test)
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-6)


def test_full_fine_tuning_is_refused_where_it_makes_no_sense(tiny_task, tiny_model, tmp_path, capsys):
    for flag, message in ((["--fsdp"], "--method full with --fsdp is not supported yet: --fsdp shards only the "
                                       "frozen base model"),
                          (["--dtype", "fp16"], "fp16 would need loss scaling")):
        with pytest.raises(SystemExit):
            train.main(flags(tiny_task, tiny_model, tmp_path / "out", FULL, *flag))
        assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    model, tokenizer = load(str(tiny_model))
    with pytest.raises(UserError, match="no adapter to put in a bank"):
        adapters.add_adapter(model, FULL, n_adapters=2)
    adapters.add_adapter(model, adapters.PARA, r=4)
    with pytest.raises(UserError, match="only a model without an adapter can be saved"):
        loaders.save(model, tokenizer, tmp_path / "saved")

# -----------------------------------------------------------------------------
# loaders.save: the model as an HF folder, read back bit for bit (and by HF Transformers)


def assert_saved_and_read_back_bit_for_bit(model, tokenizer, folder):
    loaders.save(model, tokenizer, folder)
    again, tokenizer_again = load(str(folder))
    assert type(again) is type(model) and type(again.args) is type(model.args)
    shape = ("dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "hidden_dim", "vocab_size", "norm_eps",
             "rope_theta", "max_seq_len")
    assert [getattr(again.args, f) for f in shape] == [getattr(model.args, f) for f in shape]
    a, b = state(model), state(again)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (again.output.weight is again.tok_embeddings.weight) == (model.output.weight is model.tok_embeddings.weight)
    with torch.no_grad():
        assert torch.equal(again(TOKENS), model(TOKENS))
    for k in ("bos_id", "eos_id", "pad_id", "n_words", "add_bos", "chat_format"):
        assert getattr(tokenizer_again, k) == getattr(tokenizer, k), k
    assert tokenizer_again.encode("red cat owl Answer: A") == tokenizer.encode("red cat owl Answer: A")
    return again


def test_a_llama_is_saved_as_an_hf_folder_that_load_and_hf_transformers_read_back(tiny_model, tmp_path):
    from transformers import AutoModelForCausalLM

    model, tokenizer = load(str(tiny_model))  # a Meta folder with a sentencepiece tokenizer.model
    assert_saved_and_read_back_bit_for_bit(model, tokenizer, tmp_path / "saved")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "saved", dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(TOKENS).logits, model(TOKENS), **WIDE)


@pytest.mark.parametrize("version", [1, 3], ids=["gemma", "gemma3"])
def test_a_gemma_is_saved_with_its_gemma_config_and_read_back_as_a_gemma(version, tmp_path):
    from test_gemma import hf_model, word_tokenizer
    from transformers import AutoModelForCausalLM

    import gemma

    hf = hf_model(version)
    hf.save_pretrained(tmp_path / "hf")
    word_tokenizer(tmp_path / "hf")
    model, tokenizer = load(str(tmp_path / "hf"))
    again = assert_saved_and_read_back_bit_for_bit(model, tokenizer, tmp_path / "saved")
    assert isinstance(again, gemma.Gemma) and again.args == model.args  # local layers, window, RoPE bases, scale
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "saved", dtype=torch.float32,
                                                  attn_implementation="eager").eval()
    tokens = torch.randint(3, 40, (2, 12), generator=torch.Generator().manual_seed(0))  # past Gemma 3's window
    with torch.no_grad():
        assert torch.equal(theirs(tokens).logits, hf(tokens).logits)


def test_the_small_default_models_gguf_tokenizer_is_saved_as_a_tokenizer_json_that_reads_back_the_same(tmp_path):
    from tokenizer import Tokenizer

    try:
        path = loaders.default_model_path()
    except UserError as e:
        pytest.skip(str(e))
    _, (metadata, _) = loaders.gguf_args(path)
    tokenizer = Tokenizer.from_gguf(metadata, path)
    tokenizer.save(tmp_path)
    again = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    for k in ("bos_id", "eos_id", "pad_id", "n_words", "add_bos", "chat_format"):
        assert getattr(again, k) == getattr(tokenizer, k), k
    from test_smollm2 import TEXTS
    for text in TEXTS:
        assert again.encode(text) == tokenizer.encode(text), text
        assert again.decode(tokenizer.encode(text)) == tokenizer.decode(tokenizer.encode(text))
    messages = [{"role": "user", "content": "Hi"}]
    assert again.format_chat(messages) == tokenizer.format_chat(messages)


def test_python_adapters_py_counts_every_weight_of_the_model_for_full_fine_tuning(tiny_model):
    model, _ = load(str(tiny_model))
    assert adapters.count_parameters(model.args, FULL) == sum(p.numel() for p in model.parameters())
    smollm2 = ModelArgs(dim=576, n_layers=30, n_heads=9, n_kv_heads=3, hidden_dim=1536, vocab_size=49152)
    assert adapters.count_parameters(smollm2, FULL, tied=True) == 134_515_008  # HF's count of SmolLM2-135M
    llama2_7b = ModelArgs(dim=4096, n_layers=32, n_heads=32, vocab_size=32000)
    assert adapters.count_parameters(llama2_7b, FULL) == 6_738_415_616
    assert "the weights 26.95 GB + their gradients 26.95 GB + AdamW's two moments 53.91 GB + the best weights on " \
        "dev 26.95 GB = 134.77 GB" in train.full_ft_memory(6_738_415_616, "cuda:0", torch.float32, 1)
