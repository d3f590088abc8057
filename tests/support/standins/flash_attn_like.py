"""A torch stand-in for ``flash_attn.flash_attn_varlen_func``: SDPA on each packed sequence.

Same signature and conventions (packed ``(total, H, D)``, int32 ``cu_seqlens``, GQA by head groups,
``causal`` = flash-attn's bottom-right rule); used where the stand-in models import flash-attn.
"""

import torch
import torch.nn.functional as F


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                           deterministic=False, return_attn_probs=False, block_table=None):
    assert dropout_p == 0.0 and not return_attn_probs
    assert cu_seqlens_q.dtype == torch.int32 and cu_seqlens_k.dtype == torch.int32
    out = q.new_zeros(q.shape[0], q.shape[1], v.shape[2])
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    assert max(b - a for a, b in zip(cq, cq[1:])) <= max_seqlen_q
    assert max(b - a for a, b in zip(ck, ck[1:])) <= max_seqlen_k
    for n in range(len(cq) - 1):
        qn, kn, vn = (t.transpose(0, 1)[None] for t in (q[cq[n]:cq[n + 1]], k[ck[n]:ck[n + 1]], v[ck[n]:ck[n + 1]]))
        lq, lk = qn.shape[2], kn.shape[2]
        if lq == 0 or lk == 0:
            continue
        mask = None
        if causal:
            mask = torch.arange(lk)[None, :] <= torch.arange(lq)[:, None] + (lk - lq)
        o = F.scaled_dot_product_attention(qn, kn, vn, attn_mask=mask, scale=softmax_scale,
                                           enable_gqa=qn.shape[1] != kn.shape[1])
        out[cq[n]:cq[n + 1]] = torch.nan_to_num(o[0].transpose(0, 1))
    return out
