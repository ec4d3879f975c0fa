"""
SQuAD v1.1 for a small model (task "squad-small"): writes train.jsonl, dev.jsonl and test.jsonl next to this file,
all three from the official dev file, dev-v1.1.json (48 articles, 10,570 questions).

How this differs from the paper's splits (Appendix A, data/squad/prepare.py, task "squad"): there, train and dev
come from the official train set (1,000 of its questions become dev, the other 86,599 train) and the whole
official dev set is test. Here the official train set is not used at all. The articles of the official dev set
are shuffled with random.Random(seed) and given out whole: to test until it holds at least --n_test (1,000)
questions, then to dev until it holds at least --n_dev (300), and the rest to train. No article, so no passage,
is in two splits: a question's context is a paragraph that other questions share, and splitting by question
would test on passages seen in training. Train, dev and test are therefore all Wikipedia articles of the dev
set, train is about a tenth of the paper's, and test is another, smaller set than the paper's: scores are not
comparable with the paper's SQuAD numbers, only with each other.

Why: the official training file is not available offline here, only the dev file; and the model this protocol
is for (SmolLM2-135M, trained and evaluated on a CPU) can neither train on 86k questions nor decode 10,570 test
answers with beam search in a run of reasonable length. Train is written in an order shuffled with the same
seed, so that its first N lines are a random sample of questions from many articles (a run may train on a
prefix); dev and test keep the file order.

With the official file and seed 0: test 1,582 questions (4 articles), dev 403 (2), train 8,585 (42).
Whole articles overshoot the thresholds (one article has 810 questions); seed 1 gives test 1,013, dev 530.

    python data/squad_small/prepare.py                              # downloads the official dev-v1.1.json
    python data/squad_small/prepare.py --src ../shared/assets/squad  # or a folder or zip with dev-v1.1.json(.gz)
"""
import random
import sys
from pathlib import Path

if __name__ == "__main__":  # run as a script: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from data import command_line, download, read_json, write_splits
from data.squad.prepare import URL, article_records, articles
from errors import UserError

HERE = Path(__file__).resolve().parent
FILE = "dev-v1.1.json"


def prepare(src=None, out=HERE, seed=0, n_test=1000, n_dev=300, allow_missing_train=False):
    """Write out/{train,dev,test}.jsonl from src (a folder or zip; None downloads the official dev file).
    allow_missing_train is accepted for prepare_task's sake and does nothing: no training file is read."""
    if src is None:
        download(URL + FILE, Path(out) / FILE)
        src = out
    squad, where = read_json(src, FILE)
    per_article = [article_records(article, where) for article in articles(squad, where)]  # in file order

    rng = random.Random(seed)
    order = list(range(len(per_article)))
    rng.shuffle(order)
    # deal whole articles: to test until it holds n_test questions, then to dev until n_dev, the rest to train
    chosen = {"train": [], "dev": [], "test": []}  # article indices
    held = {"train": 0, "dev": 0, "test": 0}  # questions
    for a in order:
        split = "test" if held["test"] < n_test else "dev" if held["dev"] < n_dev else "train"
        chosen[split].append(a)
        held[split] += len(per_article[a])
    if held["test"] < n_test or held["dev"] < n_dev or not held["train"]:
        raise UserError(f"{where} has {sum(held.values())} questions in {len(per_article)} articles: too few for a "
                        f"test set of {n_test} (--n_test), a dev set of {n_dev} (--n_dev) and a train set of the rest")

    # dev and test in file order; train shuffled, so that any prefix of it samples many articles
    splits = {split: [r for i in sorted(chosen[split]) for r in per_article[i]] for split in chosen}
    rng.shuffle(splits["train"])
    print(f"squad-small, seed {seed}: " + ", ".join(
        f"{split} {len(splits[split]):,} questions ({len(chosen[split])} articles)" for split in splits))
    return write_splits(out, splits)


if __name__ == "__main__":
    command_line(prepare, __doc__, HERE, src="dev-v1.1.json or dev-v1.1.json.gz",
                 seed="the article draw and the train order", n_test=(1000, "least questions in test"),
                 n_dev=(300, "least questions in dev"))
