"""
Fine-tune LLaMA-2 on one task with PARA (or the (IA)^3 and LoRA baselines), keep the adapter that is best
on dev loss, and report dev and test metrics from generation. The paper's recipe (section 4.3) is the default:

    python train.py --task copa --r 12                   # the small default model, on a CPU laptop
    python train.py --task copa --method none            # zero-shot: the base model, no adapter
    python train.py --task boolq --ckpt_dir llama-2-7b --grad_checkpointing --seeds 1,2,3,4,5
    torchrun --nproc_per_node 8 train.py --task squad --ckpt_dir llama-2-7b --adapter_rank 12 --micro_batch_size 4

Out folder: adapter.pt (best on dev), ckpt.pt (to --resume), log.jsonl (one line per step and per dev
evaluation), predictions.jsonl and results.json. With --seeds, one such folder per seed (seed1/, ...) and a
results.json with each seed and the median.
"""
import argparse
import json
import math
import os
import random
import resource
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

import para
from data import TASKS, load_split, metric_for, prepare_task, resolve_task
from generate import generate
from errors import UserError
from model import load


class RunError(Exception):
    """A problem the user can fix (bad flags, data, out_dir, a diverged run): printed without a traceback."""


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    # task and model
    a("--task", default="copa", help="copa, boolq, squad (prepared on first use), or a folder with train/dev/test.jsonl")
    a("--src", help="folder or zip the task is prepared from, for offline use (see data/<task>/prepare.py)")
    a("--allow_missing_train", action="store_true", help="prepare a task whose --src lacks the training file "
      "(empty train split: only --method none can run on it)")
    a("--ckpt_dir", help="Meta or HF Llama-2 folder, or a .gguf file (default: the small SmolLM2-135M-Instruct)")
    a("--out_dir", help="where the adapter, log and results go (default: out/<task>-<method>)")
    # method
    a("--method", default="para", choices=["para", "ia3", "lora", "none"], help="none: no adapter, evaluate the base model")
    a("--r", "--adapter_rank", type=int, default=12, help="PARA's vector-generator bottleneck, or LoRA's rank. "
      "Under torchrun write --adapter_rank: torchrun's parser takes --r for one of its own --r... options")
    a("--lora_alpha", type=float, default=8.0, help="LoRA scaling is alpha / r (8: PEFT's default)")
    a("--lora_targets", default="wq,wv", help="LoRA's matrices, comma-separated Meta names")
    # the paper's optimisation recipe (section 4.3); the rest are HF Trainer's defaults, as the paper says
    a("--lr", type=float, default=1e-4)
    a("--weight_decay", type=float, default=0.0, help="AdamW's decoupled decay; 0 as in HF's Trainer")
    a("--warmup_ratio", type=float, default=0.06, help="linear warmup over this share of the steps, then linear decay to 0")
    a("--grad_clip", type=float, default=1.0, help="clip the gradient norm (HF's Trainer default); 0 turns it off")
    a("--epochs", type=int, default=10, help="at most this many epochs")
    a("--max_steps", type=int, default=0, help="stop after this many optimizer steps (0: epochs decide)")
    a("--batch_size", type=int, default=0, help="examples per optimizer step (0: 16 under 10k training examples, else 128)")
    a("--micro_batch_size", type=int, default=8, help="examples per forward pass on each process; the rest is "
      "gradient accumulation, so memory is bounded whatever the batch size")
    a("--max_seq_len", type=int, default=2048, help="longer examples lose prompt tokens from the left (counted)")
    a("--eval_interval", type=int, default=200, help="dev loss every this many steps, and at the last one")
    a("--patience", type=int, default=10, help="stop after this many dev evaluations without a lower dev loss")
    a("--ckpt_interval", type=int, default=0, help="also write ckpt.pt every this many steps (it is always written "
      "at each dev evaluation)")
    a("--seed", type=int, default=1)
    a("--seeds", help="comma-separated seeds, one run each, reported with their median (the paper uses five)")
    # evaluation by generation
    a("--num_beams", type=int, default=3, help="beam search width (3 in the paper; 1 is greedy)")
    a("--max_new_tokens", type=int, default=0, help="0: the longest train/dev target with its EOS, at most 64")
    a("--eval_batch_size", type=int, default=16, help="prompts per generation batch")
    a("--limit_eval", type=int, default=0, help="use only the first N dev and test examples (quick runs)")
    # hardware
    a("--device", help="cpu, cuda, cuda:1, ... (default: cuda if available; under torchrun cuda:LOCAL_RANK)")
    a("--dtype", default="auto", choices=["auto", "fp32", "bf16"],
      help="bf16: base weights in bf16 and bf16 autocast, adapter and optimizer in fp32 (auto: bf16 on cuda)")
    a("--grad_checkpointing", action="store_true", help="recompute activations in backward (7B/13B on one GPU)")
    # runs
    a("--resume", action="store_true", help="continue the run in out_dir from its ckpt.pt (fresh start if none)")
    a("--overwrite", action="store_true", help="start afresh even if out_dir holds a run")
    return p.parse_args(argv)

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


def truncate_left(prompt, keep, bos_id):
    """The last `keep` tokens of prompt; a leading BOS stays (Llama 2 always saw one at position 0)."""
    if len(prompt) <= keep:
        return prompt
    if prompt and prompt[0] == bos_id:
        return prompt[:1] + prompt[len(prompt) - keep + 1:]
    return prompt[len(prompt) - keep:]


def tokenize(records, tokenizer, max_seq_len):
    """[(prompt ids, target ids)] and the number of examples shortened to max_seq_len.
    The prompt is encoded alone, with the model's BOS default: exactly the ids generation is given. The target
    ids are the rest of encode(prompt + target), so they are the tokens the model would see in running text,
    plus EOS so that generation learns to stop. An example longer than max_seq_len loses prompt tokens from the
    left (after BOS): the answer and the words just before it matter most."""
    examples, n_truncated = [], 0
    for r in records:
        prompt = tokenizer.encode(r["prompt"])
        full = tokenizer.encode(r["prompt"] + r["target"])
        if full[:len(prompt)] == prompt:
            target = full[len(prompt):]
        else:  # a merge across the boundary (BPE can join the prompt's last characters with the target's first)
            target = tokenizer.encode(r["target"], bos=False)
        target = target[:max_seq_len - 2] + [tokenizer.eos_id]  # a target longer than the window keeps its start
        if len(prompt) + len(target) > max_seq_len:
            prompt = truncate_left(prompt, max_seq_len - len(target), tokenizer.bos_id)
            n_truncated += 1
        examples.append((prompt, target))
    return examples, n_truncated


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
    """Summed cross-entropy of the target tokens; the -100 positions (prompt, padding) count for nothing."""
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="sum")


def target_loss(model, examples, micro_batch_size, pad_id, device, autocast=nullcontext()):
    """(summed cross-entropy, number of target tokens) over examples, float64 on device, without gradients."""
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)
    with torch.no_grad(), autocast:
        for i in range(0, len(examples), micro_batch_size):
            tokens, targets, prompt_len = collate(examples[i:i + micro_batch_size], pad_id, device)
            para.set_rows(model, prompt_len=prompt_len)
            total[0] += loss_sum(model(tokens), targets)
            total[1] += (targets != -100).sum()
    return total


def atomic_write(path, write):
    """write(tmp_path), then rename over path: a crash at any moment leaves either the old file or the new one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path, obj):
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=2) + "\n"))


def peak_memory(device):
    if device.type == "cuda":
        return {"peak_memory_bytes": torch.cuda.max_memory_allocated(device), "peak_memory_kind": "cuda max_memory_allocated"}
    # ru_maxrss is in kilobytes on Linux (bytes on macOS)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    return {"peak_memory_bytes": rss, "peak_memory_kind": "process peak RSS (CPU)"}

# -----------------------------------------------------------------------------


def main(argv=None):
    args = parse_args(argv)
    # several processes under torchrun: one per GPU (or CPU process with gloo), each holding the whole model
    ddp = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    rank, world = (int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])) if ddp else (0, 1)
    if args.device:
        device = torch.device(args.device)
    else:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if ddp and device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    if ddp:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        return run_seeds(args, device, rank, world)
    finally:
        if ddp:
            dist.destroy_process_group()


def run_seeds(args, device, rank, world):
    """One run per seed, then each seed's metrics and their median (the paper reports the median of five)."""
    if args.task in TASKS:
        folder = prepare_task(args.task, src=args.src, allow_missing_train=args.allow_missing_train)
    else:
        folder = resolve_task(args.task)
    out_dir = Path(args.out_dir or os.path.join("out", f"{Path(folder).name}-{args.method}"))
    if not args.seeds:
        return train_and_evaluate(args, args.seed, folder, out_dir, rank, world, device)
    seeds = [int(s) for s in args.seeds.split(",")]
    if (out_dir / "results.json").exists() and not (args.resume or args.overwrite):
        raise RunError(f"{out_dir} holds a finished run (results.json): pass --resume to complete it, --overwrite "
                       "to replace it, or choose another --out_dir")
    results = {seed: train_and_evaluate(args, seed, folder, out_dir / f"seed{seed}", rank, world, device)
               for seed in seeds}
    summary = {"seeds": results}
    for split in ("dev", "test"):
        names = (results[seeds[0]][split] or {}).keys()
        summary[f"{split}_median"] = {k: statistics.median(r[split][k] for r in results.values()) for k in names}
    if rank == 0:
        write_json(out_dir / "results.json", summary)
        for split in ("dev", "test"):
            if not summary[f"{split}_median"]:
                continue
            per_seed = ", ".join(f"seed {s} {next(iter(r[split].values())):.1f}" for s, r in results.items())
            name, value = next(iter(summary[f"{split}_median"].items()))
            print(f"{split} {name}: median {value:.2f} over seeds ({per_seed})")
    return summary


def train_and_evaluate(args, seed, folder, out_dir, rank, world, device):
    master = rank == 0  # only rank 0 prints and writes files
    t_start = time.time()

    # -----------------------------------------------------------------------------
    # the out folder: never silently replace a user's finished or interrupted run
    ckpt_path, results_path, log_path = out_dir / "ckpt.pt", out_dir / "results.json", out_dir / "log.jsonl"
    adapter_path = out_dir / "adapter.pt"
    if not (args.resume or args.overwrite) and (results_path.exists() or ckpt_path.exists()):
        what = "a finished run (results.json)" if results_path.exists() else "an interrupted run (ckpt.pt)"
        raise RunError(f"{out_dir} holds {what}: pass --resume to continue it, --overwrite to replace it, "
                       "or choose another --out_dir")
    if master:
        out_dir.mkdir(parents=True, exist_ok=True)
        for stale in out_dir.glob("*.tmp*"):  # half-written files of a run killed while writing one
            stale.unlink()
        if not args.resume:
            for path in (ckpt_path, results_path, log_path, adapter_path, out_dir / "predictions.jsonl"):
                path.unlink(missing_ok=True)
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True) if args.resume and ckpt_path.exists() else None
    train_settings = {k: getattr(args, k) for k in ("task", "ckpt_dir", "method", "r", "lora_alpha", "lora_targets",
                                                    "lr", "weight_decay", "warmup_ratio", "grad_clip", "epochs",
                                                    "max_steps", "batch_size", "max_seq_len", "eval_interval",
                                                    "patience")} | {"seed": seed, "world_size": world}
    if ckpt is not None and ckpt["settings"] != train_settings:
        changed = {k: (ckpt["settings"].get(k), v) for k, v in train_settings.items() if ckpt["settings"].get(k) != v}
        raise RunError(f"cannot --resume {out_dir}: its run used other settings, (then, now): {changed}")
    if args.resume and results_path.exists():
        if master:
            print(f"{out_dir} is finished: its results.json is kept (--overwrite to run it again)")
        return json.loads(results_path.read_text())

    # -----------------------------------------------------------------------------
    # data: prompt and target tokenized separately, so training and generation see the same prompt ids
    random.seed(seed)
    torch.manual_seed(seed)  # the adapter's initialisation
    model, tokenizer = load(args.ckpt_dir, device=device,
                            dtype={"fp32": torch.float32, "bf16": torch.bfloat16}.get(args.dtype))
    autocast_dtype = next(model.parameters()).dtype  # bf16 weights compute under bf16 autocast
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if autocast_dtype == torch.bfloat16
                else nullcontext())
    splits = {split: load_split(folder, split) for split in ("train", "dev", "test")}
    if args.limit_eval:
        splits["dev"], splits["test"] = splits["dev"][:args.limit_eval], splits["test"][:args.limit_eval]
    if args.method != "none" and not splits["train"]:
        raise RunError(f"{folder}/train.jsonl is empty, there is nothing to train on (was the task prepared with "
                       "--allow_missing_train?). Give the official training file with --src, or evaluate the base "
                       "model with --method none")
    if args.method != "none" and not splits["dev"]:
        raise RunError(f"{folder}/dev.jsonl is empty: training keeps the adapter with the lowest dev loss, so it "
                       "needs dev examples")
    max_seq_len = min(args.max_seq_len, model.args.max_seq_len)
    train, n_truncated = tokenize(splits["train"], tokenizer, max_seq_len)
    dev, n_truncated_dev = tokenize(splits["dev"], tokenizer, max_seq_len)
    if master and (n_truncated or n_truncated_dev):
        print(f"{n_truncated} train and {n_truncated_dev} dev examples are longer than {max_seq_len} tokens: "
              "their prompts lose tokens from the left")
    batch_size = args.batch_size or (16 if len(train) < 10_000 else 128)  # the paper's rule
    steps_per_epoch = math.ceil(len(train) / batch_size)
    total_steps = args.epochs * steps_per_epoch
    if args.max_steps:
        total_steps = min(total_steps, args.max_steps)
    warmup_steps = math.ceil(args.warmup_ratio * total_steps)

    # -----------------------------------------------------------------------------
    # the adapter: only its parameters train, in fp32 whatever the base model's dtype
    for p in model.parameters():
        p.requires_grad_(False)
    if args.method != "none":
        kw = {"alpha": args.lora_alpha, "targets": args.lora_targets.split(",")} if args.method == "lora" else {}
        para.add_adapter(model, method=args.method, r=args.r, **kw)
        para.mark_only_adapter_as_trainable(model)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    for p in params.values():
        p.data = p.data.float()
    n_trainable, n_total = sum(p.numel() for p in params.values()), sum(p.numel() for p in model.parameters())
    model.grad_checkpointing = args.grad_checkpointing
    if master:
        print(f"{args.method}: {n_trainable:,} trainable parameters ({100 * n_trainable / n_total:.3f}% of {n_total:,}); "
              f"{len(train)} train examples, batch {batch_size}, {steps_per_epoch} steps/epoch, at most {total_steps} steps")
    optimizer = torch.optim.AdamW(params.values(), lr=args.lr, weight_decay=args.weight_decay) if params else None

    def dev_loss():
        """Mean cross-entropy per target token over the dev set; each process takes every world-th example."""
        total = target_loss(model, dev[rank::world], args.micro_batch_size, tokenizer.pad_id, device, autocast)
        if world > 1:
            dist.all_reduce(total)
        return (total[0] / total[1]).item()

    # -----------------------------------------------------------------------------
    # resume: the adapter, AdamW's moments, the step (which fixes the data position and the learning rate),
    # early stopping's state, the RNGs and the log, all as they were when ckpt.pt was written
    step, best_loss, bad_evals, done = 0, math.inf, 0, args.method == "none"
    train_time, train_tokens = 0.0, 0
    best = {n: p.detach().clone() for n, p in params.items()}  # the adapter best on dev, on every process
    if ckpt is not None:
        for n, p in params.items():
            p.data.copy_(ckpt["adapter"][n])
            best[n].copy_(ckpt["best_adapter"][n])
        optimizer.load_state_dict(ckpt["optimizer"])
        step, best_loss, bad_evals, done = ckpt["step"], ckpt["best_loss"], ckpt["bad_evals"], ckpt["done"]
        train_time, train_tokens = ckpt["train_time"], ckpt["train_tokens"]
        random.setstate(ckpt["rng"]["python"])
        torch.set_rng_state(ckpt["rng"]["torch"])
        if device.type == "cuda" and ckpt["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(ckpt["rng"]["cuda"], device)
        if master and log_path.exists():
            with open(log_path, "r+b") as f:
                f.truncate(ckpt["log_bytes"])  # lines written after the checkpoint will be written again
            print(f"resumed {out_dir} at step {step}" + (" (training finished)" if done else ""))
    elif args.resume and master and args.method != "none":
        print(f"--resume: {ckpt_path} does not exist, starting afresh")
    if world > 1 and params:
        # every process starts from rank 0's adapter (the same seed gives the same one; this makes it certain)
        for p in params.values():
            dist.broadcast(p.data, 0)
    log = open(log_path, "ab") if master else None  # bytes: log.tell() is a true offset to truncate to on resume

    def write_log(record):
        if log:
            log.write((json.dumps(record) + "\n").encode())
            log.flush()

    def save_checkpoint():
        if not master:
            return
        state = {"adapter": {n: p.detach().cpu() for n, p in params.items()}, "optimizer": optimizer.state_dict(),
                 "best_adapter": {n: t.cpu() for n, t in best.items()},
                 "step": step, "best_loss": best_loss, "bad_evals": bad_evals, "done": done,
                 "train_time": train_time, "train_tokens": train_tokens, "log_bytes": log.tell(), "settings": train_settings,
                 "rng": {"python": random.getstate(), "torch": torch.get_rng_state(),
                         "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}}
        atomic_write(ckpt_path, lambda tmp: torch.save(state, tmp))

    # -----------------------------------------------------------------------------
    # training: one optimizer step per global batch; each process takes every world-th example of the batch
    # and runs it in micro-batches, accumulating gradients
    pbar = tqdm(total=total_steps, initial=step, disable=not master or done, dynamic_ncols=True, desc="train")
    while not done:
        t0 = time.time()
        epoch, index = divmod(step, steps_per_epoch)
        # the shuffle is a function of (seed, epoch) alone, so the step number is the whole data position
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        batch = [train[i] for i in order[index * batch_size:(index + 1) * batch_size].tolist()]
        # the loss is the mean over the global batch's target tokens: each micro-batch adds its sum / that count,
        # so the gradient is the same for any micro-batch size and any number of processes
        n_targets = sum(len(t) for _, t in batch)
        share = batch[rank::world]
        model.train()
        stats = torch.zeros(2, dtype=torch.float64, device=device)  # loss, tokens processed
        for i in range(0, len(share), args.micro_batch_size):
            tokens, targets, prompt_len = collate(share[i:i + args.micro_batch_size], tokenizer.pad_id, device)
            para.set_rows(model, prompt_len=prompt_len)
            with autocast:
                logits = model(tokens)
            loss = loss_sum(logits, targets) / n_targets
            loss.backward()
            stats += torch.tensor([loss.item(), sum(len(p) + len(t) for p, t in share[i:i + args.micro_batch_size])],
                                  dtype=torch.float64, device=device)
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params.values()]
        if world > 1:
            # Only the adapter's gradients travel, summed in one all-reduce of one flat buffer, written by hand
            # rather than with DDP's wrapper: a few MB per step, a process with no examples in a short last batch
            # still takes part, and the frozen base model is never broadcast or bucketed.
            flat = torch.cat([g.flatten() for g in grads] + [stats.float()])
            dist.all_reduce(flat)
            grads = list(torch.split(flat[:-2], [g.numel() for g in grads]))
            stats = flat[-2:].double()
            for p, g in zip(params.values(), grads):
                p.grad = g.view_as(p)
        else:
            for p, g in zip(params.values(), grads):
                p.grad = g
        loss = stats[0].item()
        grad_norm = torch.nn.utils.clip_grad_norm_(params.values(), args.grad_clip or math.inf).item()
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            raise RunError(f"the training loss is {loss} (gradient norm {grad_norm}) at step {step + 1} (epoch "
                           f"{epoch + 1}): the run is stopped and the adapter was not updated. Try a lower --lr, or "
                           f"--dtype fp32; --resume would restart from the last checkpoint in {out_dir}")
        lr = lr_at(step, args.lr, warmup_steps, total_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        dt = time.time() - t0
        train_time, train_tokens = train_time + dt, train_tokens + int(stats[1].item())
        write_log({"step": step, "epoch": round(step / steps_per_epoch, 4), "loss": loss, "lr": lr,
                   "grad_norm": grad_norm, "tokens_per_s": round(stats[1].item() / dt, 1)})
        pbar.update(1)
        pbar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{stats[1].item() / dt:.0f}")

        # dev loss every eval_interval steps and at the end; the best adapter is kept, and patience runs out
        done = step >= total_steps
        if step % args.eval_interval == 0 or done:
            loss_dev = dev_loss()
            is_best, best_loss, bad_evals, stop = early_stopping(loss_dev, best_loss, bad_evals, args.patience)
            if is_best:
                for n, p in params.items():
                    best[n].copy_(p.detach())
                if master:
                    para.save_adapter(model, adapter_path, base=args.ckpt_dir or "SmolLM2-135M-Instruct")
            write_log({"step": step, "dev_loss": loss_dev, "best_dev_loss": best_loss, "is_best": is_best})
            pbar.write(f"step {step}: dev loss {loss_dev:.4f}" + (" (best)" if is_best else f" ({bad_evals} without a better one)"))
            if stop:
                pbar.write(f"early stopping: {args.patience} dev evaluations without a lower dev loss")
                done = True
        if done or step % args.eval_interval == 0 or (args.ckpt_interval and step % args.ckpt_interval == 0):
            save_checkpoint()
    pbar.close()
    if log:
        log.close()

    # -----------------------------------------------------------------------------
    # evaluation: the best adapter generates answers to dev and test prompts (beam 3 in the paper)
    for n, p in params.items():
        p.data.copy_(best[n])
    # room for the longest answer seen in training or dev (EOS included); 32 when there is none (SQuAD's test only)
    max_new_tokens = args.max_new_tokens or min(64, max((len(t) for _, t in train + dev), default=32))
    model.eval()
    t_eval = time.time()
    metric = metric_for(folder)
    results = {}
    predictions = []
    for split in ("dev", "test"):
        records = splits[split]
        if not records:  # SQuAD prepared without its training file has no dev split
            results[split] = None
            continue
        prompts = [truncate_left(tokenizer.encode(r["prompt"]), model.args.max_seq_len - max_new_tokens,
                                 tokenizer.bos_id) for r in records]
        # longest first, in batches of similar length (less left-padding); each process takes every world-th batch
        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
        batches = [order[i:i + args.eval_batch_size] for i in range(0, len(order), args.eval_batch_size)][rank::world]
        preds = {}
        for b in tqdm(batches, desc=split, disable=not master, dynamic_ncols=True):
            with autocast:
                outs = generate(model, tokenizer, [prompts[i] for i in b], max_new_tokens=max_new_tokens,
                                temperature=0, num_beams=args.num_beams)
            preds.update({i: out.text for i, out in zip(b, outs)})  # the text before EOS
        if world > 1:
            gathered = [None] * world
            dist.all_gather_object(gathered, preds)
            preds = {i: p for part in gathered for i, p in part.items()}
        preds = [preds[i] for i in range(len(records))]
        results[split] = metric(preds, records)
        predictions += [{"split": split, "id": r.get("id"), "prediction": p, "target": r["target"]}
                        for r, p in zip(records, preds)]

    # -----------------------------------------------------------------------------
    results |= {"trainable_parameters": n_trainable, "steps": step, "best_dev_loss": best_loss if step else None,
                "train_examples": len(train), "truncated_train_examples": n_truncated, "batch_size": batch_size,
                "train_time_s": round(train_time, 1), "eval_time_s": round(time.time() - t_eval, 1),
                "wall_time_s": round(time.time() - t_start, 1),
                "train_tokens_per_s": round(train_tokens / train_time, 1) if train_time else None,
                "num_beams": args.num_beams, "max_new_tokens": max_new_tokens, "world_size": world,
                "device": str(device), "dtype": str(autocast_dtype).removeprefix("torch."), "seed": seed,
                "settings": train_settings} | peak_memory(device)
    if master:
        atomic_write(out_dir / "predictions.jsonl",
                     lambda tmp: tmp.write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in predictions)))
        write_json(results_path, results)
        print(f"dev {results['dev']}  test {results['test']}  ({out_dir})")
    return results


if __name__ == "__main__":
    try:
        main()
    except (RunError, UserError, OSError, ValueError) as e:
        sys.exit(f"error: {e}")
