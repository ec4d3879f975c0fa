"""The sentencepiece tokenizer (Llama 2's tokenizer.model) against HF's sentencepiece-backed Llama tokenizer:
ids on varied text, BOS/EOS, decoding, and Meta's chat format. A tiny model trained here always runs; the real
Llama 2 tokenizer.model runs when the shared assets are present."""
import json
import re

import pytest
import sentencepiece

from conftest import ASSETS
from errors import UserError
from tiny_llama import train_sentencepiece
from tokenizer import Tokenizer

LLAMA2_TOKENIZER = ASSETS / "llama2-tokenizer" / "tokenizer.model"
TEXTS = [
    "",
    "Hello world",
    " one leading space",
    "   three leading spaces",
    "trailing spaces  ",
    "runs     of      spaces",
    "line one\nline two\n\nafter a blank line\n",
    "tabs\tand\r\nCRLF",
    "digits 12345, 3.14159 and 1,000,000",
    "café naïve Straße ÆØÅ 中文 日本語 한국어 Ελληνικά",
    "emoji 🦙🔥👍🏽 and a rare one 🫠",
    "def f(x):\n    return x ** 2  # code\n\tif x: pass",
    "“curly quotes” — dashes… and ▁ (the sentencepiece space mark)",
]


def hf_sentencepiece_llama_tokenizer(path):
    """HF's Llama tokenizer on sentencepiece itself, configured as Llama 2's (BOS added, EOS not).

    In transformers 5, LlamaTokenizer is the tokenizers-backed one (a conversion of the .model file); the
    sentencepiece-backed path is SentencePieceBackend. legacy=True runs sentencepiece's own encoder on the text
    (legacy=False strips sentencepiece's dummy prefix space); the special_tokens_pattern "bos" prepends BOS."""
    from transformers.tokenization_utils_sentencepiece import SentencePieceBackend

    return SentencePieceBackend(vocab_file=str(path), unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                legacy=True, special_tokens_pattern="bos")


@pytest.fixture(scope="module")
def tiny_model_path(tmp_path_factory):
    return train_sentencepiece(tmp_path_factory.mktemp("sentencepiece"))


@pytest.fixture(scope="module", params=["tiny", "llama2"])
def model_path(request, tiny_model_path):
    """The tokenizer.model under test: the tiny one trained here, and Llama 2's when the assets hold it."""
    if request.param == "tiny":
        return tiny_model_path
    if not LLAMA2_TOKENIZER.is_file():
        pytest.skip(f"Llama 2's tokenizer.model is not in the shared assets ({LLAMA2_TOKENIZER.name})")
    return LLAMA2_TOKENIZER


@pytest.fixture(scope="module")
def tokenizers(model_path):
    """(ours, HF's) on the same tokenizer.model."""
    return Tokenizer.from_file(str(model_path)), hf_sentencepiece_llama_tokenizer(model_path)


# -----------------------------------------------------------------------------
# ids

@pytest.mark.parametrize("text", TEXTS)
def test_ids_match_hf_sentencepiece_llama_tokenizer(tokenizers, text):
    ours, hf = tokenizers
    assert ours.encode(text) == hf.encode(text)


@pytest.mark.parametrize("text", TEXTS)
def test_bos_false_gives_hf_ids_without_special_tokens(tokenizers, text):
    ours, hf = tokenizers
    assert ours.encode(text, bos=False) == hf.encode(text, add_special_tokens=False)


def test_bos_is_added_by_default(tokenizers):
    ours, hf = tokenizers
    assert ours.add_bos
    assert ours.encode("Hello")[0] == ours.bos_id == hf.bos_token_id
    assert ours.encode("Hello") == [ours.bos_id] + ours.encode("Hello", bos=False)


def test_eos_true_appends_the_eos_id(tokenizers):
    ours, hf = tokenizers
    assert ours.eos_id == hf.eos_token_id
    assert ours.encode("Hello", eos=True) == ours.encode("Hello") + [ours.eos_id]
    assert ours.encode("Hello", bos=False, eos=True) == ours.encode("Hello", bos=False) + [ours.eos_id]


def test_special_token_text_is_encoded_as_plain_text_like_meta(tokenizers):
    # Meta's tokenizer never turns the text "<s>" into the BOS id (HF's does): a prompt cannot forge a turn
    ours, _ = tokenizers
    ids = ours.encode("a </s> b <s>", bos=False)
    assert ours.bos_id not in ids and ours.eos_id not in ids
    assert ours.decode(ids) == "a </s> b <s>"


def test_vocabulary_size_and_special_ids_come_from_the_model_file(tokenizers, model_path):
    ours, hf = tokenizers
    sp = sentencepiece.SentencePieceProcessor(model_file=str(model_path))
    assert ours.n_words == sp.vocab_size() == hf.vocab_size
    assert (ours.bos_id, ours.eos_id) == (1, 2)  # Llama 2's (and the tiny model's trainer settings)
    assert ours.pad_id == ours.eos_id  # Llama 2 has no pad token; padding is masked, eos stands in


def test_llama2_tokenizer_has_32000_pieces():
    if not LLAMA2_TOKENIZER.is_file():
        pytest.skip("Llama 2's tokenizer.model is not in the shared assets")
    assert Tokenizer.from_file(str(LLAMA2_TOKENIZER)).n_words == 32000


# -----------------------------------------------------------------------------
# decoding

@pytest.mark.parametrize("text", [t for t in TEXTS if "▁" not in t])  # sentencepiece decodes "▁" as a space
def test_decode_round_trips_the_text(tokenizers, text):
    ours, _ = tokenizers
    assert ours.decode(ours.encode(text, eos=True)) == text


# -----------------------------------------------------------------------------
# Meta's chat format (llama/generation.py chat_completion), spelled out with sentencepiece itself

def test_llama2_chat_format_is_metas(tokenizers, model_path):
    ours, _ = tokenizers
    sp = sentencepiece.SentencePieceProcessor(model_file=str(model_path))
    dialog = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": " Hi! "},
              {"role": "assistant", "content": "Hello. "}, {"role": "user", "content": "2+2?"}]
    # the system prompt joins the first user message, and only the joined text's ends are stripped
    expected = ([1] + sp.encode("[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\n Hi! [/INST] Hello. ") + [2]
                + [1] + sp.encode("[INST] 2+2? [/INST]"))
    assert ours.format_chat(dialog) == expected


def test_llama2_chat_format_without_system_prompt(tokenizers, model_path):
    ours, _ = tokenizers
    sp = sentencepiece.SentencePieceProcessor(model_file=str(model_path))
    assert ours.format_chat([{"role": "user", "content": "Hi"}]) == [1] + sp.encode("[INST] Hi [/INST]")


# -----------------------------------------------------------------------------
# unreadable tokenizer files: a UserError that names the file, never a library's own exception

def bpe_tokenizer_json(folder):
    """A valid tokenizer.json of a tiny byte-level BPE with no chat tokens; returns its path."""
    from tokenizers import Tokenizer as HFTokenizer, models

    path = folder / "tokenizer.json"
    HFTokenizer(models.BPE({"a": 0, "b": 1, "ab": 2, "</s>": 3}, [("a", "b")])).save(str(path))
    return path


def test_corrupt_tokenizer_model_is_refused_naming_the_file(tmp_path):
    path = tmp_path / "tokenizer.model"
    path.write_bytes(bytes(range(256)) * 8)
    with pytest.raises(UserError, match=f"{re.escape(str(path))} is not a readable sentencepiece model .*re-download it"):
        Tokenizer.from_file(str(path))


def test_corrupt_tokenizer_json_is_refused_naming_the_file(tmp_path):
    path = tmp_path / "tokenizer.json"
    path.write_bytes(bytes(range(256)) * 8)
    with pytest.raises(UserError, match=f"{re.escape(str(path))} is not a readable tokenizer file .*re-download it"):
        Tokenizer.from_file(str(path))


def test_tokenizer_config_json_that_is_not_json_is_refused_naming_the_file(tmp_path):
    path = bpe_tokenizer_json(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text('{"eos_token": "</s>",')
    with pytest.raises(UserError, match=f"{re.escape(str(tmp_path / 'tokenizer_config.json'))} is not valid JSON"):
        Tokenizer.from_file(str(path))


def test_tokenizer_config_json_with_a_token_that_is_not_a_string_is_refused_naming_the_field(tmp_path):
    path = bpe_tokenizer_json(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": 3}))
    with pytest.raises(UserError, match="tokenizer_config.json: field 'eos_token' is 3, it must be a token"):
        Tokenizer.from_file(str(path))


def test_chat_format_of_a_tokenizer_without_one_is_refused(tmp_path):
    tokenizer = Tokenizer.from_file(str(bpe_tokenizer_json(tmp_path)))
    assert tokenizer.chat_format is None and tokenizer.eos_id == 3
    with pytest.raises(UserError, match="this tokenizer has no chat format: it belongs to a base model"):
        tokenizer.format_chat([{"role": "user", "content": "ab"}])
