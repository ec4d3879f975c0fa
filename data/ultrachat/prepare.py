"""
UltraChat (Ding et al. 2023), the paper's instruction-tuning data (Table 3), as a chat task: train.jsonl, dev.jsonl
and test.jsonl next to this file, one conversation per line, {"messages": [{"role": ..., "content": ...}, ...]}.
train.py trains on a chat task with the loss on the assistant's tokens only, one example per reply.

    python data/ultrachat/prepare.py                          # downloads UltraChat's first file (train_0.jsonl)
    python data/ultrachat/prepare.py --src conversations.jsonl --n_dev 50 --n_test 50   # or your own

A source is a file or a folder of .json/.jsonl files, each a JSON array or one conversation per line, in any of:
- UltraChat: {"id": ..., "data": ["user turn", "assistant turn", "user turn", ...]};
- UltraChat 200k (HuggingFaceH4, exported to JSON lines) or this project's own: {"messages": [{"role", "content"}]};
- ShareGPT: {"conversations": [{"from": "system"|"human"|"gpt", "value": ...}, ...]}.
--n_dev and --n_test conversations (500 each by default), drawn with --seed, become dev and test; the rest train.
"""
import json
import sys
from pathlib import Path

if __name__ == "__main__":  # run as a script: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from data import FIX, _decode, command_line, conversation_problem, download, shown, split_off, write_splits
from errors import UserError

HERE = Path(__file__).resolve().parent
URL = "https://huggingface.co/datasets/stingning/ultrachat/resolve/main/train_0.jsonl"
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


def to_messages(item, where):
    """A source's conversation as [{"role", "content"}], checked; a UserError names `where` and what is wrong."""
    if isinstance(item, dict) and isinstance(item.get("messages"), list):
        messages = item["messages"]
    elif isinstance(item, dict) and isinstance(item.get("data"), list):  # UltraChat: turns alternate, user first
        messages = [{"role": ("user", "assistant")[i % 2], "content": turn} for i, turn in enumerate(item["data"])]
    elif isinstance(item, dict) and isinstance(item.get("conversations"), list):
        turns = item["conversations"]
        if not all(isinstance(t, dict) and t.get("from") in SHAREGPT_ROLES for t in turns):
            raise UserError(f"{where}: a ShareGPT turn needs \"from\" (system, human or gpt) and \"value\"; {FIX}")
        messages = [{"role": SHAREGPT_ROLES[t["from"]], "content": t.get("value")} for t in turns]
    else:
        raise UserError(f"{where}: not a conversation (expected \"messages\", UltraChat's \"data\" or ShareGPT's "
                        f"\"conversations\"), got {shown(item)}; {FIX}")
    if problem := conversation_problem(messages):
        raise UserError(f"{where}: {problem}; {FIX}")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def read_conversations(src):
    """Every conversation of a file, or of a folder's .json and .jsonl files, in order."""
    src = Path(src)
    if not src.exists():
        raise UserError(f"--src {src} does not exist; give a conversations file or a folder of them")
    files = sorted(p for p in src.iterdir() if p.suffix in (".json", ".jsonl")) if src.is_dir() else [src]
    conversations = []
    for path in files:
        text = _decode(path.read_bytes(), path)
        if text.lstrip().startswith("["):  # one JSON array
            try:
                items = [(f"{path}, item {i + 1}", x) for i, x in enumerate(json.loads(text))]
            except json.JSONDecodeError as e:
                raise UserError(f"{path}, line {e.lineno}: not valid JSON ({e.msg}); {FIX}") from None
        else:  # JSON lines
            items = []
            for n, line in enumerate(text.split("\n"), 1):
                if line.strip():
                    try:
                        items.append((f"{path}, line {n}", json.loads(line)))
                    except json.JSONDecodeError as e:
                        raise UserError(f"{path}, line {n}: not valid JSON ({e.msg}); {FIX}") from None
        conversations += [{"messages": to_messages(item, where)} for where, item in items]
    if not conversations:
        raise UserError(f"--src {src} holds no conversation")
    return conversations


def prepare(src=None, out=HERE, seed=0, allow_missing_train=False, n_dev=500, n_test=500):
    """Write out/{train,dev,test}.jsonl from src (None downloads UltraChat's first file)."""
    src = src or download(URL, Path(out) / "ultrachat_train_0.jsonl")
    conversations = read_conversations(src)
    if len(conversations) <= n_dev + n_test:
        raise UserError(f"--src holds {len(conversations)} conversations, not more than --n_dev {n_dev} + --n_test "
                        f"{n_test}: nothing would be left to train on; ask for fewer")
    held_out, train = split_off(conversations, n_dev + n_test, seed)
    dev, test = held_out[:n_dev], held_out[n_dev:]
    write_splits(out, {"train": train, "dev": dev, "test": test})


if __name__ == "__main__":
    command_line(prepare, __doc__, HERE, src="conversations", seed="the dev/test draw",
                 n_dev=(500, "conversations for dev"), n_test=(500, "conversations for test"))
