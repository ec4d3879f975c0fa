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
import sys
from pathlib import Path

if __name__ == "__main__":  # run as a script: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from data import FIX, command_line, download, read_json, split_off, write_splits
from errors import UserError

URL = "https://rajpurkar.github.io/SQuAD-explorer/dataset/"
FILES = ("train-v1.1.json", "dev-v1.1.json")
HERE = Path(__file__).resolve().parent

# The prompt; the target is " " + the first gold answer, and "answers" keeps every gold answer for the metric.
# The first dev question as prompt + target (context cut short):
#   Context: Super Bowl 50 was an American football game to determine the champion of ...
#   Question: Which NFL team represented the AFC at Super Bowl 50?
#   Answer: Denver Broncos
TEMPLATE = "Context: {context}\nQuestion: {question}\nAnswer:"


def articles(squad, where):
    """The articles of an official SQuAD json object (read from `where`, named in errors)."""
    if not (isinstance(squad, dict) and isinstance(squad.get("data"), list)):
        raise UserError(f'{where}: expected an object with a "data" array of articles (SQuAD v1.1); {FIX}')
    return squad["data"]


def article_records(article, where):
    """One record per question of one article, in file order. A malformed question is a UserError naming
    `where` and the question's id (a malformed article or paragraph, its title and position)."""
    def malformed(place, problem):
        return UserError(f"{where}, {place}: {problem}; {FIX}")

    title = article.get("title") if isinstance(article, dict) else None
    name = f"article {title!r}" if isinstance(title, str) else "an article without a title"
    if not (isinstance(article, dict) and isinstance(article.get("paragraphs"), list)):
        raise malformed(name, 'expected an object with a "paragraphs" array')
    records = []
    for p, paragraph in enumerate(article["paragraphs"]):
        place = f"{name}, paragraph {p}"
        if not (isinstance(paragraph, dict) and isinstance(paragraph.get("context"), str)
                and isinstance(paragraph.get("qas"), list)):
            raise malformed(place, 'expected an object with a "context" string and a "qas" array')
        for q, qa in enumerate(paragraph["qas"]):
            if not (isinstance(qa, dict) and isinstance(qa.get("id"), str)):
                raise malformed(f"{place}, question {q}", 'expected an object with an "id" string')
            if not isinstance(qa.get("question"), str):
                raise malformed(f"question {qa['id']}", 'missing the "question" string')
            answers = qa.get("answers")
            if not (isinstance(answers, list) and answers and all(
                    isinstance(a, dict) and isinstance(a.get("text"), str) and a["text"].strip() for a in answers)):
                raise malformed(f"question {qa['id']}", 'needs at least one gold answer, and every answer '
                                'a non-empty "text" string: "answers": [{"text": "...", "answer_start": 0}]')
            answers = [a["text"] for a in answers]
            prompt = TEMPLATE.format(context=paragraph["context"].strip(), question=qa["question"].strip())
            records.append({"prompt": prompt, "target": " " + answers[0].strip(), "answers": answers, "id": qa["id"]})
    return records


def to_records(squad, where):
    """One record per question of an official SQuAD json object, in file order."""
    return [record for article in articles(squad, where) for record in article_records(article, where)]


def prepare(src=None, out=HERE, seed=0, allow_missing_train=False, n_dev=1000):
    """Write out/{train,dev,test}.jsonl from src (a folder or zip; None downloads the official files)."""
    if src is None:
        for name in FILES:
            download(URL + name, Path(out) / name)
        src = out
    train_json, train_where = read_json(src, "train-v1.1.json", optional=allow_missing_train)  # None if missing
    train = to_records(train_json, train_where) if train_where else []  # no train, no dev
    test = to_records(*read_json(src, "dev-v1.1.json"))
    if train and len(train) <= n_dev:
        raise UserError(f"{train_where} has {len(train)} questions; cannot draw a dev set of {n_dev} from it "
                        "(--n_dev)")
    dev, train = split_off(train, n_dev, seed)
    return write_splits(out, {"train": train, "dev": dev, "test": test})


if __name__ == "__main__":
    command_line(prepare, __doc__, HERE, src="train-v1.1.json and dev-v1.1.json", seed="the dev draw from train",
                 train="train-v1.1.json", n_dev=(1000, "questions moved from train to dev"))
