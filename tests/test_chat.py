"""Chat tasks (conversations, the loss on the assistant's tokens only, one example per reply, the VG never seeing the
reply it is trained on), their preparation from UltraChat and ShareGPT files, and MMLU scored as HF's argmax."""
import json

import pytest
import torch

import adapters
import mmlu
import train
from data import load_split
from data.mmlu.prepare import prepare as prepare_mmlu
from data.ultrachat.prepare import prepare as prepare_ultrachat
from errors import UserError
from loaders import load
from test_train import flags, tiny_model, write_task  # noqa: F401 (a fixture)

CONVERSATION = {"messages": [{"role": "system", "content": "red blue"},
                             {"role": "user", "content": "cat dog fox"},
                             {"role": "assistant", "content": "A"},
                             {"role": "user", "content": "red green owl"},
                             {"role": "assistant", "content": "B"}]}


def test_a_conversation_is_one_example_per_reply_its_prompt_all_before_it_its_loss_the_replys_tokens(tiny_model):
    _, tokenizer = load(str(tiny_model))
    examples, _, _ = train.tokenize([CONVERSATION], tokenizer, 64)
    assert len(examples) == 2  # two replies
    m = CONVERSATION["messages"]
    for (prompt, target), k in zip(examples, (2, 4)):
        assert prompt == tokenizer.format_chat(m[:k])  # the conversation up to the reply, the reply's turn opened
        full = tokenizer.format_chat(m[:k + 1], add_generation_prompt=False)
        assert prompt + target == full  # the reply's tokens and the end of its turn (Llama 2's: " ", EOS)
        assert target[-1] == tokenizer.eos_id and tokenizer.decode(target).strip() == m[k]["content"]


def test_the_vector_generator_never_sees_the_reply_it_is_trained_to_write(tiny_model):
    model, tokenizer = load(str(tiny_model))
    adapters.add_adapter(model, "para", r=4)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if adapters.is_adapter_param(name):
                p.add_(0.3 * torch.randn_like(p))
    other = json.loads(json.dumps(CONVERSATION))
    other["messages"][2]["content"] = "B cat cat dog"  # another first reply
    seen = []
    hook = model.layers[1].vector_generator.register_forward_hook(lambda m, inputs, out: seen.append(out))
    for conversation in (CONVERSATION, other):
        (prompt, target), _ = train.tokenize([conversation], tokenizer, 64)[0]
        tokens, _, prompt_len = train.collate([(prompt, target)], tokenizer.pad_id, "cpu")
        with torch.no_grad():
            model(tokens, prompt_len=prompt_len)
    hook.remove()
    assert all(torch.equal(a, b) for a, b in zip(*seen))  # the same vectors, whatever the reply
    assert not torch.equal(tokens, train.collate([train.tokenize([CONVERSATION], tokenizer, 64)[0][0]],
                                                 tokenizer.pad_id, "cpu")[0])  # though the rows differ


def test_a_chat_task_trains_on_conversations_and_is_scored_by_its_dev_loss(tiny_model, tmp_path, capsys):
    conversations = [{"messages": [{"role": "user", "content": " ".join(w)},
                                   {"role": "assistant", "content": "A" if w[0] == "red" else "B"}]}
                     for w in [("red", "cat", "dog"), ("blue", "owl", "fox"), ("red", "red", "gold")] * 8]
    task = write_task(tmp_path / "chat", {"train": conversations, "dev": conversations[:4], "test": conversations[:4]})
    results = train.main(flags(task, tiny_model, tmp_path / "out", "para", "--max_steps", 3, "--eval_interval", 3))
    assert results["dev"] is None and results["test"] is None and results["best_dev_loss"] > 0
    assert results["train_examples"] == 24


@pytest.mark.parametrize("messages, problem", [
    ([], "non-empty array"),
    ([{"role": "user", "content": "red"}], "never reaches an assistant's reply"),
    ([{"role": "robot", "content": "red"}, {"role": "assistant", "content": "A"}], "has role \"robot\""),
    ([{"role": "user", "content": "red"}, {"role": "system", "content": "x"}, {"role": "assistant", "content": "A"}],
     "only the first message may be one"),
])
def test_a_bad_conversation_is_refused_with_its_line(messages, problem, tmp_path):
    good = {"messages": CONVERSATION["messages"][:3]}
    task = write_task(tmp_path / "chat", {"train": [good, {"messages": messages}], "dev": [good], "test": [good]})
    with pytest.raises(UserError, match=f"train.jsonl, line 2: .*{problem}"):
        load_split(task, "train")


def test_ultrachat_and_sharegpt_files_prepare_to_conversations(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "ultrachat.jsonl").write_text("".join(json.dumps({"id": i, "data": [f"q{i}", f"a{i}", f"q{i}b", f"a{i}b"]})
                                                 + "\n" for i in range(6)))
    (src / "sharegpt.json").write_text(json.dumps([{"conversations": [
        {"from": "system", "value": "s"}, {"from": "human", "value": f"h{i}"}, {"from": "gpt", "value": f"g{i}"}]}
        for i in range(4)]))
    prepare_ultrachat(src=src, out=tmp_path / "out", n_dev=2, n_test=2)
    splits = {s: load_split(tmp_path / "out", s) for s in ("train", "dev", "test")}
    assert [len(splits[s]) for s in ("train", "dev", "test")] == [6, 2, 2]
    every = [m for s in splits.values() for r in s for m in r["messages"]]
    assert {"role": "user", "content": "q0"} in every and {"role": "assistant", "content": "g3"} in every
    assert {"role": "system", "content": "s"} in every
    (src / "bad.jsonl").write_text(json.dumps({"conversations": [{"from": "robot", "value": "x"}]}) + "\n")
    with pytest.raises(UserError, match="bad.jsonl, line 1: a ShareGPT turn needs"):
        prepare_ultrachat(src=src, out=tmp_path / "out2", n_dev=2, n_test=2)


# -----------------------------------------------------------------------------
# MMLU

ITEMS = {  # a few questions of our own, in the official layout: {split}/{subject}_{split}.csv
    ("dev", "astronomy"): [["Which planet is closest to the Sun?", "Venus", "Mercury", "Earth", "Mars", "B"]],
    ("test", "astronomy"): [["What is the Sun?", "A planet", "A moon", "A star", "A comet", "C"],
                            ["How many moons does Earth have?", "0", "1", "2", "3", "B"],
                            ["Which is a gas giant?", "Jupiter", "Mercury", "Mars", "Venus", "A"]],
    ("dev", "high_school_mathematics"): [["What is 2 + 2?", "3", "4", "5", "6", "B"]],
    ("test", "high_school_mathematics"): [["What is 3 * 3?", "6", "8", "9", "12", "C"],
                                          ["What is 10 / 2?", "2", "5", "8", "20", "B"],
                                          ["Which is prime?", "4", "6", "9", "7", "D"]],
}


@pytest.fixture(scope="module")
def mmlu_items(tmp_path_factory):
    import csv
    src, out = tmp_path_factory.mktemp("mmlu_src"), tmp_path_factory.mktemp("mmlu")
    for (split, subject), rows in ITEMS.items():
        (src / split).mkdir(exist_ok=True)
        with open(src / split / f"{subject}_{split}.csv", "w", newline="") as f:
            csv.writer(f).writerows(rows)
    prepare_mmlu(src=src, out=out)
    return {s: [json.loads(x) for x in (out / f"{s}.jsonl").read_text().splitlines()] for s in ("dev", "test")}


@pytest.mark.parametrize("shots", [0, 1])
def test_mmlu_chooses_the_letter_hfs_log_probabilities_choose(mmlu_items, smollm, shots):
    from transformers import AutoModelForCausalLM

    from loaders import default_model_path
    model, tokenizer = smollm
    path = default_model_path()
    import os
    hf = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                              dtype=torch.float32).eval()
    test, dev = mmlu_items["test"], mmlu_items["dev"]
    result = mmlu.evaluate(model, tokenizer, test, dev, shots=shots, batch_size=4)
    prompts = [mmlu.prompt_ids(tokenizer, q, [d for d in dev if d["subject"] == q["subject"]][:shots], 8192)
               for q in test]
    ours, _ = mmlu.choose(model, tokenizer, prompts)
    letters = mmlu.letter_ids(tokenizer)
    with torch.no_grad():
        theirs = [mmlu.LETTERS[int(hf(torch.tensor([p])).logits[0, -1, letters].argmax())] for p in prompts]
    assert ours == theirs
    assert tokenizer.decode(prompts[0]).startswith("The following are multiple choice questions (with answers) about "
                                                   "astronomy.\n\n")
    assert set(result["subjects"]) == {"astronomy", "high_school_mathematics"} and result["questions"] == 6
    right = [o == q["answer"] for o, q in zip(ours, test)]
    assert result["micro"] == pytest.approx(100 * sum(right) / 6)
    assert result["macro"] == pytest.approx(50 * (sum(right[:3]) / 3 + sum(right[3:]) / 3))
