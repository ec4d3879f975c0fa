"""
COPA (SuperGLUE) for PARA fine-tuning: writes train.jsonl, dev.jsonl and test.jsonl next to this file.

Splits (paper, Appendix A): train = the official train set (400). The official validation set (100) is
shuffled with random.Random(seed) and halved: dev = the first 50, test = the other 50; with an odd count,
test gets the extra one. The official test set has no labels and is not used.

    python data/copa/prepare.py                              # downloads COPA.zip from SuperGLUE
    python data/copa/prepare.py --src ../shared/assets/copa  # or a folder or zip with train.jsonl, val.jsonl
"""
import argparse
import sys
from pathlib import Path

if __name__ == "__main__":  # run as a script: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from data import JSON_TYPES, download, read_jsonl, shown, split_off, write_splits
from errors import UserError

URL = "https://dl.fbaipublicfiles.com/glue/superglue/data/v2/COPA.zip"
HERE = Path(__file__).resolve().parent

# The prompt; the target is " choice1" or " choice2". Train idx 0 as prompt + target:
#   Premise: My body cast a shadow over the grass.
#   Question: What was the cause?
#   choice1: The sun was rising.
#   choice2: The grass was cut.
#   Answer: choice1
TEMPLATE = "Premise: {premise}\nQuestion: What was the {question}?\nchoice1: {choice1}\nchoice2: {choice2}\nAnswer:"


def problem(example):
    """What is wrong with one line of an official COPA file, or None. Checked before any file is written: a label
    of 7 would otherwise become the target " choice8"."""
    if not isinstance(example, dict):
        return f"expected a JSON object, got {JSON_TYPES[type(example)]}"
    for key in ("premise", "choice1", "choice2", "question", "label", "idx"):
        if key not in example:
            return f'missing "{key}"; a COPA line has premise, choice1, choice2, question, label and idx'
    for key in ("premise", "choice1", "choice2"):
        if not isinstance(example[key], str):
            return f'"{key}" must be a string, got {JSON_TYPES[type(example[key])]}'
    if example["question"] not in ("cause", "effect"):
        return f'"question" must be "cause" or "effect", got {shown(example["question"])}'
    if type(example["label"]) is not int or example["label"] not in (0, 1):  # type(): true/false are not labels
        return f'"label" must be 0 (choice1) or 1 (choice2), got {shown(example["label"])}'
    return None


def to_record(example):
    label = f"choice{example['label'] + 1}"  # label 0 -> choice1
    return {"prompt": TEMPLATE.format(**example), "target": " " + label, "label": label, "id": example["idx"]}


def prepare(src=None, out=HERE, seed=0, allow_missing_train=False):
    """Write out/{train,dev,test}.jsonl from src (a folder or zip; None downloads the official zip)."""
    src = src or download(URL, Path(out) / "COPA.zip")
    train = read_jsonl(src, "train.jsonl", problem, optional=allow_missing_train)
    val = read_jsonl(src, "val.jsonl", problem)
    dev, test = split_off(val, len(val) // 2, seed)
    splits = {"train": train, "dev": dev, "test": test}
    return write_splits(out, {split: [to_record(e) for e in examples] for split, examples in splits.items()})


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--src", help="folder or zip with train.jsonl and val.jsonl (default: download)")
    parser.add_argument("--out", default=HERE, help="folder for train/dev/test.jsonl (default: this file's)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the dev/test halving (default: 0)")
    parser.add_argument("--allow_missing_train", action="store_true",
                        help="if src has no train.jsonl, write an empty train.jsonl instead of failing")
    try:
        prepare(**vars(parser.parse_args()))
    except UserError as e:  # anything else is a bug, and keeps its traceback
        sys.exit(f"error: {e}")
