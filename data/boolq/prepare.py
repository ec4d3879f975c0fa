"""
BoolQ (SuperGLUE) for PARA fine-tuning: writes train.jsonl, dev.jsonl and test.jsonl next to this file.

Splits (paper, Appendix A): train = the official train set (9,427). The official validation set (3,270)
is shuffled with random.Random(seed) and halved: dev = the first 1,635, test = the other 1,635; with an
odd count, test gets the extra one. The official test set has no labels and is not used.

    python data/boolq/prepare.py                     # downloads BoolQ.zip from SuperGLUE
    python data/boolq/prepare.py --src BoolQ.zip     # or a folder or zip with train.jsonl, val.jsonl
    python data/boolq/prepare.py --src ../shared/assets/boolq --allow_missing_train  # val only: dev/test
"""
import sys
from pathlib import Path

if __name__ == "__main__":  # run as a script: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from data import command_line, download, field_problem, prepare_superglue, shown

URL = "https://dl.fbaipublicfiles.com/glue/superglue/data/v2/BoolQ.zip"
HERE = Path(__file__).resolve().parent

# The prompt; the target is " True" or " False". Validation idx 0 as prompt + target (passage cut short):
#   Passage: Ethanol fuel -- All biomass goes through at least some of these steps: ...
#   Question: does ethanol take more energy make that produces?
#   Answer (True or False): False
# The passage is "<Wikipedia title> -- <text>"; questions are lower case with no question mark.
TEMPLATE = "Passage: {passage}\nQuestion: {question}?\nAnswer (True or False):"


def problem(example):
    """What is wrong with one line of an official BoolQ file, or None; checked before any file is written."""
    if shape := field_problem(example, "BoolQ", ("question", "passage", "label", "idx"), ("question", "passage")):
        return shape
    if not isinstance(example["label"], bool):  # "False" (a string) would be truthy and read as True
        return f'"label" must be true or false (JSON booleans), got {shown(example["label"])}'
    return None


def to_record(example):
    label = "True" if example["label"] else "False"  # label is a JSON bool
    prompt = TEMPLATE.format(passage=example["passage"], question=example["question"])
    return {"prompt": prompt, "target": " " + label, "label": label, "id": example["idx"]}


def prepare(src=None, out=HERE, seed=0, allow_missing_train=False):
    """Write out/{train,dev,test}.jsonl from src (a folder or zip; None downloads the official zip)."""
    src = src or download(URL, Path(out) / "BoolQ.zip")
    return prepare_superglue(src, out, seed, allow_missing_train, problem, to_record)


if __name__ == "__main__":
    command_line(prepare, __doc__, HERE, src="train.jsonl and val.jsonl", seed="the dev/test halving",
                 train="train.jsonl")
