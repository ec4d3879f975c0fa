"""
bench.py --sections serve: serve.py under load, over HTTP, as its clients see it.

A load generator sends completion requests to a server of this process (on 127.0.0.1, a free port) and reads each
answer as a stream, timing its first chunk (time to first token) and the gaps between chunks (inter-token
latency: a chunk is a token's text, but for a token that ends inside a character or a stop string's prefix).
Two loads:
- closed loop: C clients, each sending its next request as soon as its last one is answered (throughput at
  saturation: what the server can do);
- open loop: Poisson arrivals at R requests/s, whatever the server does (latency at a given load).
Requests go to K tenants in turn (K adapters, random non-trivial weights; K = 1, 8 and 32 by default), in two length
mixes: the paper's Table 4 shape (prompts of 274 tokens, 32 new tokens) and short chat-like prompts (16 to 48 tokens,
32 new tokens), greedy; the open loop at several rates (1, 2 and 4 requests/s by default).

Rows: every method (base, PARA, (IA)^3, LoRA, Houlsby) at each K and load, and the base model served three ways:
continuous batching, one request at a time (--max_batch 1), and static batches (a new batch only once the last one
has finished). Runs of all rows alternate round by round, and each ratio is the median of same-round ratios with a
distribution-free 95% interval, as in the rest of bench.py.
"""
import http.client
import json
import random
import statistics
import tempfile
import threading
import time
from pathlib import Path

import torch

import adapters
import bench
import generate
import serve

MIXED = "mixed"  # a row: one server holding every method's tenants, its requests going to each method in turn


def mixes(args, context):
    """name -> the range of prompt lengths (tokens) its requests draw from: the paper's Table 4 shape (--prompt_len,
    274), and short chat-like prompts; within the model's context."""
    cap = max(1, context - args.new_tokens - 8)
    return {"table4": (min(args.prompt_len, cap),) * 2, "short": (min(16, cap), min(48, cap))}


def requests_of(tokenizer, lengths, n, new_tokens, seed):
    """n prompts (texts) of lengths in the range `lengths`, cut from bench.TEXT at random places, with max_tokens."""
    rng = random.Random(seed)
    body = tokenizer.encode(bench.TEXT, bos=False) * 4
    low, high = lengths
    out = []
    for _ in range(n):
        length = rng.randint(low, high)
        start = rng.randrange(len(body) - length)
        out.append((tokenizer.decode(body[start:start + length]), new_tokens))
    return out


def server_of(path, dtype, tenants, max_batch, max_len, static=False, prefill_layers=None):
    """A serve.py server of the model at path with the adapter files `tenants` ({name: path}), in this process."""
    argv = ["--port", "0", "--dtype", dtype, "--max_batch", str(max_batch), "--max_waiting", "100000",
            "--max_len", str(max_len)] + (["--prefill_layers", str(prefill_layers)] if prefill_layers else [])
    argv += ["--ckpt_dir", path] if path else []
    for name, file in tenants.items():
        argv += ["--adapter", f"{name}={file}"]
    _, args = serve.parse_args(argv)
    server = serve.start(args)
    server.engine.static = static  # a new batch only when the last one has finished
    server.quiet = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def stop(server):
    server.engine.drain(60)
    server.shutdown()
    server.server_close()


def one_request(server, model, prompt, max_tokens):
    """(seconds to the first chunk, gaps between chunks, completion tokens, seconds in all) of one streamed request."""
    host, port = server.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=600)
    start = time.perf_counter()
    conn.request("POST", "/v1/completions", json.dumps({
        "model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True}),
        {"Content-Type": "application/json"})
    response = conn.getresponse()
    times = []
    for line in response:
        if line.startswith(b"data: ") and not line.startswith(b"data: [DONE]"):
            chunk = json.loads(line[6:])
            if chunk["choices"][0]["text"]:
                times.append(time.perf_counter())
    conn.close()
    end = time.perf_counter()
    return (times[0] - start if times else end - start), [b - a for a, b in zip(times, times[1:])], len(times), \
        end - start


def closed_loop(server, models, requests, clients):
    """Every request, sent by `clients` clients in turn; (records, wall seconds)."""
    queue, records, lock = list(enumerate(requests)), [], threading.Lock()

    def client():
        while True:
            with lock:
                if not queue:
                    return
                i, (prompt, n) = queue.pop(0)
            records.append(one_request(server, models[i % len(models)], prompt, n))

    start = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    return records, time.perf_counter() - start


def open_loop(server, models, requests, rate, seed):
    """Every request, sent at Poisson arrivals of `rate` per second; (records, wall seconds)."""
    rng, records, threads = random.Random(seed), [], []
    start = time.perf_counter()
    at = 0.0
    for i, (prompt, n) in enumerate(requests):
        time.sleep(max(0.0, start + at - time.perf_counter()))
        t = threading.Thread(target=lambda i=i, p=prompt, n=n: records.append(
            one_request(server, models[i % len(models)], p, n)))
        t.start()
        threads.append(t)
        at += rng.expovariate(rate)
    for t in threads:
        t.join(600)
    return records, time.perf_counter() - start


def summary(records, seconds):
    """Throughput and latencies of one load."""
    gaps = sorted(g for r in records for g in r[1])
    ttft = sorted(r[0] for r in records)
    q = lambda xs, p: xs[min(len(xs) - 1, int(p * len(xs)))] if xs else float("nan")
    return {"tokens/s": sum(r[2] for r in records) / seconds, "TTFT p50 ms": 1000 * q(ttft, 0.5),
            "TTFT p99 ms": 1000 * q(ttft, 0.99), "ITL p50 ms": 1000 * q(gaps, 0.5), "ITL p99 ms": 1000 * q(gaps, 0.99)}


def serving(base, tokenizer, args, device, dtype, path):
    """The section's rows: see the module docstring. --serve_tenants, --serve_clients, --serve_rate,
    --serve_requests and --serve_mixes size it."""
    Ks, name_of = args.serve_tenants, adapters.label
    dtype_flag = {"torch.float32": "fp32", "torch.bfloat16": "bf16", "torch.float16": "fp16"}[str(dtype)]
    every = {m: s for m, s in args.sizes.items() if not adapters.METHODS[m].prunes}  # the mixed row's methods
    methods = {None: {}} | {m: s for m, s in every.items() if m in args.serve_methods}
    folder = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    tenants = {}
    for method, settings in (every if MIXED in args.serve_methods else methods).items():
        if method is None:  # max(K) random adapters of each method, saved for the servers to load
            continue
        model = bench.with_adapter(base, method, settings, max(Ks), True, seed=5)
        tenants[method] = {}
        for i in range(max(Ks)):
            file = folder / f"{method}-{i}.pt"
            adapters.save_adapter(model, file, index=i)
            tenants[method][f"{method}-{i}"] = str(file)
    rows, loads = [], {mix: lengths for mix, lengths in mixes(args, base.args.max_seq_len).items()
                       if mix in args.serve_mixes}
    max_len = max(high for _, high in loads.values()) + args.new_tokens + 8  # every request fits; a small cache
    for mix, lengths in loads.items():  # keeps the 7 servers in memory
        requests = requests_of(tokenizer, lengths, args.serve_requests, args.new_tokens, seed=7)
        # (row name, K) -> (its server, the models its requests go to in turn). A method's server holds max(K)
        # tenants, and a load with K tenants sends its requests to K of them: each row computes with its own
        # adapter, so the others held in the bank cost memory, not time
        servers, jobs, layers = {}, {}, args.serve_prefill_layers
        for m, s in methods.items():
            server = server_of(path, dtype_flag, tenants.get(m, {}), args.serve_max_batch, max_len,
                               prefill_layers=layers)
            for K in (Ks if m else [0]):
                servers[name_of(m, s) if m else "base", K] = (server, list(tenants.get(m, {}))[:K] or
                                                              [server.base_name])
        if MIXED in args.serve_methods and tenants:  # every method's tenants in one server, in turn: one batch
            in_turn = [name for i in range(max(Ks)) for names in tenants.values() for name in list(names)[i:i + 1]]
            server = server_of(path, dtype_flag, {n: f for names in tenants.values() for n, f in names.items()},
                               args.serve_max_batch, max_len, prefill_layers=layers)
            for K in Ks:
                servers[MIXED, K] = (server, in_turn[:K])
        for name, kept, row in (("base, one at a time", 1, "one"), ("base, static batches", args.serve_max_batch,
                                                                      "static")):
            if row in args.serve_methods:
                server = server_of(path, dtype_flag, {}, kept, max_len, static="static" in name, prefill_layers=layers)
                servers[name, 0] = (server, [server.base_name])
        for server, models in servers.values():  # first calls pay for allocations and kernel choices
            one_request(server, models[0], requests[0][0], 4)
        for (name, K), (server, models) in servers.items():
            jobs[name, K, "closed"] = lambda s=server, m=models: closed_loop(s, m, requests, args.serve_clients)
            for rate in args.serve_rate if "," not in name else ():
                jobs[name, K, rate] = lambda s=server, m=models, r=rate: open_loop(s, m, requests, r, seed=11)
        runs = {key: [] for key in jobs}
        for r in range(args.runs):
            bench.say(f"serve, {mix}: round {r + 1}/{args.runs}")
            order = list(jobs)[r % len(jobs):] + list(jobs)[:r % len(jobs)]
            for key in order:
                runs[key].append(summary(*jobs[key]()))
        for server in {id(s): s for s, _ in servers.values()}.values():
            stop(server)
        for (name, K, load), measured in runs.items():
            ref = runs["base", 0, load]
            row = {"section": "serve", "mix": mix, "method": name, "key": name.split(",")[0] if "," in name else
                   next((m for m, s in methods.items() if m and name_of(m, s) == name), name if name == MIXED else None),
                   "tenants": K,
                   "load": f"{args.serve_clients} clients" if load == "closed" else f"{load:g} req/s"}
            for key in measured[0]:
                row[key] = statistics.median(m[key] for m in measured)
            # throughput against the base model's under the same load; p99 inter-token latency against its too
            for key, of in (("/ base tokens/s", "tokens/s"), ("/ base ITL p99", "ITL p99 ms")):
                ratio = [m[of] / b[of] for m, b in zip(measured, ref)]
                row[key] = statistics.median(ratio)
                row.setdefault("95% CI", {})[key] = bench.median_interval(ratio)
            if "," in name:  # the base model served otherwise: continuous batching's throughput against it
                ratio = [b["tokens/s"] / m["tokens/s"] for m, b in zip(measured, ref)]
                row["continuous / it"] = statistics.median(ratio)
                row["95% CI"]["continuous / it"] = bench.median_interval(ratio)
            rows.append(row)
    return rows + [engine_step(base, args, device, dtype)]


def engine_step(base, args, device, dtype):
    """The row of the engine's decode step (one token for each of --serve_max_batch rows, over a cache of a Table-4
    prompt) against the ceiling of the same rows' matrix products, and against that ceiling plus the least that
    attention must do (read every cached key and value once), all measured in the same rounds."""
    a, rows, length = base.args, args.serve_max_batch, args.prompt_len
    cache = generate.KVCache(a.n_layers, rows, length + 1, a.n_kv_heads, a.head_dim, device,
                             generate.cache_dtype(base), pad_len=torch.zeros(rows, dtype=torch.long, device=device))
    tokens = torch.zeros(rows, dtype=torch.long, device=device)

    def step():
        with torch.inference_mode():
            bench.sync(device)
            start = time.perf_counter()
            generate.decode_step(base, tokens, length, cache)
            bench.sync(device)
        return None, time.perf_counter() - start

    jobs = {"step": step, "ceiling": lambda: (None, bench.ceiling_pass(base, device, rows)),
            "cache": lambda: (None, cache_pass(cache, rows, length + 1, a.n_heads, device))}
    bench.warm_up(jobs)
    results = bench.interleaved(jobs, max(args.runs, 10))
    ratio = [c[1] / s[1] for s, c in zip(results["step"], results["ceiling"])]
    with_cache = [(c[1] + r[1]) / s[1] for s, c, r in zip(results["step"], results["ceiling"], results["cache"])]
    median = lambda name: statistics.median(x[1] for x in results[name])
    return {"section": "serve", "method": "engine decode step", "key": None, "rows": rows,
            "dtype": str(dtype).removeprefix("torch."), "steps/s": 1 / median("step"),
            "ceiling steps/s": 1 / median("ceiling"), "cache reads ms": 1000 * median("cache"),
            "/ ceiling": statistics.median(ratio), "/ ceiling with the cache reads": statistics.median(with_cache),
            "95% CI": {"/ ceiling": bench.median_interval(ratio),
                       "/ ceiling with the cache reads": bench.median_interval(with_cache)}}


def cache_pass(cache, rows, length, n_heads, device):
    """Seconds of attention's two products, bare, for one query per row over `length` cached positions in every
    layer (q K^T, then those scores times V): the least any attention does, reading each key and value once."""
    k0 = cache.k[0]
    q = torch.randn(rows, k0.shape[1], n_heads // k0.shape[1], k0.shape[3], device=device, dtype=k0.dtype)
    with torch.inference_mode():
        bench.sync(device)
        start = time.perf_counter()
        for k, v in zip(cache.k, cache.v):
            (q @ k[:rows, :, :length].transpose(-1, -2)) @ v[:rows, :, :length]
        bench.sync(device)
    return time.perf_counter() - start
