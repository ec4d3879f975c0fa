"""
train.py --fsdp: past one GPU. Under torchrun, each process holds 1/N of the frozen base model (PyTorch's FSDP2,
fully_shard), where DDP holds all of it on every GPU: 70B in bf16 is 140 GB, more than any one GPU.

    torchrun --nproc_per_node 8 train.py --fsdp --task boolq --ckpt_dir llama-2-70b --grad_checkpointing

What is sharded, and what is not:
- The base weights are sharded: each block is one FSDP unit, the embedding, final norm and head the root's. A
  block's weights are gathered just before it runs (forward, and backward's recompute), then freed again.
- The adapter is not. It is small even on 70B (PARA: 47M parameters, 0.76 GB in fp32 with its gradients and
  AdamW's two moments, against 140 GB of base), so every process keeps it whole (FSDP's ignored_params), and
  train.py all-reduces its gradients as under DDP. So AdaLoRA's allocator reads full gradients, clipping and
  AdamW are the single-process code, and adapter.pt and ckpt.pt are rank 0's files in the one-process format,
  which generate.py loads on one device.
- Precision: base weights are stored in the run's dtype (bf16 on GPUs: a frozen base needs no fp32 master copy),
  so shards and their all-gathers are half the size; the adapter stays fp32 and runs under the same bf16 autocast
  as a single-GPU run.

Loading: the model is built on the meta device, with the adapter; fully_shard splits it there, and to_empty
allocates each process's own shards only, filled from the checkpoint's rows they cover (a Meta or HF checkpoint is
mapped from disk, so only those rows are read). No process holds the whole model, in memory or on its GPU.
"""
import copy

import torch
import torch.nn as nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from loaders import build_on_meta, is_tied, rope_table, rows


def load_sharded(path, device: torch.device, dtype: torch.dtype, world: int, attach):
    """(model, tokenizer): the model of `path` sharded over `world` processes, with the adapter that attach(model)
    adds to it whole on every process. Call it on every process, after init_process_group."""
    model, state_dict, tokenizer = build_on_meta(path)
    skeleton = copy.deepcopy(model)  # on the meta device: no memory
    model.to(dtype)  # the base weights' dtype, before the adapter (fp32) joins
    if is_tied(state_dict):
        model.output.weight = model.tok_embeddings.weight
    attach(model)  # on the meta device: the adapter's shapes
    adapter = {p for p in model.parameters() if p.requires_grad}
    mesh = init_device_mesh(device.type, (world,))
    for block in model.layers:  # one unit per block: at most one block's weights are gathered at a time
        fully_shard(block, mesh=mesh, ignored_params=adapter)
    fully_shard(model, mesh=mesh, ignored_params=adapter)
    model.to_empty(device=device)  # memory for this process's shards (and the whole adapter), uninitialised

    fresh = fresh_adapter(skeleton, device, dtype, attach)
    with torch.no_grad():
        for name, p in model.named_parameters():  # a tied head is listed once, as tok_embeddings.weight
            if p.requires_grad:  # the adapter (to_empty made new tensors: `adapter` holds the meta ones)
                p.copy_(fresh[name])
                continue
            # FSDP2 gives process k rows [k c, (k + 1) c) of a tensor of n rows, c = ceil(n / world)
            local = p.to_local()
            start = min(mesh.get_local_rank() * -(-p.shape[0] // world), p.shape[0])
            local.copy_(rows(state_dict[name], start, start + len(local)))
    model.freqs_cis = rope_table(model.args, device)
    return model.eval(), tokenizer


def fresh_adapter(skeleton, device, dtype, attach) -> dict:
    """The adapter's initial tensors by name, drawn from the seed as on a loaded model (train.py seeds before it
    loads): attached to the skeleton, a copy of the model whose base tensors become stand-ins, each a zero-stride
    view of one element, with its shape and no memory."""
    for module in skeleton.modules():
        for name, p in module.named_parameters(recurse=False):
            stand_in = torch.zeros((), dtype=dtype, device=device).expand(p.shape)
            module._parameters[name] = nn.Parameter(stand_in, requires_grad=False)
    attach(skeleton)
    return {name: p for name, p in skeleton.named_parameters() if p.requires_grad}
