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
    assert len(report["claims"]) == 10 and all(isinstance(c["holds"], bool) for c in report["claims"])
