"""The data/ package: task preparation (paper, Appendix A), the split files' format, and the metrics."""
import gzip
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import data
import data.boolq.prepare
import data.copa.prepare
from data.boolq.prepare import prepare as prepare_boolq
from data.copa.prepare import prepare as prepare_copa
from data.squad.prepare import prepare as prepare_squad
from data.squad_small.prepare import prepare as prepare_squad_small
from conftest import ASSETS, ROOT as REPO
from errors import UserError

# -----------------------------------------------------------------------------
# tiny sources in the official formats, written by the tests

def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def copa_rows(n, start=0):
    return [{"premise": f"Premise {i}.", "choice1": f"One {i}.", "choice2": f"Two {i}.",
             "question": ["cause", "effect"][i % 2], "label": i % 2, "idx": i} for i in range(start, start + n)]


def boolq_rows(n):
    return [{"question": f"is {i} even", "passage": f"Number {i} -- Text {i}.", "idx": i, "label": i % 2 == 0}
            for i in range(n)]


def squad_json(n_articles, n_questions, prefix):
    """n_articles articles of one paragraph each with n_questions questions; question j has j+1 gold answers."""
    return {"version": "1.1", "data": [
        {"title": f"A{a}", "paragraphs": [{"context": f"Context {a} with words.", "qas": [
            {"id": f"{prefix}{a}-{q}", "question": f"Question {a}-{q}? ",
             "answers": [{"answer_start": 0, "text": f"gold {k}"} for k in range(q % 3 + 1)]}
            for q in range(n_questions)]}]}
        for a in range(n_articles)]}


@pytest.fixture
def copa_src(tmp_path):
    """A COPA folder: 6 train, 21 validation (odd on purpose)."""
    write_jsonl(tmp_path / "copa_src" / "train.jsonl", copa_rows(6))
    write_jsonl(tmp_path / "copa_src" / "val.jsonl", copa_rows(21, start=100))
    return tmp_path / "copa_src"


@pytest.fixture
def boolq_zip(tmp_path):
    """A BoolQ.zip in the official layout: BoolQ/train.jsonl, BoolQ/val.jsonl, BoolQ/test.jsonl (no labels)."""
    path = tmp_path / "BoolQ.zip"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("BoolQ/", "")
        z.writestr("BoolQ/train.jsonl", "".join(json.dumps(r) + "\n" for r in boolq_rows(5)))
        z.writestr("BoolQ/val.jsonl", "".join(json.dumps(r) + "\n" for r in boolq_rows(8)))
        z.writestr("BoolQ/test.jsonl", json.dumps({"question": "q", "passage": "p", "idx": 0}) + "\n")
    return path


@pytest.fixture
def squad_src(tmp_path):
    """A SQuAD folder: train-v1.1.json with 8 questions, dev-v1.1.json.gz with 3."""
    folder = tmp_path / "squad_src"
    folder.mkdir()
    (folder / "train-v1.1.json").write_text(json.dumps(squad_json(2, 4, "t")))
    (folder / "dev-v1.1.json.gz").write_bytes(gzip.compress(json.dumps(squad_json(1, 3, "d")).encode()))
    return folder


@pytest.fixture
def squad_small_src(tmp_path):
    """A folder with dev-v1.1.json only: 12 articles of 5 questions, ids d<article>-<question>."""
    folder = tmp_path / "squad_small_src"
    folder.mkdir()
    (folder / "dev-v1.1.json").write_text(json.dumps(squad_json(12, 5, "d")))
    return folder


def sizes(folder):
    return {split: len(data.load_split(folder, split)) for split in data.SPLITS}


def file_bytes(folder):
    return {split: (Path(folder) / f"{split}.jsonl").read_bytes() for split in data.SPLITS}

# -----------------------------------------------------------------------------
# preparation from the tiny sources

def test_copa_train_is_official_train_and_validation_is_halved(copa_src, tmp_path):
    assert sizes(prepare_copa(copa_src, tmp_path / "out")) == {"train": 6, "dev": 10, "test": 11}


def test_odd_validation_size_gives_the_extra_example_to_test(copa_src, tmp_path):
    out = prepare_copa(copa_src, tmp_path / "out")
    assert len(data.load_split(out, "test")) == len(data.load_split(out, "dev")) + 1


def test_dev_and_test_partition_the_validation_set(copa_src, tmp_path):
    out = prepare_copa(copa_src, tmp_path / "out")
    dev, test = ({r["id"] for r in data.load_split(out, split)} for split in ("dev", "test"))
    assert not dev & test and dev | test == set(range(100, 121))


def test_boolq_is_read_from_the_official_zip_layout(boolq_zip, tmp_path):
    assert sizes(prepare_boolq(boolq_zip, tmp_path / "out")) == {"train": 5, "dev": 4, "test": 4}


def test_squad_dev_comes_from_train_and_official_dev_is_test(squad_src, tmp_path):
    out = prepare_squad(squad_src, tmp_path / "out", n_dev=3)
    ids = {split: {r["id"] for r in data.load_split(out, split)} for split in data.SPLITS}
    assert (len(ids["train"]), len(ids["dev"])) == (5, 3) and not ids["train"] & ids["dev"]
    assert ids["train"] | ids["dev"] == {f"t{a}-{q}" for a in range(2) for q in range(4)}
    assert ids["test"] == {"d0-0", "d0-1", "d0-2"}


def test_squad_records_keep_every_gold_answer_and_target_the_first(squad_src, tmp_path):
    test = data.load_split(prepare_squad(squad_src, tmp_path / "out", n_dev=3), "test")
    assert [r["answers"] for r in test] == [["gold 0"], ["gold 0", "gold 1"], ["gold 0", "gold 1", "gold 2"]]
    assert all(r["target"] == " gold 0" for r in test)
    assert test[0]["prompt"] == "Context: Context 0 with words.\nQuestion: Question 0-0?\nAnswer:"


def test_squad_with_fewer_train_questions_than_dev_size_is_an_error(squad_src, tmp_path):
    with pytest.raises(UserError, match="cannot draw a dev set of 1000"):
        prepare_squad(squad_src, tmp_path / "out")


def test_preparing_twice_gives_identical_files(copa_src, boolq_zip, squad_src, tmp_path):
    for name, run in [("copa", lambda out: prepare_copa(copa_src, out)),
                      ("boolq", lambda out: prepare_boolq(boolq_zip, out)),
                      ("squad", lambda out: prepare_squad(squad_src, out, n_dev=3))]:
        assert file_bytes(run(tmp_path / name / "a")) == file_bytes(run(tmp_path / name / "b")), name


def test_another_seed_gives_another_split(copa_src, squad_src, tmp_path):
    assert file_bytes(prepare_copa(copa_src, tmp_path / "c0"))["dev"] != \
        file_bytes(prepare_copa(copa_src, tmp_path / "c1", seed=1))["dev"]
    assert file_bytes(prepare_squad(squad_src, tmp_path / "s0", n_dev=3))["dev"] != \
        file_bytes(prepare_squad(squad_src, tmp_path / "s1", seed=1, n_dev=3))["dev"]


def test_training_text_is_prompt_plus_target_starting_with_one_space(copa_src, boolq_zip, squad_src, tmp_path):
    outs = [prepare_copa(copa_src, tmp_path / "c"), prepare_boolq(boolq_zip, tmp_path / "b"),
            prepare_squad(squad_src, tmp_path / "s", n_dev=3)]
    for record in (r for out in outs for split in data.SPLITS for r in data.load_split(out, split)):
        assert record["prompt"].endswith(("Answer:", "Answer (True or False):"))  # no trailing space
        assert record["target"].startswith(" ") and not record["target"].startswith("  ")


def test_copa_targets_are_the_label_words_choice1_and_choice2(copa_src, tmp_path):
    train = data.load_split(prepare_copa(copa_src, tmp_path / "out"), "train")
    assert [(r["target"], r["label"]) for r in train[:2]] == [(" choice1", "choice1"), (" choice2", "choice2")]
    assert train[0]["prompt"] == ("Premise: Premise 0.\nQuestion: What was the cause?\n"
                                  "choice1: One 0.\nchoice2: Two 0.\nAnswer:")


def test_boolq_targets_are_the_label_words_true_and_false(boolq_zip, tmp_path):
    train = data.load_split(prepare_boolq(boolq_zip, tmp_path / "out"), "train")
    assert [r["target"] for r in train[:2]] == [" True", " False"]
    assert train[0]["prompt"] == "Passage: Number 0 -- Text 0.\nQuestion: is 0 even?\nAnswer (True or False):"


def test_gzipped_source_files_are_read(tmp_path):
    for name, rows in [("train.jsonl.gz", copa_rows(4)), ("val.jsonl.gz", copa_rows(4, start=10))]:
        (tmp_path / "src" / name).parent.mkdir(exist_ok=True)
        (tmp_path / "src" / name).write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in rows).encode()))
    assert sizes(prepare_copa(tmp_path / "src", tmp_path / "out")) == {"train": 4, "dev": 2, "test": 2}


def test_missing_train_file_fails_naming_the_file_and_the_flag(copa_src, tmp_path):
    (copa_src / "train.jsonl").unlink()
    with pytest.raises(UserError, match="train.jsonl.*--allow_missing_train"):
        prepare_copa(copa_src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_allow_missing_train_writes_an_empty_train_split(copa_src, tmp_path):
    (copa_src / "train.jsonl").unlink()
    out = prepare_copa(copa_src, tmp_path / "out", allow_missing_train=True)
    assert sizes(out) == {"train": 0, "dev": 10, "test": 11}


def test_without_src_the_official_file_is_downloaded_then_prepared(boolq_zip, tmp_path, monkeypatch):
    monkeypatch.setattr(data.boolq.prepare, "URL", boolq_zip.as_uri())
    out = prepare_boolq(out=tmp_path / "out")
    assert (out / "BoolQ.zip").read_bytes() == boolq_zip.read_bytes()
    assert sizes(out) == {"train": 5, "dev": 4, "test": 4}


def test_download_failure_suggests_src(tmp_path, monkeypatch):
    monkeypatch.setattr(data.copa.prepare, "URL", (tmp_path / "absent.zip").as_uri())
    with pytest.raises(UserError, match="--src"):
        prepare_copa(out=tmp_path / "out")
    assert list((tmp_path / "out").iterdir()) == []  # no half-downloaded file left behind


def test_prepare_script_runs_from_the_command_line(copa_src, tmp_path):
    subprocess.run([sys.executable, "data/copa/prepare.py", "--src", str(copa_src), "--out", str(tmp_path / "out")],
                   cwd=REPO, check=True, capture_output=True)
    assert sizes(tmp_path / "out") == {"train": 6, "dev": 10, "test": 11}


def test_prepare_script_reports_a_missing_file_without_a_traceback(copa_src, tmp_path):
    (copa_src / "train.jsonl").unlink()
    result = subprocess.run([sys.executable, "data/copa/prepare.py", "--src", str(copa_src)],
                            cwd=REPO, capture_output=True, text=True)
    assert result.returncode != 0
    assert "train.jsonl" in result.stderr and "Traceback" not in result.stderr

# -----------------------------------------------------------------------------
# squad-small: train, dev and test from the official dev file, split by article

def ids_by_split(folder):
    return {split: [r["id"] for r in data.load_split(folder, split)] for split in data.SPLITS}


def article_of(question_id):
    return question_id.split("-")[0]  # "d7-3" -> "d7"


def test_squad_small_splits_share_no_article(squad_small_src, tmp_path):
    ids = ids_by_split(prepare_squad_small(squad_small_src, tmp_path / "out", n_test=11, n_dev=6))
    articles = {split: {article_of(i) for i in split_ids} for split, split_ids in ids.items()}
    assert not articles["train"] & articles["dev"] and not articles["train"] & articles["test"]
    assert not articles["dev"] & articles["test"]


def test_squad_small_gives_whole_articles_to_test_then_dev_until_each_holds_its_minimum(squad_small_src, tmp_path):
    # 5 questions an article: at least 11 test questions take 3 articles, at least 6 dev questions 2, 7 are left
    out = prepare_squad_small(squad_small_src, tmp_path / "out", n_test=11, n_dev=6)
    assert sizes(out) == {"train": 35, "dev": 10, "test": 15}


def test_squad_small_uses_every_question_once_as_the_squad_task_writes_it(squad_small_src, tmp_path):
    out = prepare_squad_small(squad_small_src, tmp_path / "out", n_test=11, n_dev=6)
    written = [r for split in data.SPLITS for r in data.load_split(out, split)]
    source = json.loads((squad_small_src / "dev-v1.1.json").read_text())
    expected = data.squad.prepare.to_records(source, "dev-v1.1.json")
    assert sorted(written, key=lambda r: r["id"]) == sorted(expected, key=lambda r: r["id"])


def test_squad_small_is_the_same_for_a_seed_and_different_for_another(squad_small_src, tmp_path):
    def run(name, seed):
        return file_bytes(prepare_squad_small(squad_small_src, tmp_path / name, seed=seed, n_test=11, n_dev=6))
    assert run("a", 0) == run("b", 0)
    assert run("c", 1)["test"] != run("a", 0)["test"]


def test_squad_small_shuffles_train_and_keeps_dev_and_test_in_file_order(squad_small_src, tmp_path):
    ids = ids_by_split(prepare_squad_small(squad_small_src, tmp_path / "out", n_test=11, n_dev=6))
    file_order = [f"d{a}-{q}" for a in range(12) for q in range(5)]
    for split in ("dev", "test"):
        assert ids[split] == [i for i in file_order if i in ids[split]]
    assert ids["train"] != [i for i in file_order if i in ids["train"]]
    assert len({article_of(i) for i in ids["train"][:5]}) > 1  # a prefix samples several articles


def test_squad_small_with_too_few_questions_names_the_options(squad_small_src, tmp_path):
    with pytest.raises(UserError, match="60 questions in 12 articles.*--n_test.*--n_dev"):
        prepare_squad_small(squad_small_src, tmp_path / "out", n_test=50, n_dev=20)
    assert not (tmp_path / "out").exists()

# -----------------------------------------------------------------------------
# source files checked before anything is written: errors name the file, the line and the fix

def copa_val_error(copa_src, tmp_path, row):
    """The UserError message for a COPA val.jsonl whose 3rd line is `row`."""
    write_jsonl(copa_src / "val.jsonl", copa_rows(2) + [row] + copa_rows(2, start=2))
    with pytest.raises(UserError) as error:
        prepare_copa(copa_src, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    message = str(error.value)
    assert f"{copa_src / 'val.jsonl'}, line 3:" in message and "use the official file" in message
    return message


def test_copa_label_other_than_0_or_1_is_an_error_naming_the_line(copa_src, tmp_path):
    row = copa_rows(1)[0] | {"label": 7}  # would otherwise become the target " choice8"
    assert '"label" must be 0 (choice1) or 1 (choice2), got 7' in copa_val_error(copa_src, tmp_path, row)


def test_copa_line_without_a_premise_is_an_error_naming_the_line(copa_src, tmp_path):
    row = {k: v for k, v in copa_rows(1)[0].items() if k != "premise"}
    assert 'missing "premise"' in copa_val_error(copa_src, tmp_path, row)


def test_copa_line_without_a_label_is_an_error_naming_the_line(copa_src, tmp_path):
    row = {k: v for k, v in copa_rows(1)[0].items() if k != "label"}
    assert 'missing "label"' in copa_val_error(copa_src, tmp_path, row)


def boolq_val_error(tmp_path, row):
    """The UserError message for a BoolQ val.jsonl whose 2nd line is `row`."""
    write_jsonl(tmp_path / "src" / "val.jsonl", boolq_rows(1) + [row])
    with pytest.raises(UserError) as error:
        prepare_boolq(tmp_path / "src", tmp_path / "out", allow_missing_train=True)
    assert f"{tmp_path / 'src' / 'val.jsonl'}, line 2:" in str(error.value)
    return str(error.value)


def test_boolq_label_other_than_true_or_false_is_an_error_naming_the_line(tmp_path):
    row = boolq_rows(1)[0] | {"label": "False"}  # a string: truthy, it would have become " True"
    assert '"label" must be true or false (JSON booleans), got "False"' in boolq_val_error(tmp_path, row)


def test_boolq_line_without_a_label_is_an_error_naming_the_line(tmp_path):
    row = {k: v for k, v in boolq_rows(1)[0].items() if k != "label"}
    assert 'missing "label"' in boolq_val_error(tmp_path, row)


def squad_dev_error(tmp_path, answers):
    """The UserError message for a dev-v1.1.json whose question d0-1 has `answers`."""
    squad = squad_json(1, 3, "d")
    squad["data"][0]["paragraphs"][0]["qas"][1]["answers"] = answers
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "dev-v1.1.json").write_text(json.dumps(squad))
    with pytest.raises(UserError) as error:
        prepare_squad(tmp_path / "src", tmp_path / "out", allow_missing_train=True)
    assert f"{tmp_path / 'src' / 'dev-v1.1.json'}, question d0-1:" in str(error.value)
    return str(error.value)


def test_squad_question_without_answers_is_an_error_naming_its_id(tmp_path):
    assert "at least one gold answer" in squad_dev_error(tmp_path, [])


def test_squad_answer_without_text_is_an_error_naming_its_id(tmp_path):
    assert '"text" string' in squad_dev_error(tmp_path, [{"answer_start": 0}])


def test_bad_json_in_a_source_line_names_the_file_and_the_line_counting_blank_lines(copa_src, tmp_path):
    good = json.dumps(copa_rows(1)[0])
    (copa_src / "val.jsonl").write_text(f"{good}\n\n{good}\n  \n{good[:-1]}\n{good}\n")
    with pytest.raises(UserError, match=r"val\.jsonl, line 5: not valid JSON"):
        prepare_copa(copa_src, tmp_path / "out")


def test_bad_json_in_a_squad_file_names_the_file_line_and_column(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "dev-v1.1.json").write_text('{\n  "version": "1.1",\n  "data": [oops]\n}\n')
    with pytest.raises(UserError, match=r"dev-v1\.1\.json, line 3, column 12: not valid JSON"):
        prepare_squad(tmp_path / "src", tmp_path / "out", allow_missing_train=True)


def test_a_corrupt_gzip_source_is_an_error_naming_the_file(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "dev-v1.1.json.gz").write_bytes(b"not gzip")
    with pytest.raises(UserError, match=r"dev-v1\.1\.json\.gz: not a valid gzip file"):
        prepare_squad(tmp_path / "src", tmp_path / "out", allow_missing_train=True)


@pytest.mark.parametrize("task", ["copa", "boolq", "squad", "squad_small"])
@pytest.mark.parametrize("src", ["absent", "plain.txt"])
def test_prepare_script_reports_a_bad_src_in_one_line_without_a_traceback(task, src, tmp_path):
    (tmp_path / "plain.txt").write_text("neither a folder nor a zip")
    result = subprocess.run([sys.executable, f"data/{task}/prepare.py", "--src", str(tmp_path / src),
                             "--out", str(tmp_path / "out")], cwd=REPO, capture_output=True, text=True)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.startswith(f"error: --src {tmp_path / src} ") and result.stderr.count("\n") == 1

# -----------------------------------------------------------------------------
# tasks: names, folders, prepare on first use

def test_prepare_task_prepares_a_known_task_when_its_files_are_missing(copa_src, tmp_path, monkeypatch):
    monkeypatch.setitem(data.TASKS, "copa", tmp_path / "copa")
    assert data.prepare_task("copa", src=copa_src) == tmp_path / "copa"
    assert sizes(tmp_path / "copa") == {"train": 6, "dev": 10, "test": 11}


def test_prepare_task_without_src_keeps_files_already_prepared(copa_src, tmp_path, monkeypatch):
    monkeypatch.setitem(data.TASKS, "copa", tmp_path / "copa")
    data.prepare_task("copa", src=copa_src)
    before = file_bytes(tmp_path / "copa")
    monkeypatch.setattr(data.copa.prepare, "URL", (tmp_path / "absent.zip").as_uri())  # would fail if it ran
    data.prepare_task("copa", seed=1)
    assert file_bytes(tmp_path / "copa") == before


def test_prepare_task_with_src_prepares_again_from_it_and_says_so(copa_src, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(data.TASKS, "copa", tmp_path / "copa")
    data.prepare_task("copa", src=copa_src)
    other = tmp_path / "other"
    write_jsonl(other / "train.jsonl", copa_rows(3))
    write_jsonl(other / "val.jsonl", copa_rows(4, start=200))
    capsys.readouterr()
    data.prepare_task("copa", src=other)
    assert sizes(tmp_path / "copa") == {"train": 3, "dev": 2, "test": 2}
    assert f"preparing copa from --src {other}, replacing the files in {tmp_path / 'copa'}" in capsys.readouterr().out


def test_prepare_task_from_a_bad_src_keeps_the_files_already_prepared(copa_src, tmp_path, monkeypatch):
    monkeypatch.setitem(data.TASKS, "copa", tmp_path / "copa")
    data.prepare_task("copa", src=copa_src)
    before = file_bytes(tmp_path / "copa")
    write_jsonl(copa_src / "val.jsonl", copa_rows(4) + [{"premise": "p"}])
    with pytest.raises(UserError):
        data.prepare_task("copa", src=copa_src)
    assert file_bytes(tmp_path / "copa") == before and sorted(os.listdir(tmp_path / "copa")) == \
        ["dev.jsonl", "test.jsonl", "train.jsonl"]


def test_prepare_task_prepares_squad_small_with_its_prepare_script(tmp_path, monkeypatch):
    monkeypatch.setitem(data.TASKS, "squad-small", tmp_path / "squad_small")
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "dev-v1.1.json").write_text(json.dumps(squad_json(48, 30, "d")))
    assert data.prepare_task("squad-small", src=tmp_path / "src") == tmp_path / "squad_small"
    assert sizes(tmp_path / "squad_small") == {"train": 120, "dev": 300, "test": 1020}  # 30 questions an article


def test_prepare_task_without_network_says_how_to_prepare_from_local_files(tmp_path, monkeypatch):
    monkeypatch.setitem(data.TASKS, "copa", tmp_path / "copa")
    monkeypatch.setattr(data.copa.prepare, "URL", (tmp_path / "absent.zip").as_uri())
    with pytest.raises(UserError, match="python data/copa/prepare.py --src PATH"):
        data.prepare_task("copa")


def test_resolve_task_accepts_a_folder_of_your_own(tmp_path):
    for split in data.SPLITS:
        write_jsonl(tmp_path / "mine" / f"{split}.jsonl", [{"prompt": "2+2=", "target": " 4"}])
    assert data.resolve_task(str(tmp_path / "mine")) == tmp_path / "mine"


def test_resolve_task_names_the_split_files_a_folder_lacks(tmp_path):
    write_jsonl(tmp_path / "mine" / "train.jsonl", [{"prompt": "2+2=", "target": " 4"}])
    with pytest.raises(UserError, match="dev.jsonl, test.jsonl"):
        data.resolve_task(str(tmp_path / "mine"))


def test_unknown_task_error_lists_known_tasks_and_the_folder_option():
    with pytest.raises(UserError) as error:
        data.resolve_task("cola")
    message = str(error.value)
    assert "'cola'" in message and "copa, boolq, squad" in message and "folder" in message

# -----------------------------------------------------------------------------
# load_split: every line checked, errors name the file and the line

def test_load_split_returns_the_records(tmp_path):
    rows = [{"prompt": "a", "target": " b", "label": "b"}, {"prompt": "c", "target": " d"}]
    assert data.load_split(write_jsonl(tmp_path / "dev.jsonl", rows).parent, "dev") == rows


def test_blank_lines_at_the_end_are_fine(tmp_path):
    (tmp_path / "dev.jsonl").write_text('{"prompt": "a", "target": " b"}\n\n  \n')
    assert len(data.load_split(tmp_path, "dev")) == 1


def bad_line_error(tmp_path, line):
    """The UserError for a dev.jsonl whose 3rd line is `line`."""
    good = '{"prompt": "a", "target": " b"}\n'
    (tmp_path / "dev.jsonl").write_text(good + good + line + "\n" + good)
    with pytest.raises(UserError) as error:
        data.load_split(tmp_path, "dev")
    assert "dev.jsonl, line 3:" in str(error.value)
    return str(error.value)


@pytest.mark.parametrize("line, message", [
    ('{"prompt": "a", "target": " b"', "not valid JSON"),
    ('{"prompt": "a"}', 'missing "target"'),
    ('{"prompt": 1, "target": " b"}', '"prompt" must be a string, got a number'),
    ('{"prompt": "", "target": " b"}', '"prompt" is empty'),
    ('["a", " b"]', "got an array"),  # a line that is not an object
    ("", "blank line"),  # a blank line inside the file
    ('{"prompt": "a", "target": " b", "answers": []}', '"answers"'),
])
def test_a_bad_line_is_reported_with_its_file_and_line(line, message, tmp_path):
    assert message in bad_line_error(tmp_path, line)

# -----------------------------------------------------------------------------
# metrics

def test_accuracy_counts_predictions_that_begin_with_the_label_word():
    preds = [" True", "True.", "True\nPassage: ...", "False", "Trues", "choice1", "choice12"]
    golds = ["True", "True", "True", "True", "True", "choice1", "choice1"]
    assert data.accuracy(preds, golds) == pytest.approx(100 * 4 / 7)


def test_accuracy_is_case_sensitive():
    assert data.accuracy(["true", "True"], ["True", "True"]) == 50.0


def test_normalize_answer_drops_case_punctuation_articles_and_extra_spaces():
    assert data.normalize_answer("  The Denver  Broncos, an NFL team! ") == "denver broncos nfl team"
    assert data.normalize_answer("Theater a-b") == "theater ab"  # articles only as whole words; "-" is removed


def test_exact_match_ignores_case_articles_and_punctuation():
    assert data.exact_match_score("the Denver Broncos.", "Denver Broncos") == 1.0
    assert data.exact_match_score("Denver", "Denver Broncos") == 0.0


def test_f1_of_a_partial_overlap_matches_the_hand_computation():
    # pred tokens [denver, broncos, team], gold [denver, broncos]: 2 shared, P = 2/3, R = 1,
    # F1 = 2 * (2/3) * 1 / (2/3 + 1) = 0.8
    assert data.f1_score("the Denver Broncos team", "Denver Broncos") == pytest.approx(0.8)
    # pred [carolina, panthers, and, broncos], gold [denver, broncos]: 1 shared, P = 1/4, R = 1/2,
    # F1 = 2 * (1/8) / (3/4) = 1/3
    assert data.f1_score("Carolina Panthers and Broncos", "Denver Broncos") == pytest.approx(1 / 3)


def test_f1_counts_a_repeated_token_only_as_often_as_the_gold_has_it():
    # pred [cat, cat], gold [cat]: 1 shared, P = 1/2, R = 1, F1 = 2/3
    assert data.f1_score("the cat cat", "a cat") == pytest.approx(2 / 3)


def test_squad_scores_take_the_best_gold_answer():
    # question 1: EM 1, F1 1. Question 2: golds "Denver Broncos" (EM 0, F1 0.8) and "Broncos"
    # (EM 0, F1 2*(1/3)*1/(4/3) = 0.5): best EM 0, best F1 0.8. Means: EM 50, F1 90, f1-em 70.
    scores = data.squad_metrics(["Denver Broncos", "the Denver Broncos team"],
                                [["Broncos", "Denver Broncos"], ["Denver Broncos", "Broncos"]])
    assert scores == pytest.approx({"f1-em": 70.0, "f1": 90.0, "em": 50.0})


def test_empty_prediction_scores_zero():
    assert data.squad_metrics([""], [["Denver Broncos"]]) == {"f1-em": 0.0, "f1": 0.0, "em": 0.0}
    # v1.1 quirk, kept: when the gold normalises to nothing too, EM is 1 but F1 is 0
    assert (data.exact_match_score("", "the"), data.f1_score("", "the")) == (1.0, 0.0)


def test_metric_for_squad_like_records_is_f1_em_on_the_first_line(squad_src, tmp_path):
    out = prepare_squad(squad_src, tmp_path / "out", n_dev=3)
    metric, test = data.metric_for(str(out)), data.load_split(out, "test")
    # "gold" against "gold 0": P = 1, R = 1/2, F1 = 2/3 (the best of its golds), EM 0
    f1, em = 100 * (1 + 1 + 2 / 3) / 3, 100 * 2 / 3
    assert metric([" gold 0\nQuestion: ...", "gold 1", "gold"], test) == \
        pytest.approx({"f1-em": (f1 + em) / 2, "f1": f1, "em": em})


def test_metric_for_classification_records_is_accuracy(copa_src, tmp_path):
    out = prepare_copa(copa_src, tmp_path / "out")
    test = data.load_split(out, "test")
    assert data.metric_for(str(out))([r["label"] for r in test], test) == {"acc": 100.0}

# -----------------------------------------------------------------------------
# the real files in shared/assets (skipped when absent)

def asset(path):
    if not (ASSETS / path).exists():
        pytest.skip(f"shared/assets/{path} is not present")
    return ASSETS / path


def test_assets_copa_gives_the_paper_sizes_400_50_50(tmp_path):
    out = prepare_copa(asset("copa"), tmp_path / "a")
    assert sizes(out) == {"train": 400, "dev": 50, "test": 50}
    assert file_bytes(out) == file_bytes(prepare_copa(asset("copa"), tmp_path / "b"))
    assert data.load_split(out, "train")[0]["target"] == " choice1"  # idx 0: "The sun was rising."


def test_assets_boolq_without_train_fails_by_default(tmp_path):
    with pytest.raises(UserError, match="train.jsonl"):
        prepare_boolq(asset("boolq"), tmp_path / "out")


def test_assets_boolq_validation_gives_dev_and_test_of_1635(tmp_path):
    out = prepare_boolq(asset("boolq"), tmp_path / "a", allow_missing_train=True)
    assert sizes(out) == {"train": 0, "dev": 1635, "test": 1635}
    assert file_bytes(out) == file_bytes(prepare_boolq(asset("boolq"), tmp_path / "b", allow_missing_train=True))


def test_assets_squad_official_dev_gives_a_test_set_of_10570(tmp_path):
    out = prepare_squad(asset("squad"), tmp_path / "out", allow_missing_train=True)
    assert sizes(out) == {"train": 0, "dev": 0, "test": 10570}
    first = data.load_split(out, "test")[0]
    assert first["target"] == " Denver Broncos" and first["prompt"].endswith(
        "\nQuestion: Which NFL team represented the AFC at Super Bowl 50?\nAnswer:")


def test_assets_squad_small_splits_the_official_dev_file_by_article(tmp_path):
    out = prepare_squad_small(asset("squad"), tmp_path / "out")
    ids = ids_by_split(out)
    squad = json.loads(gzip.decompress((asset("squad") / "dev-v1.1.json.gz").read_bytes()))
    article = {qa["id"]: a for a, art in enumerate(squad["data"]) for p in art["paragraphs"] for qa in p["qas"]}
    assert len(ids["test"]) >= 1000 and len(ids["dev"]) >= 300
    assert sorted(i for split in ids.values() for i in split) == sorted(article)  # all 10,570, each once
    assert len(article) == 10570
    articles = [{article[i] for i in split} for split in ids.values()]
    assert sum(map(len, articles)) == len(set.union(*articles)) == 48
