"""
SQuAD v1.1 for PARA fine-tuning: writes train.jsonl, dev.jsonl and test.jsonl next to this file.

Splits (paper, Appendix A): 1,000 questions of the official train set, drawn with random.Random(seed),
become dev and the other 86,599 stay train; the official dev set (10,570 questions) is test.
The paper's Table 1 lists 5.9k test examples, but the official dev set has 10,570 questions and the
paper does not say which subset it kept, so all of them are used.

    python data/squad/prepare.py                               # downloads the two official json files
    python data/squad/prepare.py --src FOLDER                  # or a folder or zip with train-v1.1.json and
                                                               #   dev-v1.1.json (either may be .gz)
    python data/squad/prepare.py --src ../shared/assets/squad --allow_missing_train  # dev only: test
"""
import argparse
import json
import sys
from pathlib import Path

if __name__ == "__main__":  # run as a script: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from data import download, read_source, split_off, write_splits

URL = "https://rajpurkar.github.io/SQuAD-explorer/dataset/"
FILES = ("train-v1.1.json", "dev-v1.1.json")
HERE = Path(__file__).resolve().parent

# The prompt; the target is " " + the first gold answer, and "answers" keeps every gold answer for the metric.
# The first dev question as prompt + target (context cut short):
#   Context: Super Bowl 50 was an American football game to determine the champion of ...
#   Question: Which NFL team represented the AFC at Super Bowl 50?
#   Answer: Denver Broncos
TEMPLATE = "Context: {context}\nQuestion: {question}\nAnswer:"


def to_records(squad):
    """One record per question of an official SQuAD json object, in file order."""
    for article in squad["data"]:
        for paragraph in article["paragraphs"]:
            for qa in paragraph["qas"]:
                answers = [a["text"] for a in qa["answers"]]
                prompt = TEMPLATE.format(context=paragraph["context"].strip(), question=qa["question"].strip())
                yield {"prompt": prompt, "target": " " + answers[0].strip(), "answers": answers, "id": qa["id"]}


def prepare(src=None, out=HERE, seed=0, allow_missing_train=False, n_dev=1000):
    """Write out/{train,dev,test}.jsonl from src (a folder or zip; None downloads the official files)."""
    if src is None:
        for name in FILES:
            download(URL + name, Path(out) / name)
        src = out
    train_text = read_source(src, "train-v1.1.json", optional=allow_missing_train)  # "" if missing: no train, no dev
    train = list(to_records(json.loads(train_text))) if train_text else []
    test = list(to_records(json.loads(read_source(src, "dev-v1.1.json"))))
    if train and len(train) <= n_dev:
        raise ValueError(f"train has {len(train)} questions; cannot draw a dev set of {n_dev} from it")
    dev, train = split_off(train, n_dev, seed)
    return write_splits(out, {"train": train, "dev": dev, "test": test})


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--src", help="folder or zip with train-v1.1.json and dev-v1.1.json (default: download)")
    parser.add_argument("--out", default=HERE, help="folder for train/dev/test.jsonl (default: this file's)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the dev draw from train (default: 0)")
    parser.add_argument("--allow_missing_train", action="store_true",
                        help="if src has no train-v1.1.json, write empty train and dev files instead of failing")
    parser.add_argument("--n_dev", type=int, default=1000, help="questions moved from train to dev (default: 1000)")
    try:
        prepare(**vars(parser.parse_args()))
    except (OSError, ValueError) as e:
        sys.exit(f"error: {e}")
