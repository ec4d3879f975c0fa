"""How far fp32 rounding alone moves the logits of the test models: the measurement behind the tolerances in
tiny_llama.py. Run it on a new CPU with `python tests/spread.py`.

For each family of test models and several seeds it prints
  spread   max |logits in fp32 - logits of the same weights in fp64|: how far one correct fp32 path lies from the
           exact result, so two correct fp32 paths (ours and HF's, merged and unmerged LoRA, cache and recompute)
           differ by up to about twice this;
  control  max |logits - logits with one key head of the last layer scaled by 1.001|: the smallest real error a
           tolerance must still catch.
(model.py and HF compute RMSNorm and RoPE in fp32 even for fp64 weights, so the fp64 run is exact to about 1e-7 of
the logits' size, well below the fp32 spread.)
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tiny_llama import CONFIGS, WIDE_ARGS, hf_config, random_hf_model, random_model, wide_model  # noqa: E402


def measure(model, tokens):
    """(spread, control, largest logit) of our Transformer or an HF LlamaForCausalLM."""
    hf = not hasattr(model, "layers")
    logits = (lambda x: model(x).logits) if hf else model
    key = model.model.layers[-1].self_attn.k_proj if hf else model.layers[-1].attention.wk
    head_dim = model.config.head_dim if hf else model.args.head_dim
    with torch.no_grad():
        fp32 = logits(tokens)
        model.double()
        fp64 = logits(tokens)
        model.float()
        key.weight[:head_dim] *= 1.001
        control = logits(tokens)
    return (fp32.double() - fp64).abs().max().item(), (fp32 - control).abs().max().item(), fp64.abs().max().item()


def main():
    torch.set_num_threads(2)
    families = {
        "random_model (test_model.py)": lambda seed, name: random_model(CONFIGS[name], 256, seed),
        "random_hf_model (test_load.py)": lambda seed, name: random_hf_model(hf_config(CONFIGS[name], 256), seed),
        "wide_model (test_para.py, test_generate.py)": lambda seed, name: wide_model(WIDE_ARGS, seed),
    }
    print(f"{'family':46} {'spread':>8} {'control':>8} {'max |logit|':>11}")
    for family, build in families.items():
        rows = []
        for seed in range(5):
            for name in ("mha", "gqa"):
                tokens = torch.randint(WIDE_ARGS.vocab_size, (2, 12), generator=torch.Generator().manual_seed(seed))
                rows.append(measure(build(seed, name), tokens))
        spread, control, size = max(r[0] for r in rows), min(r[1] for r in rows), max(r[2] for r in rows)
        print(f"{family:46} {spread:8.1e} {control:8.1e} {size:11.1f}")
    print(f"\nCPU: {cpu_name()}, torch {torch.__version__}")


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        import platform
        return platform.processor()


if __name__ == "__main__":
    main()
