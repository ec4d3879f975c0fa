"""bench.py end to end on a tiny random model: every section gives every row, and with adapters left at their
initialisation every method generates the base model's tokens (so the speed rows compare like with like)."""
import json
import shutil

import torch

import bench
from tiny_llama import GQA, SP_VOCAB, hf_config, random_hf_model, train_sentencepiece


def test_bench_reports_every_row_and_methods_at_init_generate_the_base_tokens(tmp_path, capsys):
    folder = tmp_path / "tiny_hf"  # an HF folder, so that the HF section runs on the same weights too
    random_hf_model(hf_config(GQA, SP_VOCAB, max_seq_len=64)).save_pretrained(folder)
    shutil.copy(train_sentencepiece(tmp_path / "sp"), folder / "tokenizer.model")
    threads = torch.get_num_threads()
    bench.main(["--model", str(folder), "--device", "cpu", "--threads", "1", "--runs", "1", "--prompt_len", "16",
                "--new_tokens", "4", "--batch", "3", "--init", "--json"])
    torch.set_num_threads(threads)
    report = json.loads(capsys.readouterr().out)
    rows = report["rows"]

    table4 = {(r["method"], r["beams"]): r for r in rows if r["section"] == "table4"}
    lora_r = report["setting"]["lora_r"]
    assert set(table4) == {(m, b) for m in ("base", "PARA r=12", "(IA)^3", f"LoRA r={lora_r}") for b in (1, 3)}
    for (method, beams), row in table4.items():
        assert row["tokens"] == table4["base", beams]["tokens"], (method, beams)
        assert len(row["tokens"][0]) == 4  # EOS off: every method makes exactly new_tokens tokens
        assert row["tokens/s"] > 0 and row["peak MiB"] > row["adapter MiB"] >= 0

    tenant = {(r["method"], r["adapters"]): r for r in rows if r["section"] == "multitenant"}
    assert set(tenant) == {("base", 0)} | {(m, n) for m in ("PARA", "(IA)^3", "LoRA") for n in (1, 3)}
    for key, row in tenant.items():
        assert row["tokens"] == tenant["base", 0]["tokens"], key
        assert len(row["tokens"]) == 3 and all(len(t) == 4 for t in row["tokens"])
    assert len({tuple(t) for t in tenant["base", 0]["tokens"]}) > 1  # different prompts, not one prompt 3 times

    hf = {r["measurement"]: r for r in rows if r["section"] == "hf"}
    assert set(hf) == {"greedy", "beam 3"} and all(r["same tokens"] for r in hf.values())
    assert {r["measurement"] for r in rows if r["section"] == "ceiling"} == {
        "ceiling: matrix-vector products only", "bound: our prefill + steps at the ceiling"}
    assert len(report["claims"]) == 10 and all(c["holds"] in ("yes", "no", "undecided") for c in report["claims"])


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
    assert (holds(1.31, 1.4), holds(1.2, 1.29), holds(1.25, 1.35)) == ("yes", "no", "undecided")
