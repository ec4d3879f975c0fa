"""
Serve many tenants' adapters on one backbone over HTTP, with continuous batching: the setting PARA was made for.

    python serve.py --adapter copa=out/copa-para/adapter.pt --adapter boolq=out/boolq-para/adapter.pt
    curl 127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \\
        -d '{"model": "copa", "prompt": "The capital of France is", "max_tokens": 8, "temperature": 0}'

An OpenAI-compatible API (POST /v1/completions and /v1/chat/completions, GET /v1/models and /health); a request's
"model" names an adapter, or the base model. There is no authentication: keep the server on 127.0.0.1, or behind a
proxy that authenticates.

Five pieces, and the data flows one way through them (nano-vllm's shape):
- Request: one completion, with its options, its own sampler, and a queue its HTTP thread reads events from. It
  moves from waiting to running to finished.
- Engine.admit, the scheduler: first in, first out, the waiting request at the head joins the running batch as soon
  as a row and the cache have room for it (so no request waits forever), with the requests behind it that fit too,
  up to --prefill_tokens: the group's prompts are prefilled in one forward (their keys and values, and under PARA
  their vectors), then copied into the batch. Between two decode steps the running rows wait for one such prefill
  at most, or for --prefill_layers layers of it (Prefill: a prefill in pieces).
- Batch: the running requests as one left-padded batch over one KV cache, as in generate.py. Every row ends at the
  same column c, each decode step writes one token per row there, and a row's padding is the columns before its
  prompt: so each row has its own length. A new row's prompt goes to the columns just before c (all rows move
  right first if it is longer than c, or left by the padding they share when the cache's end is near); rows leave
  as soon as they finish.
- Engine.step, the iteration: one decode step for every running row, then each row samples its next token with its
  own options. PARA only multiplies by the vectors each row's prefill stored: its vector generator never runs here.
- Bank: the tenants' adapters, a bank per method and config (mixed.py), so that every method shares the batch.
The HTTP layer (Handler) is thin: it checks a request, queues it, and writes back what the engine sends.
"""
import argparse
import collections
import json
import math
import os
import queue
import signal
import sys
import threading
import time
import traceback
import urllib.parse
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Optional

# Set before torch loads its OpenMP runtime (GNU libgomp), which reads it once: an idle worker thread spins 1M times
# (~13 ms here) before it sleeps, not the default 300k (~4 ms). Measured in fp32 on 2 threads, one 274-token prompt:
# a PARA prefill in the engine costs 1.03 of the base model's, against 1.08, and the base model's is 5% faster; an
# idle server spins ~9 ms more after its last step (README, "OpenMP's idle threads"). A GOMP_SPINCOUNT set is kept.
os.environ.setdefault("GOMP_SPINCOUNT", "1000000")

import torch  # noqa: E402

import adapters
import generate
import mixed
from errors import UserError
from generate import KVCache, Options, cut_at_stop, sample, shown, stop_at
from loaders import DTYPES, default_model_path, load, model_name, pick_device, resolve_dtype

BASE = (0, 0)  # row 0 of every group's bank is a fresh adapter, the identity: requests for the base model use it

# -----------------------------------------------------------------------------
# A request, from waiting to running to finished


@dataclass
class Request:
    prompt: list  # token ids
    options: Options  # max_new_tokens, temperature, top_p, seed, stop, eos_id
    model: str  # the name the client asked for: an adapter's, or the base model's
    adapter: Optional[tuple] = BASE  # its (group, row) in the banks; None: an --adapter_dir one, loaded on admission
    chat: bool = False
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:24])
    created: int = field(default_factory=lambda: int(time.time()))
    events: queue.Queue = field(default_factory=queue.Queue)  # from the engine: ("text", delta), ("done", reason)
    tokens: list = field(default_factory=list)  # the generated ids, EOS excluded
    sent: int = 0  # characters of the text already sent
    generator: Optional[torch.Generator] = None  # its own sampler: seeded, it draws what generate.py draws
    cancelled: bool = False  # the client went away: the engine drops the request at its next step
    next_token: Optional[int] = None  # the token sampled last, which the next decode step feeds


# -----------------------------------------------------------------------------
# The running requests: one left-padded batch over one KV cache, every row ending at column c


class Batch:
    def __init__(self, model, max_batch, max_len):
        a, weight = model.args, model.tok_embeddings.weight
        self.max_batch, self.max_len = max_batch, max_len
        self.cache = KVCache(a.n_layers, max_batch, max_len, a.n_kv_heads, a.head_dim, weight.device,
                             generate.cache_dtype(model))
        self.rows: list[Request] = []
        self.ends: list[int] = []  # the column each row's writes end before: where it joined + max_new_tokens - 1
        self.c = 0  # the column the next decode step writes, the same for every row

    def join_column(self, requests) -> Optional[int]:
        """The column c would be when the requests (a group prefilled together) join, or None if they cannot join
        now. They join at c if their prompts fit before c, further right if one is longer (every row moves right),
        further left if the cache's end is near (every row moves left by the padding they share); the rows' writes
        must stay inside the cache."""
        if len(self.rows) + len(requests) > self.max_batch:
            return None
        L = max(len(r.prompt) for r in requests)
        m = max(r.options.max_new_tokens for r in requests)
        shared = int(self.cache.pad_len.min()) if self.rows else self.c  # every row has this much padding
        for c in (max(self.c, L), max(self.c - shared, L)):
            if c + m - 1 <= self.max_len and all(end + c - self.c <= self.max_len for end in self.ends):
                return c
        return None

    def move(self, d):
        """Every row moves d columns (left when d < 0), with its keys, values and padding."""
        if self.rows and d:
            B, first = len(self.rows), int(self.cache.pad_len.min())
            for t in self.cache.k + self.cache.v:
                t[:B, :, first + d:self.c + d] = t[:B, :, first:self.c].clone()
            self.cache.pad_len += d
            self.ends = [end + d for end in self.ends]
        self.c += d

    def join(self, joining, prefill, column):
        """Prefilled requests become the last rows. prefill: their KV cache, left-padded, request j's prompt in the
        last len(prompt) columns of its row j; joining: the (j, request) pairs that go on past their first token.
        Each one's prompt keys and values go to the columns just before c, its per-row state (padding, adapter,
        PARA's vectors) after the other rows'."""
        if not joining:
            return
        self.move(column - self.c)
        B, c, width = len(self.rows), self.c, prefill.len
        picked = torch.tensor([j for j, _ in joining], device=self.cache.k[0].device)
        for i, (j, request) in enumerate(joining):
            L = len(request.prompt)
            for mine, its in zip(self.cache.k + self.cache.v, prefill.k + prefill.v):
                mine[B + i, :, c - L:c] = its[j, :, width - L:width]
        cache = self.cache
        rows = lambda old, new: new if B == 0 else torch.cat([old, new])
        pads = torch.tensor([c - len(r.prompt) for _, r in joining], device=picked.device)
        cache.pad_len = rows(cache.pad_len, pads)
        cache.adapter_ids = rows(cache.adapter_ids, prefill.adapter_ids[picked])
        cache.vectors = {layer: tuple(rows(old, new[picked]) for old, new in
                                      zip(cache.vectors.get(layer, (None,) * 3), its))
                         for layer, its in prefill.vectors.items()}
        for _, request in joining:
            self.rows.append(request)
            self.ends.append(c + request.options.max_new_tokens - 1)

    def keep(self, rows):
        """Only the rows `rows` (indices, in order) stay; an empty batch starts again at column 0."""
        if len(rows) < len(self.rows):
            self.cache.len = self.c  # the columns KVCache.reorder moves
            self.cache.reorder(rows)
            self.rows, self.ends = [self.rows[i] for i in rows], [self.ends[i] for i in rows]
        if not self.rows:
            self.c, self.cache.vectors = 0, {}


# -----------------------------------------------------------------------------
# The engine: admission (the scheduler), prefill, decode steps


class Prefill:
    """A group's prefill, a few layers at a time: generate.prefill (one forward over the left-padded prompts: their
    keys and values, PARA's vectors, the logits of each one's first token), cut between layers, so that the running
    rows' decode steps go on between two pieces and none waits for a whole prefill (--prefill_layers). Each piece
    runs model.Transformer.forward's own steps on the whole group, so the result is the one-forward result, bit for
    bit. The cut is between layers, not between tokens (chunked prefill): under PARA every prompt token's Q and V at
    a layer are scaled by vectors read from the last token's state at that layer, which needs all tokens' earlier
    layers first."""

    def __init__(self, model, group, pad_id, bank):
        a, device = model.args, model.tok_embeddings.weight.device
        self.model, self.group, self.layer = model, group, 0
        tokens, pad_len = generate.left_pad([r.prompt for r in group], pad_id, device)
        self.cache = KVCache(a.n_layers, len(group), tokens.shape[1], a.n_kv_heads, a.head_dim, device,
                             generate.cache_dtype(model), pad_len=pad_len,
                             adapter_ids=torch.tensor([bank.ids(r.adapter) for r in group], dtype=torch.long,
                                                      device=device))  # (G, groups)
        self.rows = adapters.block_args(model, adapter_ids=self.cache.adapter_ids, vectors=self.cache.vectors)
        self.h = model.embed(tokens)  # (G, T, D)
        self.rot, self.mask = model.rope_and_mask(torch.arange(tokens.shape[1], device=device), 0, pad_len, self.cache)
        self.logits = None  # (G, vocab), after the last layer
        self.going_on = []  # the (j, request) pairs that go on past their first token

    def run(self, n_layers):
        """The next n_layers layers; after the last, the logits of each prompt's next token."""
        for block in self.model.layers[self.layer:self.layer + n_layers]:
            self.h = block(self.h, self.rot, self.mask, self.cache, 0, **self.rows)
        self.layer += n_layers
        if self.layer >= len(self.model.layers):
            self.logits = self.model.output(self.model.norm(self.h[:, -1:])).float()[:, -1]
            self.h = None


class Overloaded(Exception):
    """The waiting queue is full (HTTP 429)."""


class Draining(Exception):
    """The server is shutting down and admits nothing new (HTTP 503)."""


class Engine:
    def __init__(self, model, tokenizer, bank, max_batch=16, max_len=2048, max_waiting=64, prefill_tokens=512,
                 prefill_layers=None):
        self.model, self.tokenizer, self.bank = model, tokenizer, bank
        self.batch = Batch(model, max_batch, max_len)
        self.waiting = collections.deque()
        self.max_waiting = max_waiting
        self.prefill_tokens = prefill_tokens  # a group's padded prompt tokens at most: what stalls the running rows
        self.prefill_layers = prefill_layers or model.args.n_layers  # layers of a prefill between two decode steps
        self.pending = None  # the group being prefilled, a piece of layers at a time (Prefill)
        self.wake = threading.Condition()
        self.draining = self.stopped = False
        self.static = False  # continuous batching; True: static batches, for bench.py's comparison
        self.thread = threading.Thread(target=self.run, name="engine", daemon=True)

    def submit(self, request):
        with self.wake:
            if self.draining:
                raise Draining()
            if len(self.waiting) >= self.max_waiting:
                raise Overloaded()
            self.waiting.append(request)
            self.wake.notify()

    def busy(self):
        return bool(self.waiting or self.batch.rows or self.pending)

    def run(self):
        """The engine's one loop: admit what fits, then one decode step for every running row."""
        while True:
            with self.wake:
                while not self.busy() and not self.stopped:
                    self.wake.wait()
                if self.stopped and not self.busy():
                    return
            try:
                self.admit()
                if self.batch.rows:
                    self.step()
            except Exception as e:  # a fault in the engine fails the running requests only; the server serves on
                self.fail(self.batch.rows, e)
                self.batch.keep([])

    def admit(self):
        """First in, first out: the head of the queue joins when it fits, and the requests behind it join with it
        while the group fits too and its prompts, padded to the longest, stay within prefill_tokens; nothing
        overtakes. The group's prefill is one forward, so a burst of arrivals stalls the running rows once, and
        for as long as prefill_tokens allow, not once per request. Static batches (bench.py's comparison) take
        every request that fits, but only into an empty batch."""
        if self.pending:  # a prefill in pieces goes on first: nothing overtakes it
            return self.prefill()
        if self.static and self.batch.rows:
            return
        group = []
        with self.wake:
            while self.waiting:
                request = self.waiting[0]
                if request.cancelled:
                    self.waiting.popleft()
                    continue
                if request.adapter is None:  # a named adapter not in the bank yet (--adapter_dir)
                    try:
                        loaded = self.bank.load(request.model, self.in_use() | {r.model for r in group})
                    except UserError as e:  # its file went bad since start-up: this request fails, no other
                        self.waiting.popleft().events.put(("error", str(e)))
                        continue
                    if not loaded:
                        break  # every row of its group's bank serves a request: wait for one to finish
                    request.adapter = self.bank.rows[request.model]
                tokens = (len(group) + 1) * max(len(r.prompt) for r in group + [request])
                if group and tokens > self.prefill_tokens and not self.static:
                    break
                if self.batch.join_column(group + [request]) is None:
                    break
                group.append(self.waiting.popleft())
        if group:
            self.pending = Prefill(self.model, group, self.tokenizer.pad_id, self.bank)
            self.prefill()

    def fail(self, requests, e):
        for r in requests:
            r.events.put(("error", f"internal error in the engine: {type(e).__name__}: {e}"))

    def in_use(self):
        pending = self.pending.group if self.pending else []
        return {r.model for r in [*self.batch.rows, *self.waiting, *pending]}

    @torch.inference_mode()
    def prefill(self):
        """The next piece of the pending group's prefill (Prefill: at most prefill_layers layers; all of them when no
        row is running). After the last, each request's first token; those that go on join the batch when it has
        room for them (rows may have moved on since the group was admitted)."""
        p = self.pending
        try:
            if p.logits is None:  # into an empty batch, whole: no running row waits for it
                p.run(self.prefill_layers if self.batch.rows else len(self.model.layers))
                if p.logits is None:
                    return
                for r in p.group:
                    if r.options.seed is not None:
                        r.generator = torch.Generator(p.logits.device).manual_seed(r.options.seed)
                p.going_on = [(j, r) for j, r in enumerate(p.group) if self.advance(r, p.logits[j:j + 1])]
            if p.going_on:
                column = self.batch.join_column([r for _, r in p.going_on])
                if column is None:
                    return  # the running rows have moved near the cache's end: join once some have finished
                self.batch.join(p.going_on, p.cache, column)
        except Exception as e:  # a fault in the engine fails these requests only
            self.fail(p.group, e)
        self.pending = None

    @torch.inference_mode()
    def step(self):
        """One decode step of every running row at column c, then each row's next token."""
        batch = self.batch
        rows = [i for i, r in enumerate(batch.rows) if not r.cancelled]
        batch.keep(rows)
        if not batch.rows:
            return
        tokens = torch.tensor([r.next_token for r in batch.rows], device=batch.cache.k[0].device)
        logits = generate.decode_step(self.model, tokens, batch.c, batch.cache)  # (B, vocab)
        batch.c += 1
        batch.keep([i for i, r in enumerate(batch.rows) if self.advance(r, logits[i:i + 1])])

    def advance(self, request, logits):
        """Sample the request's next token from its logits (1, vocab), as generate.sample_tokens does, and send
        the text it adds. Returns whether the request goes on."""
        o = request.options
        token = int(sample(logits, temperature=o.temperature, top_k=o.top_k, top_p=o.top_p,
                           generator=request.generator))
        if token == o.eos_id:
            return self.finish(request, "stop")
        request.tokens.append(token)
        text = self.tokenizer.decode(request.tokens)
        if o.stop and stop_at(text, o.stop) is not None:
            return self.finish(request, "stop")
        if len(request.tokens) == o.max_new_tokens:
            return self.finish(request, "length")
        safe = shown(text, o.stop)  # whole characters, and nothing that may begin a stop string
        if safe > request.sent:
            request.events.put(("text", text[request.sent:safe]))
            request.sent = safe
        request.next_token = token
        return True

    def finish(self, request, reason):
        text = cut_at_stop(self.tokenizer.decode(request.tokens), request.options.stop)
        if len(text) > request.sent:
            request.events.put(("text", text[request.sent:]))
        request.events.put(("done", reason))
        return False

    def drain(self, seconds):
        """Admit nothing more; wait (at most `seconds`) for the requests in flight to finish."""
        with self.wake:
            self.draining = True
        deadline = time.time() + seconds
        while self.busy() and time.time() < deadline:
            time.sleep(0.05)
        with self.wake:
            self.stopped = True
            self.wake.notify()


# -----------------------------------------------------------------------------
# The adapters: a bank per method and config (mixed.py), row 0 the base model, named adapters pinned, --adapter_dir's
# loaded on first use


class Bank:
    def __init__(self, model, named, adapter_dir=None, max_adapters=8, base=None, any_base=False):
        """named: {name: path}, loaded now and kept; adapter_dir: NAME.pt files loaded on first use, at most
        max_adapters at a time of each method and config, the least recently used (and unused) evicted.

        The adapters form groups, one per method and config (mixed.py): a bank each, whose row 0 is the identity.
        A tenant is (group, row); the base model is (0, 0), every group's identity. Every file is read now, the
        folder's too, so that a bad one is named before the server listens and every group is known."""
        self.model, self.dir, self.base, self.any_base = model, adapter_dir, base, any_base
        self.named, self.pinned = list(named), set(named)
        found = {p.stem: str(p) for p in sorted(Path(adapter_dir).glob("*.pt"))} if adapter_dir else {}
        if adapter_dir and not found:
            raise UserError(f"--adapter_dir {adapter_dir} holds no NAME.pt adapter file")
        payloads = {name: adapters.read_adapter_file(path) for name, path in {**found, **named}.items()}
        # a method with a union (SSP: tenants of different structures) is one group, the union of their configs
        groups = {}  # a group's key -> the configs of its files
        for p in payloads.values():
            groups.setdefault(self.key(p["config"]), []).append(p["config"])
        self.configs = []  # each group's config
        for configs in groups.values():
            union = adapters.METHODS[configs[0]["method"]].union
            self.configs.append(union(configs) if union else configs[0])
        self.rows, self.used = {}, collections.OrderedDict()  # name -> (group, row); name -> None, oldest first
        group = {name: self.group(p["config"]) for name, p in payloads.items()}
        self.free, sizes = [], []  # each group's free rows; its rows
        for g in range(len(self.configs)):
            mine = [name for name in named if group[name] == g]
            folder = any(group[name] == g for name in found if name not in self.pinned)
            sizes.append(1 + len(mine) + (max_adapters if folder else 0))
            self.free.append(list(range(1 + len(mine), sizes[-1])))
            self.rows |= {name: (g, row) for row, name in enumerate(mine, start=1)}
        self.tensors = mixed.add_groups(model, list(zip(self.configs, sizes)))  # each group's bank tensors by name
        for name, (g, row) in self.rows.items():
            self.fill(g, row, named[name], payloads[name])

    @staticmethod
    def key(config):
        return config["method"] if adapters.METHODS[config["method"]].union else json.dumps(config, sort_keys=True)

    def group(self, config):
        """The group that holds adapters of this config: its own, or (a union) one the union covers; None if none."""
        for g, mine in enumerate(self.configs):
            union = adapters.METHODS[mine["method"]].union
            if config == mine or union and config["method"] == mine["method"] and union([mine, config]) == mine:
                return g
        return None

    def ids(self, adapter):
        """A tenant (group, row) as each group's row: (G,), its row in its own group, the identity elsewhere."""
        g, row = adapter
        return [row if i == g else 0 for i in range(len(self.configs))]

    def fill(self, g, row, path, payload=None):
        """Adapter file `path` into row `row` of group g's bank, checked against it and this base model."""
        payload = payload or adapters.read_adapter_file(path)
        if self.group(payload["config"]) != g:
            raise UserError(f"{path} is a {payload['config']} adapter, which this server's banks do not hold "
                            f"({', '.join(map(str, self.configs))}): restart the server to serve it")
        adapters.check_adapter_file(path, payload, self.model.args, self.base, self.any_base)
        with torch.no_grad():
            for k, t in self.tensors[g].items():
                if k in payload["tensors"]:
                    t[row].copy_(payload["tensors"][k])
                else:  # a union's tensor this tenant lacks: zeros, which add nothing (and clear an evicted tenant's)
                    t[row].zero_()

    def names(self):
        """Every adapter this server can serve: the named ones, and --adapter_dir's files."""
        found = sorted(p.stem for p in Path(self.dir).glob("*.pt")) if self.dir else []
        return [*self.named, *(n for n in found if n not in self.pinned)]

    def known(self, name):
        # a file directly in the folder: a name with a path in it ("../x") would reach files outside it
        return name in self.rows or bool(self.dir and name == Path(name).name and "\0" not in name and
                                         (Path(self.dir) / f"{name}.pt").is_file())

    def load(self, name, in_use):
        """Put adapter `name` in a row of its group (already there, a free row, or the least recently used row of
        the group that no request uses). Returns False when every row of its group serves a request."""
        if name in self.rows:
            self.used.pop(name, None)
            if name not in self.pinned:
                self.used[name] = None
            return True
        path = Path(self.dir) / f"{name}.pt"
        payload = adapters.read_adapter_file(path)
        g = self.group(payload["config"])
        if g is None:
            raise UserError(f"{path} is a {payload['config']} adapter, which this server's banks do not hold "
                            f"({', '.join(map(str, self.configs))}): restart the server to serve it")
        if not self.free[g]:
            idle = next((n for n in self.used if n not in in_use and self.rows[n][0] == g), None)
            if idle is None:
                return False
            self.free[g].append(self.rows.pop(idle)[1])
            del self.used[idle]
        row = self.free[g].pop()
        self.fill(g, row, path, payload)
        self.rows[name], self.used[name] = (g, row), None
        return True


# -----------------------------------------------------------------------------
# HTTP: OpenAI's completions and chat completions, thin over the engine


class BadRequest(Exception):
    def __init__(self, status, message, param=None):
        super().__init__(message)
        self.status, self.param = status, param


COMMON = {"model", "max_tokens", "temperature", "top_p", "seed", "stop", "stream", "stream_options", "n"}
ACCEPTED = {"/v1/completions": COMMON | {"prompt"}, "/v1/chat/completions": COMMON | {"messages",
                                                                                      "max_completion_tokens"}}
ROLES = ("system", "user", "assistant")
MAX_BODY = 1 << 24  # bytes: a request body past 16 MiB is refused before it is read (a context of text is far less)


def number(body, key, kind, low, high, default, low_open=False):
    """body[key] as a finite number of `kind` in [low, high] ((low, high] if low_open), or the default."""
    value = body.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int) or \
            not math.isfinite(value) or value < low or (low_open and value == low) or value > high:
        interval = f"{'(' if low_open else '['}{low}, {high}]"
        raise BadRequest(400, f"{key!r} must be {'a number' if kind is float else 'an integer'} in {interval}, got "
                              f"{json.dumps(value)[:40]}", key)
    return kind(value)


def text_of(content):
    """A chat message's content as text: a string, or OpenAI's list of text parts, joined by newlines (as vLLM
    joins them); None if it is neither (an image, say: this server reads text only)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and content and all(
            isinstance(p, dict) and p.get("type") == "text" and set(p) == {"type", "text"} and isinstance(p["text"], str)
            for p in content):
        return "\n".join(p["text"] for p in content)
    return None


def usage(request):
    n_prompt, n_new = len(request.prompt), len(request.tokens)
    return {"prompt_tokens": n_prompt, "completion_tokens": n_new, "total_tokens": n_prompt + n_new}


class Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # connections the OS holds before accept(): many clients arrive at once

    def __init__(self, address, engine, base_name, max_tokens):
        super().__init__(address, Handler)
        self.engine, self.base_name, self.max_tokens = engine, base_name, max_tokens
        self.in_flight = 0
        self.count = threading.Lock()
        self.quiet = False  # True: no line per request (bench.py's loads)


class Handler(BaseHTTPRequestHandler):
    server: Server
    include_usage = False  # this request's stream_options: a last chunk with the usage (parse sets it)

    def log_message(self, format, *args):  # one line per request on stderr, as the standard server does, but terse
        if not self.server.quiet:
            sys.stderr.write(f"{self.address_string()} {format % args}\n")

    def send_json(self, status, obj):
        body = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def send_error_json(self, status, message, param=None):
        kind = {400: "invalid_request_error", 404: "not_found_error", 413: "invalid_request_error",
                429: "rate_limit_error", 503: "service_unavailable"}.get(status, "server_error")
        self.send_json(status, {"error": {"message": message, "type": kind, "param": param, "code": status}})

    def send_error(self, code, message=None, explain=None):
        """The standard server's own errors (a malformed request line, a method other than GET and POST) in JSON too."""
        self.close_connection = True
        self.send_error_json(code, message or self.responses.get(code, ("error",))[0])

    def do_GET(self):
        server = self.server
        model = lambda name: {"id": name, "object": "model", "created": 0, "owned_by": "local"}
        if self.path == "/health":
            self.send_json(200, {"status": "ok", "waiting": len(server.engine.waiting),
                                 "running": len(server.engine.batch.rows)})
        elif self.path == "/v1/models":
            names = [server.base_name, *server.engine.bank.names()]
            self.send_json(200, {"object": "list", "data": [model(name) for name in names]})
        elif self.path.startswith("/v1/models/"):  # one model: the base model or an adapter, by its id
            name = urllib.parse.unquote(self.path.removeprefix("/v1/models/"))
            if name == server.base_name or server.engine.bank.known(name):
                self.send_json(200, model(name))
            else:
                self.send_error_json(404, f"no model or adapter named {name[:80]!r}: GET /v1/models lists them", "model")
        else:
            self.send_error_json(404, f"no such path {self.path[:80]!r}: GET /health or /v1/models")

    def do_POST(self):
        if self.path not in ACCEPTED:
            return self.send_error_json(404, f"no such path {self.path[:80]!r}: POST /v1/completions or "
                                             "/v1/chat/completions")
        with self.server.count:
            self.server.in_flight += 1
        try:
            try:
                request, stream = self.parse()
                self.server.engine.submit(request)
            except BadRequest as e:
                return self.send_error_json(e.status, str(e), e.param)
            except Overloaded:
                return self.send_error_json(429, "too many requests are waiting: try again later")
            except Draining:
                return self.send_error_json(503, "the server is shutting down")
            except Exception as e:  # a fault of ours: this request fails with a 500 and the trace, the server serves on
                traceback.print_exc()
                return self.send_error_json(500, f"internal error while reading the request: {type(e).__name__}: {e}")
            try:
                self.stream(request) if stream else self.answer(request)
            except (BrokenPipeError, ConnectionResetError):  # the client went away: its request stops at the next step
                request.cancelled = True
        finally:
            with self.server.count:
                self.server.in_flight -= 1

    def parse(self):
        """The body, checked: a Request and whether to stream. Every field is checked; unknown ones are refused."""
        server = self.server
        size = self.headers.get("Content-Length", "")
        if not (size.isascii() and size.isdigit()):  # no body, or a length that cannot be read up to (a negative one reads until EOF)
            raise BadRequest(400, "a POST needs a Content-Length header with the body's size in bytes")
        if int(size) > MAX_BODY:
            self.close_connection = True  # the body is left unread
            raise BadRequest(413, f"the body has {size} bytes, more than this server reads ({MAX_BODY})")
        try:
            body = json.loads(self.rfile.read(int(size)),
                              parse_constant=lambda c: (_ for _ in ()).throw(ValueError(c)))
        except ValueError as e:
            raise BadRequest(400, f"the body is not valid JSON ({str(e)[:80]}); NaN and Infinity are not numbers")
        if not isinstance(body, dict):
            raise BadRequest(400, "the body must be a JSON object")
        try:  # JSON may escape half of a UTF-16 pair ("\ud800"): Python reads it, but it is no text to tokenize
            json.dumps(body, ensure_ascii=False).encode()
        except UnicodeEncodeError:
            raise BadRequest(400, "a string in the body holds a lone UTF-16 surrogate (an escape such as \\ud800 "
                                  "without its pair): send text as valid UTF-8 or paired escapes")
        unknown = sorted(set(body) - ACCEPTED[self.path])
        if unknown:
            raise BadRequest(400, f"unsupported parameter(s): {', '.join(unknown)[:200]}", unknown[0])
        name = body.get("model")
        if not isinstance(name, str):
            raise BadRequest(400, "'model' must be a string: the base model's name or an adapter's", "model")
        if name != server.base_name and not server.engine.bank.known(name):
            raise BadRequest(404, f"no model or adapter named {name[:80]!r}: GET /v1/models lists them", "model")
        if number(body, "n", int, 1, 1, 1) != 1:
            raise BadRequest(400, "'n' must be 1", "n")
        chat = self.path == "/v1/chat/completions"
        tokenizer = server.engine.tokenizer
        if chat:
            messages = body.get("messages")
            if not (isinstance(messages, list) and messages and all(
                    isinstance(m, dict) and set(m) <= {"role", "content", "name"} and m.get("role") in ROLES and
                    text_of(m.get("content")) is not None for m in messages)):
                raise BadRequest(400, "'messages' must be a non-empty list of {\"role\": \"system\"|\"user\"|"
                                      "\"assistant\", \"content\": a string, or a list of {\"type\": \"text\", "
                                      "\"text\": string} parts}", "messages")
            try:
                prompt = tokenizer.format_chat([{"role": m["role"], "content": text_of(m["content"])} for m in messages])
            except UserError as e:
                raise BadRequest(400, str(e), "messages")
        else:
            text = body.get("prompt")
            if not isinstance(text, str) or not text:
                raise BadRequest(400, "'prompt' must be a non-empty string", "prompt")
            prompt = tokenizer.encode(text)
        stop = body.get("stop")
        stop = [stop] if isinstance(stop, str) else stop
        if stop is not None and not (isinstance(stop, list) and 0 < len(stop) <= 4 and
                                     all(isinstance(s, str) and s for s in stop)):
            raise BadRequest(400, "'stop' must be a non-empty string or a list of 1 to 4 of them", "stop")
        context = server.engine.batch.max_len
        limit = number(body, "max_completion_tokens", int, 1, context, None) if chat else None
        max_tokens = number(body, "max_tokens", int, 1, context, limit or (server.max_tokens if chat else 16))
        options = Options(max_new_tokens=max_tokens, stop=stop, eos_id=tokenizer.eos_id,
                          temperature=number(body, "temperature", float, 0, 2, 1.0),
                          top_p=number(body, "top_p", float, 0, 1, 1.0, low_open=True),
                          seed=number(body, "seed", int, 0, 2**63 - 1, None))
        if len(prompt) + max_tokens > context:
            raise BadRequest(400, f"the prompt has {len(prompt)} tokens; with max_tokens {max_tokens} that is "
                                  f"{len(prompt) + max_tokens}, more than this server's context of {context}: "
                                  "shorten the prompt or ask for fewer tokens", "max_tokens")
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise BadRequest(400, "'stream' must be true or false", "stream")
        stream_options = body.get("stream_options")
        if stream_options is not None and not (stream and isinstance(stream_options, dict) and
                                               set(stream_options) <= {"include_usage"} and
                                               isinstance(stream_options.get("include_usage", False), bool)):
            raise BadRequest(400, "'stream_options' goes with \"stream\": true, and holds only "
                                  "{\"include_usage\": true|false}", "stream_options")
        self.include_usage = bool(stream_options and stream_options.get("include_usage"))
        adapter = BASE if name == server.base_name else server.engine.bank.rows.get(name)  # None: load on admission
        return Request(prompt, options, name, adapter=adapter, chat=chat), stream

    def events(self, request):
        """The engine's events for this request, until it is done; an error ends it with a 500."""
        while True:
            kind, value = request.events.get()
            if kind == "error":
                raise RuntimeError(value)
            yield kind, value
            if kind == "done":
                return

    def body(self, request, text, reason):
        chat = request.chat
        choice = {"index": 0, "finish_reason": reason}
        choice |= {"message": {"role": "assistant", "content": text}} if chat else {"text": text, "logprobs": None}
        return {"id": ("chatcmpl-" if chat else "cmpl-") + request.id, "created": request.created,
                "object": "chat.completion" if chat else "text_completion", "model": request.model,
                "choices": [choice], "usage": usage(request)}

    def answer(self, request):
        parts, reason = [], None
        try:
            for kind, value in self.events(request):
                if kind == "text":
                    parts.append(value)
                else:
                    reason = value
        except RuntimeError as e:
            return self.send_error_json(500, str(e))
        self.send_json(200, self.body(request, "".join(parts), reason))

    def stream(self, request):
        """Server-sent events: a chunk per piece of text, a last chunk with the finish reason, then [DONE]."""
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()
        chat = request.chat
        head = {"id": ("chatcmpl-" if chat else "cmpl-") + request.id, "created": request.created,
                "object": "chat.completion.chunk" if chat else "text_completion", "model": request.model}
        if self.include_usage:  # OpenAI's stream_options: every chunk has "usage", null until a last chunk of its own
            head["usage"] = None

        def chunk(text, reason=None):
            choice = {"index": 0, "finish_reason": reason}
            choice |= {"delta": {"role": "assistant", "content": text} if text or reason is None else {}} if chat \
                else {"text": text, "logprobs": None}
            self.wfile.write(f"data: {json.dumps(head | {'choices': [choice]})}\n\n".encode())
            self.wfile.flush()

        try:
            for kind, value in self.events(request):
                chunk(value) if kind == "text" else chunk("", value)
            if self.include_usage:
                self.wfile.write(f"data: {json.dumps(head | {'choices': [], 'usage': usage(request)})}\n\n".encode())
        except RuntimeError as e:
            self.wfile.write(f"data: {json.dumps({'error': {'message': str(e), 'code': 500}})}\n\n".encode())
        self.wfile.write(b"data: [DONE]\n\n")
        self.wfile.flush()


# -----------------------------------------------------------------------------
# Command line


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    arg = p.add_argument
    arg("--adapter", action="append", default=[], metavar="NAME=PATH", help="an adapter file, served as model NAME; "
        "repeatable; adapters of any methods share the batch")
    arg("--adapter_dir", help="a folder of NAME.pt adapter files, each loaded when first asked for")
    arg("--max_adapters", type=int, default=8, help="adapters of --adapter_dir held at once, of each method and config; the least recently used "
        "one that no request uses makes room")
    arg("--ckpt_dir", help="Meta folder, HF folder or .gguf file (default: the small SmolLM2 model)")
    arg("--any_base", action="store_true", help="serve adapters trained on other weights of the same shape")
    arg("--host", default="127.0.0.1", help="the address to listen on (there is no authentication: keep it local, "
        "or behind a proxy)")
    arg("--port", type=int, default=8000, help="the port to listen on (0: a free one, printed)")
    arg("--max_batch", type=int, default=16, help="requests decoded together at most")
    arg("--max_len", type=int, help="positions of the batch's KV cache: a request's prompt and new tokens must fit "
        "in it (default: the model's context, at most 2048)")
    arg("--prefill_tokens", type=int, default=512, help="prompt tokens (each padded to the longest) that arrivals "
        "are prefilled together in, at most: the longest the running requests stall for them (a longer prompt is "
        "prefilled alone)")
    arg("--prefill_layers", type=int, help="layers of a prefill run between two decode steps, at most: a long "
        "prefill runs in pieces, and the running requests' tokens go on between them: a lower p99 inter-token latency, "
        "and fewer tokens/s, since groups join more slowly (README, Serving; default: all, one piece)")
    arg("--max_waiting", type=int, default=64, help="requests waiting at most; more get HTTP 429")
    arg("--max_tokens", type=int, default=256, help="new tokens of a chat completion that does not say (a "
        "completion's default is OpenAI's, 16)")
    arg("--drain_seconds", type=float, default=30.0, help="on SIGTERM or Ctrl-C, how long the requests in flight "
        "may take to finish")
    arg("--device", default="auto", help="cuda, cuda:1, mps or cpu (auto: cuda when available)")
    arg("--dtype", default="auto", choices=DTYPES, help="auto: bf16 on cuda and on CPUs with native bf16, fp32 "
        "elsewhere")
    args = p.parse_args(argv)
    for flag in ("max_adapters", "max_batch", "max_len", "max_waiting", "max_tokens", "prefill_tokens", "prefill_layers"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            p.error(f"--{flag} must be at least 1, got {getattr(args, flag)}")
    if not 0 <= args.port < 65536 or not args.drain_seconds >= 0:
        p.error("--port must lie in [0, 65535] and --drain_seconds be >= 0")
    named = {}
    for spec in args.adapter:
        name, _, path = spec.partition("=")
        if not name or not path or name in named:
            p.error(f"--adapter {spec!r}: write NAME=PATH, each NAME once")
        named[name] = path
    args.named = named
    return p, args


def start(args):
    """The model, its bank and the engine, started; then the HTTP server, not yet serving. Bad files are refused
    here, before the server listens."""
    for name, path in args.named.items():
        adapters.read_adapter_file(path)  # before the model loads: a bad file is named at once
    device = pick_device(args.device)
    model, tokenizer = load(args.ckpt_dir, device=device, dtype=resolve_dtype(args.dtype, device))
    base = args.ckpt_dir or default_model_path()
    bank = Bank(model, args.named, args.adapter_dir, args.max_adapters, base, args.any_base)
    max_len = args.max_len or min(2048, model.args.max_seq_len)
    if max_len > model.args.max_seq_len:
        raise UserError(f"--max_len {max_len} is more than the model's context of {model.args.max_seq_len}")
    engine = Engine(model, tokenizer, bank, args.max_batch, max_len, args.max_waiting, args.prefill_tokens,
                    args.prefill_layers)
    engine.thread.start()
    return Server((args.host, args.port), engine, model_name(args.ckpt_dir), args.max_tokens)


def main(argv=None):
    parser, args = parse_args(argv)
    try:
        server = start(args)
    except UserError as e:
        parser.error(str(e))
    stopping = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stopping.set())
    threading.Thread(target=server.serve_forever, name="http", daemon=True).start()
    host, port = server.server_address[:2]
    print(f"serving {server.base_name} and {len(server.engine.bank.rows)} adapter(s) on http://{host}:{port}/v1 "
          "(Ctrl-C stops it)", flush=True)
    stopping.wait()
    print("stopping: finishing the requests in flight", flush=True)
    server.engine.drain(args.drain_seconds)
    deadline = time.time() + 5  # their HTTP threads write the last bytes
    while server.in_flight and time.time() < deadline:
        time.sleep(0.05)
    server.shutdown()
    server.server_close()


if __name__ == "__main__":
    main()
