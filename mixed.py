"""
Adapters of different methods in one batch: serve.py's engine, when its tenants' adapters are not all of one method
and config (say PARA, LoRA and Houlsby tenants, and some asking for the base model).

adapters.py's bank holds n adapters of one method: each adapted projection is one class (LoRABank, ...) whose
tensors are stacked (n, *shape). Here the model holds several such banks at once, one per group (a method and its
config), and a projection may carry the parts of several groups: wv, say, LoRA's and (IA)^3's.

    row b of the batch, adapter_ids[b] (G,): its row in each group's bank, 0 (the identity) but in its tenant's
    y = x W^T                                         the loaded projection, once for every row
    y[rows_g] = adapt_g(x[rows_g], y[rows_g], ...)    for each group g with a part here: its equation, on its
                                                      tenants' rows only, with each row's tensors
    q, v, u *= l_q, l_v, l_u                          for each PARA group, after its projections

Each row so computes its own method's equation and nothing else, as it would in a bank of its own (and as
generate.py computes it alone). PARA's vectors are made for every row at the prefill (a row of another group gets
its row 0, a fresh generator: exactly 1), and multiply every row: a multiply per scaled projection, as cheap as
picking rows out.

Each group's bank is built as adapters.py builds one, on a copy of the model that shares its weights, then its
parts are moved onto the model's own projections and norms.
"""
import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

import adapters
import para
from errors import UserError
from gemma import GemmaBlock
from model import TransformerBlock


class Rows:
    """A batch's rows in the groups' banks: adapter_ids (B, G), each row's row in each group (0: the identity),
    and, for each group g, the rows of the batch that are its tenants', of[g] = (index (k,), their ids (k,)):
    (None, all ids) when every row is, None when no row is. A projection's part of group g runs on those rows only,
    so that a LoRA tenant's rows pay for LoRA and a PARA tenant's for nothing more. Made once per forward
    (adapters.block_args), read by every layer: on a GPU, finding the rows waits for the ids once per group and
    forward, not in every layer."""

    def __init__(self, adapter_ids):
        self.ids = adapter_ids
        self.of, self.shared = [], {}  # shared: group -> every_row(group)
        for ids in adapter_ids.unbind(1):
            mine = ids != 0
            index = None if mine.all() else mine.nonzero()[:, 0]
            self.of.append(None if index is not None and len(index) == 0 else
                           (index, ids if index is None else ids[index]))

    def every_row(self, g):
        """Every row's id in group g: one int when they are all the same (a prefill of one prompt, say), so that
        adapters.per_row reads that row of the bank in place instead of gathering a copy for each row; else (B,).
        Found at the first layer's call, kept for the others."""
        if g not in self.shared:
            ids = self.ids[:, g]
            self.shared[g] = int(ids[0]) if bool((ids == ids[0]).all()) else ids
        return self.shared[g]


class Mixed(adapters.Bank):
    """A loaded projection (or norm) with the parts of several banks: its own output for every row, then each
    group's equation on that group's rows, with each row's tensors. mixed_class makes the class of a given loaded
    module."""

    parts: nn.ModuleList  # the bank layers of the groups with a part here, each with .group, its column of ids

    def forward(self, x, rows: Rows):  # x (B, T, in)
        y = self.base_forward(x)
        for part in self.parts:
            if rows.of[part.group] is None:
                continue
            index, ids = rows.of[part.group]
            tensors = [adapters.per_row(t, ids) for t in part.tensors()]
            if index is None:
                y = part.adapt(x, y, *tensors)
            else:
                y[index] = part.adapt(x[index], y[index], *tensors)
        return y


MIXED_CLASSES = {}


def mixed_class(cls):
    if cls not in MIXED_CLASSES:
        MIXED_CLASSES[cls] = type(f"Mixed{cls.__name__}", (Mixed, cls), {"base_forward": cls.forward})
    return MIXED_CLASSES[cls]


def prompt_vectors(block, a, start_pos, vectors, rows):
    """Each PARA group's (l_q, l_v, l_u), each (B, 1, d), as para.PARABlock.prompt_vectors: computed from the
    normed prompt state a (B, T, D) at the prefill (its last column: the prompts are left-padded), read back from
    the generation's store at a decode step."""
    out = []
    for vg in block.vector_generators:
        key = (block.attention.layer_id, vg.group)
        if isinstance(start_pos, int) and start_pos == 0:
            vectors[key] = vg(a[:, -1], rows.every_row(vg.group))  # every row: the others' vectors are exactly 1
        elif key not in vectors:
            raise RuntimeError("PARA has no vectors for these rows: run their prompt (start_pos=0) before decoding, "
                               "with the same store of vectors")
        out.append(vectors[key])
    return out


class MixedBlock(TransformerBlock):
    """model.py's block with every group's parts: adapters.BankBlock's projections, and PARA's scaling."""

    vector_generators: nn.ModuleList  # the PARA groups' vector generators (banks), each with .group

    def forward(self, x, rot, mask, cache=None, start_pos=0, adapter_ids=None, vectors=None):
        att, ffn, ids, project = self.attention, self.feed_forward, adapter_ids, adapters.project
        a = project(self.attention_norm, x, ids)
        ls = prompt_vectors(self, a, start_pos, vectors, ids)  # each PARA group's vectors, 1 for others' rows
        q, k, v = project(att.wq, a, ids), project(att.wk, a, ids), project(att.wv, a, ids)
        for l_q, l_v, _ in ls:  # Eq. 4, for each PARA group's rows (the others' vectors are 1)
            q, v = para.scale(l_q, q), para.scale(l_v, v)
        h = x + project(att.wo, att.attend(q, k, v, rot, mask, cache, start_pos), ids)
        f = project(self.ffn_norm, h, ids)
        u = project(ffn.w3, f, ids)
        for *_, l_u in ls:  # Eq. 5
            u = para.scale(l_u, u)
        return h + project(ffn.w2, F.silu(project(ffn.w1, f, ids)) * u, ids)


class GemmaMixedBlock(MixedBlock, GemmaBlock):
    """The same on Gemma's block (gemma.GemmaPARABlock and GemmaBankBlock in one)."""

    def forward(self, x, rot, mask, cache=None, start_pos=0, adapter_ids=None, vectors=None):
        att, ffn, ids, project = self.attention, self.feed_forward, adapter_ids, adapters.project
        a = project(self.attention_norm, x, ids)
        ls = prompt_vectors(self, a, start_pos, vectors, ids)  # each PARA group's vectors, 1 for others' rows
        q, k, v = project(att.wq, a, ids), project(att.wk, a, ids), project(att.wv, a, ids)
        for l_q, l_v, _ in ls:
            q, v = para.scale(l_q, q), para.scale(l_v, v)
        h = x + self.post("post_attention_norm", project(att.wo, att.attend(q, k, v, rot, mask, cache, start_pos), ids))
        f = project(self.ffn_norm, h, ids)
        u = project(ffn.w3, f, ids)
        for *_, l_u in ls:
            u = para.scale(l_u, u)
        g = F.gelu(project(ffn.w1, f, ids), approximate="tanh")
        return h + self.post("post_ffn_norm", project(ffn.w2, g * u, ids))


MIXED_BLOCKS = {TransformerBlock: MixedBlock, GemmaBlock: GemmaMixedBlock}


def add_groups(model, groups: list) -> list:
    """Make the model hold a bank per group, in place: groups [(config, n_rows)], config {"method": ..., settings},
    each bank n_rows fresh adapters, each the identity. Returns each bank's tensors by name, (n_rows, *shape) each,
    for the caller to fill. No group: the model stays as it is."""
    if getattr(model, "adapter_config", None):
        raise UserError(f"the model already has a {model.adapter_config['method']} adapter of its own")
    if not groups:
        return []
    for block in model.layers:
        if type(block) not in MIXED_BLOCKS:
            raise UserError(f"adapters of several methods in one batch are not written for {type(block).__name__}")
    # copies of the model's modules that share its weights (the memo maps each one to itself): adapters.py builds
    # each group's bank on one, exactly as on a model of its own, and its adapted modules become the group's parts
    shells = [copy.deepcopy(model, memo={id(t): t for t in [*model.parameters(), *model.buffers()]})
              for _ in groups]
    for block in model.layers:
        block.__class__ = MIXED_BLOCKS[type(block)]
        block.vector_generators = nn.ModuleList()
    tensors = []
    for g, ((config, n_rows), shell) in enumerate(zip(groups, shells)):
        settings = dict(config)
        adapters.add_adapter(shell, settings.pop("method"), n_adapters=max(n_rows, 2), **settings)  # a bank
        tensors.append(adapters.adapter_state_dict(shell))
        if adapters.METHODS[config["method"]].union:  # a union's rows are zeros where a tenant has nothing (a fresh
            with torch.no_grad():  # SSP low-rank adapter is random), and zeros are the identity
                for t in tensors[-1].values():
                    t.zero_()
        for block, theirs in zip(model.layers, shell.layers):
            if isinstance(theirs, para.PARABlock):
                theirs.vector_generator.group = g
                block.vector_generators.append(theirs.vector_generator)
                continue
            for name, part in theirs.named_modules():
                if isinstance(part, adapters.Bank):
                    mine = block.get_submodule(name)
                    if not isinstance(mine, Mixed):
                        mine.__class__ = mixed_class(type(mine))
                        mine.parts = nn.ModuleList()
                    part.group = g
                    mine.parts.append(part)
    model.groups = [config for config, _ in groups]
    return tensors
