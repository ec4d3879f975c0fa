"""
Tasks for PARA fine-tuning (paper, Appendix A): COPA, BoolQ and SQuAD v1.1.

A task is a folder with train.jsonl, dev.jsonl and test.jsonl, one JSON object a line:
    {"prompt": "...\nAnswer:", "target": " True", "label": "True", "id": 0}
The training text is exactly prompt + target: the prompt ends without a space and the target begins with one.
Extra keys: "id" (the source's id), and what the metric needs: "label" (the label word, classification)
or "answers" (every gold answer, SQuAD). data/<task>/prepare.py builds a task's folder; a folder of
your own with the same three files is a task too.

train.py uses prepare_task, resolve_task, load_split and metric_for; the prepare scripts share download,
read_jsonl, read_json, split_off and write_splits. A problem the user can fix (a missing or malformed file, an
unknown task) raises errors.UserError, naming the file, the line and the fix.
"""
import argparse
import collections
import errno
import gzip
import importlib
import json
import os
import random
import re
import shutil
import string
import sys
import urllib.request
import zipfile
from pathlib import Path

from errors import UserError

DATA_DIR = Path(__file__).resolve().parent
# name -> the folder its prepare.py writes; a module name cannot hold a hyphen, so squad-small lives in squad_small
TASKS = {name: DATA_DIR / name.replace("-", "_") for name in ("copa", "boolq", "squad", "squad-small", "ultrachat")}
SPLITS = ("train", "dev", "test")
JSON_TYPES = {dict: "an object", list: "an array", str: "a string", int: "a number", float: "a number",
              bool: "true/false", type(None): "null"}

# -----------------------------------------------------------------------------
# helpers shared by the data/<task>/prepare.py scripts

TEMPORARY = ".para-tmp"  # the suffix of the project's temporary files: no other program's files end so


def tmp_name(path):
    """The temporary file a write of `path` goes to first: same folder, so that os.replace is atomic; named after
    path, this process and a random token, with a suffix of the project's own (is_temporary)."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}-{os.urandom(4).hex()}{TEMPORARY}")


def is_temporary(candidate, path) -> bool:
    """Whether `candidate` is a temporary file that a write of `path` made (a process killed mid-write leaves it)."""
    pattern = rf"\.{re.escape(Path(path).name)}\.\d+-[0-9a-f]{{8}}{re.escape(TEMPORARY)}"
    return Path(candidate).parent == Path(path).parent and re.fullmatch(pattern, Path(candidate).name) is not None


def atomic_write(path, write):
    """write(tmp_path), then rename it over path: a crash at any moment leaves either the old file or the new one.
    Every file the project writes (splits, adapters, checkpoints, logs of results) goes through here. A full disk
    is a UserError that says the old file is intact. write may make a folder at tmp_path (a full fine-tune's model),
    which then replaces a path that is not there yet (os.replace cannot put a folder over another)."""
    path, tmp = Path(path), tmp_name(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError of its zip writer
        if not (getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or free_bytes(path.parent) < 1 << 20):
            raise
        kept = f"the previous {path.name} is intact" if path.exists() else f"no {path.name} was written"
        raise UserError(f"the disk holding {path.parent} is full ({free_bytes(path.parent) >> 20} MiB free) while "
                        f"writing {path.name}: {kept}. Free some space, then run the command again (train.py: "
                        "with --resume)") from None
    finally:
        if tmp.is_dir():  # a folder left half written
            shutil.rmtree(tmp)
        else:
            tmp.unlink(missing_ok=True)


def free_bytes(folder) -> int:
    """Bytes free for this user on the disk that holds folder."""
    st = os.statvfs(folder)
    return st.f_bavail * st.f_frsize


def download(url, dest):
    """Fetch url into dest, unless dest is already there; a temp file + rename never leaves half a file."""
    dest = Path(dest)
    if dest.is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_name(dest)
    print(f"downloading {url}")
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(tmp, "wb") as f:
            while chunk := response.read(1 << 20):
                f.write(chunk)
    except OSError as e:  # urllib's URLError and HTTPError are OSErrors
        tmp.unlink(missing_ok=True)
        raise UserError(f"could not download {url} ({e}). Without network access, fetch that file "
                        "another way and pass it, or the folder that holds it, with --src PATH") from None
    os.replace(tmp, dest)
    return dest


def _pick(paths, name):
    """The shallowest of paths ("a/b" strings, depth <= 1) named name or name.gz, or None."""
    hits = [p for p in paths if p.count("/") <= 1 and p.rsplit("/", 1)[-1] in (name, name + ".gz")]
    return min(hits, key=lambda p: (p.count("/"), p.endswith(".gz"), p), default=None)


def read_source(src, name, optional=False):
    """(text, where) of file `name` (or `name.gz`) in folder or zip `src`, at its top or one folder down (COPA.zip
    holds COPA/train.jsonl); `where` names the file in messages. A missing file is a UserError, or gives ("", None)
    when optional."""
    src = Path(src)
    if src.exists() and not (src.is_dir() or src.is_file()):  # a FIFO or a device: reading it could wait forever
        raise UserError(f"--src {src} is neither a folder nor a regular file; give the folder or zip that holds {name}")
    if src.is_dir():
        hit = _pick([p.relative_to(src).as_posix() for p in [*src.glob("*"), *src.glob("*/*")] if p.is_file()], name)
        raw = (src / hit).read_bytes() if hit else None
    elif zipfile.is_zipfile(src):
        with zipfile.ZipFile(src) as z:
            hit = _pick(z.namelist(), name)
            raw = z.read(hit) if hit else None
    elif src.exists():
        raise UserError(f"--src {src} is not a folder or a zip file; give the folder or zip that holds {name}")
    else:
        raise UserError(f"--src {src} does not exist; give the folder or zip that holds {name}")
    if raw is None:
        message = f"{src} has no {name} (nor {name}.gz), at its top or one folder down"
        if optional:
            print(f"warning: {message}; the splits made from it will be empty")
            return "", None
        hint = (", or add --allow_missing_train to leave the splits made from it empty (evaluation only)"
                if name.startswith("train") else "")
        raise UserError(f"{message}. Use the official files (run prepare.py without --src to "
                        f"download them){hint}")
    where = f"{src}/{hit}"
    if hit.endswith(".gz"):
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as e:  # BadGzipFile is an OSError; a cut-off file is an EOFError
            raise UserError(f"{where}: not a valid gzip file ({e}); fetch it again") from None
    return _decode(raw, where), where


def _decode(raw, where):
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{where}: not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8") from None


FIX = "fix it, or use the official file (prepare.py without --src downloads it)"


def parse_jsonl(text, where, problem=lambda example: None):
    """The examples of a JSON-lines text, blank lines skipped. Bad JSON, or an example for which problem(example)
    returns a message, is a UserError naming `where` and the line."""
    examples = []
    # split on "\n" only: str.splitlines would also cut at U+2028, which JSON allows inside strings.
    # Blank lines are skipped but still counted, so the numbers are the ones an editor shows.
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            example = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{where}, line {number}: not valid JSON ({e.msg}, column {e.colno}); {FIX}") from None
        if message := problem(example):
            raise UserError(f"{where}, line {number}: {message}; {FIX}")
        examples.append(example)
    return examples


def parse_json(text, where):
    """One JSON document; bad JSON is a UserError naming `where`, the line and the column."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{where}, line {e.lineno}, column {e.colno}: not valid JSON ({e.msg}); {FIX}") from None


def read_jsonl(src, name, problem=lambda example: None, optional=False):
    """The examples of JSON-lines file `name` in `src` (see read_source and parse_jsonl); [] if optional and
    missing."""
    text, where = read_source(src, name, optional=optional)
    return parse_jsonl(text, where, problem) if where else []


def read_json(src, name, optional=False):
    """(document, where) of JSON file `name` in `src`; (None, None) if optional and missing."""
    text, where = read_source(src, name, optional=optional)
    return (parse_json(text, where) if where else None), where


def shown(value):
    """A JSON value for a message: itself when short ("7", "true"), else its type ("an object")."""
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 20 else JSON_TYPES[type(value)]


def split_off(examples, k, seed):
    """(k examples drawn with random.Random(seed), the rest); both keep the source order."""
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    picked = set(order[:k])
    return ([e for i, e in enumerate(examples) if i in picked],
            [e for i, e in enumerate(examples) if i not in picked])


def write_splits(out, splits):
    """Write {split: records} to out/<split>.jsonl: all files are written first, then renamed into place."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tmps = {}
    for split, records in splits.items():
        tmps[split] = tmp_name(out / f"{split}.jsonl")
        with open(tmps[split], "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    for split, tmp in tmps.items():
        os.replace(tmp, out / f"{split}.jsonl")
    print(f"wrote {out}: " + ", ".join(f"{split} {len(records)}" for split, records in splits.items()))
    return out

def field_problem(example, task, keys, strings):
    """What is wrong with the shape of one line of a task's official file, or None: it must be a JSON object with
    every one of `keys`, and strings at `strings`. (The task checks its labels itself.)"""
    if not isinstance(example, dict):
        return f"expected a JSON object, got {JSON_TYPES[type(example)]}"
    for key in keys:
        if key not in example:
            return f'missing "{key}"; a {task} line has {", ".join(keys[:-1])} and {keys[-1]}'
    for key in strings:
        if not isinstance(example[key], str):
            return f'"{key}" must be a string, got {JSON_TYPES[type(example[key])]}'
    return None


def prepare_superglue(src, out, seed, allow_missing_train, problem, to_record):
    """COPA and BoolQ (paper, Appendix A): train is the official train set; the official validation set, shuffled
    with random.Random(seed), is halved into dev and test (test gets an odd one); the test set has no labels."""
    train = read_jsonl(src, "train.jsonl", problem, optional=allow_missing_train)
    val = read_jsonl(src, "val.jsonl", problem)
    dev, test = split_off(val, len(val) // 2, seed)
    splits = {"train": train, "dev": dev, "test": test}
    return write_splits(out, {split: [to_record(e) for e in examples] for split, examples in splits.items()})


def command_line(prepare, doc, out, src, seed, train=None, **options):
    """The command line of a data/<task>/prepare.py: --src (a folder or zip holding `src`; default: download),
    --out, --seed (what it shuffles: `seed`), --allow_missing_train when the task has a `train` file, and the
    task's own integer options {name: (default, help)}. A problem the user can fix is one line on stderr."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--src", help=f"folder or zip with {src} (default: download)")
    parser.add_argument("--out", default=out, help="folder for train/dev/test.jsonl (default: the script's)")
    parser.add_argument("--seed", type=int, default=0, help=f"seed of {seed} (default: 0)")
    if train:
        parser.add_argument("--allow_missing_train", action="store_true",
                            help=f"if src has no {train}, write empty splits from it instead of failing")
    for name, (default, text) in options.items():
        parser.add_argument(f"--{name}", type=int, default=default, help=f"{text} (default: {default})")
    try:
        prepare(**vars(parser.parse_args()))
    except UserError as e:  # anything else is a bug, and keeps its traceback
        sys.exit(f"error: {e}")

# -----------------------------------------------------------------------------
# tasks and splits, for train.py

def _unknown(task):
    return UserError(f"unknown task {str(task)!r}: the known tasks are {', '.join(TASKS)}. For data of your own, "
                      "give the path of a folder holding train.jsonl, dev.jsonl and test.jsonl, one "
                      '{"prompt": ..., "target": ...} object a line')


def prepare_task(name, src=None, seed=0, allow_missing_train=False):
    """Folder of known task `name`, prepared by data/<folder>/prepare.py: from src when it is given (again, if
    the folder was prepared already: --src must not be silently ignored), else only if a split file is missing.
    Without src, files already there are kept as they are, whatever seed or source they were made from."""
    if name not in TASKS:
        raise _unknown(name)
    folder = TASKS[name]
    module = name.replace("-", "_")  # the folder's name: squad-small is prepared by data/squad_small/prepare.py
    prepared = all((folder / f"{split}.jsonl").is_file() for split in SPLITS)
    if src is not None:
        print(f"preparing {name} from --src {src}" + (f", replacing the files in {folder}" if prepared else ""))
    if src is not None or not prepared:
        prepare = importlib.import_module(f"{__name__}.{module}.prepare").prepare
        try:
            # write_splits renames the new files into place only once all are written: a failure keeps the old ones
            prepare(src=src, out=folder, seed=seed, allow_missing_train=allow_missing_train)
        except UserError as e:
            if src is not None:
                raise
            raise UserError(f"{e}\nTo prepare {name} from local files: "
                            f"python data/{module}/prepare.py --src PATH") from None
    return folder


def resolve_task(task):
    """Folder of `task`: a known task's name (prepared on first use), or a folder of your own."""
    if isinstance(task, str) and task in TASKS:
        return prepare_task(task)
    folder = Path(task)
    if not folder.is_dir():
        raise _unknown(task)
    missing = [f"{split}.jsonl" for split in SPLITS if not (folder / f"{split}.jsonl").is_file()]
    if missing:
        raise UserError(f"task folder {folder} has no {', '.join(missing)}; "
                                "a task folder needs train.jsonl, dev.jsonl and test.jsonl")
    return folder


ROLES = ("system", "user", "assistant")


def conversation_problem(messages):
    """What is wrong with a conversation (a chat task's line: {"messages": [...]}), or None."""
    if not isinstance(messages, list) or not messages:
        return '"messages" must be a non-empty array of {"role": ..., "content": ...} objects'
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or set(m) - {"role", "content", "name"} or not isinstance(m.get("content"), str):
            return f'message {i} must be an object {{"role": ..., "content": string}}'
        if m.get("role") not in ROLES:
            return f'message {i} has role {shown(m.get("role"))}; the roles are {", ".join(ROLES)}'
        if m["role"] == "system" and i > 0:
            return f"message {i} is a system message; only the first message may be one"
        try:
            m["content"].encode("utf-8")
        except UnicodeEncodeError as e:
            return f"message {i} holds a lone surrogate (character {e.start}), which is not text; fix that character"
    if not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
        return "the conversation never reaches an assistant's reply: there is nothing to train on"
    return None


def _problem(record):
    """What is wrong with one parsed line, or None."""
    if isinstance(record, dict) and "messages" in record:
        return conversation_problem(record["messages"])
    if not isinstance(record, dict):
        return f'expected a JSON object with "prompt" and "target", got {JSON_TYPES[type(record)]}'
    for key in ("prompt", "target"):
        if key not in record:
            return f'missing "{key}"; every line needs "prompt" and "target" strings'
        if not isinstance(record[key], str):
            return f'"{key}" must be a string, got {JSON_TYPES[type(record[key])]}'
        if not record[key]:
            return f'"{key}" is empty; give the text the model reads ("prompt") and must write ("target")'
        try:
            record[key].encode("utf-8")
        except UnicodeEncodeError as e:  # a lone surrogate, e.g. "\\ud800" written by a tool that split a pair
            return f'"{key}" holds a lone surrogate (character {e.start}), which is not text; fix that character'
    if "label" in record and not isinstance(record["label"], str):
        return f'"label" must be a string (the label word), got {JSON_TYPES[type(record["label"])]}'
    answers = record.get("answers", [""])
    if not (isinstance(answers, list) and answers and all(isinstance(a, str) for a in answers)):
        return '"answers" must be a non-empty array of strings (every gold answer)'
    return None


def load_split(folder, split):
    """Records of folder/<split>.jsonl. A bad line raises UserError naming the file, the line and the fix."""
    path = Path(folder) / f"{split}.jsonl"
    if not path.is_file():
        raise UserError(f"{path} not found; a task folder needs train.jsonl, dev.jsonl and test.jsonl")
    lines = _decode(path.read_bytes(), path).split("\n")
    while lines and not lines[-1].strip():  # blank lines at the end are fine
        lines.pop()
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            raise UserError(f"{path}, line {number}: blank line; remove it (only the end may have blank lines)")
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}, line {number}: not valid JSON ({e}); each line must be one JSON object "
                             'like {"prompt": "...", "target": " ..."}') from None
        if problem := _problem(record):
            raise UserError(f"{path}, line {number}: {problem}")
        records.append(record)
    return records

# -----------------------------------------------------------------------------
# metrics (paper, Appendix A.2): accuracy for COPA and BoolQ; for SQuAD, the mean of F1 and exact match.
# All in percent, like the official SQuAD script.

def accuracy(preds, golds):
    """Percent of predictions that begin with their gold label word, case-sensitive. Leading whitespace and
    whatever follows the word are ignored, so " True", "True." and "True\\nPassage: ..." all count as "True";
    "true" and "Trues" do not. A trained model writes the label word and stops; the rule only forgives
    what generation may add after it, and it works for labels of several words."""
    if len(preds) != len(golds):
        raise ValueError(f"{len(preds)} predictions for {len(golds)} gold labels")
    hits = sum(re.match(re.escape(gold.strip()) + r"(?!\w)", pred.lstrip()) is not None
               for pred, gold in zip(preds, golds))
    return 100.0 * hits / max(len(golds), 1)


PUNCTUATION = set(string.punctuation)


def normalize_answer(s):
    """SQuAD v1.1 answer normalisation: lower case, drop punctuation, drop the articles a/an/the, single spaces."""
    s = "".join(ch for ch in s.lower() if ch not in PUNCTUATION)
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def exact_match_score(prediction, gold):
    return float(normalize_answer(prediction) == normalize_answer(gold))


def f1_score(prediction, gold):
    """Token F1 of the normalised answers; tokens shared = the multiset intersection."""
    pred_tokens, gold_tokens = normalize_answer(prediction).split(), normalize_answer(gold).split()
    shared = sum((collections.Counter(pred_tokens) & collections.Counter(gold_tokens)).values())
    if shared == 0:  # v1.1 gives 0 here even when both sides are empty
        return 0.0
    precision, recall = shared / len(pred_tokens), shared / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def squad_metrics(preds, answers_list):
    """SQuAD v1.1: each prediction takes its best score over all its gold answers; means in percent.
    "f1-em", the paper's headline, comes first."""
    if len(preds) != len(answers_list):
        raise ValueError(f"{len(preds)} predictions for {len(answers_list)} questions")
    n = max(len(preds), 1)
    em = 100.0 * sum(max(exact_match_score(p, a) for a in answers) for p, answers in zip(preds, answers_list)) / n
    f1 = 100.0 * sum(max(f1_score(p, a) for a in answers) for p, answers in zip(preds, answers_list)) / n
    return {"f1-em": (f1 + em) / 2, "f1": f1, "em": em}


def metric_for(task):
    """metric(preds, records) -> {name: percent} for a task's name or folder; the first key is the paper's
    headline. Test records with "answers" get squad_metrics on the first line of each prediction ("f1-em");
    others get accuracy against "label" ("acc"), or against the stripped target when there is no label.
    The metric's `stop` is where generation may stop without changing the score: the end of the first line.
    """
    records = load_split(resolve_task(task), "test")
    if records and any("messages" in r for r in records):
        return None  # a chat task: dev loss only (its replies have no score here; MMLU is mmlu.py's)
    if records and all("answers" in r for r in records):
        def squad(preds, records):
            first_lines = [p.strip().split("\n")[0] for p in preds]
            return squad_metrics(first_lines, [r["answers"] for r in records])
        squad.stop = ["\n"]  # generate.py's stop strings do not count leading whitespace, as strip() here
        return squad

    def acc(preds, records):
        return {"acc": accuracy(preds, [r.get("label", r["target"].strip()) for r in records])}
    acc.stop = None  # a label word may be followed by anything (accuracy's docstring)
    return acc
