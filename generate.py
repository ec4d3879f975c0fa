"""
Text generation with a hand-written KV cache: greedy, sampling and beam search, and the command line.

    python generate.py --prompt "The capital of France is"            # greedy, streamed
    python generate.py --chat --prompt "Name three fruits." --num_beams 3
    python generate.py --prompts_file prompts.jsonl --json             # one batch, one JSON line per prompt

Every prompt of a batch is left-padded to the longest one, so that all rows end at the same column and the
next token of every row is read from the last position. The model masks the padding and counts each row's
positions from its first real token (model.Transformer.forward, pad_len), so a prompt generates the same
tokens in a batch as alone. Left padding is also what PARA needs: the prefill's last position is every row's
last prompt token, from which the vector generator computes that row's vectors (para.set_rows).

A generation is one prefill (one forward over all prompts, which fills the cache and, under PARA, computes
the vectors) followed by decode steps of one token per row, which only read the cache (gpt-fast's split).

Beam search follows the rules of HF Transformers' beam search (5.x), so that both return the same tokens.
"""
import argparse
import json
import os
import resource
import sys
import time
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

import para
from errors import UserError


class KVCache:
    """Keys and values of every layer, preallocated for up to `batch_size` rows and `max_len` positions.

    Each layer holds (batch_size, nkv, max_len, hd); a forward over B rows uses the first B of them. Only the
    nkv key/value heads are stored: attention shares each among nh/nkv query heads after reading.
    """

    def __init__(self, n_layers, batch_size, max_len, n_kv_heads, head_dim, device=None, dtype=torch.float32):
        shape = (batch_size, n_kv_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.len = 0  # positions written so far, the same in every row

    def update(self, layer_id, start_pos, k, v):
        """Write k, v (B, nkv, T, hd) at [start_pos, start_pos+T) of rows [0, B); return views of [0, start_pos+T)."""
        B, end = k.shape[0], start_pos + k.shape[2]
        self.k[layer_id][:B, :, start_pos:end] = k
        self.v[layer_id][:B, :, start_pos:end] = v
        self.len = end
        return self.k[layer_id][:B, :, :end], self.v[layer_id][:B, :, :end]

    def reorder(self, index, start=0):
        """Row index[i] becomes row i (index: LongTensor (B',), B' <= batch_size), in place.

        Beam search follows its surviving beams with this, and generation drops its finished rows. Only the
        written positions [start, len) are moved: a caller passes start > 0 when every row already holds the
        right values before `start` (the beams of one prompt share that prompt's keys and values).
        """
        for cache in self.k + self.v:
            cache[: len(index), :, start : self.len] = cache[:, :, start : self.len].index_select(0, index)


@dataclass
class Generation:
    tokens: list[int]  # the generated ids, EOS excluded
    text: str  # their decoding, cut before the first stop string
    seconds: float  # the whole batch's time: prefill and decoding
    prefill_seconds: float  # the prefill and the choice of the first token

    @property
    def tokens_per_s(self) -> float:
        return len(self.tokens) / self.seconds if self.seconds > 0 else 0.0


# -----------------------------------------------------------------------------
# One forward each


def prefill(model, tokens, pad_len, cache):
    """One forward over the left-padded prompts (B, T) at start_pos 0; logits (B, vocab) of each row's next token."""
    return model(tokens, 0, pad_len=pad_len, cache=cache, last_only=True)[:, -1]


def decode_step(model, token, pos, pad_len, cache):
    """Feed one token per row (B,) at cache position pos; logits (B, vocab) of each row's next token."""
    return model(token[:, None], pos, pad_len=pad_len, cache=cache)[:, -1]


def sample(logits, temperature=0.0, top_k=0, top_p=1.0, generator=None):
    """Next token of each row (B,) from logits (B, vocab): the argmax at temperature 0, else a draw
    from softmax(logits / temperature) restricted to the top_k tokens and to the top_p probability mass."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k > 0:
        kth_best = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth_best, float("-inf"))
    if top_p < 1.0:
        # keep the most likely tokens until their probability reaches top_p: drop a token when the
        # tokens ranked above it already reach it (so the most likely token always stays)
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs >= top_p  # (B, vocab), in sorted order
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]


# -----------------------------------------------------------------------------
# Generation


def left_pad(prompts, pad_id, device):
    """(B, T) tokens with each prompt at the right end of its row, and pad_len (B,), or None when no row is padded."""
    T = max(len(p) for p in prompts)
    tokens = torch.full((len(prompts), T), pad_id, dtype=torch.long)
    for i, p in enumerate(prompts):
        tokens[i, T - len(p):] = torch.tensor(p, dtype=torch.long)
    pad = [T - len(p) for p in prompts]
    return tokens.to(device), (torch.tensor(pad, device=device) if any(pad) else None)


def check_prompts(prompts, max_new_tokens, max_seq_len):
    """Refuse what the model cannot do, with a message that says what to change."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"prompt {i} is empty: give at least one token")
        if len(p) + max_new_tokens > max_seq_len:
            raise ValueError(
                f"prompt {i} has {len(p)} tokens; with {max_new_tokens} new tokens that is {len(p) + max_new_tokens}, "
                f"more than the model's context of {max_seq_len}: shorten the prompt, ask for fewer new tokens, "
                "or truncate the prompt from the left (--truncate)"
            )


def cut_at_stop(text, stop):
    """text up to (not including) the earliest stop string in it."""
    ends = [i for i in (text.find(s) for s in stop or []) if i >= 0]
    return text[: min(ends)] if ends else text


@torch.inference_mode()
def generate(model, tokenizer, prompts: list[list[int]], max_new_tokens=256, temperature=0.0, top_p=1.0, top_k=0,
             num_beams=1, length_penalty=1.0, early_stopping=False, stop=None, seed=None, adapter_ids=None,
             eos_id=None, stream=None) -> list[Generation]:
    """Continue each prompt (a list of token ids); all prompts form one left-padded batch.

    temperature 0 is greedy decoding; above 0 it samples, with top_k / top_p truncation and a seed.
    num_beams > 1 is beam search (greedy only), with HF's length_penalty and early_stopping (True, False, "never").
    A row stops at EOS (eos_id, default: the tokenizer's; -1: never), at max_new_tokens, or at a stop string:
    its tokens then include those of the stop string, its text is cut before it.
    adapter_ids (B,) pick each row's adapter from the bank of para.load_adapter (None: adapter 0, if any).
    stream(i, token) is called with every new token of prompt i as soon as it is chosen (not with beam search).
    """
    check_prompts(prompts, max_new_tokens, model.args.max_seq_len)
    if num_beams > 1 and temperature > 0:
        raise ValueError("beam search here is deterministic: use temperature 0 with num_beams > 1")
    if not (early_stopping is True or early_stopping is False or early_stopping == "never"):
        raise ValueError(f"early_stopping must be True, False or 'never', got {early_stopping!r}")
    eos_id = tokenizer.eos_id if eos_id is None else eos_id
    device, dtype = model.tok_embeddings.weight.device, model.tok_embeddings.weight.dtype
    tokens, pad_len = left_pad(prompts, tokenizer.pad_id, device)
    B, T0 = tokens.shape
    args = model.args
    cache = KVCache(args.n_layers, B * num_beams, T0 + max_new_tokens, args.n_kv_heads, args.head_dim, device, dtype)

    def hits_stop(ids):
        return bool(stop) and any(s in tokenizer.decode(ids) for s in stop)

    start = time.perf_counter()
    para.set_rows(model, adapter_ids)  # PARA computes each row's vectors during the prefill below
    logits = prefill(model, tokens, pad_len, cache)  # (B, vocab)
    if num_beams > 1:
        outputs, prefill_end = beam_search(model, logits, cache, pad_len, T0, max_new_tokens, eos_id, hits_stop,
                                           num_beams, length_penalty, early_stopping)
    else:
        generator = torch.Generator(device).manual_seed(seed) if seed is not None else None
        outputs, prefill_end = sample_tokens(model, logits, cache, pad_len, T0, max_new_tokens, eos_id, hits_stop,
                                             temperature, top_k, top_p, generator, stream)
    seconds = time.perf_counter() - start
    return [Generation(ids, cut_at_stop(tokenizer.decode(ids), stop), seconds, prefill_end - start) for ids in outputs]


def keep_rows(model, cache, rows, start=0):
    """Keep batch rows `rows` (a list), in that order, in the cache and in the adapters' per-row state."""
    index = torch.tensor(rows, device=cache.k[0].device)
    if rows != list(range(len(rows))):  # dropping the last rows moves nothing: the next forward just uses fewer
        cache.reorder(index, start)
    if start == 0:  # the adapters' per-row state comes from the prompt: with start > 0 every row already holds it
        para.reorder_rows(model, index)  # (skipping it saves about 1-2 ms per beam step, a walk over all modules)
    return index


def sample_tokens(model, logits, cache, pad_len, T0, max_new_tokens, eos_id, hits_stop,
                  temperature, top_k, top_p, generator, stream):
    """Greedy or sampled decoding of every row; finished rows leave the batch. Returns (ids per prompt, prefill end)."""
    outputs = [[] for _ in range(logits.shape[0])]
    rows = list(range(logits.shape[0]))  # the prompt of each batch row
    prefill_end = None
    for step in range(max_new_tokens):
        next_token = sample(logits, temperature, top_k, top_p, generator)  # (R,)
        running = []  # batch rows that go on
        for r, token in enumerate(next_token.tolist()):  # the one host sync of a step
            if token == eos_id:
                continue
            outputs[rows[r]].append(token)
            if stream:
                stream(rows[r], token)
            if not hits_stop(outputs[rows[r]]):
                running.append(r)
        prefill_end = prefill_end or time.perf_counter()
        if not running or step == max_new_tokens - 1:
            break
        if len(running) < len(rows):  # some rows finished: drop them rather than compute them on
            index = keep_rows(model, cache, running)
            next_token, rows = next_token[index], [rows[r] for r in running]
            pad_len = pad_len[index] if pad_len is not None else None
        logits = decode_step(model, next_token, T0 + step, pad_len, cache)
    return outputs, prefill_end


def beam_search(model, logits, cache, pad_len, T0, max_new_tokens, eos_id, hits_stop,
                num_beams, length_penalty, early_stopping):
    """Beam search, one independent search per prompt, by HF Transformers' rules:

    - Each step, every running beam is extended by every token, and the 2*num_beams best extensions of a prompt
      (by sum of log-probs) are its candidates. 2x, so that num_beams of them are left to run on even if
      num_beams end here.
    - A candidate ends on EOS, on a stop string, or at max_new_tokens. An ending candidate is kept as a finished
      hypothesis only if it ranks among the first num_beams candidates; its score is
      sum_logprobs / len ** length_penalty, len = its number of new tokens, EOS included.
      A prompt keeps its num_beams best finished hypotheses.
    - The first num_beams candidates that do not end are the next step's beams.
    - A prompt is done when it holds num_beams finished hypotheses and either early_stopping is True, or its best
      running beam could not beat the worst of them: sum / L ** length_penalty <= worst score, with L the current
      length (early_stopping False), or max_new_tokens when early_stopping is "never" and length_penalty > 0.
    - The answer is the best finished hypothesis.
    """
    V = logits.shape[-1]
    assert V >= 2 * num_beams, "beam search needs a vocabulary of at least 2 * num_beams tokens"
    n_prompts = logits.shape[0]
    beams = [[[]] for _ in range(n_prompts)]  # the running beams' tokens; one empty beam per prompt after prefill
    finished = [[] for _ in range(n_prompts)]  # (score, tokens) of the best finished hypotheses, best first
    searching = list(range(n_prompts))  # prompts not done, in batch order; each has len(beams[p]) consecutive rows
    beam_logp = torch.zeros(n_prompts, device=logits.device)  # (R,) sum of log-probs of each row's beam
    prefill_end = None
    for step in range(max_new_tokens):
        n = len(beams[searching[0]])  # beams per prompt: 1 after the prefill, num_beams after
        length = step + 1  # new tokens in a hypothesis that ends with this step's token
        logp = F.log_softmax(logits, dim=-1) + beam_logp[:, None]  # (R, V) a beam's log-prob + its next token's
        top_logp, top_index = logp.view(len(searching), n * V).topk(2 * num_beams)  # (P, 2nb), best first
        # the score each candidate would have if it ended here, and the best score it could reach by running on
        score_if_ended = top_logp / length ** length_penalty
        best_len = max_new_tokens if early_stopping == "never" and length_penalty > 0 else length
        best_possible = top_logp / best_len ** length_penalty
        top_logp, score_if_ended, best_possible = torch.stack([top_logp, score_if_ended, best_possible]).tolist()
        top_index = top_index.tolist()  # the .tolist() above was the step's host sync: this copy waits for nothing
        prefill_end = prefill_end or time.perf_counter()

        next_rows, next_tokens, next_logp, still_searching = [], [], [], []
        for i, p in enumerate(searching):
            running = []  # (row, token, sum of log-probs, tokens) of the beams that go on
            bound = None  # best_possible of the best running candidate
            for j in range(2 * num_beams):
                beam, token = divmod(top_index[i][j], V)
                tokens = beams[p][beam] + [token]
                if token == eos_id or length == max_new_tokens or hits_stop(tokens):
                    if j < num_beams:  # lower candidates only stand by, in case the top ones all end
                        finished[p] = sorted(finished[p] + [(score_if_ended[i][j], tokens)], key=lambda h: -h[0])
                        finished[p] = finished[p][:num_beams]
                elif len(running) < num_beams:
                    running.append((i * n + beam, token, top_logp[i][j], tokens))
                    bound = best_possible[i][j] if bound is None else bound
            full = len(finished[p]) == num_beams
            if length == max_new_tokens or (full and (early_stopping is True or bound <= finished[p][-1][0])):
                continue  # done: the prompt leaves the batch
            still_searching.append(p)
            beams[p] = [tokens for _, _, _, tokens in running]
            for row, token, total, _ in running:
                next_rows.append(row), next_tokens.append(token), next_logp.append(total)
        if not still_searching:
            break
        if next_rows != list(range(logp.shape[0])):
            # the beams of one prompt share its keys and values up to T0; only a change of rows per prompt
            # (1 -> num_beams after the prefill, or a prompt leaving) needs those positions moved too
            same_groups = n == num_beams and still_searching == searching
            index = keep_rows(model, cache, next_rows, start=T0 if same_groups else 0)
            pad_len = pad_len[index] if pad_len is not None else None
        searching = still_searching
        beam_logp = torch.tensor(next_logp, device=logits.device)
        logits = decode_step(model, torch.tensor(next_tokens, device=logits.device), T0 + step, pad_len, cache)
    outputs = []
    for hypotheses in finished:
        tokens = hypotheses[0][1]
        outputs.append(tokens[:-1] if tokens and tokens[-1] == eos_id else tokens)
    return outputs, prefill_end


# -----------------------------------------------------------------------------
# Command line


def read_prompts_file(path):
    """One prompt per line: plain text, or a JSON object {"prompt": ..., "adapter": optional path}."""
    prompts, adapters = [], []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue  # blank lines, e.g. a trailing newline, are not prompts
            if line.lstrip().startswith("{"):
                try:
                    item = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{n}: not valid JSON ({e.msg}); write one object, or plain text, per line")
                if not isinstance(item.get("prompt"), str):
                    raise ValueError(f"{path}:{n}: a JSON line needs a \"prompt\" string")
                prompts.append(item["prompt"]), adapters.append(item.get("adapter"))
            else:
                prompts.append(line.rstrip("\n")), adapters.append(None)
    return prompts, adapters


class Printer:
    """Prints one completion as its tokens arrive: whole characters only, and nothing that may begin a stop string."""

    def __init__(self, tokenizer, stop):
        self.tokenizer, self.stop, self.tokens, self.printed = tokenizer, stop or [], [], 0
        self.hold = max((len(s) for s in self.stop), default=1) - 1  # characters that could start a stop string

    def __call__(self, i, token):
        self.tokens.append(token)
        text = cut_at_stop(self.tokenizer.decode(self.tokens), self.stop)
        # decoding the whole list each time, not token by token: a character may span several byte tokens,
        # and is shown as U+FFFD until its last byte arrives
        safe = len(text.rstrip("\ufffd")) - self.hold
        if safe > self.printed:
            print(text[self.printed : safe], end="", flush=True)
            self.printed = safe

    def finish(self, text):
        print(text[self.printed :], flush=True)


def peak_memory(device):
    """(MiB, what was measured): allocated GPU memory on CUDA, else the peak resident size of this process."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "peak GPU memory allocated"
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kilobytes on Linux, bytes on macOS
    return peak / (2**20 if sys.platform == "darwin" else 2**10), "peak RSS of the process"


def main(argv=None):
    parser = argparse.ArgumentParser(description="Generate text with LLaMA-2 style models (default: SmolLM2-135M).")
    parser.add_argument("--prompt", action="append", default=[], help="a prompt; repeat for a batch")
    parser.add_argument("--prompts_file", help='one prompt per line: plain text or {"prompt": ..., "adapter": path}')
    parser.add_argument("--ckpt_dir", help="Meta folder, HF folder or .gguf file (default: the small SmolLM2 model)")
    parser.add_argument("--adapter", help="a PARA / (IA)^3 / LoRA adapter file, for every prompt without its own")
    parser.add_argument("--chat", action="store_true", help="wrap each prompt as a user turn of the model's chat format")
    parser.add_argument("--max_new_tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (the default); try 0.7 for chat")
    parser.add_argument("--top_p", type=float, default=1.0, help="sample from the smallest set of tokens with this mass")
    parser.add_argument("--top_k", type=int, default=0, help="sample from the k most likely tokens (0: all)")
    parser.add_argument("--seed", type=int, help="seed of the sampler, for a reproducible sample")
    parser.add_argument("--num_beams", type=int, default=1, help="beam search with this many beams (the paper: 3)")
    parser.add_argument("--length_penalty", type=float, default=1.0, help="beam score = sum logprob / len ** this")
    parser.add_argument("--early_stopping", default="false", choices=["true", "false", "never"],
                        help="beam search stops when num_beams hypotheses are done (true), when no better one "
                             "seems possible (false), or when none is possible (never); as in HF")
    parser.add_argument("--stop", action="append", help="stop when the completion contains this string; repeatable")
    parser.add_argument("--truncate", action="store_true", help="cut too long prompts from the left to fit the context")
    parser.add_argument("--json", action="store_true", help="print one JSON object per prompt per line")
    parser.add_argument("--device", default="auto", help="cuda, mps or cpu (auto: the first available)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                        help="auto: bfloat16 on cuda, float32 elsewhere")
    args = parser.parse_args(argv)

    # -- what to generate from, checked before the model is loaded
    texts, adapters = list(args.prompt), [None] * len(args.prompt)
    if args.prompts_file:
        try:
            more_texts, more_adapters = read_prompts_file(args.prompts_file)
        except (OSError, ValueError) as e:
            parser.error(str(e))
        texts, adapters = texts + more_texts, adapters + more_adapters
    if not texts:
        parser.error("give a prompt: --prompt TEXT (repeatable) or --prompts_file FILE")
    for i, text in enumerate(texts):
        if not text.strip():
            parser.error(f"prompt {i} is empty")
    adapters = [a or args.adapter for a in adapters]
    if any(adapters) and not all(adapters):
        parser.error("some prompts have an adapter and some don't: give --adapter PATH for the others")
    if args.num_beams < 1 or args.max_new_tokens < 1:
        parser.error("--num_beams and --max_new_tokens must be at least 1")
    if args.num_beams > 1 and args.temperature > 0:
        parser.error("beam search is deterministic here: drop --temperature, or use --num_beams 1")
    if args.temperature < 0 or not 0 < args.top_p <= 1 or args.top_k < 0:
        parser.error("need --temperature >= 0, 0 < --top_p <= 1 and --top_k >= 0")

    # -- the model, and its adapters (multi-tenant: a bank of distinct files, one id per prompt)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    try:
        torch.empty(0, device=args.device)
    except (RuntimeError, AssertionError) as e:  # e.g. --device cuda on a machine without CUDA
        parser.error(f"device {args.device!r} is not usable here: {str(e).splitlines()[0]}")
    dtype = None if args.dtype == "auto" else getattr(torch, args.dtype)
    from model import load

    try:
        model, tokenizer = load(args.ckpt_dir, device=args.device, dtype=dtype)
        adapter_ids = None
        if any(adapters):
            paths = list(dict.fromkeys(adapters))  # distinct, in order of first use
            para.load_adapter(model, paths)
            adapter_ids = [paths.index(a) for a in adapters]
    except (UserError, OSError, ValueError) as e:
        parser.error(str(e))

    # -- tokens
    try:
        prompts = [tokenizer.format_chat([{"role": "user", "content": t}]) if args.chat else tokenizer.encode(t)
                   for t in texts]
    except ValueError as e:  # a base model has no chat format
        parser.error(str(e))
    context = model.args.max_seq_len
    if args.truncate:
        keep = context - args.max_new_tokens
        if keep < 1:
            parser.error(f"--max_new_tokens {args.max_new_tokens} leaves no room for a prompt in a context of {context}")
        prompts = [p[-keep:] for p in prompts]
    try:
        check_prompts(prompts, args.max_new_tokens, context)
    except ValueError as e:
        parser.error(str(e))

    # -- generation
    streaming = len(prompts) == 1 and args.num_beams == 1 and not args.json
    printer = Printer(tokenizer, args.stop) if streaming else None
    early_stopping = {"true": True, "false": False, "never": "never"}[args.early_stopping]
    results = generate(model, tokenizer, prompts, args.max_new_tokens, args.temperature, args.top_p, args.top_k,
                       args.num_beams, args.length_penalty, early_stopping, args.stop, args.seed, adapter_ids,
                       stream=printer)
    for text, result in zip(texts, results):
        if args.json:
            print(json.dumps({"prompt": text, "completion": result.text, "tokens": result.tokens,
                              "tokens_per_s": round(result.tokens_per_s, 2)}, ensure_ascii=False), flush=True)
        elif printer:
            printer.finish(result.text)
        else:
            print(f"--- {text}\n{result.text}", flush=True)
    n_tokens, seconds = sum(len(r.tokens) for r in results), results[0].seconds
    memory, measured = peak_memory(torch.device(args.device))
    print(f"{n_tokens} tokens in {seconds:.2f} s: {n_tokens / seconds:.1f} tokens/s "
          f"(prefill of {sum(map(len, prompts))} prompt tokens: {results[0].prefill_seconds:.2f} s); "
          f"{measured}: {memory:.0f} MiB", file=sys.stderr if args.json else sys.stdout)


if __name__ == "__main__":
    main()
