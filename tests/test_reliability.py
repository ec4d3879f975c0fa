"""Bad inputs and faults a user meets, each with the message or the behaviour it must get (issue "Reliability II"):
one run per folder, resume only onto the same inputs, generation within memory, messages that name the fix.
Each test fails without its fix."""
import json
import os
import re
import sys
from pathlib import Path

import pytest
import torch

import adapters
import bench
import generate
import loaders
import runs
import study
import train
from errors import UserError
from test_train import (Killed, flags, read_log, run_killed_before_step, task_records, tiny_model,  # noqa: F401
                        tiny_task, write_task)
from tiny_llama import R, adapted, wide_model

QUICK = ("--max_steps", 2, "--limit_eval", 2)


def quick(task, model, out, *extra):
    return flags(task, model, out, "para", *QUICK, *extra)


def saved_ckpt(tiny_task, tiny_model, out):
    """The flags of a run of 4 steps with a checkpoint every 2."""
    return flags(tiny_task, tiny_model, out, "para", "--max_steps", 4, "--eval_interval", 2, "--limit_eval", 2)


def killed_after_step_2(argv, monkeypatch):
    """argv's run, killed as step 3 begins: its ckpt.pt holds step 2, and --resume has something to continue."""
    run_killed_before_step(argv, 3, monkeypatch)


# -----------------------------------------------------------------------------
# one run per folder


def test_a_second_run_on_a_folder_in_use_is_refused_with_the_first_runs_pid(tiny_task, tiny_model, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    held = runs.lock(out)  # another train.py holds the folder (flock conflicts between two open files, one process)
    try:
        with pytest.raises(UserError, match=f"in use by another train.py run \\(PID {os.getpid()}\\)"):
            train.main(quick(tiny_task, tiny_model, out))
    finally:
        held.close()
    assert not (out / "log.jsonl").exists()  # nothing of the second run was written
    train.main(quick(tiny_task, tiny_model, out))  # the lock goes with its holder


def test_an_out_dir_that_is_a_file_or_under_one_is_refused(tiny_task, tiny_model, tmp_path):
    (tmp_path / "file").write_text("mine")
    for out, where in ((tmp_path / "file", "is a file"), (tmp_path / "file" / "run", "lies under")):
        with pytest.raises(UserError, match=where):
            train.main(quick(tiny_task, tiny_model, out))
    assert (tmp_path / "file").read_text() == "mine"


def test_an_out_dir_that_cannot_be_written_is_refused(tiny_task, tiny_model, tmp_path, monkeypatch):
    def denied(self, *args, **kwargs):  # what a read-only folder does (root, who runs the tests, is never denied)
        raise PermissionError(13, "Permission denied", str(self))
    monkeypatch.setattr(Path, "touch", denied)
    with pytest.raises(UserError, match="cannot be written"):
        train.main(quick(tiny_task, tiny_model, tmp_path / "out"))


def test_a_full_disk_during_a_checkpoint_says_the_previous_one_is_intact(tiny_task, tiny_model, tmp_path,
                                                                         monkeypatch):
    out = tmp_path / "out"
    save, checkpoints = torch.save, []

    def full_at_the_second_checkpoint(obj, f, *args, **kwargs):
        if "ckpt.pt" in str(f):
            checkpoints.append(f)
            if len(checkpoints) == 2:
                Path(f).write_bytes(b"half")
                raise RuntimeError("[enforce fail at inline_container.cc:778] . PytorchStreamWriter failed writing file")
        return save(obj, f, *args, **kwargs)
    monkeypatch.setattr(torch, "save", full_at_the_second_checkpoint)
    monkeypatch.setattr("data.free_bytes", lambda folder: 0)  # the disk is full
    with pytest.raises(UserError, match="is full .*the previous ckpt.pt is intact.*--resume"):
        train.main(saved_ckpt(tiny_task, tiny_model, out))
    assert torch.load(out / "ckpt.pt", weights_only=True)["state"]["step"] == 2  # the first, intact
    assert not list(out.glob("*.para-tmp"))


# -----------------------------------------------------------------------------
# resume only onto the same settings and inputs


def test_resume_after_the_data_changed_is_refused_naming_the_file(tiny_task, tiny_model, tmp_path, monkeypatch):
    task = write_task(tmp_path / "task", {s: [json.loads(x) for x in (tiny_task / f"{s}.jsonl").read_text().splitlines()]
                                          for s in ("train", "dev", "test")})
    out = tmp_path / "out"
    killed_after_step_2(saved_ckpt(task, tiny_model, out), monkeypatch)
    with open(task / "train.jsonl", "a") as f:  # the same path, other data
        f.write(json.dumps(task_records(1, 5)[0]) + "\n")
    with pytest.raises(UserError, match="inputs changed since it was written: data: train.jsonl \\(changed\\)"):
        train.main(saved_ckpt(task, tiny_model, out) + ["--resume"])


def test_resume_after_the_base_weights_changed_is_refused_naming_the_file(tiny_task, tiny_model, tmp_path,
                                                                         monkeypatch):
    import shutil
    model = Path(shutil.copytree(tiny_model, tmp_path / "model"))
    out = tmp_path / "out"
    killed_after_step_2(saved_ckpt(tiny_task, model, out), monkeypatch)
    weights = torch.load(model / "consolidated.00.pth")
    weights["norm.weight"] = weights["norm.weight"] + 1  # same shapes, other values
    torch.save(weights, model / "consolidated.00.pth")
    with pytest.raises(UserError, match="model: consolidated.00.pth \\(changed\\)"):
        train.main(saved_ckpt(tiny_task, model, out) + ["--resume"])


def test_resume_takes_the_same_settings_written_otherwise(tiny_task, tiny_model, tmp_path, monkeypatch):
    out = tmp_path / "out"
    argv = saved_ckpt(tiny_task, tiny_model, out)
    i = argv.index("--r")
    argv = argv[:i] + argv[i + 2:]  # --r absent: PARA's 12
    killed_after_step_2(argv, monkeypatch)
    i = argv.index("--ckpt_dir")
    argv[i + 1] = str(argv[i + 1]) + "/"  # a trailing slash
    train.main(argv + ["--r", "12", "--resume"])  # the same run, spelled otherwise: resumed, not refused
    assert [r["step"] for r in read_log(out / "log.jsonl") if "loss" in r] == [1, 2, 3, 4]


@pytest.mark.parametrize("edit", ["missing adapter", "extra key"])
def test_a_hand_edited_checkpoint_is_refused(edit, tiny_task, tiny_model, tmp_path, monkeypatch):
    out = tmp_path / "out"
    killed_after_step_2(saved_ckpt(tiny_task, tiny_model, out), monkeypatch)
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    if edit == "missing adapter":
        del ckpt["adapter"]
    else:
        ckpt["mine"] = 1
    torch.save(ckpt, out / "ckpt.pt")
    with pytest.raises(UserError, match="not a checkpoint that train.py wrote"):
        train.main(saved_ckpt(tiny_task, tiny_model, out) + ["--resume"])


def test_resume_after_the_log_was_emptied_never_pads_it_with_nul_bytes(tiny_task, tiny_model, tmp_path, capsys,
                                                                      monkeypatch):
    out = tmp_path / "out"
    killed_after_step_2(saved_ckpt(tiny_task, tiny_model, out), monkeypatch)
    (out / "log.jsonl").write_text("")
    train.main(saved_ckpt(tiny_task, tiny_model, out) + ["--resume"])
    text = (out / "log.jsonl").read_text()
    assert "\0" not in text and [r["step"] for r in read_log(out / "log.jsonl")][0] == 3
    assert "edited or emptied" in capsys.readouterr().out


def test_ctrl_c_says_where_the_checkpoint_is_and_how_to_resume(tiny_task, tiny_model, tmp_path, monkeypatch):
    out = tmp_path / "out"
    lr_at = train.lr_at

    def interrupted(step, *args):
        if step == 3:  # the checkpoint of step 2 is written
            raise KeyboardInterrupt
        return lr_at(step, *args)
    monkeypatch.setattr(train, "lr_at", interrupted)
    with pytest.raises(train.Interrupted, match=f"interrupted at step 3: {re.escape(str(out / 'ckpt.pt'))} holds "
                                                "step 2. Continue with: python .*--resume"):
        train.main(saved_ckpt(tiny_task, tiny_model, out))


# -----------------------------------------------------------------------------
# lengths


def test_every_split_whose_prompts_are_cut_is_counted_and_said(tiny_task, tiny_model, tmp_path, capsys):
    records = task_records(4, 3)
    long = dict(records[0], prompt=" ".join(["red"] * 70) + " Answer:")  # longer than the context of 64
    task = write_task(tmp_path / "task", {"train": records, "dev": records, "test": [long] + records})
    train.main(quick(task, tiny_model, tmp_path / "out"))
    said = capsys.readouterr().out
    assert "note: 1 test prompts lose tokens from the left" in said


def test_max_new_tokens_that_leaves_prompts_under_half_the_context_is_refused_before_training(tiny_task, tiny_model,
                                                                                                tmp_path, monkeypatch):
    monkeypatch.setattr(train, "load", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(UserError, match="--max_new_tokens 40 would leave .*half of the model's context of 64"):
        train.main(quick(tiny_task, tiny_model, tmp_path / "out", "--max_new_tokens", 40))


def test_targets_cut_by_max_seq_len_are_said_and_a_window_too_small_for_any_target_is_refused(tiny_task, tiny_model,
                                                                                                tmp_path, capsys):
    records = [dict(r, target=" A A A") for r in task_records(8, 0)]  # 3 tokens, and EOS
    task = write_task(tmp_path / "task", {"train": records, "dev": records, "test": records})
    train.main(quick(task, tiny_model, tmp_path / "out", "--max_seq_len", 3))  # 1 target token, EOS, 1 of the prompt
    assert "note: 8 train targets keep only their first 1 tokens" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        train.main(quick(tiny_task, tiny_model, tmp_path / "out2", "--max_seq_len", 2))
    assert "--max_seq_len must be at least 3" in capsys.readouterr().err


def test_generation_and_training_cut_a_long_prompt_by_one_rule_that_keeps_bos():
    class Args:
        chat, truncate, max_new_tokens = False, True, 4

    class Tokenizer:
        bos_id = 1

        def encode(self, text):
            return [1] + [int(w) for w in text.split()]
    assert generate.encode(["5 6 7 8 9"], Tokenizer(), Args, context=7) == [[1, 8, 9]]
    assert train.truncate_left is generate.truncate_left


# -----------------------------------------------------------------------------
# numbers out of range


@pytest.mark.parametrize("argv, message", [
    (("--seeds", "1,1"), "names a seed twice"),
    (("--seed", str(2**70)), r"a seed must lie in \[0, 2\*\*32\)"),
])
def test_bad_seeds_are_refused_before_anything_trains(argv, message, tiny_task, tiny_model, tmp_path, capsys):
    with pytest.raises(SystemExit):
        train.main(quick(tiny_task, tiny_model, tmp_path / "out", *argv))
    assert message.replace("\\", "") in capsys.readouterr().err.replace("\\", "") or \
        re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "out").exists()


def test_a_temperature_as_small_as_1e_45_samples_the_best_token_instead_of_failing():
    logits = torch.tensor([[1.0, 3.0, 2.0], [0.5, -1.0, 0.25]])
    for temperature in (1e-45, 1e-30):
        assert generate.sample(logits, temperature=temperature, generator=torch.Generator().manual_seed(0)).tolist() \
            == [1, 0]


def test_more_beams_than_half_the_vocabulary_is_refused():
    with pytest.raises(UserError, match="num_beams 33 needs a vocabulary of at least 66 tokens; this model's has 64"):
        generate.generate(wide_model(), NoText(), [[1, 2]], num_beams=33, max_new_tokens=2)


def test_a_kv_cache_larger_than_the_free_memory_is_refused_up_front(monkeypatch):
    monkeypatch.setattr(generate, "available_memory", lambda device: 100)  # 100 bytes free
    with pytest.raises(UserError, match="KV cache needs .* GiB \\(1 prompts x 3 beams x 10 positions\\) and 0.0 GiB"):
        generate.generate(wide_model(), NoText(), [[1, 2]], num_beams=3, max_new_tokens=8, eos_id=-1)


@pytest.mark.parametrize("size", [2**26, 10**30])
def test_an_adapter_file_whose_config_is_absurd_is_refused_before_anything_is_allocated(size, tmp_path):
    adapters.save_adapter(adapted("para"), tmp_path / "a.pt")
    payload = torch.load(tmp_path / "a.pt", weights_only=True)
    payload["config"]["r"] = size
    torch.save(payload, tmp_path / "a.pt")
    with pytest.raises(UserError, match=r"'r' must lie in \[1, 1,048,576\]"):
        adapters.load_adapter(wide_model(), tmp_path / "a.pt")


def test_an_adapter_file_whose_config_does_not_fit_its_tensors_is_refused_before_building(tmp_path):
    adapters.save_adapter(adapted("para"), tmp_path / "a.pt")
    payload = torch.load(tmp_path / "a.pt", weights_only=True)
    payload["config"]["r"] = R + 1
    torch.save(payload, tmp_path / "a.pt")
    model = wide_model()
    with pytest.raises(UserError, match="don't fit the adapter its config describes"):
        adapters.load_adapter(model, tmp_path / "a.pt")
    assert not getattr(model, "adapter_config", None)  # nothing was built on the model


# -----------------------------------------------------------------------------
# text and files


class NoText:
    pad_id, eos_id, bos_id = 0, -1, -1

    def decode(self, ids):
        return " ".join(map(str, ids))


def test_a_lone_surrogate_in_data_is_refused_naming_the_line(tmp_path):
    task = write_task(tmp_path / "task", {"train": task_records(2, 0), "dev": task_records(2, 1),
                                          "test": task_records(2, 2)})
    lines = (task / "dev.jsonl").read_text().splitlines()
    lines[1] = lines[1].replace("Answer:", "Answer:\\ud800")
    (task / "dev.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(UserError, match="dev.jsonl, line 2: \"prompt\" holds a lone surrogate"):
        train.load_split(task, "dev")


def test_a_prompt_that_is_not_utf8_is_refused(tiny_model, capsys):
    with pytest.raises(SystemExit):
        generate.main(["--ckpt_dir", str(tiny_model), "--prompt", "caf\udce9"])  # b"caf\xe9" from a Latin-1 shell
    assert "prompt 0 is not valid UTF-8 text (character 3)" in capsys.readouterr().err


def test_a_fifo_is_refused_as_an_adapter_or_a_prompts_file_instead_of_waiting_forever(tmp_path, capsys):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    with pytest.raises(UserError, match="is not a regular file"):
        adapters.read_adapter_file(fifo)
    with pytest.raises(UserError, match="is not a regular file"):
        generate.read_prompts_file(fifo)


def test_an_error_quotes_at_most_a_line_of_a_huge_field(tmp_path):
    from test_load import gguf_metadata_file
    path = gguf_metadata_file(tmp_path / "model.gguf", architecture="x" * 1_000_000)
    with pytest.raises(UserError) as e:
        loaders.load(str(path))
    assert len(str(e.value)) < 300 and "1,000,002 characters" in str(e.value)


def test_a_missing_adapter_file_is_reported_before_the_model_loads(tiny_model, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(generate, "load", lambda *a, **k: pytest.fail("the model was loaded first"))
    with pytest.raises(SystemExit):
        generate.main(["--ckpt_dir", str(tiny_model), "--prompt", "red", "--adapter", str(tmp_path / "none.pt")])
    assert "not found" in capsys.readouterr().err


# -----------------------------------------------------------------------------
# adapters and the base model


def test_an_adapter_trained_on_other_weights_of_the_same_shape_is_refused_unless_asked(tiny_task, tiny_model,
                                                                                       tmp_path, capsys):
    import shutil
    other = Path(shutil.copytree(tiny_model, tmp_path / "other"))
    weights = torch.load(other / "consolidated.00.pth")
    weights["norm.weight"] = weights["norm.weight"] * 2
    torch.save(weights, other / "consolidated.00.pth")
    train.main(quick(tiny_task, tiny_model, tmp_path / "out"))
    adapter = str(tmp_path / "out" / "adapter.pt")
    argv = ["--ckpt_dir", str(other), "--prompt", "red", "--adapter", adapter, "--max_new_tokens", "2"]
    with pytest.raises(SystemExit):
        generate.main(argv)
    assert "trained on other weights" in capsys.readouterr().err
    generate.main(argv + ["--any_base"])
    assert "warning: " in capsys.readouterr().out
    generate.main(["--ckpt_dir", str(tiny_model) + "/", "--prompt", "red", "--adapter", adapter, "--max_new_tokens", "2"])


# -----------------------------------------------------------------------------
# many prompts: batches within memory, in order


def test_a_big_prompts_file_is_generated_in_batches_in_the_files_order(tiny_model, tmp_path, capsys, monkeypatch):
    words = ["red", "blue", "cat", "dog", "green"]
    lines = [" ".join(words[(i + j) % 5] for j in range(1 + i % 4)) for i in range(23)]
    (tmp_path / "prompts.txt").write_text("\n".join(lines) + "\n")
    argv = ["--ckpt_dir", str(tiny_model), "--prompts_file", str(tmp_path / "prompts.txt"), "--max_new_tokens", "3",
            "--json", "--dtype", "fp32"]
    generate.main(argv + ["--batch_size", "23"])  # one batch
    one = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    sizes = []
    generate_one = generate.generate
    monkeypatch.setattr(generate, "generate", lambda m, t, p, *a, **k: sizes.append(len(p)) or generate_one(m, t, p, *a, **k))
    per_prompt = generate.kv_cache_bytes(loaders.read_args(str(tiny_model)), 1, 1 + 4 + 3, torch.float32)
    monkeypatch.setattr(generate, "available_memory", lambda device: 4 * 5 * per_prompt + 7)  # a quarter holds 5
    generate.main(argv)
    batched = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert sizes == [5, 5, 5, 5, 3]
    same = lambda results: [(r["prompt"], r["tokens"], r["completion"]) for r in results]  # not tokens_per_s
    assert same(batched) == same(one) and [b["prompt"] for b in batched] == lines


# -----------------------------------------------------------------------------
# bench.py and study.py refuse bad flags before they run


@pytest.mark.parametrize("flag, value", [("--prompt_len", "0"), ("--prompt_len", "-5"), ("--runs", "0"),
                                         ("--runs", "-1"), ("--threads", "0"), ("--batch", "0"),
                                         ("--new_tokens", "0")])
def test_bench_refuses_a_count_below_one(flag, value, capsys):
    with pytest.raises(SystemExit):
        bench.parse_args([flag, value])
    assert f"{flag} must be at least 1" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (("--lrs", "2e-3"), "2e-3 is not a half decade"),
    (("--lrs", "abc"), "abc is not a half decade"),
    (("--seeds", "a"), "--seeds must be comma-separated whole numbers"),
    (("--train_examples", "-1"), "--train_examples must be at least 0"),
    (("--epochs", "0"), "--epochs must be at least 1"),
    (("--bootstrap", "0"), "--bootstrap must be at least 1"),
    (("--extra", "--limit_eval 2"), "--extra sets --limit_eval"),
    (("--extra=--no_such_flag",), "train.py refuses these flags"),
])
def test_study_refuses_a_bad_flag_before_the_first_run(argv, message, tiny_model, capsys, monkeypatch):
    monkeypatch.setattr(study, "run", lambda *a, **k: pytest.fail("a run started"))
    with pytest.raises(SystemExit):
        study.main(["--ckpt_dir", str(tiny_model), *argv])
    assert message in capsys.readouterr().err


def test_study_resolves_its_paths_against_the_callers_folder_and_runs_train_py_there(tiny_model, tmp_path,
                                                                                   monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = study.parse_args(["--ckpt_dir", os.path.relpath(tiny_model, tmp_path), "--out", "rel/study"])
    assert args.out == str(tmp_path / "rel" / "study") and os.path.isabs(args.ckpt_dir)
    cmd = study.command(args, args.para, "1e-3", 1, "test")
    assert cmd[1] == str(study.ROOT / "train.py") and str(tmp_path / "rel" / "study") in cmd[cmd.index("--out_dir") + 1]


def test_a_task_given_as_a_dot_names_the_default_out_folder_after_the_folder(tiny_task, tiny_model, tmp_path,
                                                                          monkeypatch):
    monkeypatch.chdir(tiny_task)
    argv = [a for a in quick(".", tiny_model, "unused") if a not in ("--out_dir", "unused")]
    train.main(argv)
    assert (tiny_task / "out" / f"{tiny_task.name}-para" / "results.json").exists()


# -----------------------------------------------------------------------------
# bf16 where the CPU has it


def test_dtype_auto_is_bf16_only_on_a_cpu_with_native_bf16_and_bf16_elsewhere_warns(monkeypatch, capsys):
    cpu = torch.device("cpu")
    monkeypatch.setattr(loaders, "cpu_flags", lambda: {"avx2", "fma"})
    assert loaders.resolve_dtype("auto", cpu) == torch.float32
    assert loaders.resolve_dtype("bf16", cpu) == torch.bfloat16
    assert "no native bf16" in capsys.readouterr().err
    for native in ("avx512_bf16", "amx_bf16"):
        monkeypatch.setattr(loaders, "cpu_flags", lambda: {"avx2", native})
        assert loaders.resolve_dtype("auto", cpu) == torch.bfloat16
        loaders.resolve_dtype("bf16", cpu)
        assert capsys.readouterr().err == ""


def test_bf16_weights_compute_under_bf16_autocast_and_other_dtypes_under_none():
    # train.py, bench.py and study.py's prompt use all take this context: an fp32 adapter tensor meets bf16 weights
    cpu, x, w = torch.device("cpu"), torch.randn(2, 8), torch.randn(8, 3, dtype=torch.bfloat16)
    with loaders.autocast_for(cpu, torch.bfloat16):
        assert torch.is_autocast_enabled("cpu") and (x @ w).dtype == torch.bfloat16
    for dtype in (torch.float32, torch.float16):
        with loaders.autocast_for(cpu, dtype):
            assert not torch.is_autocast_enabled("cpu")
    context = loaders.autocast_for(cpu, torch.bfloat16)  # train.py enters one context at every step
    for _ in range(2):
        with context:
            assert torch.is_autocast_enabled("cpu")
        assert not torch.is_autocast_enabled("cpu")
