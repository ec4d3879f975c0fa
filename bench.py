"""
Generation speed and memory: the paper's Table 4, multi-tenant serving, and generate.py against HF Transformers.

    python bench.py                                    # SmolLM2-135M on the CPU, 2 threads, 5 runs (--dtype auto)
    python bench.py --sections table4 --runs 9 --json  # one JSON object: every row, its tokens and timings
    python bench.py --model path/to/llama-2-7b --device cuda   # the paper's setting: bf16, 100 runs

The setting is the paper's Sec. 4.5: a prompt of 274 tokens, 32 new tokens, beam 1 and 3. EOS is switched off,
so that every method always makes exactly that many tokens. Sections (--sections):

table4       The base model, PARA (r = 12), (IA)^3, and unmerged LoRA, AdaLoRA and Houlsby adapters (LoRA's rank and
             the Houlsby bottleneck matching PARA's parameter count), one prompt. The adapters get random weights (a fresh adapter is the base model itself, and
             a zero LoRA B or a vector of ones could be skipped by a clever kernel); --init leaves them at
             their initialisation, where every method must generate the base model's tokens.
multitenant  One batch of --batch different prompts of --prompt_len tokens each (windows of one text, so no
             row is padded), greedy. Each method serves it with a single adapter for every row, and with a
             bank of --batch adapters, row i using adapter i: PARA gathers each row's vector generator once,
             in the prefill; (IA)^3 gathers each row's vectors, LoRA and AdaLoRA each row's A and B, and the
             Houlsby adapter each row's bottleneck, at every step.
hf           generate.py against HF Transformers' generate on the same weights (greedy and beam 3), the base
             model, with the best any decoder could do here: our prefill, then every step at the ceiling.
compile      Greedy decode steps/s of one prompt, eager and compiled (--compile: torch.compile of the decode step
             over a static KV cache, CUDA graphs on CUDA), each as a fraction of the ceiling measured in the same
             rounds; the compile time and the number of new tokens after which compiling pays off.
train        Our train step (forward, backward, AdamW on 16 examples of --task) against HF Transformers + PEFT's
             on the same weights: LoRA and (IA)^3, and PARA's own.
ceiling      A bare loop over the matrix-vector products of one decode step (all linear layers and the LM
             head, nothing else): the decode steps/s no decoder of these weights can beat on this machine.

--model random:7b (13b, 70b, tiny) builds a model of that shape with random weights on the device: Table 4's speed
and memory reproduce on any GPU without Meta's files (the tokens mean nothing; hf and train need real files).

Speed. tokens/s is the new tokens (of every row in a batch) over the whole generate call, prefill included, as
in the paper; "decode tok/s" leaves out the prefill and the choice of the first token. Each figure is the
median over --runs runs, after one untimed run of each row. The runs of all rows of a section alternate, one
of each per round and the order rotated each round, so that a machine that slows down or speeds up (other
jobs, heat) hits every row alike; a ratio ("/ base") is the median over the rounds of the ratio of the two
rows' speeds in the same round. On CUDA the clock is read after a synchronize. On a shared machine those
same-round ratios still scatter by a few percent, so each claim also gets a distribution-free 95% confidence
interval of its median, and holds only when the whole interval meets the target ("undecided" otherwise).

Memory (peak MiB), the same quantity on both devices: the bytes of the weights the row uses (base model and
its adapter, counted from the tensors) plus the largest amount of tensor memory held during the generate call
above what was held before it. CUDA reads that from torch.cuda.max_memory_allocated (reset before the call);
the CPU has no such counter, so a separate, untimed call runs under torch.profiler(profile_memory=True) and the
peak is the running sum of its allocation and free events. Allocator caching, Python objects and the
interpreter are not counted on either device.
"""
import argparse
import contextlib
import copy
import itertools
import json
import math
import operator
import os
import platform
import statistics
import sys
import time
import zlib

os.environ.setdefault("GOMP_SPINCOUNT", "1000000")  # before torch loads: serve.py's setting, for its servers here

import torch  # noqa: E402
import torch.nn.functional as F

import adapters
import baselines
import bench_serve
import generate
from errors import UserError
from loaders import DTYPES, autocast_for, default_model_path, load, model_class, native_bf16, pick_device, resolve_dtype
from model import ModelArgs

# a fixed English text to cut the prompts from (any text does; this one keeps the model writing, not stopping)
TEXT = (
    "The history of the bicycle is a story of small improvements that added up. The first machines, built in the "
    "early nineteenth century, had no pedals at all: riders sat on a wooden frame between two wheels and pushed "
    "themselves along with their feet. Pedals attached directly to the front wheel came decades later, and because "
    "one turn of the pedals meant one turn of the wheel, makers enlarged the front wheel to go faster. The result "
    "was the high wheeler, a tall and dangerous machine from which riders often fell head first. The safety bicycle "
    "solved this with a chain that drove the rear wheel through gears, so that both wheels could be the same modest "
    "size. Air-filled tyres followed soon after and made the ride far more comfortable on rough roads. Within a few "
    "years, cycling clubs appeared in many cities, and the bicycle changed how ordinary people travelled to work, "
    "met friends and spent their weekends. Women in particular gained a new freedom of movement, and the fashion of "
    "the time changed to allow it. Engineers who learned their trade building bicycles later went on to build "
    "motorcycles, cars and even the first aeroplanes, carrying with them ideas about light frames, ball bearings "
    "and chains. Today the bicycle remains one of the most efficient machines ever made for turning human effort "
    "into motion, and cities around the world are building lanes and parking for it again. Write a short essay on "
    "what the next improvement to the bicycle might be, and explain why it would matter to people who ride every day."
)
STRIDE = 17  # tokens between the starts of two prompts of a multi-tenant batch


def prompts_from_text(tokenizer, n, length):
    """n different prompts of exactly `length` tokens: windows of TEXT (repeated), STRIDE tokens apart."""
    head = [tokenizer.bos_id] if tokenizer.add_bos else []
    body = tokenizer.encode(TEXT, bos=False)
    need = (n - 1) * STRIDE + length
    body = body * (need // len(body) + 1)
    return [head + body[i * STRIDE : i * STRIDE + length - len(head)] for i in range(n)]


# -----------------------------------------------------------------------------
# The models: one set of base weights, shared by every row


def with_adapter(base, method, settings, n_adapters, randomise, seed):
    """A copy of `base` that shares its weights (not copied: no memory) and carries a fresh adapter (or bank)."""
    shared = {id(t): t for t in itertools.chain(base.parameters(), base.buffers())}
    model = copy.deepcopy(base, memo=shared)  # new modules around the same tensors; add_adapter then replaces some
    if method is None:
        return model
    torch.manual_seed(seed)  # the adapter's random init (PARA's W_down, LoRA's A): the same in every run
    adapters.add_adapter(model, method, n_adapters=n_adapters, **settings)
    if randomise:
        randomise_adapter(model, seed)
    return model


@torch.no_grad()
def randomise_adapter(model, seed):
    """Non-trivial adapter weights, every adapter of a bank different, that keep the text sane: the PARA and
    (IA)^3 vectors move by some ±5% around 1 (on SmolLM2), LoRA's and AdaLoRA's update is 10% of W (Frobenius
    norm), and the Houlsby bottleneck adds about 10% to its sublayer's output."""
    g = torch.Generator().manual_seed(seed)
    noise = lambda t: torch.randn(t.shape, generator=g).to(t.device, t.dtype)
    for name, p in model.named_parameters():
        if name.endswith("vector_generator.up"):  # l = gelu(h W_down) W_up + b: now prompt-dependent
            p.copy_(0.3 * noise(p))
        elif name.endswith("vector_generator.bias") or name.endswith("ia3_vector"):
            p.copy_(1 + 0.05 * noise(p))
        elif name.endswith("lora_E"):  # AdaLoRA's singular values: every triplet kept
            p.fill_(1.0)
        elif name.endswith("houlsby_up"):
            p.copy_(0.1 * noise(p) / p.shape[-1] ** 0.5)
    for m in model.modules():
        if isinstance(m, baselines.LoRALinear):  # and AdaLoRA; A keeps its random init
            B = m.lora_B if m.lora_B.ndim == 3 else m.lora_B[None]  # (n, out, r): a bank's n adapters, or one
            B.copy_(noise(B))
            A = (m.lora_E * m.lora_A) if hasattr(m, "lora_E") else m.lora_A
            A = A if A.ndim == 3 else A[None]
            size = (m.scaling * B.float() @ A.float()).flatten(1).norm(dim=1)  # (n,) the norm of each update
            B.mul_((0.1 * m.weight.float().norm() / size)[:, None, None])


def tensor_bytes(tensors):
    """Bytes of distinct tensors (a tied embedding and LM head count once)."""
    return sum({t.data_ptr(): t.numel() * t.element_size() for t in tensors}.values())


# -----------------------------------------------------------------------------
# Measuring


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_generate(model, tokenizer, prompts, num_beams, new_tokens, adapter_ids=None, compile=False):
    """One generate call, EOS off: (tokens of each prompt, seconds of the call, seconds of its decode steps)."""
    device = model.tok_embeddings.weight.device
    sync(device)
    start = time.perf_counter()
    out = generate.generate(model, tokenizer, prompts, max_new_tokens=new_tokens, num_beams=num_beams,
                            adapter_ids=adapter_ids, eos_id=-1, compile=compile)
    sync(device)
    seconds = time.perf_counter() - start
    return [g.tokens for g in out], seconds, out[0].seconds - out[0].prefill_seconds


def say(text):
    """Progress on stderr, on one line that each call overwrites (stdout keeps the report alone)."""
    print(f"\r\033[K{text}", end="", file=sys.stderr, flush=True)


def warm_up(jobs):
    """One untimed call of each job: first calls pay for allocations and kernel choices (cuBLAS's workspace,
    oneDNN's primitives), which must count as no row's time or memory."""
    for i, job in enumerate(jobs.values()):
        say(f"warming up: {i + 1}/{len(jobs)}")
        job()


def interleaved(jobs, runs):
    """Call each job once per round for `runs` rounds, rotating the order every round; {name: [results]}."""
    names, results = list(jobs), {name: [] for name in jobs}
    for i in range(runs):
        say(f"round {i + 1}/{runs} of {len(names)} rows")
        k = i % len(names)
        for name in names[k:] + names[:k]:
            results[name].append(jobs[name]())
    return results


@contextlib.contextmanager
def quiet_stderr():
    """Silence what C++ libraries print on the process's stderr (the CPU profiler's "USDT: profiler_start")."""
    sys.stderr.flush()
    saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved), os.close(null)


def peak_mib(model, call, device):
    """Peak MiB of one call: the weights the model uses, plus the most tensor memory held above what was held
    before the call (see the module docstring)."""
    weights = tensor_bytes(itertools.chain(model.parameters(), model.buffers()))
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        call()
        sync(device)
        held = torch.cuda.max_memory_allocated(device) - before
    else:
        with quiet_stderr(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                                    profile_memory=True) as prof:
            call()
        # every allocation (+bytes) and free (-bytes) of the call, in time order; kineto_results holds them
        # all, where prof.events() folds the allocations into the operators that made them
        events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                        if e.name() == "[memory]")
        held = max(itertools.accumulate(n for _, n in events), default=0)
    return (weights + held) / 2**20


def rate(results, n_tokens, index):
    """Median tokens/s over the runs, from the seconds at results[i][index]."""
    return statistics.median(n_tokens / r[index] for r in results)


def speedup(results, reference, index=1):
    """Median over the rounds of reference's seconds / results' seconds in the same round: a ratio of speeds
    (both make the same tokens) from which a change of the machine's speed between rounds cancels."""
    return statistics.median(ratios(results, reference, index))


def ratios(results, reference, index=1):
    return [ref[index] / r[index] for r, ref in zip(results, reference)]


def median_interval(values, confidence=0.95):
    """A distribution-free confidence interval for the median: [x_(j), x_(n+1-j)] of the sorted values covers it
    with probability 1 - 2 P(X < j), X ~ Binomial(n, 1/2); j is the largest rank that keeps this >= confidence
    (15 runs: the 4th smallest to the 4th largest). Below 6 runs no rank does, and it is the whole range."""
    x, n = sorted(values), len(values)
    j = 1
    while j < (n + 1) // 2 and 1 - 2 * sum(math.comb(n, i) for i in range(j + 1)) / 2**n >= confidence:
        j += 1
    return [x[j - 1], x[n - j]]


# -----------------------------------------------------------------------------
# Sections: each returns rows, one dict per row


def methods(args):
    """name -> (method, settings) of each row: the base model, then every method of the registry at the size it is
    compared at (adapters.compared_size: LoRA and the Houlsby adapter count-matched to PARA, AdaLoRA at PEFT's
    initial rank, unmerged like LoRA)."""
    return {"base": (None, {})} | {adapters.label(m, s): (m, s) for m, s in args.sizes.items()}


def para_row(args):
    """The name of PARA's row."""
    return adapters.label(adapters.PARA, args.sizes[adapters.PARA])


def table4(base, tokenizer, args, device):
    """The paper's Table 4: one prompt, beam 1 and 3, every method, tokens/s and peak memory."""
    prompt = prompts_from_text(tokenizer, 1, args.prompt_len)
    models = {name: with_adapter(base, m, kw, 1, not args.init, seed=1) for name, (m, kw) in methods(args).items()}
    jobs = {(name, beams): (lambda name=name, beams=beams: run_generate(models[name], tokenizer, prompt, beams,
                                                                        args.new_tokens, compile=args.compile))
            for beams in (1, 3) for name in models}
    warm_up(jobs)
    memory = {key: peak_mib(models[key[0]], job, device) for key, job in jobs.items()}
    results = interleaved(jobs, args.runs)
    para = para_row(args)
    rows = []
    for name, beams in jobs:
        runs, ref, ours = results[name, beams], results["base", beams], results[para, beams]
        tensors = adapters.adapter_state_dict(models[name]).values()
        rows.append({
            "section": "table4", "method": name, "key": methods(args)[name][0], "adapter params": sum(t.numel() for t in tensors), "beams": beams,
            "tokens/s": rate(runs, args.new_tokens, 1), "/ base": speedup(runs, ref), "PARA / it": speedup(ours, runs),
            "95% CI": {"/ base": median_interval(ratios(runs, ref)), "PARA / it": median_interval(ratios(ours, runs))},
            "decode tok/s": rate(runs, args.new_tokens - 1, 2), "decode / base": speedup(runs, ref, 2),
            "peak MiB": memory[name, beams], "adapter MiB": tensor_bytes(tensors) / 2**20,
            "peak - base - adapter MiB": memory[name, beams] - memory["base", beams] - tensor_bytes(tensors) / 2**20,
            "= base tokens": runs[-1][0] == ref[-1][0], "tokens": runs[-1][0], "seconds": [r[1] for r in runs]})
    return rows


def multi_tenant(base, tokenizer, args, device):
    """One batch of different prompts, greedy: each method with one adapter for all rows, and with one per row."""
    prompts = prompts_from_text(tokenizer, args.batch, args.prompt_len)
    models, ids = {}, {}
    for name, (m, settings) in methods(args).items():
        for n in ((1,) if m is None else (1, args.batch)):
            models[name, n] = with_adapter(base, m, settings, n, not args.init, seed=2)
            ids[name, n] = list(range(args.batch)) if n > 1 else None  # row i uses adapter i
    jobs = {key: (lambda key=key: run_generate(models[key], tokenizer, prompts, 1, args.new_tokens, ids[key], args.compile))
            for key in models}
    warm_up(jobs)
    results = interleaved(jobs, args.runs)
    n_tokens, para = args.batch * args.new_tokens, para_row(args)
    rows = []
    for (name, n), runs in results.items():
        one, ours = results[name, 1], results[para, n if name != "base" else 1]
        rows.append({
            "section": "multitenant", "method": name, "key": methods(args)[name][0], "adapters": n if name != "base" else 0, "batch": args.batch,
            "tokens/s": rate(runs, n_tokens, 1), "/ base": speedup(runs, results["base", 1]),
            "/ one adapter": speedup(runs, one), "PARA / it": speedup(ours, runs),
            "decode tok/s": rate(runs, args.batch * (args.new_tokens - 1), 2), "decode / one adapter": speedup(runs, one, 2),
            "95% CI": {"/ one adapter": median_interval(ratios(runs, one)), "PARA / it": median_interval(ratios(ours, runs))},
            "= base tokens": runs[-1][0] == results["base", 1][-1][0], "tokens": runs[-1][0],
            "seconds": [r[1] for r in runs]})
    return rows


def load_hf(path, device, dtype):
    from transformers import AutoModelForCausalLM

    if path.endswith(".gguf"):
        hf = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path), dtype=dtype)
    else:
        hf = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    return hf.to(device).eval()


def versus_hf(base, tokenizer, args, device, hf):
    """Ours against HF's generate on the same weights, base model, greedy and beam 3."""
    hf.generation_config.eos_token_id = None  # no EOS: exactly new_tokens tokens, as ours with eos_id=-1
    prompt = prompts_from_text(tokenizer, 1, args.prompt_len)

    def run_hf(beams):
        tokens = torch.tensor(prompt, device=device)
        sync(device)
        start = time.perf_counter()
        with torch.inference_mode():
            out = hf.generate(tokens, attention_mask=torch.ones_like(tokens), do_sample=False, num_beams=beams,
                              max_new_tokens=args.new_tokens, pad_token_id=tokenizer.pad_id)
        sync(device)
        return [out[0, len(prompt[0]):].tolist()], time.perf_counter() - start

    jobs = {}
    for beams in (1, 3):
        jobs["ours", beams] = lambda beams=beams: run_generate(base, tokenizer, prompt, beams, args.new_tokens,
                                                               compile=args.compile)
        jobs["HF", beams] = lambda beams=beams: run_hf(beams)
    warm_up(jobs)
    results = interleaved(jobs, args.runs)
    rows = []
    for beams in (1, 3):
        ours, theirs = results["ours", beams], results["HF", beams]
        rows.append({
            "section": "hf", "measurement": "greedy" if beams == 1 else f"beam {beams}",
            "ours tokens/s": rate(ours, args.new_tokens, 1), "HF tokens/s": rate(theirs, args.new_tokens, 1),
            "ours / HF": speedup(ours, theirs), "95% CI": {"ours / HF": median_interval(ratios(ours, theirs))},
            "same tokens": ours[-1][0] == theirs[-1][0],
            "ours decode steps/s": rate(ours, args.new_tokens - 1, 2),
            "ours prefill s": statistics.median(r[1] - r[2] for r in ours),
            "seconds": {"ours": [r[1] for r in ours], "HF": [r[1] for r in theirs]}})
    return rows


def ceiling_pass(base, device, rows=1):
    """Seconds of one bare pass over the matrix products of a decode step of `rows` rows (all linears and the LM
    head): what no decoder of these weights can beat on this machine."""
    weights = [m.weight for m in base.modules() if isinstance(m, torch.nn.Linear)]
    inputs = {w.shape[1]: torch.randn(rows, w.shape[1], device=device, dtype=w.dtype) for w in weights}
    with torch.inference_mode():
        sync(device)
        start = time.perf_counter()
        for w in weights:
            F.linear(inputs[w.shape[1]], w)
        sync(device)
    return time.perf_counter() - start


def ceiling(base, device, steps=10):
    """Decode steps/s at the ceiling: the median of `steps` passes, after one that warms up."""
    times = [ceiling_pass(base, device) for _ in range(steps + 1)][1:]
    return {"section": "ceiling", "measurement": "ceiling: matrix-vector products only",
            "ours decode steps/s": 1 / statistics.median(times)}


def compiled_decode(base, tokenizer, args, device):
    """Greedy decode steps/s of one prompt, eager and compiled (generate.py --compile), each against the ceiling
    measured in the same rounds; the compile time, and the new tokens after which compiling has paid for itself."""
    prompt = prompts_from_text(tokenizer, 1, args.prompt_len)
    steps = args.new_tokens - 1
    start = time.perf_counter()
    run_generate(base, tokenizer, prompt, 1, args.new_tokens, compile=True)  # compiles
    first_call = time.perf_counter() - start
    jobs = {"eager": lambda: run_generate(base, tokenizer, prompt, 1, args.new_tokens),
            "compiled": lambda: run_generate(base, tokenizer, prompt, 1, args.new_tokens, compile=True),
            "ceiling": lambda: (None, None, steps * ceiling_pass(base, device))}  # the same steps at the ceiling
    warm_up(jobs)
    results = interleaved(jobs, args.runs)
    rows = []
    for name in ("eager", "compiled"):
        runs = results[name]
        rows.append({"section": "compile", "measurement": f"{name} decode", "decode steps/s": rate(runs, steps, 2),
                     "/ ceiling": speedup(runs, results["ceiling"], 2),
                     "95% CI": {"/ ceiling": median_interval(ratios(runs, results["ceiling"], 2))},
                     "same tokens": runs[-1][0] == results["eager"][-1][0]})
    compiled_call = statistics.median(r[1] for r in results["compiled"])
    saved_per_step = 1 / rows[0]["decode steps/s"] - 1 / rows[1]["decode steps/s"]
    rows[1]["compile s"] = first_call - compiled_call
    rows[1]["pays off after tokens"] = (round(rows[1]["compile s"] / saved_per_step) if saved_per_step > 0
                                        else "never")
    return rows


def training(base, tokenizer, args, device, dtype, path):
    """Our train step (forward, backward, AdamW) against HF Transformers + PEFT's, on the same 16 training examples
    of --task and the same weights, interleaved: LoRA count-matched on q and v, (IA)^3, and PARA's own. Ours
    computes logits at the answer's positions only (train.answer_loss), HF's at every position, as its Trainer does."""
    import train
    from peft import IA3Config, LoraConfig, get_peft_model

    from data import TASKS, load_split, prepare_task, resolve_task

    folder = prepare_task(args.task, src=args.src) if args.task in TASKS else resolve_task(args.task)
    examples, _, _ = train.tokenize(load_split(folder, "train")[:16], tokenizer, 2048)
    tokens, targets, prompt_len = train.collate(examples, tokenizer.pad_id, device)  # one batch, right-padded
    n_targets, n_tokens = (targets != -100).sum(), sum(len(p) + len(t) - 1 for p, t in examples)
    autocast = autocast_for(device, dtype)

    def step_of(model, loss_of):
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

        def step():
            sync(device)
            start = time.perf_counter()
            with autocast:
                loss = loss_of(model)
            (loss / n_targets).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            sync(device)
            return None, time.perf_counter() - start
        return step

    # PEFT's own implementation of a method, where PEFT has one (its defaults: LoRA on q, v; (IA)^3 on k, v, down)
    peft = {baselines.add_lora: lambda s: LoraConfig(r=s["r"], lora_alpha=8, target_modules=["q_proj", "v_proj"]),
            baselines.add_ia3: lambda s: IA3Config(target_modules=["k_proj", "v_proj", "down_proj"],
                                                   feedforward_modules=["down_proj"])}
    ours, theirs = {}, {}
    for name, (method, settings) in methods(args).items():
        config = method and peft.get(adapters.METHODS[method].add)
        if config or method == adapters.PARA:
            model = with_adapter(base, method, settings, 1, False, seed=3).train()
            adapters.mark_only_adapter_as_trainable(model)
            ours[name] = step_of(model, lambda model: train.answer_loss(model, tokens, targets, prompt_len))
        if config:
            model = get_peft_model(load_hf(path, device, dtype), config(settings)).train()
            theirs[name] = step_of(model, lambda model: train.loss_sum(model(input_ids=tokens).logits.float(), targets))
    jobs = {("ours", n): job for n, job in ours.items()} | {("HF+PEFT", n): job for n, job in theirs.items()}
    warm_up(jobs)
    results = interleaved(jobs, args.runs)
    rows = []
    for name in ours:
        mine, peft_runs = results["ours", name], results.get(("HF+PEFT", name))
        rows.append({"section": "train", "method": name, "ours tokens/s": rate(mine, n_tokens, 1),
                     "HF+PEFT tokens/s": rate(peft_runs, n_tokens, 1) if peft_runs else None,
                     "ours / HF+PEFT": speedup(mine, peft_runs) if peft_runs else None,
                     "95% CI": {"ours / HF+PEFT": median_interval(ratios(mine, peft_runs))} if peft_runs else {}})
    return rows


def bound(greedy, ceiling_row, new_tokens):
    """The best greedy tokens/s any decoder could reach here: our prefill, then every step at the ceiling."""
    seconds = greedy["ours prefill s"] + (new_tokens - 1) / ceiling_row["ours decode steps/s"]
    return {"section": "ceiling", "measurement": "bound: our prefill + steps at the ceiling",
            "ours tokens/s": new_tokens / seconds, "HF tokens/s": greedy["HF tokens/s"],
            "ours / HF": new_tokens / seconds / greedy["HF tokens/s"]}


# -----------------------------------------------------------------------------
# The paper's claims, checked on the rows of this run


def claims(rows):
    """The paper's claims as ratios of this run's rows, one dict each: the median, its 95% confidence interval
    (from the spread of the same-round ratios), the target, and whether it holds: "yes" when the whole interval
    meets the target, "no" when none of it does, "undecided" when the interval straddles it (more runs decide)."""
    def find(section, **where):
        return next(r for r in rows if r["section"] == section and all(r.get(k) == v for k, v in where.items()))

    out = []  # (claim, row, key of the ratio, comparison, target)
    # PARA costs one elementwise multiply per scaled projection: as little as (IA)^3 (within 2%), less than an
    # unmerged low-rank product (LoRA, AdaLoRA) or a bottleneck (Houlsby)
    target = lambda r: (">=", 0.97) if r["key"] is None else (">=", 0.98) if r["key"] == adapters.IA3 else (">", 1.0)
    para = adapters.PARA
    if any(r["section"] == "table4" for r in rows):
        for beams in (1, 3):
            for r in [r for r in rows if r["section"] == "table4" and r["beams"] == beams and r["key"] != para]:
                if r["key"] is None:
                    out.append((f"PARA / base tokens/s, beam {beams}", find("table4", key=para, beams=beams),
                                "/ base", *target(r)))
                else:
                    out.append((f"PARA / {r['method']} tokens/s, beam {beams}", r, "PARA / it", *target(r)))
            # what PARA holds beyond its adapter: B x (d_q + d_kv + d_ffn) vectors per layer, a fraction of a MiB
            p, base_peak = find("table4", key=para, beams=beams), find("table4", key=None, beams=beams)["peak MiB"]
            memory = {"above base": p["peak - base - adapter MiB"] / base_peak}
            out.append((f"PARA peak memory - base - adapter, / base, beam {beams}", memory, "above base", "<", 0.01))
    if any(r["section"] == "multitenant" for r in rows):
        n = max(r["adapters"] for r in rows if r["section"] == "multitenant")
        for r in [r for r in rows if r["section"] == "multitenant" and r["adapters"] == n and r["key"] != para]:
            out.append((f"PARA / {r['method']} tokens/s, {n} adapters in one batch", r, "PARA / it", *target(r)))
        out.append((f"PARA {n} adapters / one adapter tokens/s, same batch", find("multitenant", key=para, adapters=n),
                    "/ one adapter", ">=", 0.95))
    for name in ("greedy", "beam 3"):  # ours stays ahead of HF; how close it gets to the machine: the ceiling
        if any(r.get("measurement") == name for r in rows):
            out.append((f"ours / HF tokens/s, {name}", find("hf", measurement=name), "ours / HF", ">", 1.0))
    for r in (r for r in rows if r["section"] == "compile"):
        out.append((f"{r['measurement']} steps/s / ceiling", r, "/ ceiling", ">=", 0.9))
    for r in (r for r in rows if r["section"] == "serve"):  # serving many tenants costs PARA nothing
        if r["key"] == para and "clients" in r["load"]:
            out.append((f"PARA / base tokens/s, {r['tenants']} tenants, {r['mix']} prompts, {r['load']}", r,
                        "/ base tokens/s", ">=", 0.97))
        if r["key"] == para and "req/s" in r["load"]:
            out.append((f"PARA / base p99 inter-token latency, {r['tenants']} tenants, {r['mix']} prompts, "
                        f"{r['load']}", r, "/ base ITL p99", "<=", 1.05))
        if r["method"] == "base, one at a time" and r["mix"] == "short":
            out.append((f"continuous batching / one at a time tokens/s, {r['load']}", r, "continuous / it", ">=", 2.0))
        if r["method"] == "engine decode step":
            out.append((f"engine decode steps/s / ceiling, {r['rows']} rows, {r['dtype']}", r, "/ ceiling", ">=", 0.9))
            # the ceiling reads the weights only; a step of many rows must also read their cached keys and values
            out.append((f"engine decode steps/s / (ceiling + one read of the KV cache), {r['rows']} rows, {r['dtype']}",
                        r, "/ ceiling with the cache reads", ">=", 0.9))
    for r in (r for r in rows if r["section"] == "train" and r.get("ours / HF+PEFT")):
        out.append((f"train step tokens/s, ours / HF+PEFT, {r['method']}", r, "ours / HF+PEFT", ">=", 1.0))
    compare = {">=": operator.ge, ">": operator.gt, "<": operator.lt, "<=": operator.le}
    checks = []
    for claim, row, key, op, target in out:
        low, high = row.get("95% CI", {}).get(key) or [row[key]] * 2  # memory is measured exactly: no interval
        meets = [compare[op](low, target), compare[op](high, target)]
        holds = "yes" if all(meets) else "no" if not any(meets) else "undecided"
        checks.append({"claim": claim, "measured": row[key], "95% CI": [low, high] if low != high else None,
                       "target": f"{op} {target}", "holds": holds})
    return checks


# -----------------------------------------------------------------------------
# Output


def cpu_name():
    try:  # Linux
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def markdown(rows, hide=("section", "key", "tokens", "seconds", "95% CI")):
    columns = [c for c in dict.fromkeys(k for row in rows for k in row) if c not in hide]
    fmt = lambda v: (f"{v:.3f}" if isinstance(v, float) else "" if v is None else
                     " - ".join(map(fmt, v)) if isinstance(v, list) else str(v))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


TITLES = {"table4": "Table 4: one prompt, tokens/s and peak memory",
          "multitenant": "Multi-tenant serving: one batch, greedy",
          "hf": "generate.py against HF Transformers (base model)",
          "compile": "Decode steps/s, eager and compiled, against the ceiling (greedy, one prompt)",
          "train": "Training step against HF Transformers + PEFT (16 examples, forward, backward, AdamW)",
          "serve": "serve.py under load, over HTTP (bench_serve.py)",
          "ceiling": "Ceiling"}
NOTES = {"table4": "tokens/s: new tokens over the whole call; decode: without the prefill. peak MiB: weights + "
                   "adapter + the peak tensor memory held during the call above what was held before it ({memory}). "
                   "= base tokens: whether the row generated the base model's tokens: adapters at random weights "
                   "(the default) change them, as they should; with --init every row must.",
         "multitenant": "{batch} different prompts of {prompt_len} tokens each (no padding); tokens/s: all rows' new "
                        "tokens over the call. Adapters 1: one adapter serves every row; {batch}: row i uses "
                        "adapter i of a bank.",
         "hf": "tokens/s: new tokens over the whole call, both timed alike; same tokens: of the last run.",
         "serve": "tokens/s: every request's new tokens over the load's wall time; TTFT: time to the first token; "
                  "ITL: the gaps between a stream's tokens. Closed loop: {serve_clients} clients, each sending its "
                  "next request when its last is answered; open loop: Poisson arrivals. {serve_requests} requests "
                  "per load, to K tenants in turn (K: {serve_tenants}), greedy."}


RANDOM = {"7b": dict(dim=4096, n_layers=32, n_heads=32), "13b": dict(dim=5120, n_layers=40, n_heads=40),
          "70b": dict(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, ffn_dim_multiplier=1.3, multiple_of=4096),
          "tiny": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=32),
          # Gemma (gemma.py): the paper's 2B, and Gemma 3 270M's shape
          "gemma-2b": dict(gemma=1, dim=2048, n_layers=18, n_heads=8, n_kv_heads=1, head_dim=256, hidden_dim=16384),
          "gemma3-270m": dict(gemma=3, dim=640, n_layers=18, n_heads=4, n_kv_heads=1, head_dim=256, hidden_dim=2048)}


class NumberTokenizer:
    """A stand-in for a random model's tokenizer: each word of a text becomes an id (the tokens mean nothing, the
    cost of generating them is real)."""
    bos_id, eos_id, pad_id, add_bos = 1, 2, 0, True

    def __init__(self, vocab_size):
        self.vocab_size = vocab_size

    def encode(self, text, bos=None):
        return [self.bos_id] * (self.add_bos if bos is None else bos) + [
            3 + zlib.crc32(word.encode()) % (self.vocab_size - 3) for word in text.split()]

    def decode(self, ids):
        return " ".join(map(str, ids))


def load_model(spec, device, dtype):
    """(model, tokenizer) of a checkpoint, or of "random:7b" (13b, 70b, tiny): Llama-2's shape with random weights,
    built on the device, so that Table 4 reproduces on any GPU without Meta's files."""
    if not spec.startswith("random:"):
        return load(spec, device=device, dtype=dtype)
    if spec[7:] not in RANDOM:
        raise UserError(f"unknown random model {spec!r}: choose from " + ", ".join(f"random:{k}" for k in RANDOM))
    shape = dict(RANDOM[spec[7:]])
    version = shape.pop("gemma", None)
    vocab = 256 if spec == "random:tiny" else 32000 if version is None else 256000 if version == 1 else 262144
    if version is None:
        args = ModelArgs(**shape, vocab_size=vocab, max_seq_len=4096)
    else:
        from gemma import GemmaArgs

        args = GemmaArgs(**shape, version=version, vocab_size=vocab, max_seq_len=4096)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # allocated and initialised in the final dtype: a 70B never exists in fp32
    try:
        with torch.device(device):
            torch.manual_seed(0)
            model = model_class(args)(args)
    finally:
        torch.set_default_dtype(default)
    model.freqs_cis = model.freqs_cis.to(device)
    return model.eval(), NumberTokenizer(args.vocab_size)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--model", "--ckpt_dir", dest="model", help="Meta folder, HF folder, .gguf file, or random:7b "
                   "(13b, 70b, tiny, gemma-2b, gemma3-270m): random weights of that shape (default: the small "
                   "SmolLM2-135M GGUF)")
    p.add_argument("--device", default="auto", help="cuda or cpu (auto: cuda when available)")
    p.add_argument("--dtype", default="auto", choices=DTYPES, help="auto: bf16 on cuda and on CPUs with native bf16 "
                   "(AVX512-BF16 or AMX), fp32 elsewhere")
    p.add_argument("--threads", type=int, default=2, help="CPU threads")
    p.add_argument("--runs", "--repeats", dest="runs", type=int, help="timed runs per row (default: 100 on cuda, "
                   "5 on the cpu)")
    p.add_argument("--prompt_len", "--prompt_tokens", dest="prompt_len", type=int, default=274,
                   help="tokens in each prompt (the paper's Table 4: 274)")
    p.add_argument("--new_tokens", type=int, default=32, help="new tokens per prompt, always that many: EOS is off "
                   "(the paper's Table 4: 32)")
    p.add_argument("--batch", type=int, default=8, help="prompts (and adapters) of the multi-tenant batch")
    p.add_argument("--sections", default="table4,multitenant,hf,ceiling", help="comma-separated, from " +
                   ", ".join(TITLES))
    p.add_argument("--compile", action="store_true", help="decode with the compiled step in every section")
    p.add_argument("--task", default="copa", help="the train section's examples (the first 16 of its train split)")
    p.add_argument("--src", help="where the train section's task is prepared from, offline (see train.py --src)")
    p.add_argument("--init", action="store_true", help="leave the adapters at their initialisation: every "
                   "method then generates the base model's tokens (a check of the harness)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of Markdown tables")
    p.add_argument("--serve_tenants", default="1,8,32", help="serve: comma-separated tenant counts K; each method's "
                   "requests go to K of its adapters in turn")
    p.add_argument("--serve_clients", type=int, default=8, help="serve: concurrent clients of the closed-loop load")
    p.add_argument("--serve_rate", default="1,2,4", help="serve: comma-separated requests/s of the open-loop loads")
    p.add_argument("--serve_mixes", default="table4,short", help="serve: the length mixes, table4 and/or short")
    p.add_argument("--serve_requests", type=int, default=24, help="serve: requests in each load")
    p.add_argument("--serve_max_batch", type=int, default=16, help="serve: the server's --max_batch")
    p.add_argument("--serve_methods", default="base,para,ia3,lora,houlsby,mixed,one,static", help="serve: the rows, "
                   "comma-separated: methods (base is always measured: every ratio is against it), mixed (one server "
                   "of every method's tenants), one (one request at a time), static (static batches)")
    p.add_argument("--serve_prefill_layers", type=int, help="serve: the servers' --prefill_layers (default: all)")
    args = p.parse_args(argv)
    unknown = set(args.sections.split(",")) - set(TITLES)
    if unknown:
        p.error(f"unknown sections {sorted(unknown)}: choose from {', '.join(TITLES)}")
    try:  # comma-separated lists
        args.serve_tenants = [int(k) for k in args.serve_tenants.split(",")]
        args.serve_rate = [float(r) for r in args.serve_rate.split(",")]
    except ValueError:
        p.error(f"--serve_tenants takes whole numbers and --serve_rate numbers, comma-separated; got "
                f"{args.serve_tenants!r} and {args.serve_rate!r}")
    args.serve_mixes = args.serve_mixes.split(",")
    args.serve_methods = args.serve_methods.split(",")
    rows = {"base", "mixed", "one", "static"} | {m for m, method in adapters.METHODS.items() if not method.full}
    if not set(args.serve_methods) <= rows:
        p.error(f"--serve_methods takes {', '.join(sorted(rows))}; got {','.join(args.serve_methods)}")
    if not args.serve_mixes or not set(args.serve_mixes) <= {"table4", "short"}:
        p.error(f"--serve_mixes takes table4, short or both, got {','.join(args.serve_mixes)}")
    if not all(r > 0 and math.isfinite(r) for r in args.serve_rate):
        p.error(f"--serve_rate must be positive, finite request rates, got {args.serve_rate}")
    for flag, value in (("--threads", args.threads), ("--runs", args.runs), ("--prompt_len", args.prompt_len),
                        ("--new_tokens", args.new_tokens), ("--batch", args.batch),
                        ("--serve_tenants", min(args.serve_tenants)), ("--serve_clients", args.serve_clients),
                        ("--serve_requests", args.serve_requests), ("--serve_max_batch", args.serve_max_batch),
                        ("--serve_prefill_layers", args.serve_prefill_layers)):
        if value is not None and value < 1:
            p.error(f"{flag} must be at least 1, got {value}")
    return args


def run_sections(base, tokenizer, args, device, dtype, path):
    """Every section asked for, in order; (rows, notes, the load average after each section)."""
    sections, rows, notes = args.sections.split(","), [], []
    loads = {"start": os.getloadavg()[0]}  # this run's own threads add --threads to it
    for name, section in (("table4", table4), ("multitenant", multi_tenant), ("compile", compiled_decode),
                          ("serve", lambda *a: bench_serve.serving(*a, dtype, path))):
        if name in sections:
            say(f"{name}: ")
            rows += section(base, tokenizer, args, device)
            loads[name] = os.getloadavg()[0]
    for name, section in (("hf", lambda: versus_hf(base, tokenizer, args, device, load_hf(path, device, dtype))),
                          ("train", lambda: training(base, tokenizer, args, device, dtype, path))):
        if name in sections:
            say(f"{name}: ")
            try:
                rows += section()
                loads[name] = os.getloadavg()[0]
            except Exception as e:  # HF cannot read this model (a Meta folder, random weights), no task data
                notes.append(f"section {name} skipped: {type(e).__name__}: {str(e).splitlines()[0]}")
    if "ceiling" in sections:
        say("ceiling")
        rows.append(ceiling(base, device))
        greedy = next((r for r in rows if r.get("measurement") == "greedy"), None)
        if greedy:
            rows.append(bound(greedy, rows[-1], args.new_tokens))
    say("")
    return rows, notes, loads


def main(argv=None):
    args = parse_args(argv)
    device = pick_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    args.runs = args.runs if args.runs is not None else 100 if device.type == "cuda" else 5
    torch.set_num_threads(args.threads)
    path = args.model or default_model_path()
    base, tokenizer = load_model(path, device, dtype)
    # method -> its settings; not full fine-tuning, which has no adapter: at inference it is a base model; not SSP,
    # whose cost is that of the structure its search chooses, known only after a search (its space is 20x its budget)
    args.sizes = {m: adapters.compared_size(base.args, m) for m, method in adapters.METHODS.items()
                  if not method.full and not method.searches}
    rows, notes, loads = run_sections(base, tokenizer, args, device, dtype, path)
    setting = {"model": os.path.basename(os.path.normpath(path)), "device": str(device), "dtype": str(dtype),
               "threads": torch.get_num_threads(), "runs": args.runs, "prompt_len": args.prompt_len,
               "new_tokens": args.new_tokens, "batch": args.batch, "sizes": args.sizes,
               **{k: getattr(args, k) for k in ("serve_tenants", "serve_clients", "serve_rate", "serve_requests",
                                                "serve_mixes", "serve_methods", "serve_prefill_layers")},
               "adapters": "init" if args.init else "random",
               "compiled decode": args.compile, "torch": torch.__version__, "cpu": cpu_name(), "cores": os.cpu_count(),
               "cpu capability": torch.backends.cpu.get_cpu_capability(),
               "native bf16": native_bf16(device) if device.type in ("cpu", "cuda") else None,
               "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
               "memory": "torch.cuda.max_memory_allocated" if device.type == "cuda" else
                         "torch.profiler allocation events, CPU",
               "load average (1 min)": {k: round(v, 2) for k, v in loads.items()}}
    checks = claims(rows)
    if args.json:
        print(json.dumps({"setting": setting, "rows": rows, "claims": checks, "notes": notes}))
        return
    print(", ".join(f"{k}: {v}" for k, v in setting.items() if v is not None))
    for section in TITLES:
        part = [r for r in rows if r["section"] == section]
        if part:
            note = NOTES.get(section, "").format(**setting)
            print(f"\n### {TITLES[section]}\n\n{markdown(part)}\n" + (f"\n{note}" if note else ""))
    print("".join(f"\n{note}" for note in notes))
    if checks:
        few = ": too few for 95%, the range of all runs" if args.runs < 6 else ""
        print(f"\n### Claims, measured in this run\n\n{markdown(checks, hide=())}\n\n95% CI: of the median of the "
              f"same-round ratios, distribution-free ({args.runs} runs{few}). holds: yes if the whole interval meets "
              "the target, no if none of it does, undecided if it straddles the target (more runs narrow it).")


if __name__ == "__main__":
    try:
        main()
    except UserError as e:
        sys.exit(f"error: {e}")
