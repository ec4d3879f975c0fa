"""
Text generation with a hand-written KV cache.
"""
import torch


class KVCache:
    """Keys and values of every layer, preallocated: (B, nkv, max_len, hd) per layer, written in place.

    Only the nkv key/value heads are stored; attention shares each among nh/nkv query heads after reading.
    """

    def __init__(self, n_layers, batch_size, max_len, n_kv_heads, head_dim, device=None, dtype=torch.float32):
        shape = (batch_size, n_kv_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]

    def update(self, layer_id, start_pos, k, v):
        """Write k, v (B, nkv, T, hd) at [start_pos, start_pos+T); return views of [0, start_pos+T)."""
        end = start_pos + k.shape[2]
        self.k[layer_id][:, :, start_pos:end] = k
        self.v[layer_id][:, :, start_pos:end] = v
        return self.k[layer_id][:, :, :end], self.v[layer_id][:, :, :end]

    def reorder(self, index):
        """Keep rows `index` (LongTensor (B',)) in that order: beam search follows its surviving beams."""
        self.k = [k.index_select(0, index) for k in self.k]
        self.v = [v.index_select(0, index) for v in self.v]
