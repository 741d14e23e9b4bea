"""PyTorch FlexAttention's paged decode on the same data, as a same-run peer.

FlexAttention keeps a paged cache as ``[1, num_kv_heads, n_pages * page_size,
head_dim]`` with a page table in ``torch.nn.attention.experimental.
_paged_attention.PagedAttention``; a logical block mask (``kv_idx < seq_len``)
is converted to physical pages and ``flex_attention`` (compiled) runs the
decode with GQA. The cache is copied into that layout once, outside timing.
Checked on the CPU against inferops' reference (identical outputs).
"""

from __future__ import annotations

import torch


def flex_paged_decode(q, k_cache, v_cache, block_tables, seq_lens):
    """A no-argument callable returning ``[batch, num_q_heads, head_dim]`` (and lse on CUDA)."""
    from torch.nn.attention.experimental._paged_attention import PagedAttention
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    dev = q.device
    P, ps, Hkv, D = k_cache.shape
    B, max_pages = block_tables.shape
    kf = k_cache.permute(2, 0, 1, 3).reshape(1, Hkv, P * ps, D).contiguous()
    vf = v_cache.permute(2, 0, 1, 3).reshape(1, Hkv, P * ps, D).contiguous()
    pa = PagedAttention(P, ps, B, device=str(dev))
    bt = block_tables.long()
    lens = seq_lens.long()
    used = (lens + ps - 1) // ps
    valid = torch.arange(max_pages, device=dev)[None, :] < used[:, None]
    pa.page_table[:, :max_pages] = torch.where(valid, bt, -1)
    rows = torch.arange(B, device=dev)[:, None].expand(B, max_pages)[valid]
    pa.physical_to_logical[rows, bt[valid]] = torch.arange(max_pages, device=dev)[None, :].expand(B, -1)[valid]
    pa.capacity[:] = max_pages * ps

    def live(b, h, q_idx, kv_idx):
        return kv_idx < lens[b]

    logical = create_block_mask(live, B, None, 1, max_pages * ps, device=str(dev), BLOCK_SIZE=(128, ps))
    mask = pa.convert_logical_block_mask(logical, kv_len=lens)
    fa = torch.compile(flex_attention)
    q4 = q[:, :, None, :]
    with_lse = dev.type == "cuda"  # the CPU lowering cannot return the LSE

    def run():
        return fa(q4, kf, vf, block_mask=mask, enable_gqa=True, return_lse=with_lse)

    return run
