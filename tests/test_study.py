"""study.py end to end on the tiny model and a tiny task with SQuAD-style answers: the learning rate chosen on dev,
more seeds for PARA and the strongest baseline, a resumable set of runs, and the table with its intervals."""

import json

import numpy as np
import pytest

import study
from test_train import task_records, tiny_model, write_task  # noqa: F401 (a fixture)


@pytest.fixture(scope="module")
def qa_task(tmp_path_factory):
    """The tiny task, scored as extractive QA (F1 and EM against "answers")."""
    def records(n, seed):
        return [r | {"answers": [r["label"]]} for r in task_records(n, seed)]
    return write_task(tmp_path_factory.mktemp("task") / "qa", {"train": records(48, 0), "dev": records(16, 1),
                                                                 "test": records(16, 2)})


def test_the_study_tunes_each_method_on_dev_reruns_the_best_with_more_seeds_and_reports_intervals(
        qa_task, tiny_model, tmp_path, capsys):
    flags = ["--task", str(qa_task), "--ckpt_dir", str(tiny_model), "--out", str(tmp_path / "study"),
             "--methods", "zero-shot,PARA r=12,(IA)^3,static twin", "--more_seeds", "(IA)^3,static twin",
             "--lrs", "1e-2,3e-2", "--seeds", "1,2",
             "--train_examples", "32", "--eval_interval", "2", "--extra", "--num_beams 1"]
    study.main(flags)
    table = (tmp_path / "study" / "study.md").read_text()
    for name in ("zero-shot", "PARA r=12", "(IA)^3", "static twin"):
        assert f"| {name} |" in table
    seeds = {row.split(" | ")[0][2:]: row.split(" | ")[3] for row in table.splitlines()[2:6]}  # method: seeds
    # one of the two baselines is the strongest and gets the seeds anyway; the other has them from --more_seeds
    assert seeds == {"zero-shot": "1", "PARA r=12": "2", "(IA)^3": "2", "static twin": "2"}
    runs = sorted(p.name for p in (tmp_path / "study").iterdir() if p.is_dir())
    para = [r for r in runs if r.startswith("para")]
    assert len({r.split("-seed")[0] for r in para}) >= 2  # the grid, at seed 1
    assert {r.split("-seed")[1] for r in para} == {"1", "2"}  # PARA's chosen rate with a second seed
    assert "| PARA minus | test F1 (95% paired CI)" in table
    assert table.count("| seed 1 | l_") == 3 and table.count("| seed 2 | l_") == 3  # PARA's prompt use, per seed
    try:
        import matplotlib  # noqa: F401 (the picture's only requirement)
        assert (tmp_path / "study" / "prompt_use.png").exists()
    except ImportError:
        pass
    # the grid trains; only the rate of the lowest dev loss is scored by generation
    grid = {r: json.loads((tmp_path / "study" / r / "results.json").read_text()) for r in para if r.endswith("seed1")}
    best = min(grid, key=lambda r: grid[r]["best_dev_loss"])
    assert {r: g["eval_splits"] for r, g in grid.items()} == {r: ["dev", "test"] if r == best else [] for r in grid}
    # a second call runs nothing: every run is finished
    before = {p: p.stat().st_mtime for p in (tmp_path / "study").rglob("results.json")}
    capsys.readouterr()
    study.main(flags)
    assert "$ train.py" not in capsys.readouterr().out
    assert before == {p: p.stat().st_mtime for p in (tmp_path / "study").rglob("results.json")}


def test_an_unknown_method_name_is_refused_with_the_list_of_names(capsys):
    for flags, bad in ((["--methods", "PARA r=12,LoRA"], "'LoRA'"), (["--more_seeds", "twin"], "'twin'")):
        with pytest.raises(SystemExit):
            study.parse_args(flags)
        err = capsys.readouterr().err
        assert f"unknown method {bad}" in err and "static twin" in err  # the names to choose from


def test_bootstrap_interval_covers_the_mean_and_narrows_with_more_questions():
    rng = np.random.default_rng(0)
    small, large = rng.normal(50, 20, 100), rng.normal(50, 20, 10_000)
    low, high = study.bootstrap(small, 2000)
    assert low < small.mean() < high
    low_large, high_large = study.bootstrap(large, 2000)
    assert high_large - low_large < (high - low) / 5  # 100 times the questions: a tenth of the width


def test_prompt_use_finds_no_spread_in_a_static_adapter_and_some_in_a_prompt_aware_one():
    import torch

    from tiny_llama import fresh, randomise_adapter

    class Tokenizer:
        pad_id = 0

    prompts = [[5, 9, 2, 7], [3, 8], [11, 4, 6, 60, 2], [1, 2, 3]]
    model = fresh("para")
    with torch.no_grad():
        for block in model.layers:
            block.vector_generator.bias.add_(0.1)  # W_up = 0: every prompt gets the vectors b_up = 1.1
    for layer in study.vector_statistics(model, Tokenizer(), prompts, batch=3).values():
        for total, squares, n in layer:
            mean = total / n
            assert n == 4 and torch.allclose(mean, torch.full_like(mean, 1.1, dtype=torch.float64))
            assert (squares / n - mean * mean).abs().max() < 1e-12  # no spread across prompts
    randomise_adapter(model, seed=1)  # W_up != 0: the vectors depend on the prompt
    spread = [((squares / n - (total / n) ** 2).clamp(min=0).sqrt().mean()).item()
              for layer in study.vector_statistics(model, Tokenizer(), prompts).values() for total, squares, n in layer]
    assert min(spread) > 1e-3
