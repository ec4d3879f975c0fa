"""
A memory plan before a run starts: what each GPU holds to train, and whether it fits (train.py --plan).

    python train.py --plan --model llama-2-70b --nproc 8 --fsdp --gpu_mem 80
    python train.py --plan --ckpt_dir llama-2-13b --method lora --micro_batch_size 4 --max_seq_len 1024

Rows: the frozen base weights (whole under DDP; under FSDP a 1/nproc shard, plus what is gathered to compute); the
adapter (full fine-tuning: every weight), its gradients, AdamW's moments and the best-on-dev copy train.py keeps, all
fp32 and whole on every GPU (fsdp.py shards only the frozen base); one micro-batch's activations, with and without
gradient checkpointing (or, when larger, the flat buffer the gradients are summed over the processes in).

No formula: the model is train.py's own class and adapter, built from the config alone on fake tensors (meta
tensors, shapes and no memory, that say they are on the CPU: on the meta device autocast does not exist, and SDPA
falls back to its math kernel, which keeps the attention matrix a real device's flash kernel never makes). The
activations are measured as the high-water mark of every tensor's bytes while one micro-batch goes forward and back
through train.py's loss, op by op, under the CPU's autocast and flash kernel, which keep what CUDA's keep.
"""
import argparse
import math
import os
import weakref

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import adapters
import bench
import loaders
import train
from errors import UserError
from model import ModelArgs
from tokenizer import Tokenizer

GiB = 2**30
MODELS = {"llama-2-7b": "7b", "llama-2-13b": "13b", "llama-2-70b": "70b", "gemma-2b": "gemma-2b"}  # bench.RANDOM's
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
KINDS = ("ddp", "fsdp")  # DDP: every GPU holds the whole model; FSDP: its 1/nproc of the base weights
CKPT = {False: "no checkpointing", True: "--grad_checkpointing"}


def parser():
    p = argparse.ArgumentParser(prog="train.py --plan", description=__doc__.strip().splitlines()[0])
    arg = p.add_argument
    arg("--model", help=f"a model's shape: {', '.join(MODELS)} (default: --ckpt_dir's, or the small SmolLM2-135M)")
    arg("--ckpt_dir", help="a Meta or HF folder or a .gguf file: its config is read, never its weights")
    arg("--nproc", type=int, default=1, help="GPUs (processes) of the run: FSDP shards the base weights over them")
    arg("--fsdp", action="store_true", help="the run will use --fsdp: the FSDP column gives the verdict")
    arg("--gpu_mem", type=float, default=80.0, help="one GPU's memory in GiB (default 80: an A100 or H100 80GB)")
    arg("--dtype", choices=DTYPES, default="bf16", help="the base weights' dtype (bf16: train.py's on a GPU)")
    arg("--micro_batch_size", type=int, default=8, help="examples per forward pass (train.py's default, 8)")
    arg("--max_seq_len", type=int, default=512, help="tokens per example, padding included (default 512; train.py "
        "pads a micro-batch to its longest example, cut at its own --max_seq_len)")
    arg("--target_len", type=int, default=64, help="answer tokens per example, where train.py computes the logits "
        "and the loss (default 64)")
    train.adapter_flags(arg)  # --method, --r and each method's own settings, as train.py reads them
    return p


def check(a):
    """Refuse flags the plan cannot mean, naming the flag and the fix."""
    if a.model and a.ckpt_dir:
        raise UserError("give --model (a named shape) or --ckpt_dir (a checkpoint's config), not both")
    if a.model and a.model not in MODELS:
        raise UserError(f"unknown --model {a.model!r}: choose from {', '.join(MODELS)}, or give a checkpoint's "
                        "folder or file with --ckpt_dir")
    for flag, value in ("--nproc", a.nproc), ("--micro_batch_size", a.micro_batch_size), \
            ("--target_len", a.target_len), ("--r", 1 if a.r is None else a.r):
        if value < 1:
            raise UserError(f"{flag} must be at least 1, got {value}")
    if not (math.isfinite(a.gpu_mem) and a.gpu_mem > 0):
        raise UserError(f"--gpu_mem is one GPU's memory in GiB, a number above 0 (80 for an A100 80GB), got "
                        f"{a.gpu_mem}")
    if a.max_seq_len <= a.target_len:
        raise UserError(f"--max_seq_len {a.max_seq_len} must exceed --target_len {a.target_len}: an example is a "
                        "prompt of at least one token, then its answer")
    if a.method == adapters.NONE:
        raise UserError("--method none trains nothing: plan the training of a method (the default is PARA)")
    if a.fsdp and trains_all(a):
        raise UserError(f"--method {a.method} with --fsdp: train.py does not shard weights that train (fsdp.py "
                        "shards only the frozen base); plan it without --fsdp")


def trains_all(a):
    """Whether --method is full fine-tuning, whose "adapter" is every weight of the model."""
    return a.method in adapters.METHODS and adapters.METHODS[a.method].full


def model_config(a):
    """(ModelArgs, name, whether the head is the embedding): a named shape, or a checkpoint's config alone."""
    if a.model:
        with torch.random.fork_rng(devices=[]):  # bench's shapes, built on meta: no memory, and our RNG untouched
            args = bench.load_model(f"random:{MODELS[a.model]}", "meta", torch.float32)[0].args
        return args, a.model, type(args) is not ModelArgs  # Gemma's head is its embedding
    path = a.ckpt_dir or loaders.default_model_path()
    read = loaders.readers(path)[0]
    args, extra = read(path)  # the config, and the GGUF's (header, reader) or config.json's fields
    gguf = read is loaders.gguf_args
    # a tied head (SmolLM2): llama.cpp stores it once, as the embedding; HF says so in its config
    tied = "output.weight" not in {t.name for t in extra[1].tensors} if gguf else \
        read is loaders.hf_args and bool(extra.get("tie_word_embeddings"))
    if args.vocab_size <= 0:  # params.json's -1: the tokenizer's size
        args.vocab_size = len(extra[0].get("tokenizer.ggml.tokens") or []) if gguf else \
            Tokenizer.from_file(os.path.join(path, "tokenizer.model")).n_words
    return args, loaders.model_name(path), tied or type(args) is not ModelArgs


def build(args, tied, a):
    """train.py's model of shape args, with a's adapter attached as train.py attaches it, on the device the caller
    makes tensors on: fake tensors for the plan, the CPU in the tests."""
    default = torch.get_default_dtype()
    # the base weights in their dtype, as train.py loads them: a.dtype, or fp32 where every weight trains
    torch.set_default_dtype(torch.float32 if trains_all(a) else DTYPES[a.dtype])
    try:
        model = loaders.model_class(args)(args)
    finally:
        torch.set_default_dtype(default)  # the adapter's tensors are made fp32
    if tied:
        model.output.weight = model.tok_embeddings.weight  # one tensor, as load() makes it
    train.attach_adapter(argparse.Namespace(**vars(a), grad_checkpointing=False), model)
    return model


class LiveBytes(TorchDispatchMode):
    """The bytes of the tensors made under it and alive, and their high-water mark. A storage is counted when an op
    first returns it and uncounted when it is freed: views and in-place results add nothing."""

    def __init__(self, existing):
        super().__init__()
        self.now = self.peak = 0
        self.seen = {id(t.untyped_storage()) for t in existing}  # made before: never counted

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and id(s := t.untyped_storage()) not in self.seen:
                self.seen.add(id(s))
                self.now += s.nbytes()
                weakref.finalize(s, self.freed, id(s), s.nbytes())
        self.peak = max(self.peak, self.now)
        return out

    def freed(self, key, nbytes):
        self.seen.discard(key)
        self.now -= nbytes


def activations(model, dtype, batch, seq_len, target_len, checkpointing, all_reduce=False):
    """Peak bytes one micro-batch (batch, seq_len) makes going forward and back through train.py's loss, on the last
    target_len tokens of each row; then, with all_reduce, the flat buffer train.py sums the gradients over processes
    in. The gradients exist already, as from an earlier micro-batch: they have their own row, not counted here."""
    model.train()
    model.grad_checkpointing = checkpointing
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.zeros_like(p)
    B, T, N = batch, seq_len, target_len
    tokens, prompt_len = torch.zeros(B, T, dtype=torch.long), torch.full((B,), T - N)
    targets = torch.zeros(B * N, dtype=torch.long)
    # answer_loss's boolean mask of the answers' positions, as (row, column) indices: a fake tensor has no values in
    # which to find the True ones. Both gather the same (B*N, D) rows
    at = torch.arange(B).repeat_interleave(N), torch.arange(T - N, T).repeat(B)
    existing = [*model.parameters(), *(p.grad for p in params), model.freqs_cis, tokens, prompt_len, targets, *at]
    with LiveBytes(existing) as live:
        with loaders.autocast_for(torch.device("cpu"), dtype):  # as train_loop: the forward under autocast
            # as in train.answer_loss, the fp32 logits (B*N, vocab) are freed before backward begins
            loss = train.loss_sum(model(tokens, logits_at=at, **adapters.block_args(model, prompt_len=prompt_len)),
                                  targets)
        loss.backward()
        if all_reduce:  # train.all_reduce_adapter_grads: one flat copy of the gradients, once the activations are gone
            torch.cat([p.grad.flatten() for p in params])
    return live.peak


def plan(a):
    """The plan's numbers, from parsed and checked flags: parameter counts, bytes per GPU, whether they fit."""
    args, name, tied = model_config(a)
    if a.max_seq_len > args.max_seq_len:
        raise UserError(f"--max_seq_len {a.max_seq_len} is longer than {name}'s context of {args.max_seq_len} tokens")
    with FakeTensorMode(allow_non_fake_inputs=True):
        model = build(args, tied, a)
    # Run outside the mode, the forward makes real the few small tensors it computes from no weight (positions,
    # masks), so that Gemma 3's sliding window can read the last position; all that meets a weight is fake
    acts = {c: activations(model, DTYPES[a.dtype], a.micro_batch_size, a.max_seq_len, a.target_len, c, a.nproc > 1)
            for c in CKPT}
    size = lambda tensors: sum(t.numel() * t.element_size() for t in tensors)  # noqa: E731
    base = [p for p in model.parameters() if not p.requires_grad]  # parameters() lists a tied head once
    adapter = [p for p in model.parameters() if p.requires_grad]
    in_blocks = {id(p) for p in model.layers.parameters()}
    # FSDP (fsdp.py) gathers a block to run it and frees it after; the root (embedding, final norm, head) stays
    # gathered from forward to backward; the next block's all-gather is issued while one block runs
    gathered = size(p for p in base if id(p) not in in_blocks) + 2 * max(
        size(p for p in layer.parameters() if not p.requires_grad) for layer in model.layers)
    weights, one = size(base), size(adapter)
    trained = "weights" if trains_all(a) else "adapter"  # full fine-tuning trains all of them, in fp32
    rows = {f"frozen weights ({a.dtype})": {"ddp": weights, "fsdp": weights / a.nproc},
            "FSDP: gathered (root + 2 blocks)": {"ddp": 0, "fsdp": gathered},
            f"{trained} (fp32)": one, "gradients (fp32)": one, "AdamW's two moments (fp32)": 2 * one,
            f"best {trained} on dev, a copy (fp32)": one}
    if adapters.METHODS[a.method].prunes:  # AdaLoRA's allocator: a smoothed importance and its uncertainty
        rows["AdaLoRA's scores (2 x fp32)"] = 2 * one
    if adapters.METHODS[a.method].searches:  # SSP's search (ssp.Search.step), the peak: its whole space trains, and a
        # step keeps the weights before its virtual step, that step's gradient and the alpha half's (its retrain
        # trains only the chosen structure, at most the budget)
        rows["SSP search: 3 more copies (fp32)"] = 3 * one
    rows = {k: v if isinstance(v, dict) else {kind: v for kind in KINDS} for k, v in rows.items()}
    total = {k: {c: sum(r[k] for r in rows.values()) + acts[c] for c in CKPT} for k in KINDS}
    mem = a.gpu_mem * GiB
    return {"model": name, "label": adapters.label(a.method, model.adapter_config), "weights": weights,
            "base_parameters": sum(p.numel() for p in base), "trainable_parameters": sum(p.numel() for p in adapter),
            "rows": rows, "activations": acts, "total": total, "gpu_mem": mem, "nproc": a.nproc,
            "fits": {k: {c: t <= mem for c, t in v.items()} for k, v in total.items()}}


def verdict(r, kind):
    """Whether the run asked for fits, and if not, what would."""
    t, mem = r["total"][kind], r["gpu_mem"]
    if t[False] <= mem:
        return f"fits, {(mem - t[False]) / GiB:.2f} GiB to spare"
    if t[True] <= mem:
        return f"fits with --grad_checkpointing only, {(mem - t[True]) / GiB:.2f} GiB to spare"
    rest = r["total"]["fsdp"][True] - r["weights"] / r["nproc"]  # FSDP's shard shrinks as 1/nproc, nothing else
    if r["weights"] and mem > rest:
        hint = f"try --fsdp --nproc {math.ceil(r['weights'] / (mem - rest))} with --grad_checkpointing"
    elif t[True] - r["activations"][True] < mem:
        hint = "try a smaller --micro_batch_size or --max_seq_len"
    else:
        hint = "the weights and the training state alone are more than one GPU holds"
    return f"does not fit, even with --grad_checkpointing ({(t[True] - mem) / GiB:.2f} GiB over): {hint}"


def show(r, a):
    """The plan as a table of GiB per GPU; the column of the run asked for is starred."""
    chosen = "fsdp" if a.fsdp else "ddp"
    heads = {"ddp": "DDP" if a.nproc > 1 else "1 GPU", "fsdp": f"FSDP x{a.nproc}"}
    heads[chosen] += "*"
    print(f"memory plan: {r['model']}, {r['base_parameters']:,} frozen parameters in {a.dtype}; {r['label']}, "
          f"{r['trainable_parameters']:,} trained in fp32; micro-batch {a.micro_batch_size} x {a.max_seq_len} tokens, "
          f"the loss on the last {a.target_len} of each")
    print(f"{'GiB per GPU':<38}" + "".join(f"{heads[k]:>14}" for k in KINDS))
    lines = [*r["rows"].items(), *((f"activations, {how}", dict.fromkeys(KINDS, r["activations"][c]))
                                   for c, how in CKPT.items()),
             *((f"total, {how}", {k: r["total"][k][c] for k in KINDS}) for c, how in CKPT.items())]
    for label, v in lines:
        print(f"{label:<38}" + "".join(f"{v[k] / GiB:14.2f}" if v[k] else f"{'-':>14}" for k in KINDS))
    for c, how in CKPT.items():  # the margin: GiB to spare, or over when negative
        cells = (f"{'yes' if r['fits'][k][c] else 'NO'} {(r['gpu_mem'] - r['total'][k][c]) / GiB:+.2f}" for k in KINDS)
        print(f"{f'fits {a.gpu_mem:g} GiB, {how}?':<38}" + "".join(f"{cell:>14}" for cell in cells))
    print(f"* the run asked for ({heads[chosen][:-1]}): {verdict(r, chosen)}")
    print("(tensors only: the CUDA context, about 0.5 GiB, and the allocator's cache come on top)")


def main(argv=None):
    """Print the plan for argv (train.py's flags after --plan) and return its numbers."""
    a = parser().parse_args(argv)
    check(a)
    r = plan(a)
    show(r, a)
    return r
