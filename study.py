"""
The results study: every method on one task with the small model, side by side, with confidence intervals.

    python study.py                     # run what is missing (resumable), then write the table and the picture
    python study.py --report            # only the table and the picture, from the runs there are

Each run is one train.py command, printed before it starts, with its own out folder under --out; its
results.json is what that command reproduces. A finished run is skipped and a killed one continues from its
checkpoint (train.py --resume), so the study can be stopped and started again at any time.

The protocol (README, "Results on the small model"):
- every method gets the paper's recipe with the same budget: --train_examples examples, --epochs epochs;
- its learning rate is the one of the lowest dev loss from its grid (--lrs, or the method's own in the registry:
  full fine-tuning's is lower), with seed 1 (the quantity train.py already selects the best checkpoint by: a run
  of the grid trains only, and the chosen one alone is then scored by generation, which costs more than training
  at this budget);
- PARA and the strongest baseline then run --seeds more seeds at their rate (and any method named in
  --more_seeds, such as the static twin, whose difference from PARA is the study's question), the others one;
  the table gives the median over seeds, as the paper does. Full-FT (every weight trained) is the reference row,
  as in the paper's Table 2: never the strongest baseline, which is the strongest parameter-efficient one;
- test F1, EM and their mean (the paper's f1-em), each with a 95% bootstrap interval over test questions, and a
  paired bootstrap interval for PARA minus each method on the same questions (of the median seed's run).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

import adapters
import generate
import train
from data import exact_match_score, f1_score, load_split, resolve_task
from errors import UserError
from loaders import autocast_for, load, pick_device, read_args

ROOT = Path(__file__).resolve().parent

ZERO_SHOT = "zero-shot"
GRID = ["1e-6", "3e-6", "1e-5", "3e-5", "1e-4", "3e-4", "1e-3", "3e-3", "1e-2", "3e-2", "1e-1"]  # half decades


def study_rows(ckpt_dir):
    """name -> (folder name, train.py flags) of every row: the base model zero-shot, every method of the registry at
    the size it is compared at on this model (adapters.compared_size: LoRA's rank and the Houlsby bottleneck match
    PARA's parameter count; "LoRA r=19" and "Houlsby m=15" on SmolLM2-135M), and the variants (the static twin,
    (IA)^3 on exactly PARA's projections: PARA minus its prompt-awareness)."""
    shape = read_args(ckpt_dir)  # the config alone
    rows = {ZERO_SHOT: (ZERO_SHOT, ["--method", adapters.NONE])}
    for method in adapters.METHODS:
        settings = adapters.compared_size(shape, method)
        rows[adapters.label(method, settings)] = (method, train_flags(method, settings))
    for folder, (name, method, settings) in adapters.VARIANTS.items():
        rows[name] = (folder, train_flags(method, settings))
    return rows


def train_flags(method, settings):
    """The train.py flags that attach `method` with `settings` (each setting through the flag that gives it)."""
    flags = ["--method", method]
    for flag, setting in adapters.METHODS[method].flags.items():
        if setting in settings:
            value = settings[setting]
            flags += [f"--{flag}", ",".join(value) if isinstance(value, list) else str(value)]
    return flags


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="squad-small", help="a task with SQuAD answers (squad-small, squad)")
    p.add_argument("--ckpt_dir", help="the base model (default: the small SmolLM2-135M-Instruct)")
    p.add_argument("--out", default="out/study", help="one folder per run below this one")
    p.add_argument("--methods", help="comma-separated rows (default: all): zero-shot, every method at PARA's "
                   "count (\"PARA r=12\", \"LoRA r=19\", ... on SmolLM2), \"static twin\"")
    p.add_argument("--lrs", help="the learning rates tried on dev, with seed 1, for every method: half decades, from "
                   f"{', '.join(GRID)} (default: each method's own, {adapters.STUDY_LRS} for the adapters and lower "
                   "for full fine-tuning: adapters.METHODS)")
    p.add_argument("--grow", action=argparse.BooleanOptionalAction, default=True,
                   help="grow the grid by a half decade past an end that wins (--no-grow: keep it)")
    p.add_argument("--eval_splits", default="dev,test", help="the splits the chosen runs are scored on (test is "
                   "needed for the table)")
    p.add_argument("--seeds", default="1,2,3", help="seeds for PARA and the strongest baseline")
    p.add_argument("--more_seeds", default="", help="comma-separated methods that get --seeds too, e.g. \"static twin\"")
    p.add_argument("--train_examples", type=int, default=1000, help="the training budget: the first N examples (0: all)")
    p.add_argument("--epochs", type=int, default=1, help="epochs over the --train_examples")
    p.add_argument("--eval_interval", type=int, default=16, help="dev loss every this many steps")
    p.add_argument("--extra", default="", help="more train.py flags for every run, e.g. \"--dtype bf16\" (not the "
                   "flags the study sets itself, nor --limit_eval: every method is scored on the same questions)")
    p.add_argument("--report", action="store_true", help="write the table and the picture from the finished runs only")
    p.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples")
    p.add_argument("--prompt_use", action=argparse.BooleanOptionalAction, default=True,
                   help="measure how much PARA's vectors vary across test prompts (loads the model: minutes)")
    args = p.parse_args(argv)
    try:
        check_args(args)
    except UserError as e:
        p.error(str(e))
    args.rows = study_rows(args.ckpt_dir)
    args.para = next(name for name, (folder, _) in args.rows.items() if folder == adapters.PARA)  # "PARA r=12"
    args.methods = args.methods or ",".join(args.rows)
    for flag in ("methods", "more_seeds"):  # comma-separated names -> a list of known names
        setattr(args, flag, [n for n in getattr(args, flag).split(",") if n])
        unknown = [n for n in getattr(args, flag) if n not in args.rows]
        if unknown:
            p.error(f"--{flag}: unknown method {', '.join(map(repr, unknown))}; choose from {', '.join(args.rows)}")
    return args


SET_BY_THE_STUDY = ("--task", "--out_dir", "--seed", "--seeds", "--limit_train", "--epochs", "--eval_interval",
                    "--eval_splits", "--resume", "--overwrite", "--method", "--r", "--adapter_rank", "--lr",
                    "--ckpt_dir", "--ia3_targets", "--limit_eval")


def check_args(args):
    """Refuse, before the first run trains, every flag that would fail later or skew the comparison. Paths are made
    absolute here, once, against the caller's folder: train.py runs there too, so --extra's paths agree."""
    for flag, value, low in (("--train_examples", args.train_examples, 0), ("--epochs", args.epochs, 1),
                             ("--eval_interval", args.eval_interval, 1), ("--bootstrap", args.bootstrap, 1)):
        if value < low:
            raise UserError(f"{flag} must be at least {low}, got {value}")
    off_grid = [lr for lr in (args.lrs or "").split(",") if lr and lr not in GRID]
    if off_grid:
        raise UserError(f"--lrs {args.lrs}: {', '.join(off_grid)} is not a half decade of the grid; choose from "
                        f"{', '.join(GRID)}")
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        raise UserError(f"--seeds must be comma-separated whole numbers, like 1,2,3; got {args.seeds!r}") from None
    if len(set(seeds)) < len(seeds) or 1 not in seeds:
        raise UserError(f"--seeds {args.seeds} must name each seed once, seed 1 among them (the grid runs at seed 1)")
    if "test" not in args.eval_splits.split(",") or not set(args.eval_splits.split(",")) <= {"dev", "test"}:
        raise UserError(f"--eval_splits takes dev,test or test (the table reads test), got {args.eval_splits}")
    extra = args.extra.split()
    taken = [f for f in extra if f.split("=")[0] in SET_BY_THE_STUDY]
    if taken:
        raise UserError(f"--extra sets {', '.join(taken)}, which the study sets itself (or which would score the "
                        "methods on different questions): use the study's own flag")
    try:
        train.parser().parse_args(["--task", "copa", *extra])  # unknown flags and bad values, before any run
    except SystemExit:
        raise UserError(f"--extra {args.extra!r}: train.py refuses these flags (its message is above)") from None
    args.out = os.path.abspath(args.out)
    if os.path.exists(args.task):
        args.task = os.path.abspath(args.task)
    if args.ckpt_dir:
        args.ckpt_dir = os.path.abspath(args.ckpt_dir)


def run_dir(args, name, lr, seed):
    folder = args.rows[name][0]
    return Path(args.out) / (folder if name == ZERO_SHOT else f"{folder}-lr{lr}-seed{seed}")


def command(args, name, lr, seed, eval_splits):
    """The train.py command of one run."""
    cmd = [sys.executable, str(ROOT / "train.py"), "--task", args.task, "--out_dir", str(run_dir(args, name, lr, seed)),
           "--seed", str(seed), "--limit_train", str(args.train_examples), "--epochs", str(args.epochs),
           "--eval_interval", str(args.eval_interval), "--eval_splits", eval_splits, "--resume", *args.rows[name][1],
           *args.extra.split()]
    if name != ZERO_SHOT:
        cmd += ["--lr", lr]
    return cmd + (["--ckpt_dir", args.ckpt_dir] if args.ckpt_dir else [])


def results(args, name, lr, seed):
    path = run_dir(args, name, lr, seed) / "results.json"
    return json.loads(path.read_text()) if path.exists() else None


def run(args, name, lr, seed, eval_splits="none"):
    """The run's results, running it (or the rest of it, or the scoring of eval_splits) first unless --report."""
    done = results(args, name, lr, seed)
    wanted = set() if eval_splits == "none" else set(eval_splits.split(","))
    if (done is None or wanted - set(done.get("eval_splits", []))) and not args.report:
        cmd = command(args, name, lr, seed, eval_splits)
        print("$ python " + " ".join(cmd[1:]), flush=True)
        if subprocess.run(cmd).returncode:  # in the caller's folder, as every path was resolved against it
            raise UserError(f"the train.py command above failed (its message is above); fix it, then run the study "
                            "again: finished runs are kept")
    return results(args, name, lr, seed)


def method_of_row(args, name):
    """The registry's entry of a row's method (a variant's too); None for the zero-shot row."""
    folder = args.rows[name][0]
    return adapters.METHODS.get(adapters.VARIANTS[folder][1] if folder in adapters.VARIANTS else folder)


def best_lr(args, name):
    """The learning rate of the lowest dev loss at seed 1 (None while a run is missing). With --grow, when the
    best is at an end of the grid, the grid grows by the next half decade on that side, so that no method is
    held at an edge."""
    lrs = (args.lrs or method_of_row(args, name).lrs).split(",")
    while True:
        grid = {lr: run(args, name, lr, 1) for lr in lrs}
        if any(r is None for r in grid.values()):
            return None
        best = min(grid, key=lambda lr: grid[lr]["best_dev_loss"])
        i = GRID.index(best)
        if args.grow and best == lrs[-1] and i + 1 < len(GRID):
            lrs.append(GRID[i + 1])
        elif args.grow and best == lrs[0] and i > 0:
            lrs.insert(0, GRID[i - 1])
        else:
            return best


# -----------------------------------------------------------------------------
# per-question scores and bootstrap intervals


def question_scores(run_folder, answers):
    """{"f1": (N,), "em": (N,)} in percent, per test question, from a run's predictions.jsonl."""
    preds = {}
    for line in (run_folder / "predictions.jsonl").read_text().splitlines():
        p = json.loads(line)
        if p["split"] == "test":
            preds[p["id"]] = p["prediction"].strip().split("\n")[0]  # the first line, as train.py scores it
    f1 = [100 * max(f1_score(preds[i], a) for a in gold) for i, gold in answers.items()]
    em = [100 * max(exact_match_score(preds[i], a) for a in gold) for i, gold in answers.items()]
    return {"f1": np.array(f1), "em": np.array(em), "f1-em": (np.array(f1) + np.array(em)) / 2}


def bootstrap(values, n, seed=0):
    """95% percentile interval of the mean of values (N,) over n resamples of the questions."""
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(n, len(values)))].mean(axis=1)
    return np.percentile(means, [2.5, 97.5])


def fmt(mean, interval):
    return f"{mean:.1f} ({interval[0]:.1f} - {interval[1]:.1f})"


# -----------------------------------------------------------------------------


def main(argv=None):
    args = parse_args(argv)
    chosen = {}  # name -> (lr, [seeds])
    for name in args.methods:
        lr = "-" if name == ZERO_SHOT else best_lr(args, name)
        chosen[name] = (lr, [1]) if lr and scored(run(args, name, lr, 1, args.eval_splits)) else None
    # more seeds for PARA and the strongest other method (the lowest dev loss at its chosen rate)
    dev_loss = {n: results(args, n, c[0], 1)["best_dev_loss"] for n, c in chosen.items()
                if c and n not in (ZERO_SHOT, args.para) and not method_of_row(args, n).full}  # Full-FT: a reference
    strongest = min(dev_loss, key=dev_loss.get) if dev_loss else None
    for name in dict.fromkeys([args.para, strongest, *args.more_seeds]):
        if name in chosen and chosen[name]:
            lr = chosen[name][0]
            seeds = [int(s) for s in args.seeds.split(",")]
            done = [s for s in seeds if scored(run(args, name, lr, s, args.eval_splits))]
            chosen[name] = (lr, done)
    report(args, {n: c for n, c in chosen.items() if c}, strongest)


def scored(result):
    """Whether a run's results hold test metrics."""
    return bool(result) and result.get("test") is not None


def report(args, chosen, strongest):
    """The markdown table (study.md in --out) and the loss curves (study.png in --out)."""
    test = load_split(resolve_task(args.task), "test")
    answers = {r["id"]: r["answers"] for r in test}
    rows, scores = [], {}
    for name, (lr, seeds) in chosen.items():
        runs = {s: results(args, name, lr, s) for s in seeds}
        median_seed = sorted(seeds, key=lambda s: runs[s]["test"]["f1-em"])[len(seeds) // 2]
        scores[name] = question_scores(run_dir(args, name, lr, median_seed), answers)
        r = runs[median_seed]
        row = {"method": name, "params": f"{r['trainable_parameters']:,}", "lr": lr, "seeds": len(seeds)}
        for metric in ("f1", "em", "f1-em"):
            median = statistics.median(x["test"][metric] for x in runs.values())
            row[f"test {metric}"] = fmt(median, bootstrap(scores[name][metric], args.bootstrap))
        row["test f1 by seed"] = ", ".join(f"{runs[s]['test']['f1']:.1f}" for s in seeds)
        row["dev loss"] = f"{r['best_dev_loss']:.3f}" if r["best_dev_loss"] else "-"
        row["dev f1"] = f"{statistics.median(x['dev']['f1'] for x in runs.values()):.1f}" if r["dev"] else "-"
        first = runs[seeds[0]]  # costs from the first seed, which every method has (speeds compared: bench.py)
        row["train tok/s"] = first["train_tokens_per_s"] or "-"
        row["train min"] = f"{first['train_time_s'] / 60:.1f}"
        row["wall min"] = f"{first['wall_time_s'] / 60:.1f}"
        row["peak MiB"] = f"{first['peak_memory_bytes'] / 2**20:.0f}"
        rows.append(row)
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    lines += ["| " + " | ".join(str(v) for v in row.values()) + " |" for row in rows]
    if args.para in scores:
        lines += ["", "| PARA minus | test F1 (95% paired CI) | test EM | test f1-em |", "|---|---|---|---|"]
        for name in scores:
            if name != args.para:
                diffs = {m: scores[args.para][m] - scores[name][m] for m in ("f1", "em", "f1-em")}
                lines.append(f"| {name} | " + " | ".join(fmt(d.mean(), bootstrap(d, args.bootstrap)) for d in diffs.values())
                             + " |")
    table = "\n".join(lines)
    note = (f"\n\n{len(test):,} test questions; intervals: 95% bootstrap over questions ({args.bootstrap} resamples), "
            f"of the median seed's run. Strongest baseline (lowest dev loss): {strongest}.\n")
    if args.para in chosen and args.prompt_use:
        table += "\n\n" + prompt_use(args, *chosen[args.para])
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "study.md").write_text(table + note)
    print(table + note)
    plot(args, chosen, Path(args.out) / "study.png")


# -----------------------------------------------------------------------------
# Does PARA use the prompt? Its vectors on every test prompt: how much they vary from prompt to prompt, against
# how far they moved from 1 in the same way for every prompt (which the static twin could do as well)

VECTORS = ("l_q", "l_v", "l_u")


@torch.no_grad()
def vector_statistics(model, tokenizer, prompts, batch=16):
    """{layer: [(sum, sum of squares, n) of l_q, of l_v, of l_u over the prompts]}, each sum (d,) in float64."""
    stats = {}
    device = model.tok_embeddings.weight.device
    for i in range(0, len(prompts), batch):
        tokens, pad_len = generate.left_pad(prompts[i:i + batch], tokenizer.pad_id, device)
        store = {}  # para.PARABlock fills it at start_pos 0: each row's vectors, from its last prompt token
        model(tokens, 0, pad_len=pad_len, last_only=True, **adapters.block_args(model, vectors=store))
        for layer, vectors in store.items():
            sums = stats.setdefault(layer, [[0.0, 0.0, 0] for _ in VECTORS])
            for acc, l in zip(sums, vectors):
                l = l[:, 0].double()  # (B, d)
                acc[0], acc[1], acc[2] = acc[0] + l.sum(0), acc[1] + (l * l).sum(0), acc[2] + len(l)
    return stats


def prompt_use(args, lr, seeds):
    """For each of PARA's runs: per layer and vector, the across-prompt spread (the mean over dimensions of the
    standard deviation across test prompts) and the static part (the mean over dimensions of |mean over prompts -
    1|), their ratio, and a picture (prompt_use.png). A ratio near 0 means PARA behaved as its static twin."""
    test = load_split(resolve_task(args.task), "test")
    lines = ["| PARA run | vector | spread across prompts | static part, mean abs(mean - 1) | spread / static | "
             "layers |", "|---|---|---|---|---|---|"]
    curves, device = {}, pick_device()  # a GPU where there is one
    for seed in seeds:
        folder = run_dir(args, args.para, lr, seed)
        run = json.loads((folder / "results.json").read_text())
        # the vectors as the run scored its test prompts: its weights' dtype, and bf16 autocast for bf16 weights
        dtype = getattr(torch, run["dtype"])
        model, tokenizer = load(args.ckpt_dir, device=device, dtype=dtype)
        adapters.load_adapter(model, folder / "adapter.pt")
        keep = model.args.max_seq_len - run["max_new_tokens"]
        prompts = [generate.truncate_left(tokenizer.encode(r["prompt"]), keep, tokenizer.bos_id) for r in test]
        prompts.sort(key=len)  # batches of like lengths pad little; the sums do not depend on the order
        with autocast_for(device, dtype):
            stats = vector_statistics(model, tokenizer, prompts)
        layers = sorted(stats)
        for v, name in enumerate(VECTORS):
            spread, static = [], []
            for layer in layers:
                total, squares, n = stats[layer][v]
                mean = total / n
                spread.append((squares / n - mean * mean).clamp(min=0).sqrt().mean().item())
                static.append((mean - 1).abs().mean().item())
            curves[seed, name] = (spread, static)
            s, m = statistics.mean(spread), statistics.mean(static)
            lines.append(f"| seed {seed} | {name} | {s:.4f} | {m:.4f} | {s / m:.2f} | {len(layers)} |")
    plot_prompt_use(curves, Path(args.out) / "prompt_use.png")
    return ("Does PARA use the prompt? Its vectors on every test prompt, averaged over layers (per layer: "
            "prompt_use.png):\n\n" + "\n".join(lines))


def plot_prompt_use(curves, path):
    """Per layer, the spread across prompts (solid) and the static part (dashed) of each vector, for each seed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, len(VECTORS), figsize=(15, 4), dpi=100, sharey=True)
    for ax, name in zip(axes, VECTORS):
        for (seed, vector), (spread, static) in curves.items():
            if vector == name:
                line, = ax.plot(spread, label=f"seed {seed}: spread across prompts")
                ax.plot(static, linestyle="--", color=line.get_color(), label=f"seed {seed}: abs(mean - 1)")
        ax.set(title=name, xlabel="layer", yscale="log")
    axes[0].set_ylabel("mean over dimensions")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    print(f"wrote {path}")


def plot(args, chosen, path):
    """Train loss (a moving average) and dev loss against step, one line per method (its seed 1 run), and the
    best dev loss against the learning rate over each method's grid (seed 1), where its rate was chosen."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install matplotlib): no picture")
        return
    fig, (ax_train, ax_dev, ax_lr) = plt.subplots(1, 3, figsize=(15, 4), dpi=100, sharey=True)
    for name, (lr, _) in chosen.items():
        if name == ZERO_SHOT:
            continue
        log = [json.loads(line) for line in (run_dir(args, name, lr, 1) / "log.jsonl").read_text().splitlines()]
        steps = [r for r in log if "loss" in r]
        w = min(8, len(steps))  # an 8-step moving average
        losses = np.convolve([r["loss"] for r in steps], np.ones(w) / w, mode="valid")
        ax_train.plot([r["step"] for r in steps][w - 1:], losses, label=f"{name} (lr {lr})")
        evals = [r for r in log if "dev_loss" in r]
        ax_dev.plot([r["step"] for r in evals], [r["dev_loss"] for r in evals], marker="o", label=name)
        grid = [(float(rate), r) for rate in GRID if (r := results(args, name, rate, 1))]  # every rate tried
        top = 1.0  # a diverged or barely moved rate, drawn at the top edge so that the others stay readable
        ax_lr.plot([rate for rate, _ in grid], [min(r["best_dev_loss"], top) for _, r in grid], marker="o")
        ax_lr.plot(float(lr), results(args, name, lr, 1)["best_dev_loss"], marker="*", markersize=14, color="black")
    ax_train.set(title="train loss (8-step moving average)", xlabel="step", ylabel="loss per target token")
    ax_dev.set(title="dev loss", xlabel="step", xlim=(0, None))
    ax_lr.set(title="best dev loss by learning rate (seed 1; * chosen)", xlabel="learning rate", xscale="log")
    ax_train.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    print(f"wrote {path} ({os.path.getsize(path) / 1024:.0f} KiB)")


if __name__ == "__main__":
    try:
        main()
    except UserError as e:
        sys.exit(f"error: {e}")
