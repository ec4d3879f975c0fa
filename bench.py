"""
Generation speed: generate.py against HF Transformers' generate on the same weights, in the same process.

    python bench.py                  # SmolLM2-135M, CPU, fp32, 2 threads, prompt 274 tokens, 32 new tokens
    python bench.py --repeats 7 --json

The setting is the paper's Table 4 (prompt of 274 tokens, 32 new tokens, beam 1 and 3). EOS is switched off
in both, so that both always make exactly that many tokens. Runs of ours and HF's alternate, so that a busy
machine slows both alike, and the table shows medians. tokens/s counts the new tokens over the whole call,
prefill included; "ours decode steps/s" leaves the prefill out, to compare with the ceiling: a bare loop of
the matrix-vector products one decode step must do (every linear layer and the LM head, nothing else), which
no decoder of these weights can beat on this machine. Each measurement is one function returning a row of
the table, so that more rows (adapters, multi-tenant batches) slot in. The last row bounds greedy decoding:
our prefill followed by every step at the ceiling.
"""
import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import generate
from model import default_model_path, load

# a fixed English text to cut the prompt from (any text does; this one keeps the model writing, not stopping)
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


def median_rate(runs):
    return statistics.median(n / s for n, s in runs)


def measure_generate(model, tokenizer, hf, prompt, num_beams, new_tokens, repeats):
    """Ours and HF's generate, alternated: a table row for one decoding setting."""
    hf.generation_config.eos_token_id = None  # no EOS: exactly new_tokens tokens
    ours, theirs, decode, prefill = [], [], [], []
    for _ in range(repeats):
        result = generate.generate(model, tokenizer, [prompt], new_tokens, num_beams=num_beams, eos_id=-1)[0]
        ours.append((len(result.tokens), result.seconds))
        decode.append((len(result.tokens) - 1, result.seconds - result.prefill_seconds))
        prefill.append(result.prefill_seconds)
        start = time.perf_counter()
        with torch.inference_mode():
            out = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                              do_sample=False, num_beams=num_beams, max_new_tokens=new_tokens,
                              pad_token_id=tokenizer.pad_id)
        theirs.append((out.shape[1] - len(prompt), time.perf_counter() - start))
    return {"measurement": "greedy" if num_beams == 1 else f"beam {num_beams}",
            "ours tokens/s": median_rate(ours), "HF tokens/s": median_rate(theirs),
            "ours / HF": median_rate(ours) / median_rate(theirs),
            "same tokens": result.tokens == out[0, len(prompt):].tolist(),
            "ours decode steps/s": median_rate(decode), "ours prefill s": statistics.median(prefill)}


def measure_ceiling(model, steps=10):
    """Steps/s of a bare loop over the matrix-vector products of one decode step (all linears and the LM head)."""
    weights = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
    inputs = {w.shape[1]: torch.randn(1, w.shape[1], dtype=w.dtype) for w in weights}
    times = []
    with torch.inference_mode():
        for _ in range(steps + 1):  # the first one warms up
            start = time.perf_counter()
            for w in weights:
                F.linear(inputs[w.shape[1]], w)
            times.append(time.perf_counter() - start)
    return {"measurement": "ceiling: matrix-vector products only", "ours decode steps/s": 1 / statistics.median(times[1:])}


def bound(greedy, ceiling, new_tokens):
    """The best greedy tokens/s any decoder could reach here: our prefill, then every step at the ceiling."""
    seconds = greedy["ours prefill s"] + (new_tokens - 1) / ceiling["ours decode steps/s"]
    return {"measurement": "bound: our prefill + steps at the ceiling", "ours tokens/s": new_tokens / seconds,
            "HF tokens/s": greedy["HF tokens/s"], "ours / HF": new_tokens / seconds / greedy["HF tokens/s"]}


def markdown(rows):
    columns = list(dict.fromkeys(k for row in rows for k in row))
    fmt = lambda v: f"{v:.2f}" if isinstance(v, float) else "" if v is None else str(v)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--ckpt_dir", help="default: the small SmolLM2-135M GGUF")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt_tokens", type=int, default=274)
    parser.add_argument("--new_tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", action="store_true", help="print the rows as JSON instead of a Markdown table")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM

    path = args.ckpt_dir or default_model_path()
    model, tokenizer = load(path, dtype=torch.float32)
    if path.endswith(".gguf"):
        hf = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                  dtype=torch.float32)
    else:
        hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    hf.eval()
    prompt = (tokenizer.encode(TEXT) * 4)[: args.prompt_tokens]
    greedy = measure_generate(model, tokenizer, hf, prompt, 1, args.new_tokens, args.repeats)
    beam = measure_generate(model, tokenizer, hf, prompt, 3, args.new_tokens, args.repeats)
    ceiling = measure_ceiling(model)
    rows = [greedy, beam, ceiling, bound(greedy, ceiling, args.new_tokens)]
    if args.json:
        print(json.dumps(rows))
    else:
        print(f"{os.path.basename(path)}, {args.threads} threads, prompt {len(prompt)} tokens, "
              f"{args.new_tokens} new tokens, median of {args.repeats}, torch {torch.__version__}\n")
        print(markdown(rows))


if __name__ == "__main__":
    main()
