"""Reference backend: naive, materialised attention with the GIM backward written out.

This is the specification every other backend is tested against. It materialises
the full ``(B, Hq, Lq, Lk)`` score matrix, so it is for tests and small inputs only.

Semantics (shared by all backends), per batch ``b`` and query head ``h`` with
key/value head ``h // (Hq // Hkv)``::

    S = scale * q @ k^T                               # (Lq, Lk)
    S = softcap * tanh(S / softcap)                   # if softcap
    S = S + mask                                      # additive float 4D mask
    S = -inf where not allowed                        # causal / window / bool masks
    P = softmax(S);  LSE = logsumexp(S)               # fully masked row: P = 0, LSE = -inf
    O = gate[b, h] * (P @ v)

Causal masking is aligned bottom-right as with a KV cache: query ``i`` sits at
position ``i + Lk - Lq`` and sees keys ``j <= i + Lk - Lq``. A sliding window ``W``
further keeps ``j > pos - W`` (and ``j < pos + W`` when not causal).

Backward with GIM settings (temperature T, scales sq, sk, sv); T = 1 and scales 1
give the ordinary gradient::

    dO_u = gate * dO;                dgate = sum(dO * (P @ v))
    dV   = sv * P^T @ dO_u;          dP = dO_u @ v^T
    P_T  = softmax(S / T);           dS = P_T * (dP - rowsum(dP * P_T))
    dS  *= 1 - tanh^2                # if softcap
    dQ   = sq * scale * dS @ k;      dK = sk * scale * dS^T @ q

dK and dV are summed over the query heads that share a key/value head.
"""

from __future__ import annotations

import torch

STATS_IN_FORWARD = False


def allowed_positions(
    lq: int,
    lk: int,
    *,
    causal: bool,
    sliding_window: int | None,
    device: torch.device,
) -> torch.Tensor | None:
    """Boolean ``(Lq, Lk)`` of positions allowed by causality and the window, or None if all are."""
    if not causal and sliding_window is None:
        return None
    query_pos = torch.arange(lq, device=device)[:, None] + (lk - lq)
    key_pos = torch.arange(lk, device=device)[None, :]
    allowed = torch.ones(lq, lk, dtype=torch.bool, device=device)
    if causal:
        allowed &= key_pos <= query_pos
    if sliding_window is not None:
        allowed &= key_pos > query_pos - sliding_window
        if not causal:
            allowed &= key_pos < query_pos + sliding_window
    return allowed


def _scores(q, k, *, scale, softcap, attention_mask, causal, sliding_window, dtype):
    """Masked scores ``S`` (B, Hq, Lq, Lk) in ``dtype`` and the softcap tanh (or None)."""
    batch, hq, lq, _ = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    group = hq // hkv
    qg = q.to(dtype).reshape(batch, hkv, group, lq, -1)
    scores = torch.matmul(qg, k.to(dtype).unsqueeze(2).transpose(-1, -2)) * scale
    scores = scores.reshape(batch, hq, lq, lk)
    tanh = None
    if softcap is not None:
        tanh = torch.tanh(scores / softcap)
        scores = softcap * tanh
    allowed = allowed_positions(lq, lk, causal=causal, sliding_window=sliding_window, device=q.device)
    allowed = None if allowed is None else allowed[None, None]
    if attention_mask is not None:
        if attention_mask.dim() == 2:
            padding = attention_mask.to(torch.bool)[:, None, None, :]
            allowed = padding if allowed is None else allowed & padding
        elif attention_mask.dtype == torch.bool:
            allowed = attention_mask if allowed is None else allowed & attention_mask
        else:
            scores = scores + attention_mask.to(dtype)
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    return scores, tanh


def _softmax(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - lse.unsqueeze(-1))
    return torch.nan_to_num(probs, nan=0.0), lse


def _attend(probs, v):
    batch, hq, lq, lk = probs.shape
    hkv = v.shape[1]
    pg = probs.reshape(batch, hkv, hq // hkv, lq, lk)
    return torch.matmul(pg, v.to(probs.dtype).unsqueeze(2)).reshape(batch, hq, lq, -1)


def _compute_dtype(q: torch.Tensor, upcast: bool) -> torch.dtype:
    if q.dtype == torch.float64:
        return torch.float64
    return torch.float32 if upcast else q.dtype


def forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    attention_mask: torch.Tensor | None,
    gate: torch.Tensor | None,
    causal: bool,
    scale: float,
    sliding_window: int | None,
    softcap: float | None,
    temperature: float,
    want_gim_stats: bool,
    upcast: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns ``(out, lse, o_t, lse_t)``; this backend never computes the GIM stats (empty)."""
    dtype = _compute_dtype(q, upcast)
    scores, _ = _scores(
        q, k, scale=scale, softcap=softcap, attention_mask=attention_mask, causal=causal,
        sliding_window=sliding_window, dtype=dtype,
    )
    probs, lse = _softmax(scores.float() if dtype == torch.float16 or dtype == torch.bfloat16 else scores)
    out = _attend(probs.to(dtype), v)
    if gate is not None:
        out = out * gate.to(dtype)[:, :, None, None]
    return out.to(q.dtype), lse.float(), q.new_empty(0), q.new_empty(0, dtype=torch.float32)


def backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    o_t: torch.Tensor,
    lse_t: torch.Tensor,
    *,
    attention_mask: torch.Tensor | None,
    gate: torch.Tensor | None,
    causal: bool,
    scale: float,
    sliding_window: int | None,
    softcap: float | None,
    temperature: float,
    q_scale: float,
    k_scale: float,
    v_scale: float,
    upcast: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Returns ``(dq, dk, dv, dgate)``; ``dgate`` is None when ``gate`` is None."""
    dtype = _compute_dtype(q, upcast)
    batch, hq, lq, _ = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    group = hq // hkv
    scores, tanh = _scores(
        q, k, scale=scale, softcap=softcap, attention_mask=attention_mask, causal=causal,
        sliding_window=sliding_window, dtype=dtype,
    )
    probs, _ = _softmax(scores)
    probs_t = probs if temperature == 1.0 else _softmax(scores / temperature)[0]
    dout = dout.to(dtype)
    dgate = None
    if gate is not None:
        dgate = (dout * _attend(probs, v)).sum(dim=(-1, -2)).to(gate.dtype)
        dout = dout * gate.to(dtype)[:, :, None, None]
    dout_g = dout.reshape(batch, hkv, group, lq, -1)
    probs_g = probs.reshape(batch, hkv, group, lq, lk)
    dv = torch.matmul(probs_g.transpose(-1, -2), dout_g).sum(dim=2) * v_scale
    dprobs = torch.matmul(dout_g, v.to(dtype).unsqueeze(2).transpose(-1, -2)).reshape(batch, hq, lq, lk)
    dscores = probs_t * (dprobs - (dprobs * probs_t).sum(dim=-1, keepdim=True))
    if tanh is not None:
        dscores = dscores * (1.0 - tanh * tanh)
    dscores_g = dscores.reshape(batch, hkv, group, lq, lk)
    qg = q.to(dtype).reshape(batch, hkv, group, lq, -1)
    dq = torch.matmul(dscores_g, k.to(dtype).unsqueeze(2)).reshape(batch, hq, lq, -1) * (scale * q_scale)
    dk = torch.matmul(dscores_g.transpose(-1, -2), qg).sum(dim=2) * (scale * k_scale)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dgate
