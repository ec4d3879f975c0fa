"""
Fine-tune LLaMA-2 on one task with PARA (or a baseline: (IA)^3, LoRA, AdaLoRA, Houlsby, SSP or full fine-tuning), keep
the adapter that is best on dev loss, and report dev and test metrics from generation. The paper's recipe (section
4.3) is the default:

    python train.py --task copa --r 12                   # the small default model, on a CPU laptop
    python train.py --task copa --method none            # zero-shot: the base model, no adapter
    python train.py --task copa --method full            # every weight trains; the model is saved in model/
    python train.py --task copa --method ssp             # SSP: its structure searched, then retrained (ssp.py)
    python train.py --task boolq --ckpt_dir llama-2-7b --grad_checkpointing --seeds 1,2,3,4,5
    torchrun --nproc_per_node 8 train.py --task squad --ckpt_dir llama-2-7b --adapter_rank 12 --micro_batch_size 4
    torchrun --nproc_per_node 8 train.py --fsdp --task boolq --ckpt_dir llama-2-70b --grad_checkpointing
    python train.py --plan --model llama-2-70b --nproc 8 --fsdp --gpu_mem 80   # memory per GPU, before a run

Out folder: adapter.pt (best on dev), ckpt.pt (to --resume), log.jsonl (one line per step and per dev
evaluation), predictions.jsonl and results.json. With --seeds, one such folder per seed (seed1/, ...) and a
results.json with each seed and the median. Full fine-tuning saves no adapter.pt but the model itself, best on
dev, in model/ (an HF folder, loaders.save: python generate.py --ckpt_dir OUT/model), once training ends. SSP
searches its structure first, in the same folder (search.pt to --resume, search.jsonl), then retrains it there.
"""
import argparse
import json
import math
import os
import shlex
import statistics
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

import adapters
import fsdp
import ssp
from baselines import RankAllocator
from data import TASKS, atomic_write, load_split, metric_for, prepare_task, resolve_task
from errors import UserError
from generate import generate, peak_memory, truncate_left
import runs
from loaders import (DTYPES, FINE_TUNED, autocast_for, default_model_path, load, pick_device, read_args,
                     resolve_dtype, save, torch_load)



def parse_args(argv=None):
    p = parser()
    args = p.parse_args(argv)
    try:
        check_args(args)
    except UserError as e:
        p.error(str(e))
    return args


def parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    arg = p.add_argument
    # task and model
    arg("--task", default="copa", help=f"{', '.join(TASKS)} (prepared on first use), or a folder with "
        "train/dev/test.jsonl")
    arg("--src", help="folder or zip the task is prepared from, for offline use (see data/<task>/prepare.py)")
    arg("--allow_missing_train", action="store_true", help="prepare a task whose --src lacks the training file "
        "(empty train split: only --method none can run on it)")
    arg("--ckpt_dir", help="Meta or HF Llama-2 folder, or a .gguf file (default: the small SmolLM2-135M-Instruct)")
    arg("--out_dir", help="where the adapter, log and results go (default: out/<task>-<method>)")
    adapter_flags(arg)
    # the paper's optimisation recipe (section 4.3); the rest are HF Trainer's defaults, as the paper says
    arg("--lr", type=float, help="the peak learning rate (default: the method's: the paper's 1e-4 for each adapter, "
        f"{adapters.FULL_FT_LR:g} for full fine-tuning, as Llama 2's own fine-tuning)")
    arg("--weight_decay", type=float, default=0.0, help="AdamW's decoupled decay; 0 as in HF's Trainer")
    arg("--warmup_ratio", type=float, default=0.06, help="linear warmup over this share of the steps, then decay to 0")
    arg("--grad_clip", type=float, default=1.0, help="clip the gradient norm (HF's Trainer default); 0 turns it off")
    arg("--epochs", type=int, default=10, help="at most this many epochs")
    arg("--max_steps", type=int, default=0, help="stop after this many optimizer steps (0: epochs decide)")
    arg("--batch_size", type=int, default=0, help="examples per optimizer step (0: 16 under 10k training examples, "
        "else 128)")
    arg("--micro_batch_size", type=int, default=8, help="examples per forward pass on each process; the rest is "
        "gradient accumulation, so memory is bounded whatever the batch size")
    arg("--max_seq_len", type=int, default=2048, help="longer examples lose prompt tokens from the left (counted)")
    arg("--limit_train", type=int, default=0, help="use only the first N training examples (0: all)")
    arg("--eval_interval", type=int, default=200, help="dev loss every this many steps, and at the last one")
    arg("--patience", type=int, default=10, help="stop after this many dev evaluations without a lower dev loss")
    arg("--ckpt_minutes", type=float, default=5.0, help="write ckpt.pt at least this often (minutes of training; "
        "it is also written at every dev evaluation and at the end)")
    arg("--seed", type=int, default=1, help="seed of the adapter's initialisation and of the data order, from 0 to "
        "2**32 - 1")
    arg("--seeds", help="comma-separated seeds, one run each, reported with their median (the paper uses five)")
    # evaluation by generation
    arg("--num_beams", type=int, default=3, help="beam search width (3 in the paper; 1 is greedy)")
    arg("--max_new_tokens", type=int, default=0, help="0: the longest train/dev target with its EOS, at most 64")
    arg("--eval_batch_size", type=int, default=16, help="prompts per generation batch")
    arg("--limit_eval", type=int, default=0, help="use only the first N dev and test examples (0: all)")
    arg("--eval_splits", default="dev,test", help="the splits scored by generation after training (none: train "
        "only; --resume later scores the splits a finished run has not)")
    arg("--compile", action="store_true", help="generate with the compiled decode step (generate.py --compile)")
    # hardware
    arg("--device", default="auto", help="cpu, cuda, cuda:1, ... (auto: cuda if available; under torchrun "
        "cuda:LOCAL_RANK)")
    arg("--dtype", default="auto", choices=DTYPES, help="bf16: base weights in bf16 and bf16 autocast, the adapter "
        "and AdamW in fp32 (full fine-tuning: every weight in fp32, under bf16 autocast). auto: bf16 on cuda and on "
        "CPUs with native bf16 (AVX512-BF16 or AMX), fp32 elsewhere (a CPU without it emulates bf16, some 47x slower)")
    arg("--grad_checkpointing", action="store_true", help="recompute activations in backward (7B/13B on one GPU)")
    arg("--fsdp", action="store_true", help="under torchrun: shard the base model over the processes (FSDP2), where "
        "DDP holds all of it on each; for 13B/70B (fsdp.py)")
    # runs
    arg("--resume", action="store_true", help="continue the run in out_dir from its ckpt.pt (fresh start if none)")
    arg("--overwrite", action="store_true", help="start afresh, deleting the run files in out_dir")
    return p


def adapter_flags(arg):
    """The method and its own settings (each method reads only its own: adapters.METHODS[...].flags)."""
    arg("--method", default=adapters.PARA, choices=[*adapters.METHODS, adapters.NONE],
        help=f"{adapters.NONE}: no adapter, evaluate the base model")
    arg("--r", "--adapter_rank", type=int, help="PARA's bottleneck (default 12), LoRA's rank (12), AdaLoRA's "
        "initial rank (12), the Houlsby bottleneck (default: PARA's parameter count at r = 12) or the rank r_c of "
        "SSP's LoRA candidates (64). Under torchrun write --adapter_rank: torchrun's parser takes --r for one of "
        "its own --r... options")
    arg("--lora_alpha", type=float, default=8.0, help="LoRA's and AdaLoRA's scaling is alpha / r (8: PEFT's default)")
    arg("--lora_targets", default="wq,wv", help="LoRA's and AdaLoRA's matrices, comma-separated Meta names")
    arg("--ia3_targets", default="wk,wv,w3", help="(IA)^3's matrices, each output scaled (w3: the FFN intermediate; "
        "wq,wv,w3: PARA's static twin)")
    arg("--adalora_target_r", type=int, default=8, help="AdaLoRA's final average rank per matrix")
    arg("--adalora_tinit", type=int, help="AdaLoRA: steps at the initial budget (default: 10%% of the steps)")
    arg("--adalora_tfinal", type=int, help="AdaLoRA: last steps at the final budget (default: 30%% of the steps)")
    arg("--adalora_deltaT", type=int, default=1, help="AdaLoRA: steps between two re-allocations of the budget")
    arg("--adalora_beta", type=float, default=0.85, help="AdaLoRA: smoothing of the importance and its uncertainty")
    arg("--adalora_orth_reg_weight", type=float, default=0.5, help="AdaLoRA: weight of the orthogonality term")
    arg("--ssp_budget", type=int, help="SSP: the searched structure's parameters at most (default: the paper's 8.6M "
        "on Llama-2 7B, scaled by PARA's count on other models)")
    arg("--ssp_structure", help="SSP: retrain this structure (comma-separated candidates, layers.<i>.<position>."
        "<kind>) without searching; default: search it first, in the same out_dir (search.pt, search.jsonl)")


def check_args(args):
    """Refuse flags that would train something other than what was asked, naming the flag."""
    at_least = {"--epochs": (args.epochs, 1), "--micro_batch_size": (args.micro_batch_size, 1),
                "--eval_interval": (args.eval_interval, 1), "--patience": (args.patience, 1),
                "--num_beams": (args.num_beams, 1), "--eval_batch_size": (args.eval_batch_size, 1),
                "--max_steps": (args.max_steps, 0), "--batch_size": (args.batch_size, 0),
                "--max_new_tokens": (args.max_new_tokens, 0), "--limit_eval": (args.limit_eval, 0),
                "--limit_train": (args.limit_train, 0), "--max_seq_len": (args.max_seq_len, 3),
                "--adalora_target_r": (args.adalora_target_r, 1), "--adalora_deltaT": (args.adalora_deltaT, 1)}
    if args.r is not None:
        at_least["--r"] = (args.r, 1)
    args.eval_splits = [] if args.eval_splits == "none" else args.eval_splits.split(",")
    if any(s not in ("dev", "test") for s in args.eval_splits) or len(set(args.eval_splits)) < len(args.eval_splits):
        raise UserError(f"--eval_splits takes dev, test, dev,test or none, got {','.join(args.eval_splits)}")
    for flag, (value, low) in at_least.items():
        if value < low:
            raise UserError(f"{flag} must be at least {low}, got {value}" + (" (0 means: the default)" * (low == 0)))
    finite = {"--lr": lr_of(args), "--weight_decay": args.weight_decay, "--warmup_ratio": args.warmup_ratio,
              "--grad_clip": args.grad_clip, "--ckpt_minutes": args.ckpt_minutes, "--lora_alpha": args.lora_alpha,
              "--adalora_orth_reg_weight": args.adalora_orth_reg_weight}
    for flag, value in finite.items():
        if not math.isfinite(value) or value < 0:
            raise UserError(f"{flag} must be a number >= 0, got {value}")
    if lr_of(args) == 0 and args.method != adapters.NONE:
        raise UserError("--lr 0 trains nothing: give a learning rate > 0 (or --method none to evaluate the base model)")
    if args.warmup_ratio >= 1:
        raise UserError(f"--warmup_ratio must be below 1 (a share of the steps), got {args.warmup_ratio}")
    if not 0 < args.adalora_beta < 1:
        raise UserError(f"--adalora_beta must lie strictly between 0 and 1, got {args.adalora_beta}")
    if args.seeds is not None:
        try:
            args.seeds = [int(s) for s in args.seeds.split(",")]
        except ValueError:
            raise UserError(f"--seeds must be comma-separated whole numbers, like 1,2,3; got {args.seeds!r}") from None
        if len(set(args.seeds)) < len(args.seeds):
            raise UserError(f"--seeds {','.join(map(str, args.seeds))} names a seed twice: each seed is one run")
    for seed in args.seeds or [args.seed]:
        if not 0 <= seed < 2**32:
            raise UserError(f"a seed must lie in [0, 2**32), got {seed}")
    if args.resume and args.overwrite:
        raise UserError("--resume continues a run and --overwrite deletes it: give one of them")
    if args.fsdp and args.compile:
        raise UserError("--compile's decode step holds whole weights, and --fsdp shards them: give one of them")
    if method_of(args) and method_of(args).full and args.fsdp:  # fsdp.py keeps every trainable tensor whole
        raise UserError("--method full with --fsdp is not supported yet: --fsdp shards only the frozen base model, and "
                        "under full fine-tuning every weight trains. Drop --fsdp (one process, or DDP under torchrun, "
                        "each holding the whole model: train.py prints what that needs)")
    if method_of(args) and method_of(args).full and args.dtype == "fp16":
        raise UserError("--method full trains fp32 weights under bf16 autocast; fp16 would need loss scaling, which "
                        "train.py does not do: give --dtype bf16 or fp32")


# -----------------------------------------------------------------------------
# small pure pieces, tested one by one


def lr_at(step, lr, warmup_steps, total_steps):
    """Learning rate of optimizer step `step` (0-based): linear warmup to lr, then linear decay towards 0.
    Like HF's get_linear_schedule_with_warmup, shifted by one so that neither the first step nor the last has lr 0."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    return lr * (total_steps - step) / max(1, total_steps - warmup_steps)


def early_stopping(dev_loss, best_loss, bad_evals, patience):
    """One dev evaluation of the paper's rule: a strictly lower dev loss is a new best; training stops after
    `patience` evaluations in a row without one. Returns (is_best, best_loss, bad_evals, stop)."""
    if dev_loss < best_loss:
        return True, dev_loss, 0, False
    return False, best_loss, bad_evals + 1, bad_evals + 1 >= patience


def tokenize(records, tokenizer, max_seq_len):
    """([(prompt ids, target ids)], number of prompts cut, number of targets cut) for a window of max_seq_len.
    The prompt is encoded alone, with the model's BOS default: exactly the ids generation is given. The target
    ids are the rest of encode(prompt + target), so they are the tokens the model would see in running text,
    plus EOS so that generation learns to stop. An example longer than max_seq_len loses prompt tokens from the
    left (after BOS): the answer and the words just before it matter most. A target longer than the window keeps
    its start (max_seq_len - 2 tokens, EOS, and one prompt token fill it)."""
    examples, cut_prompts, cut_targets = [], 0, 0
    for prompt, full, target in (pair for r in records for pair in token_pairs(r, tokenizer)):
        if full[:len(prompt)] == prompt:
            target = full[len(prompt):]
        else:  # a merge across the boundary (BPE can join the prompt's last characters with the target's first)
            target = target()
        if tokenizer.eos_id in target:  # a chat reply's end of turn: what follows it is the next turn's
            target = target[:target.index(tokenizer.eos_id)]
        cut_targets += len(target) > max_seq_len - 2
        target = target[:max_seq_len - 2] + [tokenizer.eos_id]
        if len(prompt) + len(target) > max_seq_len:
            prompt = truncate_left(prompt, max_seq_len - len(target), tokenizer.bos_id)
            cut_prompts += 1
        examples.append((prompt, target))
    return examples, cut_prompts, cut_targets


def token_pairs(record, tokenizer):
    """(prompt ids, prompt and target ids, a function giving the target's ids alone) of each example in a record.
    A prompt/target record is one example. A conversation ({"messages": [...]}) is one example per assistant reply,
    in the model's chat format: its prompt is the whole conversation before the reply, which is what the model is
    given when it writes that reply, and all PARA's vector generator reads (README, "Chat")."""
    if "messages" not in record:
        return [(tokenizer.encode(record["prompt"]), tokenizer.encode(record["prompt"] + record["target"]),
                 lambda: tokenizer.encode(record["target"], bos=False))]
    messages, pairs = record["messages"], []
    for k, m in enumerate(messages):
        if m["role"] == "assistant" and m["content"].strip() and any(x["role"] == "user" for x in messages[:k]):
            prompt = tokenizer.format_chat(messages[:k])  # ends with the assistant's turn opening
            full = tokenizer.format_chat(messages[:k + 1], add_generation_prompt=False)
            pairs.append((prompt, full, lambda m=m: tokenizer.encode(m["content"], bos=False)))
    return pairs


def micro_batches(batch, size):
    """The examples of one optimizer step in micro-batches of `size`, longest first: each micro-batch is padded to
    its longest example, so grouping similar lengths wastes less compute. The step's gradient is the same."""
    batch = sorted(batch, key=lambda e: -len(e[0]) - len(e[1]))
    return [batch[i:i + size] for i in range(0, len(batch), size)]


def my_micro_batches(examples, where, size):
    """This process's micro-batches: every world-th example, `size` at a time. Under FSDP, each forward pass
    gathers weights with every other process, so each runs as many as the busiest one: its extra ones are empty."""
    mine = micro_batches(examples[where.rank::where.world], size)
    if where.fsdp:
        mine += [[]] * (math.ceil(math.ceil(len(examples) / where.world) / size) - len(mine))
    return mine


def collate(examples, pad_id, device):
    """Right-padded inputs (B, T), next-token targets (B, T) with -100 wherever the next token is not part of
    the target (prompt and padding), and prompt_len (B,): PARA reads each row at prompt_len - 1."""
    seqs = [p + t for p, t in examples]
    T = max(len(s) for s in seqs) - 1
    tokens = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    targets = torch.full((len(seqs), T), -100, dtype=torch.long)
    for i, ((prompt, target), seq) in enumerate(zip(examples, seqs)):
        tokens[i, :len(seq) - 1] = torch.tensor(seq[:-1])
        # position t predicts token t+1: the target's tokens are predicted from positions len(prompt)-1 onwards
        targets[i, len(prompt) - 1:len(seq) - 1] = torch.tensor(target)
    prompt_len = torch.tensor([len(p) for p, _ in examples])
    return tokens.to(device), targets.to(device), prompt_len.to(device)


def loss_sum(logits, targets):
    """Summed cross-entropy of the target tokens: logits (..., vocab), targets (...); -100 counts for nothing."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100,
                           reduction="sum")


def answer_loss(model, tokens, targets, prompt_len):
    """Summed cross-entropy of the target tokens of a collated batch, with logits at those positions only
    (model.forward's logits_at): the same loss as loss_sum over every position's logits, for less compute."""
    at = targets != -100  # (B, T)
    logits = model(tokens, logits_at=at, **adapters.block_args(model, prompt_len=prompt_len))  # (N, vocab)
    return loss_sum(logits, targets[at])


def target_loss(model, examples, micro_batch_size, pad_id, device, autocast=nullcontext(), where=None):
    """(summed cross-entropy, number of target tokens) over examples, float64 on device, without gradients.
    With `where`, over this process's share of them (train.py sums the shares)."""
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)
    with torch.no_grad(), autocast:
        for micro in my_micro_batches(examples, where or Dist(), micro_batch_size):
            tokens, targets, prompt_len = collate(micro or examples[:1], pad_id, device)
            total[0] += answer_loss(model, tokens, targets, prompt_len) * bool(micro)  # empty: a stand-in (FSDP)
            total[1] += (targets != -100).sum() * bool(micro)
    return total


def write_json(path, obj):
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=2) + "\n"))


# -----------------------------------------------------------------------------
# a run


@dataclass
class RunState:
    """Where training stands; saved in ckpt.pt, so that --resume continues exactly."""
    step: int = 0  # optimizer steps done: with the seed, it fixes the data position and the learning rate
    best_loss: float = math.inf  # the lowest dev loss so far
    bad_evals: int = 0  # dev evaluations since the last new best
    done: bool = False  # training finished (evaluation may not have)
    train_time: float = 0.0  # seconds spent in training steps
    train_tokens: int = 0  # tokens (prompt + target) processed


@dataclass
class Dist:
    """This process's place under torchrun; rank 0 alone prints and writes files."""
    rank: int = 0
    world: int = 1
    fsdp: bool = False  # the base model is sharded: every process must run each forward pass with the others

    @property
    def master(self):
        return self.rank == 0


def main(argv=None):
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    if "--plan" in argv:  # the memory a run needs per GPU, from the config alone (plan.py)
        import plan

        return plan.main([a for a in argv if a != "--plan"])
    args = parse_args(argv)
    # several processes under torchrun: one per GPU (or CPU process, with gloo), each holding the whole model, or
    # with --fsdp its shard of it
    ddp = Dist(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), args.fsdp) if "RANK" in os.environ else None
    if ddp and searching(args):
        raise UserError("SSP's search runs in one process: run it without torchrun, or give the structure to retrain "
                        "with --ssp_structure")
    if args.fsdp and not ddp:
        raise UserError("--fsdp shards the model over the processes of torchrun: run it as torchrun "
                        "--nproc_per_node N train.py --fsdp ...")
    device = pick_device(args.device)
    if ddp and device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    if ddp:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        results = run_seeds(args, device, ddp or Dist())
        if ddp:
            dist.barrier()  # gloo can abort a process that tears down while its peer still talks to it
        return results
    finally:
        if ddp:
            dist.destroy_process_group()


def run_seeds(args, device, where):
    """One run per seed, then each seed's metrics and their median (the paper reports the median of five)."""
    context = read_args(args.ckpt_dir).max_seq_len  # the config alone: refuse before any data or weight is read
    if args.max_new_tokens > context // 2:
        raise UserError(f"--max_new_tokens {args.max_new_tokens} would leave the prompts fewer than half of the "
                        f"model's context of {context} tokens: ask for at most {context // 2}")
    if args.task in TASKS:
        folder = prepare_task(args.task, src=args.src, allow_missing_train=args.allow_missing_train)
    else:
        folder = resolve_task(args.task)
    out_dir = Path(args.out_dir or os.path.join("out", f"{Path(folder).resolve().name}-{args.method}"))
    if not args.seeds:
        return train_and_evaluate(args, args.seed, folder, out_dir, device, where)
    if (out_dir / "results.json").exists() and not (args.resume or args.overwrite):
        raise UserError(f"{out_dir} holds a finished run (results.json): pass --resume to complete it, --overwrite "
                        "to replace it, or choose another --out_dir")
    results = {seed: train_and_evaluate(args, seed, folder, out_dir / f"seed{seed}", device, where)
               for seed in args.seeds}
    summary = {"seeds": results}
    for split in ("dev", "test"):
        names = (results[args.seeds[0]][split] or {}).keys()
        summary[f"{split}_median"] = {k: statistics.median(r[split][k] for r in results.values()) for k in names}
    if where.master:
        write_json(out_dir / "results.json", summary)
        for split in ("dev", "test"):
            if summary[f"{split}_median"]:
                per_seed = ", ".join(f"seed {s} {next(iter(r[split].values())):.1f}" for s, r in results.items())
                name, value = next(iter(summary[f"{split}_median"].items()))
                print(f"{split} {name}: median {value:.2f} over seeds ({per_seed})")
    return summary


def train_and_evaluate(args, seed, folder, out_dir, device, where):
    """One run: its out folder, model and adapter, data, training, evaluation, results."""
    t_start = time.time()
    settings = run_settings(args, seed, where)
    inputs = runs.fingerprint(folder, args.ckpt_dir or default_model_path())
    ckpt, held_lock = claim_out_dir(args, out_dir, settings, inputs, where)  # the lock is held until we return
    finished, to_score = finished_run(args, out_dir)
    if finished and not to_score:
        if where.master:
            print(f"{out_dir} is finished: its results.json is kept (--overwrite to run it again)")
        return finished

    torch.manual_seed(seed)  # the adapter's initialisation
    dtype = resolve_dtype(args.dtype, device)
    full = bool(method_of(args) and method_of(args).full)
    model, tokenizer = load_model(args, device, dtype, where)
    autocast = autocast_for(device, dtype)  # bf16 weights: bf16 autocast, fp32 adapter
    splits, train, dev, prompts, max_new_tokens, n_truncated = load_data(args, folder, tokenizer, model, where)
    batch_size = args.batch_size or (16 if len(train) < 10_000 else 128)  # the paper's rule
    structure, searched = None, {}
    if searching(args):  # SSP: the search stage first, then the chosen structure is retrained, fresh
        structure, searched = search_first(args, model, tokenizer, train, dev, seed, batch_size, out_dir, settings,
                                           inputs, autocast, device)
    if not where.fsdp:  # (under FSDP the adapter joined the model before it was sharded)
        attach_adapter(args, model, structure)
    steps_per_epoch = math.ceil(len(train) / batch_size)
    total_steps = min(args.epochs * steps_per_epoch, args.max_steps or math.inf)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    allocator = rank_allocator(args, model, total_steps)
    n_trainable, n_total = sum(p.numel() for p in params.values()), sum(p.numel() for p in model.parameters())
    if where.master:
        print(f"{args.method}: {n_trainable:,} trainable parameters ({100 * n_trainable / n_total:.3f}% of "
              f"{n_total:,}); {len(train)} train examples, batch {batch_size}, {steps_per_epoch} steps/epoch, at "
              f"most {total_steps} steps")
        if full:
            print(full_ft_memory(n_trainable, device, dtype, where.world))
    optimizer = torch.optim.AdamW(params.values(), lr=lr_of(args), weight_decay=args.weight_decay) if params else None
    run = Run(args, out_dir, model, tokenizer, params, optimizer, allocator, autocast, device, where, settings,
              inputs, RunState(done=args.method == adapters.NONE), {n: p.detach().clone() for n, p in params.items()})
    restore(run, ckpt)
    try:
        train_loop(run, train, dev, seed, batch_size, steps_per_epoch, total_steps)
        if full:
            save_model(run)
        scores = evaluate(run, splits, prompts, max_new_tokens, folder, to_score)
    except KeyboardInterrupt:  # Ctrl-C: one line that says how to go on, not a traceback
        raise Interrupted(run) from None
    results = {"dev": None, "test": None} | finished | scores
    results |= {"eval_splits": [s for s in ("dev", "test") if s in finished.get("eval_splits", []) + to_score],
                "trainable_parameters": n_trainable, "steps": run.state.step,
                "best_dev_loss": run.state.best_loss if run.state.step else None, "train_examples": len(train),
                "truncated_train_examples": n_truncated, "batch_size": batch_size,
                "wall_time_s": round(finished.get("wall_time_s", 0) + time.time() - t_start, 1)} | searched
    if finished.get("peak_memory_bytes"):  # scored later, in another process: training's peak may be the higher
        results["peak_memory_bytes"] = max(finished["peak_memory_bytes"], results["peak_memory_bytes"] or 0)
    if where.master:
        write_json(out_dir / "results.json", results)
        print(f"dev {results['dev']}  test {results['test']}  ({out_dir})")
    return results


def finished_run(args, out_dir):
    """(a finished run's results, or {}; the splits left to score): --resume scores only the splits it has not."""
    finished = {}
    if args.resume and (out_dir / "results.json").exists():
        finished = {"eval_splits": ["dev", "test"]} | json.loads((out_dir / "results.json").read_text())
    return finished, [s for s in args.eval_splits if s not in finished.get("eval_splits", [])]


def load_model(args, device, dtype, where):
    """(model, tokenizer) of --ckpt_dir: whole, or under FSDP this process's shard with the adapter already on it
    (fsdp.py attaches it before sharding). Weights that train are fp32, as an adapter is: full fine-tuning's AdamW
    steps of 2e-5 would mostly round away in bf16."""
    if where.fsdp:
        return fsdp.load_sharded(args.ckpt_dir, device, dtype, where.world, lambda m: attach_adapter(args, m))
    full = method_of(args) and method_of(args).full
    return load(args.ckpt_dir, device=device, dtype=torch.float32 if full else dtype)


def search_first(args, model, tokenizer, train, dev, seed, batch_size, out_dir, settings, inputs, autocast, device):
    """SSP's search stage (ssp.search_structure): the structure to retrain and what results.json says of the
    search. The seed is set again after it, so that the retrain starts alike whether the search ran now or before."""
    try:
        found = ssp.search_structure(args, model, tokenizer, train, dev, seed, batch_size, out_dir, settings, inputs,
                                     autocast, device)
    except KeyboardInterrupt:  # Ctrl-C: one line that says how to go on, not a traceback
        command = shlex.join(["python", *sys.argv] + ["--resume"] * ("--resume" not in sys.argv))
        raise UserError(f"interrupted in SSP's search: {out_dir / 'search.pt'} holds its last checkpoint. "
                        f"Continue with: {command}") from None
    torch.manual_seed(seed)
    return found


def full_ft_memory(n_weights, device, dtype, world):
    """What full fine-tuning holds, from the parameter count: each weight in fp32 (4 bytes) as itself, its gradient,
    AdamW's two moments (exp_avg, exp_avg_sq) and the best on dev; under bf16 autocast, the bf16 copy each forward
    makes and backward keeps; under torchrun, the flat buffer of the gradients' all-reduce. Activations come on top."""
    copy = 4 * n_weights  # bytes
    parts = {"the weights": copy, "their gradients": copy, "AdamW's two moments": 2 * copy,
             "the best weights on dev": copy}
    if dtype == torch.bfloat16:
        parts["autocast's bf16 copy"] = copy // 2
    if world > 1:
        parts["the all-reduce buffer"] = copy

    def size(b):
        return f"{b / 1e9:.2f} GB" if b >= 1e9 else f"{b / 1e6:.1f} MB"

    return (f"full fine-tuning of {n_weights:,} weights in fp32 needs, before activations, on {device}: "
            + " + ".join(f"{name} {size(b)}" for name, b in parts.items()) + f" = {size(sum(parts.values()))}; on "
            f"disk, ckpt.pt {size(4 * copy)} (the weights, the best ones, the moments) and {FINE_TUNED}/ {size(copy)}")


def method_of(args):
    """The registry's entry of --method (None for --method none)."""
    return adapters.METHODS.get(args.method)


def lr_of(args):
    """--lr, or the method's default learning rate (the paper's 1e-4)."""
    return args.lr if args.lr is not None else method_of(args).lr if method_of(args) else adapters.PAPER_LR


def run_settings(args, seed, where):
    """The flags that shape the training run (the method's own, and the recipe's): --resume refuses a checkpoint
    made with others."""
    names = ("task", "ckpt_dir", "method", *(method_of(args).flags if method_of(args) else ()), "weight_decay",
             "warmup_ratio", "grad_clip", "epochs", "max_steps", "batch_size", "max_seq_len", "limit_train",
             "eval_interval", "patience", "dtype")
    return {k: getattr(args, k) for k in names} | {"lr": lr_of(args), "seed": seed, "world_size": where.world}


def claim_out_dir(args, out_dir, settings, inputs, where):
    """Make out_dir this run's, never losing a user's work (runs.py): this process takes the folder's lock (rank 0,
    which alone writes); a fresh run refuses a folder that holds any run file, --overwrite deletes exactly the run
    files (nothing else), --resume continues from ckpt.pt, if its settings and inputs are this run's. Returns (the
    checkpoint to resume from or None, the lock to hold until the run ends)."""
    held = None
    if where.master:
        runs.prepare_folder(out_dir)
        held = runs.lock(out_dir)
    present = [name for name in runs.RUN_FILES if (out_dir / name).exists()]
    if present and not (args.resume or args.overwrite):
        raise UserError(f"{out_dir} holds the files of another run ({', '.join(present)}): pass --resume to continue "
                        "it, --overwrite to replace it, or choose another --out_dir")
    ckpt = None
    if args.resume and (out_dir / "ckpt.pt").exists():
        ckpt = torch_load(out_dir / "ckpt.pt")
        if not isinstance(ckpt, dict) or "settings" not in ckpt:
            raise UserError(f"{out_dir / 'ckpt.pt'} is not a training checkpoint of train.py: remove it, or pass "
                            "--overwrite to start afresh")
        check_same_run(ckpt, settings, inputs, out_dir / "ckpt.pt")
    if where.master:
        fresh = ckpt is None and not (args.resume and (out_dir / "results.json").exists())
        searched = fresh and args.resume and (out_dir / "search.pt").exists()  # SSP's search goes on, or is done
        if fresh and args.resume and args.method != adapters.NONE and present and not searched:
            print(f"--resume: {out_dir} has no ckpt.pt (killed before its first checkpoint): starting afresh")
        runs.clean_up(out_dir, fresh, keep=runs.SEARCH_FILES if searched else ())
    return ckpt, held


def check_same_run(saved, settings, inputs, path):
    """--resume continues a checkpoint (ckpt.pt, SSP's search.pt) only with its run's settings and inputs."""
    then, now = spelled_out(saved["settings"]), spelled_out(settings)
    changed = {k: (then.get(k), v) for k, v in now.items() if then.get(k) != v}
    if changed:
        raise UserError(f"cannot --resume {path.parent}: {path.name} was made with other settings, (then, now): "
                        f"{changed}")
    runs.check_inputs(saved.get("inputs"), inputs, path)


def spelled_out(settings):
    """Run settings with their defaults spelled out, so that one run compares equal however it was written: --r
    absent and --r at its default, a --ckpt_dir with and without a trailing slash."""
    settings = dict(settings)
    if settings.get("ckpt_dir"):
        settings["ckpt_dir"] = os.path.normpath(settings["ckpt_dir"])
    method = adapters.METHODS.get(settings.get("method"))
    if method and method.size and settings.get("r") is None:
        settings["r"] = method.default_size or adapters.size_matching_para(read_args(settings.get("ckpt_dir")),
                                                                           settings["method"])
    return settings


def load_data(args, folder, tokenizer, model, where):
    """The splits' records; the training and dev examples tokenized (prompt and target apart, so that training sees
    exactly the prompt ids generation will); the prompts of dev and test for evaluation by generation, cut to leave
    room for max_new_tokens; and that number. Every cut, in any split, is counted and said."""
    splits = {split: load_split(folder, split) for split in ("train", "dev", "test")}
    if args.limit_train:
        splits["train"] = splits["train"][:args.limit_train]
    if args.limit_eval:
        splits["dev"], splits["test"] = splits["dev"][:args.limit_eval], splits["test"][:args.limit_eval]
    if args.method != adapters.NONE and not splits["train"]:
        raise UserError(f"{folder}/train.jsonl is empty, there is nothing to train on (was the task prepared with "
                        "--allow_missing_train?). Give the official training file with --src, or evaluate the base "
                        "model with --method none")
    if args.method != adapters.NONE and not splits["dev"]:
        raise UserError(f"{folder}/dev.jsonl is empty: training keeps the adapter with the lowest dev loss, so it "
                        "needs dev examples")
    max_seq_len = min(args.max_seq_len, model.args.max_seq_len)
    train, cut_train, cut_targets = tokenize(splits["train"], tokenizer, max_seq_len)
    dev, cut_dev, cut_dev_targets = tokenize(splits["dev"], tokenizer, max_seq_len)
    # room for the longest answer seen in training or dev (EOS included); 32 when there is none (SQuAD's test only)
    max_new_tokens = args.max_new_tokens or min(64, max((len(t) for _, t in train + dev), default=32))
    keep = model.args.max_seq_len - max_new_tokens
    prompts, cut_eval = {}, {}
    for split in ("dev", "test") if metric_for(folder) else ():  # a chat task has no score by generation
        ids = [tokenizer.encode(r["prompt"]) for r in splits[split]]
        prompts[split] = [truncate_left(p, keep, tokenizer.bos_id) for p in ids]
        cut_eval[split] = sum(len(p) > keep for p in ids)
    if where.master:
        said = [f"{n} {split} prompts lose tokens from the left to fit {max_seq_len} tokens with their target"
                for split, n in (("train", cut_train), ("dev", cut_dev)) if n]
        said += [f"{n} {split} targets keep only their first {max_seq_len - 2} tokens (--max_seq_len)"
                 for split, n in (("train", cut_targets), ("dev", cut_dev_targets)) if n]
        said += [f"{n} {split} prompts lose tokens from the left to leave {max_new_tokens} new tokens in the model's "
                 f"context of {model.args.max_seq_len} when scored" for split, n in cut_eval.items() if n]
        for line in said:
            print(f"note: {line}")
    return splits, train, dev, prompts, max_new_tokens, cut_train


def attach_adapter(args, model, structure=None):
    """The method's adapter on the frozen model; only its tensors are trainable (full fine-tuning: every weight).
    structure: the one SSP's search chose (search_structure), in place of its flag."""
    for p in model.parameters():
        p.requires_grad_(False)
    if method_of(args) is None:
        return
    settings = adapter_settings(args, model) | ({"structure": structure} if structure else {})
    adapters.add_adapter(model, args.method, **settings)
    adapters.mark_only_adapter_as_trainable(model)
    model.grad_checkpointing = args.grad_checkpointing


def adapter_settings(args, model):
    """The method's settings, from its flags or its defaults (a flag left unset gives none: the method's own)."""
    method, settings = method_of(args), {}
    for flag, setting in method.flags.items():
        value = getattr(args, flag)
        if setting == method.size:
            settings[setting] = value or method.default_size or adapters.size_matching_para(model.args, args.method)
        elif setting is not None and value is not None:
            settings[setting] = value.split(",") if method.settings[setting] is adapters.NAMES else value
    return settings


def searching(args):
    """Whether the run searches its adapter's structure first: SSP, given none."""
    return bool(method_of(args) and method_of(args).searches and args.ssp_structure is None)


def rank_allocator(args, model, total_steps):
    """AdaLoRA's rank allocator (None for every other method): its schedule needs the run's number of steps."""
    if not (method_of(args) and method_of(args).prunes):
        return None
    tinit = round(0.1 * total_steps) if args.adalora_tinit is None else args.adalora_tinit
    tfinal = round(0.3 * total_steps) if args.adalora_tfinal is None else args.adalora_tfinal
    if tinit + tfinal >= total_steps:
        raise UserError(f"AdaLoRA needs steps to prune in: --adalora_tinit {tinit} + --adalora_tfinal {tfinal} "
                        f"must be fewer than the run's {total_steps} steps")
    r = model.adapter_config["r"]
    if args.adalora_target_r >= r:
        raise UserError(f"--adalora_target_r {args.adalora_target_r} must be below the initial rank --r {r}: "
                        "AdaLoRA prunes from one to the other")
    return RankAllocator(model, total_steps, args.adalora_target_r, tinit, tfinal, args.adalora_deltaT,
                         args.adalora_beta, args.adalora_beta)


@dataclass
class Run:
    """What the training loop and the evaluation of one run share."""
    args: argparse.Namespace
    out_dir: Path
    model: torch.nn.Module
    tokenizer: object
    params: dict  # the adapter's trainable tensors by name
    optimizer: Optional[torch.optim.Optimizer]
    allocator: Optional[RankAllocator]  # AdaLoRA's
    autocast: object  # bf16 autocast for bf16 weights, else a no-op
    device: torch.device
    where: "Dist"
    settings: dict  # run_settings: what --resume must find unchanged
    inputs: dict  # runs.fingerprint of the data and the model: what --resume must find unchanged too
    state: RunState
    best: dict  # the adapter best on dev so far, on every process
    log: Optional[object] = None  # log.jsonl, open for appending, on rank 0
    saved_step: Optional[int] = None  # the step of the last checkpoint this process wrote


class Interrupted(UserError):
    """Ctrl-C: where the run's last checkpoint is, and the command that continues it."""

    def __init__(self, run):
        command = shlex.join(["python", *sys.argv] + ["--resume"] * ("--resume" not in sys.argv))
        step = run.saved_step if run.saved_step is not None else run.state.step if run.state.done else None
        kept = f"{run.out_dir / 'ckpt.pt'} holds step {step}" if step is not None else "no checkpoint was written yet"
        super().__init__(f"interrupted at step {run.state.step}: {kept}. Continue with: {command}")


# -----------------------------------------------------------------------------
# the training loop


def train_loop(run, train, dev, seed, batch_size, steps_per_epoch, total_steps):
    """The paper's recipe: AdamW with warmup and linear decay, dev loss every eval_interval steps, early stopping,
    the best adapter on dev kept. One optimizer step per global batch; each process takes every world-th example
    of it and runs them in micro-batches, accumulating gradients (so the step's gradient is the same for any
    micro-batch size and number of processes)."""
    args, state, model, where = run.args, run.state, run.model, run.where
    warmup_steps = math.ceil(args.warmup_ratio * total_steps)
    last_ckpt = time.time()
    pbar = tqdm(total=total_steps, initial=state.step, disable=not where.master or state.done, dynamic_ncols=True,
                desc="train")
    while not state.done:
        t0 = time.time()
        epoch, batch = global_batch(train, seed, state.step, steps_per_epoch, batch_size)
        n_targets = sum(len(t) for _, t in batch)

        # forward and backward, one micro-batch at a time: each adds its summed loss / the batch's target count
        model.train()
        stats = torch.zeros(2, dtype=torch.float64, device=run.device)  # loss, tokens processed
        for micro in my_micro_batches(batch, where, args.micro_batch_size):
            tokens, targets, prompt_len = collate(micro or batch[:1], run.tokenizer.pad_id, run.device)
            with run.autocast:  # an empty micro-batch (FSDP) runs on a stand-in example that counts for nothing
                loss = answer_loss(model, tokens, targets, prompt_len) / n_targets * bool(micro)
            loss.backward()
            stats += torch.tensor([loss.item(), sum(len(p) + len(t) for p, t in micro)], dtype=torch.float64,
                                  device=run.device)
        if run.allocator and where.master:  # AdaLoRA's orthogonality term, once per step (on one process)
            (args.adalora_orth_reg_weight * run.allocator.regularizer()).backward()
        if where.world > 1:
            stats = all_reduce_adapter_grads(run.params, stats)
        loss, n_tokens = stats[0].item(), int(stats[1].item())

        # clip, let AdaLoRA score the step, then AdamW at this step's learning rate
        grad_norm = clip_gradients(run, loss, epoch)
        lr = lr_at(state.step, lr_of(args), warmup_steps, total_steps)
        adamw_step(run, state.step + 1, lr)

        # bookkeeping: the log, the progress bar, and the time and tokens counted in results.json
        state.step += 1
        dt = time.time() - t0
        state.train_time, state.train_tokens = state.train_time + dt, state.train_tokens + n_tokens
        write_log(run, {"step": state.step, "epoch": round(state.step / steps_per_epoch, 4), "loss": loss, "lr": lr,
                        "grad_norm": grad_norm, "tokens_per_s": round(n_tokens / dt, 1)})
        pbar.update(1)
        pbar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{n_tokens / dt:.0f}")

        # dev loss every eval_interval steps and at the end (early stopping), and a checkpoint to resume from
        state.done = state.step >= total_steps
        evaluated = state.step % args.eval_interval == 0 or state.done
        if evaluated:
            evaluate_dev(run, dev, pbar)
        if evaluated or time.time() - last_ckpt >= 60 * args.ckpt_minutes:
            save_checkpoint(run)
            last_ckpt = time.time()
    pbar.close()
    if run.log:
        run.log.close()


def global_batch(train, seed, step, steps_per_epoch, batch_size):
    """(epoch, the examples of optimizer step `step`): the shuffle is a function of (seed, epoch) alone, so the step
    number is the data position (a resumed run takes up the same examples)."""
    epoch, index = divmod(step, steps_per_epoch)
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
    return epoch, [train[i] for i in order[index * batch_size:(index + 1) * batch_size].tolist()]


def adamw_step(run, t, lr):
    """Optimizer step t (1, 2, ...) at learning rate lr, with AdaLoRA's scoring before it and pruning after."""
    if run.allocator:  # AdaLoRA: score every triplet from this step's weights and gradients, before they change
        run.allocator.update(t)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    if run.allocator:  # prune the singular values outside the budget (the optimizer moved them too)
        run.allocator.mask()


def clip_gradients(run, loss, epoch):
    """Clip the adapter's gradient norm (returned); a loss or a norm that is not finite stops the run, unchanged."""
    params = list(run.params.values())
    for p in params:
        if p.grad is None:  # a parameter no example reached (e.g. a process with no examples this step)
            p.grad = torch.zeros_like(p)
    grad_norm = torch.nn.utils.clip_grad_norm_(params, run.args.grad_clip or math.inf).item()
    if not (math.isfinite(loss) and math.isfinite(grad_norm)):
        raise UserError(f"the training loss is {loss} (gradient norm {grad_norm}) at step {run.state.step + 1} "
                        f"(epoch {epoch + 1}): the run is stopped and the adapter was not updated. Try a lower --lr, "
                        f"or --dtype fp32; --resume would restart from the last checkpoint in {run.out_dir}")
    return grad_norm


def evaluate_dev(run, dev, pbar):
    """Dev loss; a new best adapter is kept (and saved), and patience runs out."""
    state, args, where = run.state, run.args, run.where
    total = target_loss(run.model, dev, args.micro_batch_size, run.tokenizer.pad_id, run.device, run.autocast, where)
    if where.world > 1:
        dist.all_reduce(total)
    dev_loss = (total[0] / total[1]).item()
    is_best, state.best_loss, state.bad_evals, stop = early_stopping(dev_loss, state.best_loss, state.bad_evals,
                                                                     args.patience)
    if is_best:
        for n, p in run.params.items():
            run.best[n].copy_(p.detach())
        if where.master and not method_of(args).full:  # a full fine-tune's model is saved once training ends
            adapters.save_adapter(run.model, run.out_dir / "adapter.pt", base=args.ckpt_dir or default_model_path())
    write_log(run, {"step": state.step, "dev_loss": dev_loss, "best_dev_loss": state.best_loss, "is_best": is_best})
    if where.master:  # tqdm.write prints even where the bar is disabled
        pbar.write(f"step {state.step}: dev loss {dev_loss:.4f}" +
                   (" (best)" if is_best else f" ({state.bad_evals} without a better one)"))
        if stop:
            pbar.write(f"early stopping: {args.patience} dev evaluations without a lower dev loss")
    state.done = state.done or stop


# -----------------------------------------------------------------------------
# checkpoints and the log


def restore(run, ckpt):
    """The adapter, AdamW's moments, the allocator and the run state, as they were when ckpt.pt was written; then
    log.jsonl, cut back to what that checkpoint had logged, is opened for appending."""
    if ckpt is not None:
        runs.check_checkpoint(ckpt, run.out_dir / "ckpt.pt", run.params)
        for n, p in run.params.items():
            p.data.copy_(ckpt["adapter"][n])
            run.best[n].copy_(ckpt["best_adapter"][n])
        run.optimizer.load_state_dict(ckpt["optimizer"])
        if run.allocator:
            run.allocator.load_state_dict(ckpt["allocator"])
        run.state = RunState(**ckpt["state"])
        if run.where.master:
            runs.cut_log(run.out_dir / "log.jsonl", ckpt["log_bytes"])  # lines after the checkpoint come again
            print(f"resumed {run.out_dir} at step {run.state.step}" + " (training finished)" * run.state.done)
    if run.where.world > 1:  # every process starts from rank 0's adapter (the same seed gives the same one)
        for p in run.params.values():
            dist.broadcast(p.data, 0)
    # bytes, so that log.tell() is a true offset to truncate to on resume
    run.log = open(run.out_dir / "log.jsonl", "ab") if run.where.master else None


def write_log(run, record):
    if run.log:
        run.log.write((json.dumps(record) + "\n").encode())
        run.log.flush()


def save_checkpoint(run):
    if run.where.master:
        ckpt = {"adapter": {n: p.detach().cpu() for n, p in run.params.items()},
                "best_adapter": {n: t.cpu() for n, t in run.best.items()},
                "optimizer": run.optimizer.state_dict(), "state": asdict(run.state),
                "allocator": run.allocator.state_dict() if run.allocator else None,
                "log_bytes": run.log.tell(), "settings": run.settings, "inputs": run.inputs}
        atomic_write(run.out_dir / "ckpt.pt", lambda tmp: torch.save(ckpt, tmp))
        run.saved_step = run.state.step


def save_model(run):
    """Full fine-tuning's artefact, the model itself with its weights best on dev, as an HF folder (loaders.save)
    that generate.py --ckpt_dir loads. Written once, when training ends (a 7B model is 27 GB in fp32: not at every new
    best; until then ckpt.pt holds the best weights), and atomically: a killed write leaves no half folder, and
    --resume writes it if it is missing."""
    for n, p in run.params.items():
        p.data.copy_(run.best[n])
    if run.where.master and not (run.out_dir / FINE_TUNED).exists():
        atomic_write(run.out_dir / FINE_TUNED, lambda tmp: save(run.model, run.tokenizer, tmp))


# -----------------------------------------------------------------------------
# evaluation by generation


def evaluate(run, splits, prompts, max_new_tokens, folder, to_score):
    """The best adapter generates answers to the prompts of the splits to_score (beam 3 in the paper); their
    metrics. predictions.jsonl keeps the predictions of other splits, scored by an earlier call."""
    args, model, where = run.args, run.model, run.where
    for n, p in run.params.items():
        p.data.copy_(run.best[n])
    model.eval()
    t_eval, metric, results, predictions = time.time(), metric_for(folder), {}, []
    for split in to_score:
        records = splits[split]
        if not records or metric is None:  # SQuAD without its training file has no dev split; a chat task no score
            results[split] = None
            continue
        preds = generate_all(run, prompts[split], max_new_tokens, split, metric.stop)
        results[split] = metric(preds, records)
        predictions += [{"split": split, "id": r.get("id"), "prediction": p, "target": r["target"]}
                        for r, p in zip(records, preds)]
    if where.master:
        path = run.out_dir / "predictions.jsonl"
        earlier = [p for p in map(json.loads, path.read_text().splitlines()) if p["split"] not in to_score] \
            if path.exists() else []
        atomic_write(path, lambda tmp: tmp.write_text(
            "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in earlier + predictions)))
    memory, kind = peak_memory(run.device)
    s = run.state
    return results | {"train_time_s": round(s.train_time, 1), "eval_time_s": round(time.time() - t_eval, 1),
                      "train_tokens_per_s": round(s.train_tokens / s.train_time, 1) if s.train_time else None,
                      "num_beams": args.num_beams, "max_new_tokens": max_new_tokens, "world_size": where.world,
                      "device": str(run.device), "dtype": str(model.output.weight.dtype).removeprefix("torch."),
                      "seed": run.settings["seed"], "settings": run.settings, "peak_memory_bytes": memory,
                      "peak_memory_kind": kind}


def generate_all(run, prompts, max_new_tokens, split, stop):
    """The generated text of every prompt: longest first, in batches of similar length (less left-padding); each
    process takes every world-th batch. Generation stops at EOS, or at `stop` (beyond which the metric reads
    nothing). Under FSDP every process generates every batch, in step with the others: each decode step gathers
    the weights with all of them, and the number of steps depends on the batch."""
    args, where = run.args, run.where
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    batches = [order[i:i + args.eval_batch_size] for i in range(0, len(order), args.eval_batch_size)]
    preds = {}
    mine = batches if where.fsdp else batches[where.rank::where.world]
    for b in tqdm(mine, desc=split, disable=not where.master, dynamic_ncols=True):
        with run.autocast:
            outs = generate(run.model, run.tokenizer, [prompts[i] for i in b], max_new_tokens=max_new_tokens,
                            num_beams=args.num_beams, stop=stop, compile=args.compile)
        preds.update({i: out.text for i, out in zip(b, outs)})  # the text before EOS
    if where.world > 1 and not where.fsdp:
        gathered = [None] * where.world
        dist.all_gather_object(gathered, preds)
        preds = {i: p for part in gathered for i, p in part.items()}
    return [preds[i] for i in range(len(prompts))]


def all_reduce_adapter_grads(params, stats):
    """Sum the adapter's gradients (and the step's loss and token count) over all processes, in one all-reduce of
    one flat buffer, written by hand rather than with DDP's wrapper: a few MB per step, a process with no examples
    in a short last batch still takes part, and the frozen base model is never broadcast or bucketed."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params.values()]
    flat = torch.cat([g.flatten() for g in grads] + [stats.float()])
    dist.all_reduce(flat)
    for p, g in zip(params.values(), torch.split(flat[:-2], [g.numel() for g in grads])):
        p.grad = g.view_as(p)
    return flat[-2:].double()


if __name__ == "__main__":
    try:
        main()
    except Interrupted as e:
        print(f"\n{e}", file=sys.stderr)
        sys.exit(130)
    except UserError as e:
        sys.exit(f"error: {e}")
