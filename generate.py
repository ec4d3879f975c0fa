"""
Text generation with a hand-written KV cache: greedy, sampling and beam search, and the command line.

    python generate.py --prompt "The capital of France is"            # greedy, streamed
    python generate.py --chat --prompt "Name three fruits." --num_beams 3
    python generate.py --prompts_file prompts.jsonl --json             # one batch, one JSON line per prompt

Every prompt of a batch is left-padded to the longest one, so that all rows end at the same column and the
next token of every row is read from the last position. The model masks the padding and counts each row's
positions from its first real token (model.Transformer.forward, pad_len), so a prompt generates the same
tokens in a batch as alone. Left padding is also what PARA needs: the prefill's last position is every row's
last prompt token, from which the vector generator computes that row's vectors (para.PARABlock).

A generation is one prefill (one forward over all prompts, which fills the cache and, under PARA, computes
the vectors) followed by decode steps of one token per row, which only read the cache (gpt-fast's split).

Beam search follows the rules of HF Transformers' beam search (5.x), so that both return the same tokens.
"""
import argparse
import dataclasses
import json
import math
import os
import resource
import sys
import time
from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.nn.functional as F
from tqdm import tqdm

import adapters
from errors import UserError
from loaders import DTYPES, cpu_flags, default_model_path, load, pick_device, resolve_dtype


class KVCache:
    """What each row of a batch carries from one decode step to the next: the keys and values of every layer,
    preallocated for up to `batch_size` rows and `max_len` positions, each row's left padding and adapter, and the
    store of PARA's vectors, which the prefill fills from the prompts (para.PARABlock). Each step hands the model
    these as arguments (prefill, decode_step).

    Each layer holds (batch_size, nkv, max_len, hd); a forward over B rows uses the first B of them. Only the
    nkv key/value heads are stored: attention shares each among nh/nkv query heads after reading.
    """

    def __init__(self, n_layers, batch_size, max_len, n_kv_heads, head_dim, device=None, dtype=torch.float32,
                 pad_len=None, adapter_ids=None, static=False):
        shape = (batch_size, n_kv_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.len, self.max_len = 0, max_len  # positions written so far (the same in every row), and room
        # static: every call reads all max_len positions (the model masks those not written yet), so that a compiled
        # decode step sees the same shapes at every step; CUDA graphs then replay it with the cache in place
        self.static = static
        if static and torch.device(device or "cpu").type == "cuda":
            for t in self.k + self.v:
                torch._dynamo.mark_static_address(t)
        self.pad_len, self.adapter_ids = pad_len, adapter_ids  # (B,) or None, for model.Transformer.forward
        self.vectors = {}  # layer id -> PARA's (l_q, l_v, l_u) of each row, each (B, 1, size)

    def update(self, layer_id, start_pos, k, v):
        """Write k, v (B, nkv, T, hd) at [start_pos, start_pos+T) of rows [0, B); return views of [0, start_pos+T)
        (of every position when static, where start_pos may be a tensor)."""
        B, end = k.shape[0], start_pos + k.shape[2]
        if self.static:
            positions = start_pos + torch.arange(k.shape[2], device=k.device)
            self.k[layer_id][:B].index_copy_(2, positions, k.to(self.k[layer_id].dtype))
            self.v[layer_id][:B].index_copy_(2, positions, v.to(self.v[layer_id].dtype))
            return self.k[layer_id][:B], self.v[layer_id][:B]
        self.k[layer_id][:B, :, start_pos:end] = k
        self.v[layer_id][:B, :, start_pos:end] = v
        self.len = end
        return self.k[layer_id][:B, :, :end], self.v[layer_id][:B, :, :end]

    def reorder(self, rows, start=0):
        """Row rows[i] becomes row i, in place (rows: a list of B' <= batch_size row numbers).

        Beam search follows its surviving beams with this, and generation drops its finished rows. Only the
        written positions [start, len) are moved: a caller passes start > 0 when every row already holds the right
        values before `start` and the right per-row state (the beams of one prompt share that prompt's keys and
        values, its padding, its adapter and its vectors).
        """
        index = torch.tensor(rows, dtype=torch.long, device=self.k[0].device)
        end = self.max_len if self.static else self.len  # a compiled step's positions are not counted on the host
        if rows != list(range(len(rows))):  # dropping the last rows moves no key or value: later calls use fewer
            for cache in self.k + self.v:
                cache[: len(rows), :, start:end] = cache[:, :, start:end].index_select(0, index)
        if start == 0:
            select = lambda t: None if t is None else t.index_select(0, index)
            self.pad_len, self.adapter_ids = select(self.pad_len), select(self.adapter_ids)
            self.vectors = {layer: tuple(map(select, l)) for layer, l in self.vectors.items()}


@dataclass
class Generation:
    tokens: list[int]  # the generated ids, EOS excluded
    text: str  # their decoding, cut before the first stop string
    seconds: float  # the whole batch's time: prefill and decoding
    prefill_seconds: float  # the prefill's time

    @property
    def tokens_per_s(self) -> float:
        return len(self.tokens) / self.seconds if self.seconds > 0 else 0.0


# -----------------------------------------------------------------------------
# One forward each


def prefill(model, tokens, cache):
    """One forward over the left-padded prompts (B, T) at start_pos 0; logits (B, vocab) of each row's next token."""
    rows = adapters.block_args(model, adapter_ids=cache.adapter_ids, vectors=cache.vectors)  # PARA fills the vectors
    return model(tokens, 0, pad_len=cache.pad_len, cache=cache, last_only=True, **rows)[:, -1]


def decode_step(model, token, pos, cache):
    """Feed one token per row (B,) at cache position pos; logits (B, vocab) of each row's next token."""
    rows = adapters.block_args(model, adapter_ids=cache.adapter_ids, vectors=cache.vectors)  # PARA reads the vectors
    return model(token[:, None], pos, pad_len=cache.pad_len, cache=cache, **rows)[:, -1]


COMPILED = {}  # device type -> decode_step compiled (torch caches one graph per model and shape under it)


def compiled_decode_step(device):
    """decode_step compiled with torch.compile, as gpt-fast does: over a static KVCache and a tensor position it
    sees the same shapes at every step, so it compiles once per model and batch size. On CUDA it is replayed as
    a CUDA graph (one launch instead of one per kernel, some 1,450 per step on Llama-2 7B)."""
    if device.type not in COMPILED:
        mode = "reduce-overhead" if device.type == "cuda" else None  # on the CPU: inductor's C++ kernels
        COMPILED[device.type] = torch.compile(decode_step, mode=mode)
    return COMPILED[device.type]


def sample(logits, *, temperature=0.0, top_k=0, top_p=1.0, generator=None):
    """Next token of each row (B,) from logits (B, vocab): the argmax at temperature 0, else a draw
    from softmax(logits / temperature) restricted to the top_k tokens and to the top_p probability mass."""
    if temperature == 0:
        return logits.argmax(-1)
    # relative to each row's best logit first: a tiny temperature (1e-45) then sends the others to -inf, not the
    # best one to +inf (whose softmax would be NaN)
    logits = (logits - logits.max(-1, keepdim=True).values) / temperature
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


@dataclass
class Options:
    """How to continue the prompts: the decoding, and when a row stops."""
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0: greedy; above 0 sampling, with top_k / top_p truncation and a seed
    top_k: int = 0  # sample from the k most likely tokens (0: all)
    top_p: float = 1.0  # sample from the smallest set of tokens with this probability mass
    seed: Optional[int] = None  # of the sampler: a seed reproduces the whole batch
    num_beams: int = 1  # > 1: beam search (greedy only), by HF's rules
    length_penalty: float = 1.0  # beam score = sum of log-probs / new tokens ** length_penalty
    early_stopping: Union[bool, str] = False  # beam search: True, False or "never", as in HF
    stop: Optional[list] = None  # a row stops when its text contains one of these strings
    eos_id: Optional[int] = None  # a row stops at this token; None: the tokenizer's EOS; -1: never

    def check(self, prompts=(), max_seq_len=math.inf, vocab_size=None):
        """Refuse what cannot be generated, with a message that says what to change."""
        if self.max_new_tokens < 1 or self.num_beams < 1:
            raise UserError(f"max_new_tokens and num_beams must be at least 1, got {self.max_new_tokens} and "
                            f"{self.num_beams}")
        if not (math.isfinite(self.temperature) and self.temperature >= 0 and 0 < self.top_p <= 1 and self.top_k >= 0):
            raise UserError(f"need a finite temperature >= 0, 0 < top_p <= 1 and top_k >= 0, got temperature "
                            f"{self.temperature}, top_p {self.top_p}, top_k {self.top_k}")
        if self.num_beams > 1 and self.temperature > 0:
            raise UserError("beam search here is deterministic: use temperature 0 with num_beams > 1")
        if vocab_size and 2 * self.num_beams > vocab_size:  # each step keeps the 2 * num_beams best candidates
            raise UserError(f"num_beams {self.num_beams} needs a vocabulary of at least {2 * self.num_beams} tokens; "
                            f"this model's has {vocab_size}: use at most {vocab_size // 2} beams")
        if not math.isfinite(self.length_penalty):
            raise UserError(f"length_penalty must be a finite number, got {self.length_penalty}")
        if not (self.early_stopping is True or self.early_stopping is False or self.early_stopping == "never"):
            raise UserError(f"early_stopping must be True, False or 'never', got {self.early_stopping!r}")
        if self.stop and not all(self.stop):
            raise UserError("a stop string must not be empty: every text contains the empty string")
        for i, p in enumerate(prompts):
            if len(p) == 0:
                raise UserError(f"prompt {i} is empty: give at least one token")
            if len(p) + self.max_new_tokens > max_seq_len:
                raise UserError(
                    f"prompt {i} has {len(p)} tokens; with {self.max_new_tokens} new tokens that is "
                    f"{len(p) + self.max_new_tokens}, more than the model's context of {max_seq_len}: shorten the "
                    "prompt, ask for fewer new tokens, or truncate the prompt from the left (--truncate)")


def stop_at(text, stop):
    """Where the earliest stop string begins in text, or None. Its leading whitespace does not count, so that
    a stop string "\n" ends the first line of an answer, not a newline before it."""
    start = len(text) - len(text.lstrip())
    found = [i for i in (text.find(s, start) for s in stop or []) if i >= 0]
    return min(found) if found else None


def cut_at_stop(text, stop):
    """text up to (not including) the earliest stop string in it (after its leading whitespace)."""
    end = stop_at(text, stop)
    return text if end is None else text[:end]


@torch.inference_mode()
def generate(model, tokenizer, prompts: list[list[int]], options: Optional[Options] = None, *, adapter_ids=None,
             stream=None, progress=None, compile=False, **more_options) -> list[Generation]:
    """Continue each prompt (a list of token ids); all prompts form one left-padded batch.

    options: an Options, or its fields as keyword arguments (generate(model, tok, prompts, max_new_tokens=32)).
    A row stops at EOS, at max_new_tokens, or at a stop string: its tokens then include those of the stop string,
    its text is cut before it.
    adapter_ids (B,) pick each row's adapter from a bank (adapters.load_adapter of several files).
    stream(i, token) is called with every new token of prompt i as soon as it is chosen (not with beam search);
    progress(step), if given, after every decode step. A KV cache larger than the free memory is refused.
    compile: decode with compiled_decode_step (the first call of each model and batch size compiles it).
    """
    o = dataclasses.replace(options or Options(), **more_options)
    o.check(prompts, model.args.max_seq_len, model.args.vocab_size)
    if o.eos_id is None:
        o.eos_id = tokenizer.eos_id
    device, dtype = model.tok_embeddings.weight.device, cache_dtype(model)
    tokens, pad_len = left_pad(prompts, tokenizer.pad_id, device)
    B, T0 = tokens.shape
    a = model.args
    max_len = T0 + o.max_new_tokens
    if compile:  # in steps of 256, so that batches of other lengths mostly share a compiled graph
        max_len = min(-(-max_len // 256) * 256, a.max_seq_len)
    need, free = kv_cache_bytes(a, B * o.num_beams, max_len, dtype), available_memory(device)
    if free is not None and need > free:
        raise UserError(f"this generation's KV cache needs {need / 2**30:.1f} GiB ({B} prompts x {o.num_beams} beams x "
                        f"{max_len} positions) and {free / 2**30:.1f} GiB are free: use fewer beams, fewer new tokens, "
                        "or fewer prompts at once (generate.py --batch_size)")
    cache = KVCache(a.n_layers, B * o.num_beams, max_len, a.n_kv_heads, a.head_dim, device, dtype,
                    pad_len=pad_len, adapter_ids=adapters.check_adapter_ids(model, adapter_ids), static=compile)
    if compile:  # the step's position as a tensor: a new int at every step would be a new graph
        step = compiled_decode_step(device)
        decode = lambda token, pos: step(model, token, torch.tensor(T0 + pos, device=device), cache)
    else:
        decode = lambda token, pos: decode_step(model, token, T0 + pos, cache)

    def ends(ids):  # a stop string in the text of ids
        return bool(o.stop) and stop_at(tokenizer.decode(ids), o.stop) is not None

    start = time.perf_counter()
    logits = prefill(model, tokens, cache)  # (B, vocab); PARA computes each row's vectors here
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # so that the clock reads the prefill's end, not its launch
    prefill_seconds = time.perf_counter() - start
    if o.num_beams > 1:
        outputs = beam_search(decode if progress is None else counted(decode, progress), logits, cache, o, ends, T0)
    else:
        generator = torch.Generator(device).manual_seed(o.seed) if o.seed is not None else None
        outputs = sample_tokens(decode if progress is None else counted(decode, progress), logits, cache, o, ends,
                                generator, stream)
    seconds = time.perf_counter() - start
    return [Generation(ids, cut_at_stop(tokenizer.decode(ids), o.stop), seconds, prefill_seconds) for ids in outputs]


def cache_dtype(model):
    """The KV cache's dtype, which attention runs in (model.Attention.attend): the model's, but fp32 for a bf16 or
    fp16 model on a CPU without AMX, where PyTorch's fused attention is several times slower in bf16 than in fp32
    (one query of SmolLM2 on an AMD EPYC with AVX512-BF16: 133 against 18 us). With AMX it is the faster one, and
    the cache half the size (one query over 275 keys: 32 against 42 us; over 1,000: 77 against 153)."""
    weight = model.tok_embeddings.weight
    if weight.device.type == "cpu" and not (weight.dtype == torch.bfloat16 and "amx_bf16" in cpu_flags()):
        return torch.float32
    return weight.dtype


def counted(decode, progress):
    """decode, then progress(step)."""
    def step(token, i):
        logits = decode(token, i)
        progress(i + 1)
        return logits
    return step


def kv_cache_bytes(args, rows, length, dtype) -> int:
    """The KV cache of `rows` rows of `length` positions: keys and values of every layer's n_kv_heads heads."""
    return 2 * args.n_layers * rows * length * args.n_kv_heads * args.head_dim * dtype.itemsize


def available_memory(device):
    """Bytes free for new tensors: the GPU's free memory on CUDA, MemAvailable of /proc/meminfo on a Linux CPU, else
    None (unknown)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return None


def sample_tokens(decode, logits, cache, o: Options, ends, generator=None, stream=None):
    """Greedy or sampled decoding of every row; finished rows leave the batch. decode(token, step) runs one decode
    step, after the step-th new token. Returns the new ids of each prompt."""
    outputs = [[] for _ in range(logits.shape[0])]
    rows = list(range(logits.shape[0]))  # the prompt of each batch row (None: finished, in a static batch)
    for step in range(o.max_new_tokens):
        next_token = sample(logits, temperature=o.temperature, top_k=o.top_k, top_p=o.top_p, generator=generator)
        running = []  # batch rows that go on
        for r, token in enumerate(next_token.tolist()):  # the one host sync of a step
            if rows[r] is None or token == o.eos_id:
                continue
            outputs[rows[r]].append(token)
            if stream:
                stream(rows[r], token)
            if not ends(outputs[rows[r]]):
                running.append(r)
        if not running or step == o.max_new_tokens - 1:
            break
        if len(running) < len(rows):  # some rows finished
            if cache.static:  # they run on, unread: one batch size, one compiled graph
                rows = [p if r in running else None for r, p in enumerate(rows)]
            else:  # they leave the batch, rather than be computed on
                cache.reorder(running)
                next_token = next_token[torch.tensor(running, device=next_token.device)]
                rows = [rows[r] for r in running]
        logits = decode(next_token, step)
    return outputs


def beam_search(decode, logits, cache, o: Options, ends, T0):
    """Beam search, one independent search per prompt (decode(token, step) runs one decode step; the prompts end
    at T0), by HF Transformers' rules:

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
    V, nb = logits.shape[-1], o.num_beams  # Options.check: V >= 2 * nb
    n_prompts = logits.shape[0]
    beams = [[[]] for _ in range(n_prompts)]  # the running beams' tokens; one empty beam per prompt after prefill
    finished = [[] for _ in range(n_prompts)]  # (score, tokens) of the best finished hypotheses, best first
    searching = list(range(n_prompts))  # prompts not done, in batch order; each has len(beams[p]) consecutive rows
    beam_logp = torch.zeros(n_prompts, device=logits.device)  # (R,) sum of log-probs of each row's beam
    for step in range(o.max_new_tokens):
        n = len(beams[searching[0]])  # beams per prompt: 1 after the prefill, num_beams after
        length = step + 1  # new tokens in a hypothesis that ends with this step's token
        logp = F.log_softmax(logits, dim=-1) + beam_logp[:, None]  # (R, V) a beam's log-prob + its next token's
        top_logp, top_index = logp.view(len(searching), n * V).topk(2 * nb)  # (P, 2nb), best first
        # the score each candidate would have if it ended here, and the best score it could reach by running on
        best_len = o.max_new_tokens if o.early_stopping == "never" and o.length_penalty > 0 else length
        scores = torch.stack([top_logp, top_logp / length ** o.length_penalty, top_logp / best_len ** o.length_penalty])
        scores = scores.permute(1, 2, 0).tolist()  # (P, 2nb, 3): the step's one host sync
        top_index = top_index.tolist()
        next_rows, next_tokens, next_logp, still_searching = [], [], [], []
        for i, p in enumerate(searching):
            # candidate j: (sum of log-probs, score if it ended, best reachable score, row of its beam, token)
            candidates = [(*scores[i][j], i * n + top_index[i][j] // V, top_index[i][j] % V) for j in range(2 * nb)]
            running = step_one_prompt(beams[p], finished[p], candidates, length, o, ends)
            if running is None:
                continue  # done: the prompt leaves the batch
            still_searching.append(p)
            beams[p] = [tokens for _, _, _, tokens in running]
            for row, token, total, _ in running:
                next_rows.append(row), next_tokens.append(token), next_logp.append(total)
        if not still_searching:
            break
        if next_rows != list(range(logp.shape[0])):
            # the beams of one prompt share its keys and values up to T0 (and its per-row state): only a change of
            # rows per prompt (1 -> num_beams after the prefill, or a prompt leaving) needs those moved too
            same_groups = n == nb and still_searching == searching
            cache.reorder(next_rows, start=T0 if same_groups else 0)
        searching = still_searching
        beam_logp = torch.tensor(next_logp, device=logits.device)
        logits = decode(torch.tensor(next_tokens, device=logits.device), step)
    outputs = []
    for hypotheses in finished:
        tokens = hypotheses[0][1]
        outputs.append(tokens[:-1] if tokens and tokens[-1] == o.eos_id else tokens)
    return outputs


def step_one_prompt(beams, finished, candidates, length, o: Options, ends):
    """One beam-search step of one prompt (beam_search's rules): files its ending candidates into `finished`, in
    place, and returns its next beams as (row, token, sum of log-probs, tokens), or None when the prompt is done.
    The prompt's beams are consecutive rows of the batch: a candidate's row modulo their number is its beam."""
    running = []
    bound = None  # best reachable score of the best running candidate
    for j, (sum_logp, score_if_ended, best_possible, row, token) in enumerate(candidates):
        tokens = beams[row % len(beams)] + [token]
        if token == o.eos_id or length == o.max_new_tokens or ends(tokens):
            if j < o.num_beams:  # lower candidates only stand by, in case the top ones all end
                finished.append((score_if_ended, tokens))
                finished.sort(key=lambda h: -h[0])
                del finished[o.num_beams:]
        elif len(running) < o.num_beams:
            running.append((row, token, sum_logp, tokens))
            bound = best_possible if bound is None else bound
    full = len(finished) == o.num_beams
    if length == o.max_new_tokens or not running or (full and (o.early_stopping is True or bound <= finished[-1][0])):
        return None  # done; also when every candidate ended (stop strings can end many at once)
    # Stop strings can end more than num_beams candidates (EOS ends at most one per beam): the prompt then runs
    # on with fewer beams. Its empty slots hold a dead copy of a beam, sum of log-probs -inf, whose extensions
    # never rank among the top candidates; so every prompt keeps num_beams rows, and the batch its shape.
    row, token, _, tokens = running[0]
    return running + [(row, token, float("-inf"), tokens)] * (o.num_beams - len(running))


# -----------------------------------------------------------------------------
# Command line


def read_prompts_file(path):
    """One prompt per line: plain text, or a JSON object {"prompt": ..., "adapter": optional path}."""
    prompts, adapter_files = [], []
    if os.path.exists(path) and not os.path.isfile(path):  # a FIFO or a device: reading it could wait forever
        raise UserError(f"--prompts_file {path} is not a regular file: give a text file, one prompt per line")
    try:
        lines = open(path, encoding="utf-8").read().split("\n")
    except OSError as e:
        raise UserError(f"cannot read --prompts_file {path}: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise UserError(f"--prompts_file {path} is not UTF-8 text (byte {e.start}): save it as UTF-8") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue  # blank lines, e.g. a trailing newline, are not prompts
        if line.lstrip().startswith("{"):
            try:
                item = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}, line {n}: not valid JSON ({e.msg}); write one object, or plain text, per line")
            if not isinstance(item.get("prompt"), str):
                raise UserError(f"{path}, line {n}: a JSON line needs a \"prompt\" string")
            if not isinstance(item.get("adapter", ""), str):
                raise UserError(f"{path}, line {n}: \"adapter\" must be the path of an adapter file, a string")
            prompts.append(item["prompt"]), adapter_files.append(item.get("adapter"))
        else:
            prompts.append(line), adapter_files.append(None)
    if not prompts:
        raise UserError(f"--prompts_file {path} holds no prompt: write one per line")
    return prompts, adapter_files


def shown(text, stop):
    """How much of a completion that is still growing can be shown: whole characters only (a character that spans
    several byte tokens decodes as U+FFFD until its last byte), and nothing that may begin a stop string."""
    return len(text.rstrip("\ufffd")) - (max((len(s) for s in stop or []), default=1) - 1)


class Printer:
    """Prints one completion as its tokens arrive: whole characters only, and nothing that may begin a stop string."""

    def __init__(self, tokenizer, stop):
        self.tokenizer, self.stop, self.tokens, self.printed = tokenizer, stop or [], [], 0

    def __call__(self, i, token):
        self.tokens.append(token)
        # decoding the whole list each time, not token by token: a character may span several byte tokens
        text = cut_at_stop(self.tokenizer.decode(self.tokens), self.stop)
        safe = shown(text, self.stop)
        if safe > self.printed:
            print(text[self.printed : safe], end="", flush=True)
            self.printed = safe

    def finish(self, text):
        print(text[self.printed :], flush=True)


def peak_memory(device):
    """(bytes, what was measured): the most GPU memory allocated on CUDA, else the peak resident size of the process."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "peak GPU memory allocated"
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kilobytes on Linux, bytes on macOS
    return peak * (1 if sys.platform == "darwin" else 1024), "peak RSS of the process"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Generate text with LLaMA-2 style models (default: SmolLM2-135M).")
    arg = p.add_argument
    arg("--prompt", action="append", default=[], help="a prompt; repeat for a batch")
    arg("--prompts_file", help='one prompt per line: plain text, or {"prompt": ..., "adapter": path} (a line without '
        'an adapter gets the base model; examples/prompts.jsonl shows the format)')
    arg("--ckpt_dir", help="Meta folder, HF folder or .gguf file (default: the small SmolLM2 model)")
    arg("--adapter", help="an adapter file (train.py's adapter.pt), for every prompt without its own")
    arg("--any_base", action="store_true", help="load an adapter trained on other weights of the same shape (the "
        "same model in another format has other files); without it, that is refused")
    arg("--chat", action="store_true", help="wrap each prompt as a user turn of the model's chat format")
    arg("--max_new_tokens", type=int, default=256, help="new tokens at most per prompt (generation also stops at "
        "EOS and at --stop)")
    arg("--temperature", type=float, default=0.0, help="0 is greedy (the default); try 0.7 for chat")
    arg("--top_k", type=int, default=0, help="sample from the k most likely tokens (0: all)")
    arg("--top_p", type=float, default=1.0, help="sample from the smallest set of tokens with this mass")
    arg("--seed", type=int, help="seed of the sampler, for a reproducible sample (each batch starts from it)")
    arg("--num_beams", type=int, default=1, help="beam search with this many beams (the paper: 3); it shows its "
        "progress, and prints the answer when the search ends (a beam's text is not final until then)")
    arg("--length_penalty", type=float, default=1.0, help="beam score = sum logprob / len ** this")
    arg("--early_stopping", default="false", choices=["true", "false", "never"],
        help="beam search stops when num_beams hypotheses are done (true), when no better one seems possible "
             "(false), or when none is possible (never); as in HF")
    arg("--stop", action="append", help="stop when the completion contains this string; repeatable")
    arg("--truncate", action="store_true", help="cut too long prompts from the left to fit the context")
    arg("--batch_size", type=int, default=0, help="prompts generated together (0: as many as a KV cache of a "
        "quarter of the free memory holds, at most 64); results are printed batch by batch, in the file's order")
    arg("--json", action="store_true", help="print one JSON object per prompt per line")
    arg("--device", default="auto", help="cuda, cuda:1, mps or cpu (auto: cuda when available)")
    arg("--dtype", default="auto", choices=DTYPES, help="auto: bf16 on cuda and on CPUs with native bf16, fp32 "
        "elsewhere")
    arg("--compile", action="store_true", help="compile the decode step (torch.compile; CUDA graphs on cuda): pays "
        "off for long generations on a GPU; the first call compiles")
    args = p.parse_args(argv)
    for flag, value, low in (("--max_new_tokens", args.max_new_tokens, 1), ("--num_beams", args.num_beams, 1),
                             ("--batch_size", args.batch_size, 0)):
        if value < low:
            p.error(f"{flag} must be at least {low}, got {value}")
    return p, args


def read_prompts(args):
    """The texts to continue and the adapter file of each (None: the base model), checked before the model is
    loaded."""
    texts, files = list(args.prompt), [None] * len(args.prompt)
    if args.prompts_file:
        more_texts, more_files = read_prompts_file(args.prompts_file)
        texts, files = texts + more_texts, files + more_files
    if not texts:
        raise UserError("give a prompt: --prompt TEXT (repeatable) or --prompts_file FILE")
    for i, text in enumerate(texts):
        if not text.strip():
            raise UserError(f"prompt {i} is empty")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:  # bytes that are not UTF-8 on the command line arrive as lone surrogates
            raise UserError(f"prompt {i} is not valid UTF-8 text (character {e.start}): give it as UTF-8") from None
    files = [f or args.adapter for f in files]
    for f in dict.fromkeys(f for f in files if f):  # every file named, checked now: not after the model loads
        adapters.read_adapter_file(f)
    return texts, files


def truncate_left(prompt, keep, bos_id):
    """The last `keep` tokens of prompt; a leading BOS stays (Llama 2 always saw one at position 0). The one rule for
    cutting a prompt that is too long, in generation (--truncate) and in training and evaluation (train.py)."""
    if len(prompt) <= keep:
        return prompt
    if prompt and prompt[0] == bos_id:
        return prompt[:1] + prompt[len(prompt) - keep + 1:]
    return prompt[len(prompt) - keep:]


def encode(texts, tokenizer, args, context):
    """Token ids of each text (in the chat format with --chat), cut from the left to fit with --truncate."""
    prompts = [tokenizer.format_chat([{"role": "user", "content": t}]) if args.chat else tokenizer.encode(t)
               for t in texts]
    if args.truncate:
        keep = context - args.max_new_tokens
        if keep < 1:
            raise UserError(f"--max_new_tokens {args.max_new_tokens} leaves no room for a prompt in a context of "
                            f"{context}")
        prompts = [truncate_left(p, keep, tokenizer.bos_id) for p in prompts]
    return prompts


def main(argv=None):
    parser, args = parse_args(argv)
    try:
        texts, files = read_prompts(args)
        options = Options(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                          top_p=args.top_p, seed=args.seed, num_beams=args.num_beams,
                          length_penalty=args.length_penalty, stop=args.stop,
                          early_stopping={"true": True, "false": False, "never": "never"}[args.early_stopping])
        options.check()  # the flags, before the model is loaded
        device = pick_device(args.device)
        model, tokenizer = load(args.ckpt_dir, device=device, dtype=resolve_dtype(args.dtype, device))
        adapter_ids = None
        if any(files):  # multi-tenant: a bank of the distinct adapter files (None: the base model), one id per prompt
            paths = list(dict.fromkeys(files))
            adapters.load_adapter(model, paths, base=args.ckpt_dir or default_model_path(), any_base=args.any_base)
            adapter_ids = [paths.index(f) for f in files]
        prompts = encode(texts, tokenizer, args, model.args.max_seq_len)
        options.check(prompts, model.args.max_seq_len, model.args.vocab_size)
        batch_size = args.batch_size or auto_batch_size(model, prompts, options)
    except UserError as e:
        parser.error(str(e))
    printer = Printer(tokenizer, args.stop) if len(prompts) == 1 and args.num_beams == 1 and not args.json else None
    n_tokens, seconds, prefill_seconds = 0, 0.0, 0.0
    for start in range(0, len(prompts), batch_size):  # batch by batch, each printed as soon as it ends
        batch = slice(start, start + batch_size)
        progress = Progress(f"beam search, prompts {start + 1}-{min(start + batch_size, len(prompts))}",
                            args.max_new_tokens) if args.num_beams > 1 else None
        results = generate(model, tokenizer, prompts[batch], options, stream=printer, compile=args.compile,
                           adapter_ids=adapter_ids[batch] if adapter_ids else None, progress=progress)
        if progress:
            progress.close()
        for text, result in zip(texts[batch], results):
            if args.json:
                print(json.dumps({"prompt": text, "completion": result.text, "tokens": result.tokens,
                                  "tokens_per_s": round(result.tokens_per_s, 2)}, ensure_ascii=False), flush=True)
            elif printer:
                printer.finish(result.text)
            else:
                print(f"--- {text}\n{result.text}", flush=True)
        n_tokens += sum(len(r.tokens) for r in results)
        seconds, prefill_seconds = seconds + results[0].seconds, prefill_seconds + results[0].prefill_seconds
    memory, measured = peak_memory(device)
    batches = f" in batches of {batch_size}" if len(prompts) > batch_size else ""
    print(f"{n_tokens} tokens in {seconds:.2f} s: {n_tokens / seconds:.1f} tokens/s{batches} "
          f"(prefill of {sum(map(len, prompts))} prompt tokens: {prefill_seconds:.2f} s); "
          f"{measured}: {memory / 2**20:.0f} MiB", file=sys.stderr if args.json else sys.stdout)


class Progress:
    """A progress line on stderr for what prints nothing until it ends (beam search): its decode steps."""

    def __init__(self, what, total):
        self.bar = tqdm(total=total, desc=what, unit="step", leave=False, file=sys.stderr, dynamic_ncols=True)

    def __call__(self, steps):  # decode steps done
        self.bar.update(steps - self.bar.n)

    def close(self):
        self.bar.close()


def auto_batch_size(model, prompts, options, cap=64):
    """How many prompts to generate together: as many as a KV cache of a quarter of the free memory holds (at the
    longest prompt and every beam), at most `cap`, at least 1."""
    device, dtype = model.tok_embeddings.weight.device, cache_dtype(model)
    per_prompt = kv_cache_bytes(model.args, options.num_beams, max(map(len, prompts)) + options.max_new_tokens, dtype)
    free = available_memory(device)
    return cap if free is None else max(1, min(cap, free // 4 // per_prompt))


if __name__ == "__main__":
    main()
