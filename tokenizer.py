"""
Tokenizers: sentencepiece for Llama 2's tokenizer.model, byte-level BPE for GGUF files and tokenizer.json.

Both expose the same small interface: encode(text, bos, eos) -> ids, decode(ids) -> text,
bos_id / eos_id / pad_id / n_words, and format_chat(messages) -> ids in the model's own chat format.
"""
import json
import os
from typing import Optional

from errors import UserError, shorten


class Tokenizer:
    def __init__(self, backend: str, model, bos_id: int, eos_id: int, pad_id: int, n_words: int,
                 add_bos: bool, chat_format: Optional[str]):
        self.backend, self.model = backend, model  # "sentencepiece" or "bpe"
        self.bos_id, self.eos_id, self.pad_id, self.n_words = bos_id, eos_id, pad_id, n_words
        self.add_bos = add_bos  # what the model's own tokenizer config does by default
        self.chat_format = chat_format  # "llama2" ([INST]), "chatml" (<|im_start|>), "gemma" (<start_of_turn>) or None

    @staticmethod
    def from_file(path: str) -> "Tokenizer":
        """tokenizer.model (sentencepiece, Llama 2) or tokenizer.json (HF byte-level BPE)."""
        if not os.path.isfile(path):
            raise UserError(f"tokenizer file {path!r} not found: copy the model's tokenizer next to its weights")
        if path.endswith(".model"):
            from sentencepiece import SentencePieceProcessor
            try:
                sp = SentencePieceProcessor(model_file=path)
            except (RuntimeError, OSError) as e:  # sentencepiece's errors on a file it cannot parse
                raise UserError(f"{path} is not a readable sentencepiece model ({e}): it is truncated or corrupt; "
                                "re-download it") from None
            # Llama 2 has no pad token (-1); padding is always masked, so any id will do: use eos
            pad = sp.pad_id() if sp.pad_id() >= 0 else sp.eos_id()
            return Tokenizer("sentencepiece", sp, sp.bos_id(), sp.eos_id(), pad, sp.vocab_size(), True, "llama2")
        from tokenizers import Tokenizer as HFTokenizer
        try:
            tok = HFTokenizer.from_file(path)
        except Exception as e:  # tokenizers raises a plain Exception for any file it cannot parse
            raise UserError(f"{path} is not a readable tokenizer file ({e}): it is truncated or corrupt; "
                            "re-download it") from None
        config_path = os.path.join(os.path.dirname(path), "tokenizer_config.json")
        config = read_config(config_path) if os.path.isfile(config_path) else {}
        special = {t.content: i for i, t in tok.get_added_tokens_decoder().items()}

        def token_id(name, default):
            value = config.get(name, default)
            value = value.get("content") if isinstance(value, dict) else value
            if value is not None and not isinstance(value, str):
                raise UserError(f"{config_path}: field {name!r} is {shorten(value)}, it must be a token (a string); "
                                "re-download it, or correct the field")
            return special.get(value, tok.token_to_id(value) if value else None)

        bos, eos = token_id("bos_token", "<s>"), token_id("eos_token", "</s>")
        pad = token_id("pad_token", None)
        chat = "chatml" if "<|im_start|>" in special else "gemma" if "<start_of_turn>" in special else None
        return Tokenizer("bpe", tok, bos if bos is not None else -1, eos, pad if pad is not None else eos,
                         tok.get_vocab_size(), bool(config.get("add_bos_token", False)), chat)

    @staticmethod
    def from_gguf(metadata: dict, path: str) -> "Tokenizer":
        """Byte-level BPE from the token list and merges in a GGUF file's metadata (key -> value), read from path."""
        from tokenizers import AddedToken, Tokenizer as HFTokenizer, decoders, models, pre_tokenizers

        def field(name, default=None):
            return metadata.get(name, default)

        if field("tokenizer.ggml.model") == "llama" and str(field("general.architecture")).startswith("gemma"):
            return Tokenizer.gemma_from_gguf(metadata, path)
        if field("tokenizer.ggml.model") != "gpt2":
            raise UserError(f"{path}: GGUF tokenizer {shorten(field('tokenizer.ggml.model'))} is not supported, "
                            "only byte-level BPE ('gpt2') and Gemma's sentencepiece BPE")
        tokens, types = field("tokenizer.ggml.tokens"), field("tokenizer.ggml.token_type")
        merges, eos = field("tokenizer.ggml.merges"), field("tokenizer.ggml.eos_token_id")
        bos, pad = field("tokenizer.ggml.bos_token_id", -1), field("tokenizer.ggml.padding_token_id", eos)

        def list_of(value, kind):
            return isinstance(value, list) and all(isinstance(v, kind) for v in value)

        if not (list_of(tokens, str) and list_of(types, int) and list_of(merges, str) and list_of([bos, eos, pad], int)):
            raise UserError(f"{path}: the tokenizer's tokens, token types, merges or special token ids are missing "
                            "or malformed; re-download it")
        try:
            tok = HFTokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, [tuple(m.split(" ", 1)) for m in merges]))
        except Exception as e:  # tokenizers raises a plain Exception, e.g. for a merge of tokens not in the list
            raise UserError(f"{path}: the tokenizer's tokens and merges do not fit together ({str(e).splitlines()[0]}); "
                            "re-download it") from None
        # GPT-2's byte-to-unicode mapping and split regex (SmolLM2's merges never join two digits)
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.decoder = decoders.ByteLevel()
        # control tokens (type 3), e.g. <|im_start|>, are matched whole in the text, never split into bytes
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty == 3])
        template = field("tokenizer.chat_template")
        chat = "chatml" if isinstance(template, str) and "<|im_start|>" in template else None
        return Tokenizer("bpe", tok, bos, eos, pad, len(tokens), bool(field("tokenizer.ggml.add_bos_token", False)), chat)

    @staticmethod
    def gemma_from_gguf(metadata: dict, path: str) -> "Tokenizer":
        """Gemma's sentencepiece BPE from a GGUF file's token list, rebuilt as HF rebuilds it (the file holds no
        merges): the merges are every split of a token into two tokens, the earlier a token in the list the
        earlier its merge; byte fallback; spaces written as "▁", with no prefix space."""
        from tokenizers import AddedToken, Tokenizer as HFTokenizer, decoders, models, normalizers, pre_tokenizers

        tokens, types = metadata.get("tokenizer.ggml.tokens"), metadata.get("tokenizer.ggml.token_type")
        ids = [metadata.get(f"tokenizer.ggml.{k}_token_id") for k in ("bos", "eos", "padding", "unknown")]
        if not (isinstance(tokens, list) and isinstance(types, list) and len(tokens) == len(types) and
                all(isinstance(i, int) for i in ids)):
            raise UserError(f"{path}: the tokenizer's tokens, token types or special token ids are missing or "
                            "malformed; re-download it")
        # a token of spaces only is stored as spaces, while the text's spaces become "▁" before lookup
        tokens = ["\u2581" * len(t) if " " in t and not t.strip() else t for t in tokens]
        vocab = {t: i for i, t in enumerate(tokens)}
        position = {t: -i for i, t in enumerate(tokens)}  # the earlier in the list, the earlier its merge
        merges = sorted(((t[:k], t[k:], p) for t, p in position.items() for k in range(1, len(t))
                         if t[:k] in vocab and t[k:] in vocab), key=lambda m: (m[2], len(m[0]), len(m[1])),
                        reverse=True)  # best first, ties broken as HF breaks them
        tok = HFTokenizer(models.BPE(vocab, [(a, b) for a, b, _ in merges], fuse_unk=True, byte_fallback=True,
                                     unk_token=tokens[ids[3]]))
        tok.normalizer = normalizers.Replace(" ", "\u2581")
        tok.pre_tokenizer = pre_tokenizers.Split(pattern=" ", behavior="merged_with_previous", invert=False)
        tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty == 3])
        tok.add_tokens([AddedToken(t, special=False, normalized=False) for t, ty in zip(tokens, types) if ty == 4])
        add_bos = metadata.get("tokenizer.ggml.add_bos_token", True)
        return Tokenizer("bpe", tok, ids[0], ids[1], ids[2], len(tokens), bool(add_bos), "gemma")

    def save(self, folder: str):
        """Write this tokenizer into folder, where from_file reads it back the same (ids, special tokens, BOS rule, chat
        format): sentencepiece's own tokenizer.model, or byte-level BPE as HF's tokenizer.json with a
        tokenizer_config.json naming its special tokens. A GGUF's tokenizer, built from the file's metadata
        (from_gguf), so becomes a file of its own, and a model saved with it needs no GGUF (loaders.save)."""
        if self.backend == "sentencepiece":
            with open(os.path.join(folder, "tokenizer.model"), "wb") as f:
                f.write(self.model.serialized_model_proto())
            return
        self.model.save(os.path.join(folder, "tokenizer.json"))
        names = {k: self.model.id_to_token(i) if i >= 0 else None  # a model without BOS has -1: written null
                 for k, i in (("bos_token", self.bos_id), ("eos_token", self.eos_id), ("pad_token", self.pad_id))}
        config = names | {"add_bos_token": self.add_bos, "tokenizer_class": "PreTrainedTokenizerFast"}
        with open(os.path.join(folder, "tokenizer_config.json"), "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2, ensure_ascii=False)

    def encode(self, text: str, bos: Optional[bool] = None, eos: bool = False) -> list[int]:
        """Token ids of text; bos=None adds BOS when the model's tokenizer config does (Llama 2 yes, SmolLM2 no)."""
        if self.backend == "sentencepiece":
            ids = self.model.encode(text)
        else:
            ids = self.model.encode(text, add_special_tokens=False).ids
        bos = self.add_bos if bos is None else bos
        return [self.bos_id] * bos + ids + [self.eos_id] * eos

    def decode(self, ids: list[int]) -> str:
        if self.backend == "sentencepiece":
            return self.model.decode(list(ids))
        return self.model.decode(list(ids), skip_special_tokens=False)

    def format_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """Token ids of a conversation [{"role": ..., "content": ...}] in the format the model was trained with.
        Ids rather than text because Llama 2 puts BOS/EOS ids between turns, which text cannot express."""
        if self.chat_format == "chatml":
            # SmolLM2's template (from the GGUF metadata): a default system turn, then <|im_start|>role\n...<|im_end|>\n
            if messages[0]["role"] != "system":
                messages = [{"role": "system", "content": "You are a helpful AI assistant named SmolLM, "
                             "trained by Hugging Face"}] + list(messages)
            text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
            return self.encode(text + "<|im_start|>assistant\n" * add_generation_prompt)
        if self.chat_format == "llama2":
            # Meta's format, per turn: [BOS][INST] <<SYS>>\nsys\n<</SYS>>\n\nuser [/INST] answer [EOS]
            # (Meta's chat_completion ends each answer with a space before EOS)
            if messages[0]["role"] == "system":
                first = f"<<SYS>>\n{messages[0]['content']}\n<</SYS>>\n\n{messages[1]['content']}"
                messages = [{"role": "user", "content": first}] + list(messages[2:])
            ids = []
            for user, answer in zip(messages[::2], messages[1::2]):
                ids += self.encode(f"[INST] {user['content'].strip()} [/INST] {answer['content'].strip()} ", True, True)
            if len(messages) % 2:
                ids += self.encode(f"[INST] {messages[-1]['content'].strip()} [/INST]", True, False)
            return ids
        if self.chat_format == "gemma":
            # Gemma's turns: <start_of_turn>user\n...<end_of_turn>\n, the assistant's role called "model"; a system
            # message opens the first user turn
            if messages[0]["role"] == "system" and len(messages) > 1:
                messages = [{"role": "user", "content": f"{messages[0]['content']}\n\n{messages[1]['content']}"},
                            *messages[2:]]
            text = "".join(f"<start_of_turn>{'model' if m['role'] == 'assistant' else m['role']}\n"
                           f"{m['content']}<end_of_turn>\n" for m in messages)
            return self.encode(text + "<start_of_turn>model\n" * add_generation_prompt)
        raise UserError("this tokenizer has no chat format: it belongs to a base model, give it plain text")


def read_config(path: str) -> dict:
    """A config file (tokenizer_config.json, params.json, config.json), which must hold one JSON object."""
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except ValueError as e:  # not JSON, or not UTF-8
        raise UserError(f"{path} is not valid JSON ({e}): re-download it") from None
    if not isinstance(config, dict):
        raise UserError(f"{path} holds a JSON {type(config).__name__}, not an object of named fields: re-download it")
    return config
