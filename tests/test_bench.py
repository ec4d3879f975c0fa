"""bench.py end to end on a tiny random model: every section gives every row, and with adapters left at their
initialisation every method generates the base model's tokens (so the speed rows compare like with like)."""
import json
import shutil

import pytest
import torch

import bench
from tiny_llama import GQA, SP_VOCAB, hf_config, random_hf_model, train_sentencepiece


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """An HF folder, so that the HF section runs on the same weights too."""
    folder = tmp_path_factory.mktemp("tiny_hf")
    random_hf_model(hf_config(GQA, SP_VOCAB, max_seq_len=64)).save_pretrained(folder)
    shutil.copy(train_sentencepiece(tmp_path_factory.mktemp("sp")), folder / "tokenizer.model")
    return folder


def run_bench(folder, capsys, *flags):
    """bench.main's JSON report on the tiny model: 1 run of everything, prompts of 16 tokens, 4 new tokens, fp32 (auto
    would be bf16 on a CPU with native bf16)."""
    bench.main(["--model", str(folder), "--device", "cpu", "--dtype", "fp32", "--threads", "1", "--runs", "1",
                "--prompt_len", "16",
                "--new_tokens", "4", "--batch", "3", "--json", *flags])
    torch.set_num_threads(1)
    return json.loads(capsys.readouterr().out)


def test_bench_reports_every_row_and_methods_at_init_generate_the_base_tokens(tiny_folder, capsys):
    report = run_bench(tiny_folder, capsys, "--init")
    rows = report["rows"]

    table4 = {(r["method"], r["beams"]): r for r in rows if r["section"] == "table4"}
    lora_r, houlsby = report["setting"]["sizes"]["lora"]["r"], report["setting"]["sizes"]["houlsby"]["size"]
    names = ("base", "PARA r=12", "(IA)^3", f"LoRA r={lora_r}", "AdaLoRA r=12", f"Houlsby m={houlsby}")
    assert set(table4) == {(m, b) for m in names for b in (1, 3)}
    for (method, beams), row in table4.items():
        assert row["tokens"] == table4["base", beams]["tokens"], (method, beams)
        assert len(row["tokens"][0]) == 4  # EOS off: every method makes exactly new_tokens tokens
        assert row["tokens/s"] > 0 and row["peak MiB"] > row["adapter MiB"] >= 0

    tenant = {(r["method"], r["adapters"]): r for r in rows if r["section"] == "multitenant"}
    assert set(tenant) == {("base", 0)} | {(m, n) for m in names[1:] for n in (1, 3)}
    for key, row in tenant.items():
        assert row["tokens"] == tenant["base", 0]["tokens"], key
        assert len(row["tokens"]) == 3 and all(len(t) == 4 for t in row["tokens"])
    assert len({tuple(t) for t in tenant["base", 0]["tokens"]}) > 1  # different prompts, not one prompt 3 times

    hf = {r["measurement"]: r for r in rows if r["section"] == "hf"}
    assert set(hf) == {"greedy", "beam 3"} and all(r["same tokens"] for r in hf.values())
    assert {r["measurement"] for r in rows if r["section"] == "ceiling"} == {
        "ceiling: matrix-vector products only", "bound: our prefill + steps at the ceiling"}
    # per beam: PARA against base and each of 4 baselines, and its memory; 8 adapters: against 4 baselines, and
    # against one adapter; against HF: greedy and beam 3
    assert len(report["claims"]) == 2 * 6 + 5 + 2
    assert all(c["holds"] in ("yes", "no", "undecided") for c in report["claims"])


def test_median_interval_is_the_distribution_free_95_percent_interval():
    # ranks from the Binomial(n, 1/2) tables: n = 15 -> 4th to 12th, n = 20 -> 6th to 15th, n = 100 -> 40th to 61st
    assert bench.median_interval(list(range(15, 0, -1))) == [4, 12]
    assert bench.median_interval(list(range(1, 21))) == [6, 15]
    assert bench.median_interval(list(range(1, 101))) == [40, 61]
    assert bench.median_interval([3.0, 1.0, 2.0]) == [1.0, 3.0]  # too few runs for 95%: the whole range


def test_a_claim_holds_only_when_its_whole_interval_meets_the_target():
    def holds(low, high):
        row = {"section": "hf", "measurement": "greedy", "ours / HF": (low + high) / 2, "95% CI": {"ours / HF": [low, high]}}
        return bench.claims([row])[0]["holds"]
    assert (holds(1.01, 1.1), holds(0.9, 0.99), holds(0.95, 1.05)) == ("yes", "no", "undecided")  # ours > HF


def test_bench_with_its_random_adapters_generates_other_tokens_than_the_base_model(tiny_folder, capsys):
    # the control for the test above: were no adapter attached, every method would give the base tokens too
    report = run_bench(tiny_folder, capsys, "--sections", "table4", "--new_tokens", "8")
    rows = {(r["method"], r["beams"]): r for r in report["rows"]}
    for beams in (1, 3):
        assert not rows["PARA r=12", beams]["= base tokens"]  # the vectors really scale the projections
        assert rows["base", beams]["adapter params"] == 0
        assert all(r["adapter params"] > 0 for (m, b), r in rows.items() if m != "base" and b == beams)


def test_bench_compile_section_gives_eager_and_compiled_decode_against_the_ceiling(tiny_folder, capsys):
    report = run_bench(tiny_folder, capsys, "--sections", "compile", "--runs", "2")
    rows = {r["measurement"]: r for r in report["rows"]}
    assert set(rows) == {"eager decode", "compiled decode"}
    assert rows["compiled decode"]["same tokens"]  # compiling changes no token
    assert all(r["decode steps/s"] > 0 and r["/ ceiling"] > 0 for r in rows.values())
    assert rows["compiled decode"]["compile s"] > 0
    assert {c["claim"] for c in report["claims"]} == {"eager decode steps/s / ceiling",
                                                      "compiled decode steps/s / ceiling"}


def test_bench_train_section_times_our_step_and_hf_peft_s_on_the_same_examples(tiny_folder, tmp_path, capsys):
    from test_train import task_records, write_task

    task = write_task(tmp_path / "task", {split: task_records(16, i) for i, split in enumerate(("train", "dev", "test"))})
    report = run_bench(tiny_folder, capsys, "--sections", "train", "--task", str(task))
    rows = {r["method"]: r for r in report["rows"]}
    lora = next(name for name in rows if name.startswith("LoRA"))
    assert set(rows) == {"PARA r=12", "(IA)^3", lora} and rows["PARA r=12"]["HF+PEFT tokens/s"] is None
    assert all(rows[m]["ours tokens/s"] > 0 and rows[m]["HF+PEFT tokens/s"] > 0 for m in ("(IA)^3", lora))
    assert len(report["claims"]) == 2  # ours / HF+PEFT for LoRA and (IA)^3


def test_bench_runs_on_a_random_model_of_a_named_shape(capsys):
    bench.main(["--model", "random:tiny", "--device", "cpu", "--threads", "1", "--runs", "1", "--prompt_len", "16",
                "--new_tokens", "4", "--sections", "table4,ceiling", "--json"])
    torch.set_num_threads(1)
    report = json.loads(capsys.readouterr().out)
    assert report["setting"]["model"] == "random:tiny"
    assert {r["method"] for r in report["rows"] if r["section"] == "table4"} >= {"base", "PARA r=12"}
    assert all(len(r["tokens"][0]) == 4 for r in report["rows"] if r["section"] == "table4")


def test_bench_serve_section_loads_a_server_of_every_method_and_compares_batching(tiny_folder, capsys):
    report = run_bench(tiny_folder, capsys, "--sections", "serve", "--serve_tenants", "1,2", "--serve_requests", "4",
                       "--serve_clients", "2", "--serve_rate", "50,100", "--serve_max_batch", "4")
    step = [r for r in report["rows"] if r["method"] == "engine decode step"]
    rows = [r for r in report["rows"] if r["method"] != "engine decode step"]
    methods = {r["method"] for r in rows}
    assert {"base", "base, one at a time", "base, static batches", "mixed"} <= methods and "PARA r=12" in methods
    assert {(r["tenants"], r["load"]) for r in rows if r["method"] == "mixed" and r["mix"] == "short"} == \
        {(k, load) for k in (1, 2) for load in ("2 clients", "50 req/s", "100 req/s")}  # every method's tenants
    assert {r["mix"] for r in rows} == {"table4", "short"}
    para = {(r["mix"], r["tenants"], r["load"]) for r in rows if r["method"] == "PARA r=12"}
    assert para == {(mix, k, load) for mix in ("table4", "short") for k in (1, 2)
                    for load in ("2 clients", "50 req/s", "100 req/s")}  # every K, at every load
    assert {r["load"] for r in rows if r["method"] == "base, one at a time"} == {"2 clients"}
    assert all(r["tokens/s"] > 0 and r["TTFT p50 ms"] > 0 for r in rows)
    assert len(step) == 1 and step[0]["rows"] == 4 and 0 < step[0]["/ ceiling"]
    assert step[0]["/ ceiling with the cache reads"] > step[0]["/ ceiling"]  # the same rounds, the cache's time added
    claims = {c["claim"].split(",")[0] for c in report["claims"]}
    assert claims == {"PARA / base tokens/s", "PARA / base p99 inter-token latency",
                      "continuous batching / one at a time tokens/s", "engine decode steps/s / ceiling",
                      "engine decode steps/s / (ceiling + one read of the KV cache)"}


def test_bench_serve_measures_only_the_rows_asked_for_with_prefills_in_pieces(tiny_folder, capsys):
    report = run_bench(tiny_folder, capsys, "--sections", "serve", "--serve_tenants", "2", "--serve_requests", "4",
                       "--serve_clients", "2", "--serve_rate", "50", "--serve_max_batch", "4", "--serve_mixes",
                       "short", "--serve_methods", "para,mixed", "--serve_prefill_layers", "1")
    rows = [r for r in report["rows"] if r["method"] != "engine decode step"]
    assert {r["method"] for r in rows} == {"base", "PARA r=12", "mixed"}
    assert report["setting"]["serve_prefill_layers"] == 1
    assert all(r["tokens/s"] > 0 for r in rows)
