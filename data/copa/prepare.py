"""
COPA (SuperGLUE) for PARA fine-tuning: writes train.jsonl, dev.jsonl and test.jsonl next to this file.

Splits (paper, Appendix A): train = the official train set (400). The official validation set (100) is
shuffled with random.Random(seed) and halved: dev = the first 50, test = the other 50; with an odd count,
test gets the extra one. The official test set has no labels and is not used.

    python data/copa/prepare.py                              # downloads COPA.zip from SuperGLUE
    python data/copa/prepare.py --src ../shared/assets/copa  # or a folder or zip with train.jsonl, val.jsonl
"""
import sys
from pathlib import Path

if __name__ == "__main__":  # run as a script: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from data import command_line, download, field_problem, prepare_superglue, shown

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
    keys = ("premise", "choice1", "choice2", "question", "label", "idx")
    if shape := field_problem(example, "COPA", keys, strings=("premise", "choice1", "choice2")):
        return shape
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
    return prepare_superglue(src, out, seed, allow_missing_train, problem, to_record)


if __name__ == "__main__":
    command_line(prepare, __doc__, HERE, src="train.jsonl and val.jsonl", seed="the dev/test halving",
                 train="train.jsonl")
