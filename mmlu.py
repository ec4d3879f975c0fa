"""
MMLU (Hendrycks et al. 2021): the base model, or it with an adapter, zero-shot as in the paper's Table 3, or k-shot
from dev, scored as the original MMLU code and lm-evaluation-harness score it.

    python mmlu.py                                           # the small default model, zero-shot, every subject
    python mmlu.py --adapter out/ultrachat-para/adapter.pt --shots 5 --limit 20
    python mmlu.py --ckpt_dir llama-2-7b --adapter ... --src data.tar   # the data offline (data/mmlu/prepare.py)

A question is given as the original code gives it: "The following are multiple choice questions (with answers) about
{subject}.\\n\\n", then k answered examples of the subject's dev set, then the question, its four choices "A. ..."
to "D. ..." and "Answer:". The model's choice is the letter among " A", " B", " C" and " D" whose token has the
highest next-token log-probability. Accuracy per subject, macro-averaged over subjects and micro-averaged over
questions. PARA's vector generator reads the prompt's last token, as for any prompt.
"""
import argparse
import json
import statistics
from collections import defaultdict

import torch

import adapters
import generate
from data.mmlu.prepare import HERE as DATA, prepare
from errors import UserError
from loaders import DTYPES, default_model_path, load, pick_device, resolve_dtype

LETTERS = ("A", "B", "C", "D")


def questions(split, src=None):
    """The prepared split's questions (data/mmlu/prepare.py; prepared on first use, from src offline)."""
    path = DATA / f"{split}.jsonl"
    if src is not None or not path.is_file():
        prepare(src=src)
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def example(q, answered):
    """One question as the original code writes it; with its answer for a k-shot example."""
    text = q["question"] + "".join(f"\n{letter}. {choice}" for letter, choice in zip(LETTERS, q["choices"]))
    return text + "\nAnswer:" + (f" {q['answer']}\n\n" if answered else "")


def prompt_ids(tokenizer, q, shots, context):
    """The ids of a question's prompt with up to len(shots) answered examples, fewer if it would not fit."""
    header = f"The following are multiple choice questions (with answers) about {q['subject'].replace('_', ' ')}.\n\n"
    for k in range(len(shots), -1, -1):  # the original code drops examples until the prompt fits, too
        ids = tokenizer.encode(header + "".join(example(s, True) for s in shots[:k]) + example(q, False))
        if len(ids) < context:
            return ids
    raise UserError(f"a question of {q['subject']} does not fit the model's context of {context} tokens")


def letter_ids(tokenizer):
    """The token of each of " A", " B", " C", " D", which must be one token each."""
    ids = [tokenizer.encode(f" {letter}", bos=False) for letter in LETTERS]
    if any(len(i) != 1 for i in ids):
        raise UserError(f"this tokenizer writes the letters \" A\" .. \" D\" as {ids}, not one token each: MMLU's "
                        "scoring compares one token per letter")
    return [i[0] for i in ids]


@torch.inference_mode()
def choose(model, tokenizer, prompts, batch_size=8):
    """The letter each prompt's next token most likely is, and the four letters' log-probabilities (N, 4)."""
    device, letters, out = model.tok_embeddings.weight.device, letter_ids(tokenizer), []
    for i in range(0, len(prompts), batch_size):
        tokens, pad_len = generate.left_pad(prompts[i:i + batch_size], tokenizer.pad_id, device)
        logits = model(tokens, 0, pad_len=pad_len, last_only=True, **adapters.block_args(model))[:, -1]
        out.append(torch.log_softmax(logits.float(), dim=-1)[:, letters])  # (B, 4)
    logp = torch.cat(out)
    return [LETTERS[i] for i in logp.argmax(-1).tolist()], logp


def evaluate(model, tokenizer, test, dev, shots=0, batch_size=8):
    """{"macro": accuracy averaged over subjects, "micro": over questions, "subjects": {subject: accuracy}}, in %."""
    by_subject = defaultdict(list)
    for q in dev:
        by_subject[q["subject"]].append(q)
    prompts = [prompt_ids(tokenizer, q, by_subject[q["subject"]][:shots], model.args.max_seq_len) for q in test]
    chosen, _ = choose(model, tokenizer, prompts, batch_size)
    right = defaultdict(list)
    for q, c in zip(test, chosen):
        right[q["subject"]].append(c == q["answer"])
    subjects = {s: 100 * sum(r) / len(r) for s, r in sorted(right.items())}
    return {"macro": statistics.mean(subjects.values()), "micro": 100 * sum(c == q["answer"] for q, c in
                                                                             zip(test, chosen)) / len(test),
            "questions": len(test), "shots": shots, "subjects": subjects}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt_dir", help="Meta folder, HF folder or .gguf file (default: the small SmolLM2 model)")
    p.add_argument("--adapter", help="an adapter file (train.py's adapter.pt) of any method; none: the base model")
    p.add_argument("--shots", type=int, default=0, help="answered examples from the subject's dev set (0 to 5)")
    p.add_argument("--split", default="test", choices=("test", "val"), help="the questions scored")
    p.add_argument("--limit", type=int, default=0, help="at most this many questions per subject (0: all)")
    p.add_argument("--subjects", help="comma-separated subjects (default: all 57)")
    p.add_argument("--src", help="MMLU's data.tar or data folder, for offline use (see data/mmlu/prepare.py)")
    p.add_argument("--batch_size", type=int, default=8, help="prompts per forward pass")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("--device", default="auto", help="cuda, mps or cpu (auto: cuda when available)")
    p.add_argument("--dtype", default="auto", choices=DTYPES, help="auto: bf16 on cuda and on CPUs with native bf16")
    args = p.parse_args(argv)
    try:
        if not 0 <= args.shots <= 5 or args.limit < 0 or args.batch_size < 1:
            raise UserError("--shots must lie in [0, 5], --limit be >= 0 and --batch_size >= 1")
        if args.adapter:
            adapters.read_adapter_file(args.adapter)  # before the model loads
        test, dev = questions(args.split, args.src), questions("dev")
        wanted = set(args.subjects.split(",")) if args.subjects else None
        unknown = wanted - {q["subject"] for q in test} if wanted else set()
        if unknown:
            raise UserError(f"--subjects: no subject {', '.join(sorted(unknown))} in MMLU")
        kept, count = [], defaultdict(int)
        for q in test:  # the subjects asked for, at most --limit questions of each
            count[q["subject"]] += 1
            if (not wanted or q["subject"] in wanted) and (not args.limit or count[q["subject"]] <= args.limit):
                kept.append(q)
        test = kept
        device = pick_device(args.device)
        model, tokenizer = load(args.ckpt_dir, device=device, dtype=resolve_dtype(args.dtype, device))
        if args.adapter:
            adapters.load_adapter(model, args.adapter, base=args.ckpt_dir or default_model_path())
        result = evaluate(model, tokenizer, test, dev, args.shots, args.batch_size)
    except UserError as e:
        p.error(str(e))
    if args.json:
        print(json.dumps(result))
        return result
    print("| subject | accuracy |\n|---|---:|")
    print("\n".join(f"| {s.replace('_', ' ')} | {a:.1f} |" for s, a in result["subjects"].items()))
    print(f"\nMMLU, {args.shots}-shot, {result['questions']} questions: {result['macro']:.1f} macro-averaged over "
          f"{len(result['subjects'])} subjects, {result['micro']:.1f} over questions")
    return result


if __name__ == "__main__":
    main()
