"""train.py: the paper's recipe on a tiny random Llama and a tiny task (CPU, fp32, seconds each), the
reliability of a run (resume, crashes, NaN, bad data), two gloo processes, and command-line smoke runs.

The tiny task: a prompt of three words and "Answer:", the target " A" when at least two of the words are
colours and " B" otherwise. The answer depends on the prompt, dev and test hold word triples that training may
not have seen, and chance is 50%.
"""
import io
import json
import os
import random
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import adapters
import train
from conftest import ASSETS
from errors import UserError
from loaders import load
from model import ModelArgs, Transformer

REPO = Path(__file__).resolve().parents[1]
COLOURS, ANIMALS = ["red", "blue", "green", "gold"], ["cat", "dog", "fox", "owl"]
LR = {"para": 3e-2, "lora": 3e-2, "ia3": 1e-1, "adalora": 3e-2, "houlsby": 3e-2}  # a random tiny model needs
# larger steps than the paper's 1e-4


class Killed(BaseException):
    """Stands for SIGKILL: no `except Exception` in train.py can catch it."""


def run_killed_before_step(argv, step, monkeypatch):
    """train.main(argv), killed as optimizer step `step` (1-based) begins."""
    lr_at = train.lr_at

    def killed(s, *args):
        if s == step - 1:
            raise Killed()
        return lr_at(s, *args)

    monkeypatch.setattr(train, "lr_at", killed)
    with pytest.raises(Killed):
        train.main(argv)
    monkeypatch.undo()


# -----------------------------------------------------------------------------
# the tiny task and the tiny model, written once per session

def task_records(n, seed):
    rng = random.Random(seed)
    records = []
    for i in range(n):
        words = [rng.choice(COLOURS + ANIMALS) for _ in range(3)]
        label = "A" if sum(w in COLOURS for w in words) >= 2 else "B"
        records.append({"prompt": " ".join(words) + " Answer:", "target": " " + label, "label": label, "id": i})
    return records


def write_task(folder, splits):
    folder.mkdir(parents=True, exist_ok=True)
    for split, records in splits.items():
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return folder


@pytest.fixture(scope="session")
def tiny_task(tmp_path_factory):
    """96 train, 32 dev, 32 test examples."""
    return write_task(tmp_path_factory.mktemp("task") / "tiny",
                      {"train": task_records(96, 0), "dev": task_records(32, 1), "test": task_records(32, 2)})


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """A Meta-format folder: params.json, consolidated.00.pth (random, seeded) and a word-level sentencepiece
    tokenizer.model trained on the task's words (Llama 2's ids: unk 0, BOS 1 added by default, EOS 2)."""
    import sentencepiece as spm

    folder = tmp_path_factory.mktemp("tiny_llama")
    proto = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter([r["prompt"] + r["target"] for r in task_records(200, 9)]), model_writer=proto,
        model_type="word", vocab_size=32, hard_vocab_limit=False, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        minloglevel=2)
    (folder / "tokenizer.model").write_bytes(proto.getvalue())
    vocab = spm.SentencePieceProcessor(model_proto=proto.getvalue()).vocab_size()
    params = dict(dim=64, n_layers=2, n_heads=4, multiple_of=32, norm_eps=1e-5, vocab_size=-1, max_seq_len=64)
    (folder / "params.json").write_text(json.dumps(params))
    torch.manual_seed(0)
    torch.save(Transformer(ModelArgs(**{**params, "vocab_size": vocab})).state_dict(), folder / "consolidated.00.pth")
    return folder


def flags(task, model, out_dir, method="para", *extra):
    """Tiny-run defaults: 15 epochs of 6 steps, dev loss every 30 steps, greedy evaluation; rank 4 (AdaLoRA: 4 to 2);
    fp32 on every CPU (--dtype auto would be bf16 on CPUs that have it natively)."""
    return ["--task", str(task), "--ckpt_dir", str(model), "--out_dir", str(out_dir), "--method", method,
            "--dtype", "fp32", "--r", "4", "--lr", str(LR.get(method, 1e-4)), "--epochs", "15", "--eval_interval", "30", "--num_beams", "1",
            *(["--adalora_target_r", "2"] if method == "adalora" else []), *map(str, extra)]


def adapter_tensors(path, model_dir):
    """The tensors of an adapter file, read back through para's own loader into a fresh base model."""
    model, _ = load(str(model_dir))
    adapters.load_adapter(model, [path])
    return adapters.adapter_state_dict(model)


def read_log(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def without_timing(records):
    return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in records]

# -----------------------------------------------------------------------------
# small pieces


def test_learning_rate_warms_up_linearly_then_decays_linearly_towards_zero():
    lrs = [train.lr_at(step, 1e-4, warmup_steps=6, total_steps=100) for step in range(100)]
    assert lrs[:6] == pytest.approx([1e-4 * k / 6 for k in range(1, 7)])
    assert lrs[6] == pytest.approx(1e-4)
    assert all(a > b for a, b in zip(lrs[6:], lrs[7:]))
    assert lrs[-1] == pytest.approx(1e-4 / 94) and lrs[-1] > 0


def test_early_stopping_stops_after_patience_evaluations_without_a_strictly_lower_dev_loss():
    best, bad, decisions = float("inf"), 0, []
    for loss in [0.5, 0.3, 0.4, 0.3, 0.2, 0.25, 0.2, 0.9]:
        is_best, best, bad, stop = train.early_stopping(loss, best, bad, patience=3)
        decisions.append((is_best, bad, stop))
        if stop:
            break
    # an equal loss is not an improvement; the counter restarts at every new best
    assert decisions == [(True, 0, False), (True, 0, False), (False, 1, False), (False, 2, False),
                         (True, 0, False), (False, 1, False), (False, 2, False), (False, 3, True)]


def test_tokenize_gives_the_prompt_ids_generation_sees_and_a_target_ending_with_eos(tiny_model):
    _, tokenizer = load(str(tiny_model))
    record = {"prompt": "red cat owl Answer:", "target": " B"}
    [(prompt, target)], n_truncated, _ = train.tokenize([record], tokenizer, max_seq_len=64)
    assert prompt == tokenizer.encode(record["prompt"]) and prompt[0] == tokenizer.bos_id
    assert target[-1] == tokenizer.eos_id and n_truncated == 0
    assert tokenizer.decode(prompt + target[:-1]) == record["prompt"] + record["target"]


def test_long_examples_lose_prompt_tokens_from_the_left_keeping_bos_and_the_target(tiny_model):
    _, tokenizer = load(str(tiny_model))
    record = {"prompt": "red cat owl blue dog fox gold Answer:", "target": " A"}
    full_prompt = tokenizer.encode(record["prompt"])  # BOS + 8 words
    [(prompt, target)], n_truncated, _ = train.tokenize([record], tokenizer, max_seq_len=6)
    assert n_truncated == 1 and len(prompt) + len(target) == 6
    assert prompt == [tokenizer.bos_id] + full_prompt[-3:]  # "fox gold Answer:"
    assert tokenizer.decode(target[:-1]) == "A"


def test_collate_right_pads_and_trains_on_target_tokens_only():
    tokens, targets, prompt_len = train.collate([([1, 5, 6], [7, 2]), ([1, 8], [9, 10, 2])], pad_id=0, device="cpu")
    # inputs are the sequence without its last token; position t is trained to predict token t+1
    assert tokens.tolist() == [[1, 5, 6, 7], [1, 8, 9, 10]]
    assert targets.tolist() == [[-100, -100, 7, 2], [-100, 9, 10, 2]]
    assert prompt_len.tolist() == [3, 2]
    tokens, targets, _ = train.collate([([1, 5], [2]), ([1, 8, 8, 8], [9, 2])], pad_id=0, device="cpu")
    assert tokens.tolist()[0] == [1, 5, 0, 0, 0] and targets.tolist()[0] == [-100, 2, -100, -100, -100]

# -----------------------------------------------------------------------------
# learning


@pytest.mark.parametrize("method", ["para", "ia3", "lora", "adalora", "houlsby"])
def test_a_short_run_lowers_the_dev_loss_and_answers_well_above_chance(method, tiny_task, tiny_model, tmp_path):
    model, tokenizer = load(str(tiny_model))
    dev, _, _ = train.tokenize(train.load_split(tiny_task, "dev"), tokenizer, 64)
    loss, count = train.target_loss(model, dev, 16, tokenizer.pad_id, "cpu")
    base_dev_loss = (loss / count).item()

    results = train.main(flags(tiny_task, tiny_model, tmp_path / "out", method))
    log = read_log(tmp_path / "out" / "log.jsonl")
    dev_losses = [r["dev_loss"] for r in log if "dev_loss" in r]
    assert len(dev_losses) == 3 and results["steps"] == 90
    assert dev_losses[-1] < 0.5 * base_dev_loss, (base_dev_loss, dev_losses)
    assert results["best_dev_loss"] == min(dev_losses)
    assert results["test"]["acc"] >= 75 and results["dev"]["acc"] >= 75, results  # chance: 50


def test_the_run_stops_when_patience_runs_out_and_keeps_the_adapter_best_on_dev(
        tiny_task, tiny_model, tmp_path, monkeypatch):
    scripted = iter([0.5, 0.3, 0.4, 0.35, 0.3, 0.1])  # patience 3: eval 2 is the best, eval 5 ends the run
    snapshots = []

    def fake_target_loss(model, examples, *args):
        snapshots.append({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})
        return torch.tensor([next(scripted), 1.0], dtype=torch.float64)

    monkeypatch.setattr(train, "target_loss", fake_target_loss)
    results = train.main(flags(tiny_task, tiny_model, tmp_path / "out", "para", "--eval_interval", 2, "--patience", 3,
                               "--limit_eval", 4))
    evals = [r for r in read_log(tmp_path / "out" / "log.jsonl") if "dev_loss" in r]
    assert [r["step"] for r in evals] == [2, 4, 6, 8, 10] and results["steps"] == 10
    assert [r["is_best"] for r in evals] == [True, True, False, False, False]
    assert results["best_dev_loss"] == 0.3
    saved = adapter_tensors(tmp_path / "out" / "adapter.pt", tiny_model)
    for name, tensor in saved.items():
        assert torch.equal(tensor, snapshots[1][name])
    assert any(not torch.equal(saved[n], snapshots[4][n]) for n in saved)


def test_gradient_accumulation_gives_the_adapter_of_whole_batches(tiny_task, tiny_model, tmp_path):
    common = ("--max_steps", 6, "--limit_eval", 2)
    train.main(flags(tiny_task, tiny_model, tmp_path / "whole", "para", *common, "--micro_batch_size", 16))
    train.main(flags(tiny_task, tiny_model, tmp_path / "accumulated", "para", *common, "--micro_batch_size", 3))
    whole = adapter_tensors(tmp_path / "whole" / "adapter.pt", tiny_model)
    accumulated = adapter_tensors(tmp_path / "accumulated" / "adapter.pt", tiny_model)
    # The two runs sum the same gradients in another order: 3.6e-7 apart after 6 steps (AMD; values up to 1.1).
    # A wrong weighting of the micro-batches turns each Adam step (lr 3e-2) by percents, 1e-3 or more apart.
    for name in whole:
        torch.testing.assert_close(accumulated[name], whole[name], rtol=1e-4, atol=1e-6)

def test_the_loss_at_the_answer_positions_only_has_the_loss_and_gradients_of_every_positions_logits(tiny_task,
                                                                                                 tiny_model):
    model, tokenizer = load(str(tiny_model))
    adapters.add_adapter(model, "para", r=4)
    torch.manual_seed(0)
    with torch.no_grad():  # a trained adapter, not a fresh one (the base model itself)
        for name, p in model.named_parameters():
            if adapters.is_adapter_param(name):
                p.normal_(std=0.1)
    examples, _, _ = train.tokenize(train.load_split(tiny_task, "train")[:8], tokenizer, 64)
    tokens, targets, prompt_len = train.collate(examples, tokenizer.pad_id, "cpu")
    assert (targets == -100).float().mean() > 0.5  # most positions are prompt or padding: there is work to skip
    losses, grads = [], []
    for loss_of in (lambda: train.loss_sum(model(tokens, prompt_len=prompt_len), targets),
                    lambda: train.answer_loss(model, tokens, targets, prompt_len)):
        model.zero_grad()
        losses.append(loss_of())
        losses[-1].backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    # The same products, only the vocabulary matmul's shape differs: the loss came out bit-identical and the
    # gradients 2.4e-7 apart (AMD), within assert_close's fp32 default; targets off by one position are off by far more.
    torch.testing.assert_close(losses[1], losses[0])
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name])


def test_bf16_autocast_with_activation_checkpointing_trains_an_fp32_adapter(tiny_task, tiny_model, tmp_path):
    # the 7B recipe on one GPU, run on CPU: base weights in bf16, the adapter and AdamW's moments in fp32
    results = train.main(flags(tiny_task, tiny_model, tmp_path / "out", "para", "--dtype", "bf16",
                               "--grad_checkpointing", "--max_steps", 12, "--limit_eval", 4))
    assert results["dtype"] == "bfloat16"
    last = torch.load(tmp_path / "out" / "ckpt.pt", weights_only=True)
    assert all(t.dtype == torch.float32 for t in last["adapter"].values())
    assert all(s["exp_avg"].dtype == torch.float32 for s in last["optimizer"]["state"].values())
    losses = [r["loss"] for r in read_log(tmp_path / "out" / "log.jsonl") if "loss" in r]
    assert losses[-1] < losses[0]

# -----------------------------------------------------------------------------
# resume


RESUME_FLAGS = ("--epochs", 3, "--eval_interval", 4, "--limit_eval", 4)  # 18 steps, checkpoints every 4


@pytest.fixture(scope="module")
def uninterrupted(tiny_task, tiny_model, tmp_path_factory):
    """method -> (out folder, results) of an uninterrupted run, made on first use."""
    runs = {}

    def run(method):
        if method not in runs:
            out = tmp_path_factory.mktemp(f"uninterrupted-{method}")
            runs[method] = out, train.main(flags(tiny_task, tiny_model, out, method, *RESUME_FLAGS))
        return runs[method]
    return run


def assert_same_run(out, reference, model_dir):
    ref_out, ref_results = reference
    saved, ref_saved = adapter_tensors(out / "adapter.pt", model_dir), adapter_tensors(ref_out / "adapter.pt", model_dir)
    assert all(torch.equal(saved[n], ref_saved[n]) for n in ref_saved)
    last, ref_last = (torch.load(d / "ckpt.pt", weights_only=True) for d in (out, ref_out))
    assert all(torch.equal(last["adapter"][n], ref_last["adapter"][n]) for n in ref_last["adapter"])
    assert all(torch.equal(last["optimizer"]["state"][i]["exp_avg_sq"], ref_last["optimizer"]["state"][i]["exp_avg_sq"])
               for i in ref_last["optimizer"]["state"])
    assert last["state"] | {"train_time": 0} == ref_last["state"] | {"train_time": 0}
    # nothing lost, nothing twice: the log is the uninterrupted run's log, line for line
    assert without_timing(read_log(out / "log.jsonl")) == without_timing(read_log(ref_out / "log.jsonl"))
    results = json.loads((out / "results.json").read_text())
    assert (results["dev"], results["test"], results["steps"]) == (ref_results["dev"], ref_results["test"], 18)


@pytest.mark.parametrize("method", ["para", "adalora"])  # AdaLoRA: its allocator's scores and masks resume too
def test_a_killed_run_resumes_to_exactly_the_adapter_of_an_uninterrupted_run(
        method, tiny_task, tiny_model, tmp_path, monkeypatch, uninterrupted):
    run_killed_before_step(flags(tiny_task, tiny_model, tmp_path / "out", method, *RESUME_FLAGS), 11, monkeypatch)
    assert torch.load(tmp_path / "out" / "ckpt.pt", weights_only=True)["state"]["step"] == 8
    with pytest.raises(UserError, match="--resume"):  # a fresh start would throw the interrupted run away
        train.main(flags(tiny_task, tiny_model, tmp_path / "out", method, *RESUME_FLAGS))
    train.main(flags(tiny_task, tiny_model, tmp_path / "out", method, *RESUME_FLAGS, "--resume"))
    assert_same_run(tmp_path / "out", uninterrupted(method), tiny_model)


def test_a_run_killed_while_writing_a_checkpoint_resumes_from_the_previous_one(
        tiny_task, tiny_model, tmp_path, monkeypatch, uninterrupted):
    save, checkpoints = torch.save, []

    def killed_while_writing_the_second_checkpoint(obj, f, *args, **kwargs):
        if Path(f).name.startswith(".ckpt.pt"):  # train.py's temp file for ckpt.pt
            checkpoints.append(f)
            if len(checkpoints) == 2:
                buffer = io.BytesIO()
                save(obj, buffer)
                Path(f).write_bytes(buffer.getvalue()[:1000])  # half a file, then the power goes
                raise Killed()
        return save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", killed_while_writing_the_second_checkpoint)
    with pytest.raises(Killed):
        train.main(flags(tiny_task, tiny_model, tmp_path / "out", "para", *RESUME_FLAGS))
    monkeypatch.undo()
    (tmp_path / "out" / ".ckpt.pt.99999-0badf00d.para-tmp").write_bytes(b"\x80garbage")  # what a real kill leaves
    assert torch.load(tmp_path / "out" / "ckpt.pt", weights_only=True)["state"]["step"] == 4  # the first, intact
    train.main(flags(tiny_task, tiny_model, tmp_path / "out", "para", *RESUME_FLAGS, "--resume"))
    assert_same_run(tmp_path / "out", uninterrupted("para"), tiny_model)
    assert not list((tmp_path / "out").glob("*.para-tmp"))

# -----------------------------------------------------------------------------
# failures and refusals


def test_a_nan_loss_stops_the_run_with_a_message_naming_the_step(tiny_task, tiny_model, tmp_path, monkeypatch):
    loss_sum, calls = train.loss_sum, []

    def nan_at_the_third_step(logits, targets):
        calls.append(1)
        return loss_sum(logits, targets) * (float("nan") if len(calls) == 3 else 1.0)

    monkeypatch.setattr(train, "loss_sum", nan_at_the_third_step)
    with pytest.raises(UserError, match=r"loss is nan .* at step 3 "):
        train.main(flags(tiny_task, tiny_model, tmp_path / "out", "para", "--micro_batch_size", 16))


def test_a_malformed_data_line_is_reported_with_its_file_and_line_without_a_traceback(tiny_model, tmp_path):
    records = task_records(4, 0)
    task = write_task(tmp_path / "task", {"train": records, "dev": records, "test": records})
    lines = (task / "train.jsonl").read_text().splitlines()
    lines[2] = lines[2][:-1]  # a truncated JSON object on line 3
    (task / "train.jsonl").write_text("\n".join(lines) + "\n")
    run = subprocess.run([sys.executable, "train.py", *flags(task, tiny_model, tmp_path / "out")], cwd=REPO,
                         capture_output=True, text=True, env=os.environ | {"OMP_NUM_THREADS": "1"})
    assert run.returncode != 0
    assert f"error: {task / 'train.jsonl'}, line 3: not valid JSON" in run.stderr
    assert "Traceback" not in run.stderr


def test_an_empty_train_split_cannot_train_but_the_base_model_still_evaluates(tiny_model, tmp_path):
    records = task_records(8, 1)
    task = write_task(tmp_path / "task", {"train": [], "dev": records, "test": records})
    with pytest.raises(UserError, match="nothing to train on.*--method none"):
        train.main(flags(task, tiny_model, tmp_path / "para", "para"))
    results = train.main(flags(task, tiny_model, tmp_path / "none", "none"))
    assert results["trainable_parameters"] == 0 and results["steps"] == 0
    assert set(results["test"]) == {"acc"} and (tmp_path / "none" / "results.json").exists()
    assert not (tmp_path / "none" / "adapter.pt").exists()


def test_a_finished_run_is_never_overwritten_silently(tiny_task, tiny_model, tmp_path):
    quick = flags(tiny_task, tiny_model, tmp_path / "out", "para", "--max_steps", 2, "--limit_eval", 2)
    first = train.main(quick)
    with pytest.raises(UserError, match="files of another run .*--overwrite"):
        train.main(quick)
    assert train.main(quick + ["--resume"]) == json.loads((tmp_path / "out" / "results.json").read_text())
    again = train.main(quick + ["--overwrite"])
    assert again["test"] == first["test"] and len(read_log(tmp_path / "out" / "log.jsonl")) == 3


def test_a_run_trained_without_scoring_is_scored_later_as_if_scored_at_once(tiny_task, tiny_model, tmp_path):
    # the study trains every learning rate, then scores only the one chosen on dev
    quick = flags(tiny_task, tiny_model, tmp_path / "later", "para", "--max_steps", 4, "--limit_eval", 4)
    trained = train.main(quick + ["--eval_splits", "none"])
    assert trained["dev"] is None and trained["test"] is None and trained["eval_splits"] == []
    log = (tmp_path / "later" / "log.jsonl").read_text()
    # as if training had peaked far above what scoring will (the study scores in another process)
    results_file = tmp_path / "later" / "results.json"
    results_file.write_text(json.dumps(json.loads(results_file.read_text()) | {"peak_memory_bytes": 2**50}))
    test_only = train.main(quick + ["--resume", "--eval_splits", "test"])
    assert test_only["dev"] is None and test_only["eval_splits"] == ["test"]
    assert (tmp_path / "later" / "log.jsonl").read_text() == log  # no step trained again
    assert test_only["peak_memory_bytes"] == 2**50  # training's peak is kept
    both = train.main(quick + ["--resume"])
    at_once = train.main(flags(tiny_task, tiny_model, tmp_path / "at_once", "para", "--max_steps", 4, "--limit_eval", 4))
    assert (both["dev"], both["test"], both["eval_splits"]) == (at_once["dev"], at_once["test"], ["dev", "test"])
    predictions = [json.loads(line) for line in (tmp_path / "later" / "predictions.jsonl").read_text().splitlines()]
    assert sorted(p["split"] for p in predictions) == ["dev"] * 4 + ["test"] * 4  # the test ones were kept
    with pytest.raises(SystemExit):
        train.main(quick + ["--eval_splits", "train"])


def test_resume_refuses_a_run_made_with_other_settings(tiny_task, tiny_model, tmp_path):
    quick = flags(tiny_task, tiny_model, tmp_path / "out", "para", "--max_steps", 2, "--limit_eval", 2)
    train.main(quick)
    with pytest.raises(UserError, match=r"other settings.*'lr': \(0.03, 0.001\)"):
        train.main(quick + ["--resume", "--lr", "1e-3"])


def test_several_seeds_report_each_seed_and_the_median(tiny_task, tiny_model, tmp_path):
    summary = train.main(flags(tiny_task, tiny_model, tmp_path / "out", "para", "--max_steps", 12,
                               "--eval_interval", 6, "--seeds", "1,2,3"))
    assert sorted(summary["seeds"]) == [1, 2, 3]
    for seed in (1, 2, 3):
        assert (tmp_path / "out" / f"seed{seed}" / "adapter.pt").exists()
    accuracies = [summary["seeds"][s]["test"]["acc"] for s in (1, 2, 3)]
    assert summary["test_median"]["acc"] == statistics.median(accuracies)
    assert json.loads((tmp_path / "out" / "results.json").read_text())["test_median"] == summary["test_median"]
    adapters = [adapter_tensors(tmp_path / "out" / f"seed{s}" / "adapter.pt", tiny_model) for s in (1, 2)]
    assert any(not torch.equal(adapters[0][n], adapters[1][n]) for n in adapters[0])  # seeds differ

# -----------------------------------------------------------------------------
# several processes, and the command line


def test_two_gloo_processes_train_the_adapter_of_one_process_with_the_same_global_batch(tiny_model, tmp_path):
    # 20 examples in batches of 8: the last batch of each epoch has 4, two per process
    records = task_records(20, 0)
    task = write_task(tmp_path / "task", {"train": records, "dev": task_records(6, 1), "test": task_records(4, 2)})
    common = ("--batch_size", 8, "--micro_batch_size", 2, "--epochs", 2, "--eval_interval", 3, "--device", "cpu")
    # torchrun's own parser would take --r for an abbreviation of its --rdzv..., --role, ... options
    two_processes = [{"--r": "--adapter_rank"}.get(f, f) for f in flags(task, tiny_model, tmp_path / "two", "para", *common)]
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "train.py", *two_processes],
                         cwd=REPO, capture_output=True, text=True, env=os.environ | {"OMP_NUM_THREADS": "1"}, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    one = train.main(flags(task, tiny_model, tmp_path / "one", "para", *common))
    two = json.loads((tmp_path / "two" / "results.json").read_text())
    assert two["world_size"] == 2 and two["steps"] == one["steps"] == 6
    a, b = (adapter_tensors(tmp_path / d / "adapter.pt", tiny_model) for d in ("two", "one"))
    for name in a:  # summation order only, as in the accumulation test: 1.8e-7 apart here
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-6)
    dev_two, dev_one = ([r["dev_loss"] for r in read_log(tmp_path / d / "log.jsonl") if "dev_loss" in r]
                        for d in ("two", "one"))
    assert dev_two == pytest.approx(dev_one, rel=1e-5)


def torchrun(argv, env=None, check=True):
    """train.py under torchrun with two gloo processes on this machine."""
    # torchrun's own parser would take --r for an abbreviation of its --rdzv..., --role, ... options
    argv = [{"--r": "--adapter_rank"}.get(f, f) for f in argv]
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "train.py", *argv], cwd=REPO, capture_output=True, text=True,
                         env=os.environ | {"OMP_NUM_THREADS": "1"} | (env or {}), timeout=240)
    assert run.returncode == 0 or not check, run.stderr[-3000:]
    return run


KILL_AT_STEP = """
import os, signal, torch
step, calls = torch.optim.AdamW.step, [0]
def killed_at_step(self, *args, **kwargs):  # SIGKILL as optimizer step KILL_AT_STEP begins, on the last process
    calls[0] += 1
    if calls[0] == int(os.environ["KILL_AT_STEP"]) and os.environ.get("RANK") == "1":
        os.kill(os.getpid(), signal.SIGKILL)
    return step(self, *args, **kwargs)
torch.optim.AdamW.step = killed_at_step
"""


@pytest.fixture(scope="module")
def two_shard_model(tiny_model, tmp_path_factory):
    """The tiny model as Meta ships a large one: split in two model-parallel files, which --fsdp reads row bands of."""
    from tiny_llama import write_meta_checkpoint

    sd = torch.load(tiny_model / "consolidated.00.pth", weights_only=True)
    return write_meta_checkpoint(tmp_path_factory.mktemp("two_shards") / "model",
                                 json.loads((tiny_model / "params.json").read_text()), sd,
                                 tiny_model / "tokenizer.model", n_shards=2)


@pytest.mark.parametrize("method", ["para", "adalora"])
def test_fsdp_over_two_processes_trains_the_adapter_of_one_process_and_of_ddp(method, two_shard_model, tmp_path):
    # 21 examples in batches of 8: the last batch of each epoch has 5, so one process runs an empty micro-batch
    task = write_task(tmp_path / "task", {"train": task_records(21, 0), "dev": task_records(7, 1),
                                          "test": task_records(5, 2)})
    common = ("--batch_size", 8, "--micro_batch_size", 2, "--epochs", 2, "--eval_interval", 3, "--device", "cpu",
              "--grad_checkpointing", *(["--adalora_tinit", 1, "--adalora_tfinal", 1] if method == "adalora" else []))
    torchrun(flags(task, two_shard_model, tmp_path / "fsdp", method, *common, "--fsdp"))
    torchrun(flags(task, two_shard_model, tmp_path / "ddp", method, *common))
    one = train.main(flags(task, two_shard_model, tmp_path / "one", method, *common))
    results = {d: json.loads((tmp_path / d / "results.json").read_text()) for d in ("fsdp", "ddp")}
    assert results["fsdp"]["world_size"] == 2 and results["fsdp"]["steps"] == one["steps"] == 6
    tensors = {d: adapter_tensors(tmp_path / d / "adapter.pt", two_shard_model) for d in ("fsdp", "ddp", "one")}
    for name in tensors["one"]:
        # the same sums in the same order as DDP: bit-equal (every method, measured); one process sums the two
        # halves of each step in another order: 1.3e-6 apart at most, on values near 1 ((IA)^3, PARA's bias)
        assert torch.equal(tensors["fsdp"][name], tensors["ddp"][name]), name
        torch.testing.assert_close(tensors["fsdp"][name], tensors["one"][name], rtol=1e-4, atol=1e-6)
    dev = {d: [r["dev_loss"] for r in read_log(tmp_path / d / "log.jsonl") if "dev_loss" in r]
           for d in ("fsdp", "ddp", "one")}
    assert dev["fsdp"] == dev["ddp"] and dev["fsdp"] == pytest.approx(dev["one"], rel=1e-5)
    assert results["fsdp"]["test"] == one["test"]  # every process generated every batch, in step


def test_fsdp_on_a_tiny_gemma3_trains_ddps_adapter_bit_for_bit(tmp_path):
    # Gemma 3 from an HF folder: tied embeddings, wq and wk read through RoPE's row permutation, QK-norm, local layers
    from test_gemma import hf_model, word_tokenizer

    model = tmp_path / "gemma3"
    hf_model(3).save_pretrained(model)
    word_tokenizer(model)
    words = lambda n, seed: [{"prompt": " ".join(f"w{random.Random(seed * 100 + i).randrange(4, 40)}" for _ in range(3)),
                              "target": " w5" if i % 2 else " w6"} for i in range(n)]
    task = write_task(tmp_path / "task", {"train": words(21, 0), "dev": words(7, 1), "test": words(5, 2)})
    common = ("--batch_size", 8, "--micro_batch_size", 2, "--epochs", 1, "--eval_interval", 3, "--device", "cpu",
              "--eval_splits", "none")
    torchrun(flags(task, model, tmp_path / "fsdp", "para", *common, "--fsdp"))
    torchrun(flags(task, model, tmp_path / "ddp", "para", *common))
    fsdp, ddp = (torch.load(tmp_path / d / "ckpt.pt", weights_only=True)["adapter"] for d in ("fsdp", "ddp"))
    assert fsdp.keys() == ddp.keys() and all(torch.equal(fsdp[k], ddp[k]) for k in fsdp)
    assert any(not torch.equal(t, torch.ones_like(t)) for k, t in fsdp.items() if k.endswith("bias"))  # it trained


def test_an_fsdp_run_killed_and_resumed_ends_bit_equal_to_one_never_killed(two_shard_model, tmp_path):
    task = write_task(tmp_path / "task", {"train": task_records(21, 0), "dev": task_records(7, 1),
                                          "test": task_records(5, 2)})
    common = ("--batch_size", 8, "--micro_batch_size", 2, "--epochs", 3, "--eval_interval", 3, "--device", "cpu",
              "--fsdp", "--eval_splits", "none")
    torchrun(flags(task, two_shard_model, tmp_path / "whole", "para", *common))
    # a process of torchrun is SIGKILLed as step 5 begins: ckpt.pt holds step 3 (the last dev evaluation)
    (tmp_path / "hook").mkdir()
    (tmp_path / "hook" / "sitecustomize.py").write_text(KILL_AT_STEP)
    killed = torchrun(flags(task, two_shard_model, tmp_path / "killed", "para", *common), check=False,
                      env={"PYTHONPATH": str(tmp_path / "hook"), "KILL_AT_STEP": "5"})
    assert killed.returncode != 0
    assert torch.load(tmp_path / "killed" / "ckpt.pt", weights_only=True)["state"]["step"] == 3
    torchrun(flags(task, two_shard_model, tmp_path / "killed", "para", *common, "--resume"))
    whole, resumed = (torch.load(tmp_path / d / "ckpt.pt", weights_only=True) for d in ("whole", "killed"))
    for key in ("adapter", "best_adapter"):
        assert whole[key].keys() == resumed[key].keys()
        assert all(torch.equal(whole[key][k], resumed[key][k]) for k in whole[key]), key
    moments = lambda ckpt: [t for s in ckpt["optimizer"]["state"].values() for t in (s["exp_avg"], s["exp_avg_sq"])]
    assert all(torch.equal(a, b) for a, b in zip(moments(whole), moments(resumed)))
    assert without_timing(read_log(tmp_path / "killed" / "log.jsonl")) == \
        without_timing(read_log(tmp_path / "whole" / "log.jsonl"))


def test_fsdp_outside_torchrun_or_with_compile_is_refused_saying_what_to_run(tiny_task, tiny_model, tmp_path,
                                                                            monkeypatch, capsys):
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(UserError, match=r"run it as torchrun --nproc_per_node N train.py --fsdp"):
        train.main(flags(tiny_task, tiny_model, tmp_path / "out", "para", "--fsdp"))
    with pytest.raises(SystemExit):
        train.main(flags(tiny_task, tiny_model, tmp_path / "out", "para", "--fsdp", "--compile"))
    assert "--compile's decode step holds whole weights, and --fsdp shards them" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_the_command_line_writes_the_adapter_log_and_results_on_a_tiny_model(tiny_task, tiny_model, tmp_path):
    out = tmp_path / "out"
    run = subprocess.run([sys.executable, "train.py", *flags(tiny_task, tiny_model, out, "para", "--max_steps", 2,
                                                             "--num_beams", 3, "--limit_eval", 4)],
                         cwd=REPO, capture_output=True, text=True, env=os.environ | {"OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    n_params = sum(t.numel() for t in adapter_tensors(out / "adapter.pt", tiny_model).values())
    assert f"{n_params:,} trainable parameters" in run.stdout
    results = json.loads((out / "results.json").read_text())
    assert results["trainable_parameters"] == n_params and results["num_beams"] == 3
    for key in ("dev", "test", "wall_time_s", "train_tokens_per_s", "peak_memory_bytes", "peak_memory_kind"):
        assert results[key] is not None, key
    log = read_log(out / "log.jsonl")
    assert [r["step"] for r in log] == [1, 2, 2] and {"loss", "lr"} <= log[0].keys() and "dev_loss" in log[2]
    assert len((out / "predictions.jsonl").read_text().splitlines()) == 8


@pytest.mark.skipif(not (ASSETS / "copa" / "train.jsonl").exists(), reason="shared COPA files not present")
def test_the_command_line_trains_para_on_copa_with_the_small_default_model(tmp_path):
    from data.copa.prepare import prepare
    from loaders import default_model_path

    try:
        default_model_path()
    except UserError as e:
        pytest.skip(str(e))
    task = prepare(src=ASSETS / "copa", out=tmp_path / "copa")
    out = tmp_path / "out"
    run = subprocess.run([sys.executable, "train.py", "--task", str(task), "--r", "12", "--max_steps", "2",
                          "--batch_size", "2", "--limit_eval", "3", "--out_dir", str(out)],
                         cwd=REPO, capture_output=True, text=True, env=os.environ | {"OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    adapter = adapters.read_adapter_file(str(out / "adapter.pt"))
    assert adapter["config"] == {"method": "para", "r": 12}
    assert results["trainable_parameters"] == sum(t.numel() for t in adapter["tensors"].values()) > 0
    assert set(results["test"]) == {"acc"} and results["steps"] == 2 and results["num_beams"] == 3
    assert len((out / "predictions.jsonl").read_text().splitlines()) == 6


# -----------------------------------------------------------------------------
# bad input: a clear refusal, before anything is loaded, with nothing deleted


@pytest.mark.parametrize("flag, value, message", [
    ("--grad_clip", "-1", "--grad_clip must be a number >= 0"),  # would flip the gradient's sign
    ("--max_steps", "-1", "--max_steps must be at least 0"),  # would train with a negative learning rate
    ("--batch_size", "-4", "--batch_size must be at least 0"),
    ("--epochs", "0", "--epochs must be at least 1"),  # would still run one step
    ("--limit_eval", "-1", "--limit_eval must be at least 0"),  # would drop the last example
    ("--r", "0", "--r must be at least 1"),
    ("--r", "-3", "--r must be at least 1"),
    ("--micro_batch_size", "0", "--micro_batch_size must be at least 1"),
    ("--eval_interval", "0", "--eval_interval must be at least 1"),
    ("--seeds", "1,x", "--seeds must be comma-separated whole numbers"),
    ("--lr", "0", "--lr 0 trains nothing"),
    ("--lr", "nan", "--lr must be a number >= 0"),
    ("--warmup_ratio", "1.5", "--warmup_ratio must be below 1"),
])
def test_a_flag_out_of_range_is_refused_before_anything_is_loaded(flag, value, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        train.main(["--task", str(tmp_path / "no_task"), "--ckpt_dir", str(tmp_path / "no_model"), flag, value])
    assert e.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("earlier", ["adapter.pt", "log.jsonl", "predictions.jsonl", "results.json", "ckpt.pt"])
def test_a_fresh_run_refuses_a_folder_holding_any_file_of_another_run(earlier, tiny_task, tiny_model, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / earlier).write_text("someone's finished work")
    with pytest.raises(UserError, match=f"files of another run \\({earlier}\\).*--resume.*--overwrite"):
        train.main(flags(tiny_task, tiny_model, out, "para", "--max_steps", 2, "--limit_eval", 2))
    assert (out / earlier).read_text() == "someone's finished work"


def test_a_run_deletes_only_the_files_it_writes_itself(tiny_task, tiny_model, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    mine = {"thesis.tmp.docx": "chapter 1", "page.tmpl": "<html>", "notes.jsonl": "{}", ".adapter.pt.99.tmp": "mine"}
    for name, text in mine.items():
        (out / name).write_text(text)
    (out / ".adapter.pt.99-0badf00d.para-tmp").write_text("half")  # a temporary file of ours, left by a killed write
    (out / "log.jsonl").write_text("an old log\n")
    train.main(flags(tiny_task, tiny_model, out, "para", "--max_steps", 2, "--limit_eval", 2, "--overwrite"))
    assert all((out / name).read_text() == text for name, text in mine.items())  # a user's ".adapter.pt.99.tmp" too
    assert not (out / ".adapter.pt.99-0badf00d.para-tmp").exists()
    assert [r["step"] for r in read_log(out / "log.jsonl")] == [1, 2, 2]  # the old log is gone, not appended to


def test_resuming_a_run_killed_before_its_first_checkpoint_starts_a_clean_log(
        tiny_task, tiny_model, tmp_path, monkeypatch):
    quick = flags(tiny_task, tiny_model, tmp_path / "out", "para", "--max_steps", 4, "--eval_interval", 4,
                  "--limit_eval", 2)
    run_killed_before_step(quick, 3, monkeypatch)
    assert not (tmp_path / "out" / "ckpt.pt").exists() and len(read_log(tmp_path / "out" / "log.jsonl")) == 2
    train.main(quick + ["--resume"])
    assert [r["step"] for r in read_log(tmp_path / "out" / "log.jsonl")] == [1, 2, 3, 4, 4]  # not 1, 2, 1, 2, ...


def test_checkpoints_are_written_every_ckpt_minutes_between_dev_evaluations(
        tiny_task, tiny_model, tmp_path, monkeypatch):
    # dev loss every 30 steps; --ckpt_minutes 0: a checkpoint after every step
    run_killed_before_step(flags(tiny_task, tiny_model, tmp_path / "out", "para", "--ckpt_minutes", 0), 4, monkeypatch)
    assert torch.load(tmp_path / "out" / "ckpt.pt", weights_only=True)["state"]["step"] == 3


@pytest.mark.parametrize("damage", ["truncated", "code"])
def test_resume_refuses_a_damaged_checkpoint_naming_it(damage, tiny_task, tiny_model, tmp_path):
    quick = flags(tiny_task, tiny_model, tmp_path / "out", "para", "--max_steps", 2, "--limit_eval", 2)
    train.main(quick)
    ckpt = tmp_path / "out" / "ckpt.pt"
    (tmp_path / "out" / "results.json").unlink()  # as if killed after its last checkpoint
    if damage == "truncated":
        ckpt.write_bytes(ckpt.read_bytes()[:2000])
    else:
        torch.save({"settings": Exploit()}, ckpt)
    with pytest.raises(UserError, match="ckpt.pt is not a readable checkpoint file") as e:
        train.main(quick + ["--resume"])
    assert "weights_only=False" not in str(e.value) and not (tmp_path / "exploited").exists()


class Exploit:
    def __reduce__(self):  # what unpickling would call
        return (open, (str(Path(__file__).parent / "exploited"), "w"))


def test_a_programming_error_keeps_its_traceback(tiny_task, tiny_model, tmp_path, monkeypatch):
    # only errors.UserError becomes a one-line message (train.py's __main__ catches nothing else)
    def broken(*args):
        raise ValueError("an error inside the code, not the user's")

    monkeypatch.setattr(train, "collate", broken)
    with pytest.raises(ValueError, match="inside the code"):
        train.main(flags(tiny_task, tiny_model, tmp_path / "out", "para", "--max_steps", 1))


# -----------------------------------------------------------------------------
# bf16


@pytest.mark.parametrize("method", ["para", "ia3", "lora"])
def test_bf16_training_tracks_fp32_training_step_by_step(method, tiny_task, tiny_model, tmp_path):
    common = ("--max_steps", 20, "--eval_interval", 20, "--limit_eval", 2)
    for dtype in ("fp32", "bf16"):
        train.main(flags(tiny_task, tiny_model, tmp_path / dtype, method, "--dtype", dtype, *common))
    fp32, bf16 = ([r["loss"] for r in read_log(tmp_path / d / "log.jsonl") if "loss" in r] for d in ("fp32", "bf16"))
    base = fp32[0]  # step 1's loss is the base model's: both runs start from the same adapter
    assert fp32[-1] < 0.7 * base  # the runs learn: an adapter whose updates were lost would stay near `base`
    # Measured: bf16 rounding of the base model moves step 1's loss by 3e-4 (0.01% of it), and the curves stay
    # within 1.6e-3 of each other over the 20 steps (PARA, (IA)^3, LoRA). 1% of the base loss is 15 times that.
    assert all(abs(b - f) < 0.01 * base for b, f in zip(bf16, fp32)), list(zip(bf16, fp32))


def test_adalora_runs_a_schedule_even_of_two_steps(tiny_task, tiny_model, tmp_path):
    # 2 steps: its final allocation (at step 2 - 30% = 1) comes before any triplet was scored; nothing is pruned
    results = train.main(flags(tiny_task, tiny_model, tmp_path / "out", "adalora", "--max_steps", 2, "--limit_eval", 2))
    assert results["steps"] == 2
