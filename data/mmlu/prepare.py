"""
MMLU (Hendrycks et al. 2021), for mmlu.py: dev.jsonl (the 5 few-shot examples of each subject), val.jsonl and
test.jsonl next to this file, one question per line: {"subject": ..., "question": ..., "choices": [4], "answer": "A"}.

    python data/mmlu/prepare.py                     # downloads the official data.tar (166 MB)
    python data/mmlu/prepare.py --src PATH          # data.tar, or a folder with the official layout

The official layout: {dev,val,test}/{subject}_{split}.csv (at the top of src, or under data/), each row
question, A, B, C, D, answer letter, with no header.
"""
import csv
import io
import sys
import tarfile
from pathlib import Path

if __name__ == "__main__":  # run as a script: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from data import _decode, command_line, download, write_splits
from errors import UserError

HERE = Path(__file__).resolve().parent
URL = "https://people.eecs.berkeley.edu/~hendrycks/data.tar"
SPLITS = ("dev", "val", "test")


def csv_files(src):
    """{(split, subject): (text, where)} of every {split}/{subject}_{split}.csv in a folder or a tar file."""
    src, files = Path(src), {}
    if src.is_dir():
        found = [(p.relative_to(src).as_posix(), p.read_bytes) for p in src.rglob("*.csv")]
    elif src.is_file() and tarfile.is_tarfile(src):
        tar = tarfile.open(src)
        found = [(m.name, lambda m=m: tar.extractfile(m).read()) for m in tar.getmembers() if m.name.endswith(".csv")]
    else:
        raise UserError(f"--src {src} is neither a folder nor a tar file; give MMLU's data.tar or its data folder")
    for name, read in found:
        parts = name.split("/")
        if len(parts) >= 2 and parts[-2] in SPLITS and parts[-1].endswith(f"_{parts[-2]}.csv"):
            files[parts[-2], parts[-1][:-len(f"_{parts[-2]}.csv")]] = (read, name)
    if not any(split == "test" for split, _ in files):
        raise UserError(f"--src {src} has no test/{{subject}}_test.csv: it is not MMLU's official layout")
    return files


def rows_of(raw, where, subject):
    """The questions of one CSV file, checked: six fields, the answer one of A, B, C, D."""
    out = []
    for n, row in enumerate(csv.reader(io.StringIO(_decode(raw, where))), 1):
        if len(row) != 6 or row[5].strip() not in ("A", "B", "C", "D"):
            raise UserError(f"{where}, row {n}: expected question, A, B, C, D and an answer letter, got "
                            f"{len(row)} fields; use the official files")
        out.append({"subject": subject, "question": row[0], "choices": row[1:5], "answer": row[5].strip()})
    return out


def prepare(src=None, out=HERE, seed=0, allow_missing_train=False):
    """Write out/{dev,val,test}.jsonl from src (None downloads the official data.tar)."""
    src = src or download(URL, Path(out) / "data.tar")
    splits = {split: [] for split in SPLITS}
    for (split, subject), (read, where) in sorted(csv_files(src).items()):
        splits[split] += rows_of(read(), f"{src}/{where}", subject)
    write_splits(out, splits)
    subjects = len({q["subject"] for q in splits["test"]})
    print(f"wrote {out}: {subjects} subjects; dev {len(splits['dev'])}, val {len(splits['val'])}, test "
          f"{len(splits['test'])} questions")


if __name__ == "__main__":
    command_line(prepare, __doc__, HERE, src="{dev,val,test}/{subject}_{split}.csv", seed="nothing (kept for "
                 "the common command line)")
