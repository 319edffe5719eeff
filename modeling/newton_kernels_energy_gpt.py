"""Fused Triton kernels for the Newton head rules' second pass, with the plain PyTorch reference beside them.

After the normal attention pass gives `mu_t = sum_i p_ti v_i`, the Newton head rules need, per query t and head,

    newton:        products_t = sum_i p_ti (v_i . mu_t) v_i      (D)     and   second_t = sum_i p_ti ||v_i||^2   (1)
    newton_light:  squares_t  = sum_i p_ti v_i * v_i             (D)

with `p = softmax(scaling * q k^T)` under a causal mask (the queries are the LAST `Tq` of the `S` key positions, as
with a KV cache) and an optional key padding mask. Both are attention-shaped: the kernels follow the flash-attention
pattern (tiles of K and V streamed through on-chip memory with an online softmax; nothing T x S is written to memory;
the backward pass recomputes the probabilities from q, k and the saved log-sum-exp). Accumulation is in fp32; the
tile matmuls take the input dtype (fp32, bf16 or fp16), as flash attention does.

Public API (all tensors (batch, heads, length, head_dim) unless stated):
    newton_second_moments(query, key, value, mean, scaling, key_padding_mask=None) -> (products, second_moment)
    light_second_moment(query, key, value, scaling, key_padding_mask=None) -> squares
    ..._reference(...)                  the same quantities in plain PyTorch, materialising p (tests, fallback)
    fused_kernels_available(tensor)     whether the kernels can run on this tensor's device
    causal_key_padding_mask(attention_mask, q_len, kv_len)   whether a transformers mask is causal + key padding

Conventions: outputs are fp32; a query that sees no key at all (a left-padding position) gets 0 and no gradient.
Gradients flow to query, key, value and mean.

This file ships beside checkpoints as remote code: it imports nothing from the package, and Triton only inside
`try` (the model runs without it, on the PyTorch path).
"""

from __future__ import annotations

import math
import os

import torch


try:  # optional: only the fused kernels need Triton
    import triton
    import triton.language as tl
except ImportError:
    triton = None
    tl = None

# `triton.jit` reads TRITON_INTERPRET when it decorates, i.e. when this module is imported: the mode is fixed here.
KERNELS_INTERPRETED = triton is not None and os.environ.get("TRITON_INTERPRET", "0") == "1"

# Tile sizes (block_m, block_n) per kernel. GPU values follow the flash-attention Triton tutorial for head_dim <= 64;
# they are NOT tuned on a device (no GPU was available when this was written). The interpreter uses small tiles so
# that the tests cross several tiles on short sequences.
GPU_BLOCKS = {"forward": (64, 64), "backward_kv": (32, 64), "backward_q": (64, 32)}
GPU_BLOCKS_LARGE_HEADS = {"forward": (64, 32), "backward_kv": (32, 32), "backward_q": (32, 32)}  # head_dim > 64
INTERPRETER_BLOCKS = {"forward": (16, 16), "backward_kv": (16, 16), "backward_q": (16, 16)}
GPU_NUM_WARPS, GPU_NUM_STAGES = 4, 2
MAX_HEAD_DIM = 256


def fused_kernels_available(tensor: torch.Tensor) -> bool:
    """True when the Triton kernels can run on `tensor`: Triton imports and the tensor is on a GPU, or the tensor is on
    CPU and Triton's interpreter is on (TRITON_INTERPRET=1 both when this module was imported, which decides how the
    kernels are built, and now, which the interpreter needs at launch)."""
    if triton is None:
        return False
    if tensor.device.type == "cuda":
        return True
    return tensor.device.type == "cpu" and KERNELS_INTERPRETED and os.environ.get("TRITON_INTERPRET", "0") == "1"


# ---------------------------------------------------------------------------------------------------------------------
# Masks
# ---------------------------------------------------------------------------------------------------------------------


def causal_visibility(q_len: int, kv_len: int, device: torch.device) -> torch.Tensor:
    """Boolean (q_len, kv_len): True where the query (one of the last `q_len` positions) may see the key."""
    query_positions = torch.arange(kv_len - q_len, kv_len, device=device).unsqueeze(-1)
    return torch.arange(kv_len, device=device) <= query_positions


def causal_key_padding_mask(attention_mask: torch.Tensor | None, q_len: int, kv_len: int
                            ) -> tuple[bool, torch.Tensor | None]:
    """Whether a transformers attention mask is exactly "causal (queries = the last `q_len` of `kv_len` positions) +
    key padding", the only masks the kernels take; if so, also the (batch, kv_len) bool key padding mask (None: none).

    Accepted: `None` (pure causal, as SDPA leaves it), the 2D (batch, >= kv_len) padding mask of flash attention
    (1 / True = real token), and 4D (batch or 1, 1 or heads, q_len, >= kv_len) masks, bool (True = keep) or additive
    float (0 = keep, dtype minimum = masked), that equal causal & key padding. The 4D check reads the mask (one
    device synchronisation); a sliding-window, chunked or document mask returns `(False, None)`.
    """
    if attention_mask is None:
        return True, None
    if not isinstance(attention_mask, torch.Tensor):  # e.g. flex attention's BlockMask
        return False, None
    if attention_mask.ndim == 2:
        if attention_mask.shape[-1] < kv_len:
            return False, None
        return True, attention_mask[:, :kv_len].bool()
    if attention_mask.ndim != 4 or attention_mask.shape[-2] != q_len or attention_mask.shape[-1] < kv_len:
        return False, None
    mask = attention_mask[..., :kv_len]
    if mask.dtype == torch.bool:
        keep = mask
    else:
        keep = mask == 0
        if not bool(((mask == 0) | (mask == torch.finfo(mask.dtype).min)).all()):
            return False, None
    # The last query sees every key except padding: its row is the key padding mask.
    key_padding = keep[:, 0, -1, :]
    expected = causal_visibility(q_len, kv_len, mask.device) & key_padding[:, None, None, :]
    if not bool((keep == expected).all()):
        return False, None
    return True, None if bool(key_padding.all()) else key_padding


def _check_inputs(query, key, value, mean, key_padding_mask) -> torch.Tensor | None:
    """Shapes as documented; returns the key padding mask cut to the key length (or None)."""
    if query.ndim != 4 or key.shape != value.shape or key.ndim != 4:
        raise ValueError(f"query must be (batch, heads, q_len, head_dim) and key / value (batch, heads, kv_len, "
                         f"head_dim) of equal shape, got {tuple(query.shape)}, {tuple(key.shape)}, "
                         f"{tuple(value.shape)}.")
    batch, heads, q_len, head_dim = query.shape
    if key.shape[:2] != (batch, heads) or key.shape[-1] != head_dim or key.shape[2] < q_len:
        raise ValueError(f"key / value {tuple(key.shape)} do not match query {tuple(query.shape)}: same batch, heads "
                         "and head_dim, and at least as many positions as queries (the queries are the last ones).")
    if mean is not None and mean.shape != query.shape:
        raise ValueError(f"mean must have the query's shape {tuple(query.shape)}, got {tuple(mean.shape)}.")
    if key_padding_mask is None:
        return None
    if key_padding_mask.ndim != 2 or key_padding_mask.shape[0] != batch or key_padding_mask.shape[1] < key.shape[2]:
        raise ValueError(f"key_padding_mask must be (batch, >= kv_len) = ({batch}, >= {key.shape[2]}) with True for "
                         f"real tokens, got {tuple(key_padding_mask.shape)}.")
    return key_padding_mask[:, : key.shape[2]].bool()


# ---------------------------------------------------------------------------------------------------------------------
# PyTorch reference (materialises p; fp32)
# ---------------------------------------------------------------------------------------------------------------------


def reference_probabilities(query, key, scaling: float, key_padding_mask=None) -> torch.Tensor:
    """Causal softmax attention weights (batch, heads, q_len, kv_len) in fp32; rows that see no key are 0."""
    key_padding_mask = _check_inputs(query, key, key, None, key_padding_mask)
    scores = torch.matmul(query.float(), key.float().transpose(-1, -2)) * scaling
    visible = causal_visibility(query.shape[2], key.shape[2], query.device)[None, None]
    if key_padding_mask is not None:
        visible = visible & key_padding_mask[:, None, None, :]
    empty = ~visible.any(-1, keepdim=True)
    scores = scores.masked_fill(~visible, float("-inf")).masked_fill(empty, 0.0)
    return torch.softmax(scores, dim=-1).masked_fill(empty, 0.0)


def newton_second_moments_reference(query, key, value, mean, scaling: float, key_padding_mask=None
                                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """`(sum_i p_ti (v_i . mu_t) v_i, sum_i p_ti ||v_i||^2)` in fp32, shapes (B, H, Tq, D) and (B, H, Tq, 1)."""
    _check_inputs(query, key, value, mean, key_padding_mask)
    probs = reference_probabilities(query, key, scaling, key_padding_mask)
    value = value.float()
    products = torch.matmul(probs * torch.matmul(mean.float(), value.transpose(-1, -2)), value)
    return products, torch.matmul(probs, value.square().sum(-1, keepdim=True))


def light_second_moment_reference(query, key, value, scaling: float, key_padding_mask=None) -> torch.Tensor:
    """`sum_i p_ti v_i * v_i` in fp32, shape (B, H, Tq, D)."""
    _check_inputs(query, key, value, None, key_padding_mask)
    return torch.matmul(reference_probabilities(query, key, scaling, key_padding_mask), value.float().square())


# ---------------------------------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _dot(a, b, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
        # UPCAST: Triton's interpreter multiplies bf16 tiles as raw integers (it stores bf16 as uint16), so under the
        # interpreter bf16 tiles go through fp32; bf16 x bf16 products are exact in fp32, so the result is the same
        # as a tensor-core dot up to the summation order.
        if UPCAST:
            return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision=PRECISION)
        return tl.dot(a, b, input_precision=PRECISION)

    @triton.jit
    def _key_tile(K, V, PAD, k_base, v_base, pad_base, stride_kn, stride_kd, stride_vn, stride_vd, stride_pad_n,
                  offs_n, offs_d, S, D, HAS_PAD: tl.constexpr):
        """One (BLOCK_N, BLOCK_D) tile of keys and values (0 outside), and which of its keys are real tokens."""
        tile_mask = (offs_n[:, None] < S) & (offs_d[None, :] < D)
        k = tl.load(K + k_base + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd, mask=tile_mask, other=0.0)
        v = tl.load(V + v_base + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd, mask=tile_mask, other=0.0)
        real = offs_n < S
        if HAS_PAD:
            real = real & (tl.load(PAD + pad_base + offs_n * stride_pad_n, mask=offs_n < S, other=0) != 0)
        return k, v, real

    @triton.jit
    def _forward_tiles(acc, second, m_i, l_i, q, mu, K, V, PAD, k_base, v_base, pad_base,
                       stride_kn, stride_kd, stride_vn, stride_vd, stride_pad_n, query_pos, offs_d, lo, hi, S, D,
                       scale2, PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
                       HAS_PAD: tl.constexpr, LIGHT: tl.constexpr, UPCAST: tl.constexpr):
        """Online-softmax accumulation over key tiles [lo, hi); CAUSAL masks the tiles that cross the diagonal."""
        for start_n in range(lo, hi, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            k, v, real = _key_tile(K, V, PAD, k_base, v_base, pad_base, stride_kn, stride_kd, stride_vn, stride_vd,
                                   stride_pad_n, offs_n, offs_d, S, D, HAS_PAD)
            scores = _dot(q, tl.trans(k), UPCAST, PRECISION) * scale2  # base-2 logits
            visible = real[None, :]
            if CAUSAL:
                visible = visible & (offs_n[None, :] <= query_pos[:, None])
            scores = tl.where(visible, scores, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(scores, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row that has seen no key yet: p = 0, no NaN
            p = tl.math.exp2(scores - m_safe[:, None])
            alpha = tl.math.exp2(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, 1)
            v32 = v.to(tl.float32)
            if LIGHT:
                acc = acc * alpha[:, None] + _dot(p.to(v.dtype), (v32 * v32).to(v.dtype), UPCAST, PRECISION)
            else:
                projections = _dot(mu, tl.trans(v), UPCAST, PRECISION)  # v_i . mu_t
                acc = acc * alpha[:, None] + _dot((p * projections).to(v.dtype), v, UPCAST, PRECISION)
                second = second * alpha + tl.sum(p * tl.sum(v32 * v32, 1)[None, :], 1)
            m_i = m_new
        return acc, second, m_i, l_i

    @triton.jit
    def _second_pass_forward(
        Q, K, V, MU, PAD, OUT, SECOND, LSE,
        stride_qb, stride_qh, stride_qt, stride_qd, stride_kb, stride_kh, stride_kn, stride_kd,
        stride_vb, stride_vh, stride_vn, stride_vd, stride_mb, stride_mh, stride_mt, stride_md,
        stride_pad_b, stride_pad_n,
        H, TQ, S, D, scale2,
        PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        HAS_PAD: tl.constexpr, LIGHT: tl.constexpr, UPCAST: tl.constexpr,
    ):
        pid_m, pid_bh = tl.program_id(0), tl.program_id(1)
        b, h = (pid_bh // H).to(tl.int64), (pid_bh % H).to(tl.int64)
        offset = S - TQ  # absolute position of the first query
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        row_mask = (offs_m[:, None] < TQ) & (offs_d[None, :] < D)
        q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :] * stride_qd,
                    mask=row_mask, other=0.0)
        mu = q  # unused by newton_light
        if not LIGHT:
            mu = tl.load(MU + b * stride_mb + h * stride_mh + offs_m[:, None] * stride_mt + offs_d[None, :] * stride_md,
                         mask=row_mask, other=0.0).to(V.dtype.element_ty)
        k_base, v_base, pad_base = b * stride_kb + h * stride_kh, b * stride_vb + h * stride_vh, b * stride_pad_b

        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        second = tl.zeros([BLOCK_M], dtype=tl.float32)
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        # Keys before the block's first query position are visible to all its rows: no causal mask there.
        first_pos = offset + pid_m * BLOCK_M
        full_end = (first_pos // BLOCK_N) * BLOCK_N
        acc, second, m_i, l_i = _forward_tiles(
            acc, second, m_i, l_i, q, mu, K, V, PAD, k_base, v_base, pad_base, stride_kn, stride_kd, stride_vn,
            stride_vd, stride_pad_n, offset + offs_m, offs_d, 0, full_end, S, D, scale2, PRECISION, BLOCK_N,
            False, HAS_PAD, LIGHT, UPCAST)
        acc, second, m_i, l_i = _forward_tiles(
            acc, second, m_i, l_i, q, mu, K, V, PAD, k_base, v_base, pad_base, stride_kn, stride_kd, stride_vn,
            stride_vd, stride_pad_n, offset + offs_m, offs_d, full_end, tl.minimum(S, first_pos + BLOCK_M), S, D,
            scale2, PRECISION, BLOCK_N, True, HAS_PAD, LIGHT, UPCAST)

        empty = l_i == 0.0  # the query sees no key (left padding): outputs 0, log-sum-exp +inf (so p = 0 backward)
        l_safe = tl.where(empty, 1.0, l_i)
        rows = pid_bh.to(tl.int64) * TQ + offs_m
        tl.store(OUT + rows[:, None] * D + offs_d[None, :], acc / l_safe[:, None], mask=row_mask)
        if not LIGHT:
            tl.store(SECOND + rows, second / l_safe, mask=offs_m < TQ)
        tl.store(LSE + rows, tl.where(empty, float("inf"), m_i + tl.math.log2(l_safe)), mask=offs_m < TQ)

    @triton.jit
    def _backward_kv_tiles(
        dk, dv, dnorm, k, v, squares, norms, real, Q, MU, G, GS, LSE, DELTA, q_base, mu_base, row_base,
        stride_qt, stride_qd, stride_mt, stride_md, offs_n, offs_d, lo, hi, TQ, D, offset, scale2,
        PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, CAUSAL: tl.constexpr, LIGHT: tl.constexpr,
        UPCAST: tl.constexpr,
    ):
        """dk, dv accumulated over query tiles [lo, hi) for one key tile."""
        for start_m in range(lo, hi, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            in_rows = offs_m < TQ
            row_mask = in_rows[:, None] & (offs_d[None, :] < D)
            q = tl.load(Q + q_base + offs_m[:, None] * stride_qt + offs_d[None, :] * stride_qd, mask=row_mask,
                        other=0.0)
            g = tl.load(G + (row_base + offs_m)[:, None] * D + offs_d[None, :], mask=row_mask, other=0.0).to(v.dtype)
            lse = tl.load(LSE + row_base + offs_m, mask=in_rows, other=float("inf"))
            delta = tl.load(DELTA + row_base + offs_m, mask=in_rows, other=0.0)
            visible = real[None, :]
            if CAUSAL:
                visible = visible & (offs_n[None, :] <= (offset + offs_m)[:, None])
            p = tl.where(visible, tl.math.exp2(_dot(q, tl.trans(k), UPCAST, PRECISION) * scale2 - lse[:, None]), 0.0)
            if LIGHT:
                dp = _dot(g, tl.trans(squares), UPCAST, PRECISION)
                dv += _dot(tl.trans(p.to(v.dtype)), g, UPCAST, PRECISION)  # d(squares); times 2v at the end
            else:
                mu = tl.load(MU + mu_base + offs_m[:, None] * stride_mt + offs_d[None, :] * stride_md, mask=row_mask,
                             other=0.0).to(v.dtype)
                gs = tl.load(GS + row_base + offs_m, mask=in_rows, other=0.0)
                projections = _dot(mu, tl.trans(v), UPCAST, PRECISION)  # v_i . mu_t
                g_dot_v = _dot(g, tl.trans(v), UPCAST, PRECISION)  # v_i . g_t
                dv += _dot(tl.trans((p * projections).to(v.dtype)), g, UPCAST, PRECISION)
                dv += _dot(tl.trans((p * g_dot_v).to(v.dtype)), mu, UPCAST, PRECISION)
                dnorm += tl.sum(p * gs[:, None], 0)
                dp = projections * g_dot_v + gs[:, None] * norms[None, :]
            ds = p * (dp - delta[:, None])
            dk += _dot(tl.trans(ds.to(q.dtype)), q, UPCAST, PRECISION)
        return dk, dv, dnorm

    @triton.jit
    def _second_pass_backward_kv(
        Q, K, V, MU, PAD, G, GS, LSE, DELTA, DK, DV,
        stride_qb, stride_qh, stride_qt, stride_qd, stride_kb, stride_kh, stride_kn, stride_kd,
        stride_vb, stride_vh, stride_vn, stride_vd, stride_mb, stride_mh, stride_mt, stride_md,
        stride_pad_b, stride_pad_n,
        H, TQ, S, D, scale2, scaling,
        PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        HAS_PAD: tl.constexpr, LIGHT: tl.constexpr, UPCAST: tl.constexpr,
    ):
        pid_n, pid_bh = tl.program_id(0), tl.program_id(1)
        b, h = (pid_bh // H).to(tl.int64), (pid_bh % H).to(tl.int64)
        offset = S - TQ
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        k, v, real = _key_tile(K, V, PAD, b * stride_kb + h * stride_kh, b * stride_vb + h * stride_vh,
                               b * stride_pad_b, stride_kn, stride_kd, stride_vn, stride_vd, stride_pad_n, offs_n,
                               offs_d, S, D, HAS_PAD)
        v32 = v.to(tl.float32)
        squares = (v32 * v32).to(v.dtype)
        norms = tl.sum(v32 * v32, 1)
        dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        dnorm = tl.zeros([BLOCK_N], dtype=tl.float32)
        q_base, mu_base = b * stride_qb + h * stride_qh, b * stride_mb + h * stride_mh
        row_base = pid_bh.to(tl.int64) * TQ
        # Query t sees key i iff i <= offset + t. Tiles of queries that see the first key of this tile start at lo;
        # from mid on every query of a tile sees every key of this tile (no causal mask).
        first_key = pid_n * BLOCK_N
        lo = (tl.maximum(first_key - offset, 0) // BLOCK_M) * BLOCK_M
        mid = tl.maximum(lo, ((tl.maximum(first_key + BLOCK_N - 1 - offset, 0) + BLOCK_M - 1) // BLOCK_M) * BLOCK_M)
        dk, dv, dnorm = _backward_kv_tiles(
            dk, dv, dnorm, k, v, squares, norms, real, Q, MU, G, GS, LSE, DELTA, q_base, mu_base, row_base,
            stride_qt, stride_qd, stride_mt, stride_md, offs_n, offs_d, lo, tl.minimum(mid, TQ), TQ, D, offset,
            scale2, PRECISION, BLOCK_M, True, LIGHT, UPCAST)
        dk, dv, dnorm = _backward_kv_tiles(
            dk, dv, dnorm, k, v, squares, norms, real, Q, MU, G, GS, LSE, DELTA, q_base, mu_base, row_base,
            stride_qt, stride_qd, stride_mt, stride_md, offs_n, offs_d, mid, TQ, TQ, D, offset,
            scale2, PRECISION, BLOCK_M, False, LIGHT, UPCAST)
        if LIGHT:
            dv = 2.0 * v32 * dv  # d(v*v)/dv
        else:
            dv += 2.0 * dnorm[:, None] * v32  # d||v||^2/dv
        keys = pid_bh.to(tl.int64) * S + offs_n
        tile_mask = (offs_n[:, None] < S) & (offs_d[None, :] < D)
        tl.store(DK + keys[:, None] * D + offs_d[None, :], (dk * scaling).to(DK.dtype.element_ty), mask=tile_mask)
        tl.store(DV + keys[:, None] * D + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=tile_mask)

    @triton.jit
    def _backward_q_tiles(
        dq, dmu, q, mu, g, gs, lse, delta, K, V, PAD, k_base, v_base, pad_base,
        stride_kn, stride_kd, stride_vn, stride_vd, stride_pad_n, query_pos, offs_d, lo, hi, S, D, scale2,
        PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, HAS_PAD: tl.constexpr,
        LIGHT: tl.constexpr, UPCAST: tl.constexpr,
    ):
        """dq, dmu accumulated over key tiles [lo, hi) for one query tile."""
        for start_n in range(lo, hi, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            k, v, real = _key_tile(K, V, PAD, k_base, v_base, pad_base, stride_kn, stride_kd, stride_vn, stride_vd,
                                   stride_pad_n, offs_n, offs_d, S, D, HAS_PAD)
            visible = real[None, :]
            if CAUSAL:
                visible = visible & (offs_n[None, :] <= query_pos[:, None])
            p = tl.where(visible, tl.math.exp2(_dot(q, tl.trans(k), UPCAST, PRECISION) * scale2 - lse[:, None]), 0.0)
            v32 = v.to(tl.float32)
            if LIGHT:
                dp = _dot(g, tl.trans((v32 * v32).to(v.dtype)), UPCAST, PRECISION)
            else:
                projections = _dot(mu, tl.trans(v), UPCAST, PRECISION)
                g_dot_v = _dot(g, tl.trans(v), UPCAST, PRECISION)
                dmu += _dot((p * g_dot_v).to(v.dtype), v, UPCAST, PRECISION)
                dp = projections * g_dot_v + gs[:, None] * tl.sum(v32 * v32, 1)[None, :]
            ds = p * (dp - delta[:, None])
            dq += _dot(ds.to(k.dtype), k, UPCAST, PRECISION)
        return dq, dmu

    @triton.jit
    def _second_pass_backward_q(
        Q, K, V, MU, PAD, G, GS, LSE, DELTA, DQ, DMU,
        stride_qb, stride_qh, stride_qt, stride_qd, stride_kb, stride_kh, stride_kn, stride_kd,
        stride_vb, stride_vh, stride_vn, stride_vd, stride_mb, stride_mh, stride_mt, stride_md,
        stride_pad_b, stride_pad_n,
        H, TQ, S, D, scale2, scaling,
        PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        HAS_PAD: tl.constexpr, LIGHT: tl.constexpr, UPCAST: tl.constexpr,
    ):
        pid_m, pid_bh = tl.program_id(0), tl.program_id(1)
        b, h = (pid_bh // H).to(tl.int64), (pid_bh % H).to(tl.int64)
        offset = S - TQ
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        in_rows = offs_m < TQ
        row_mask = in_rows[:, None] & (offs_d[None, :] < D)
        rows = pid_bh.to(tl.int64) * TQ + offs_m
        q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :] * stride_qd,
                    mask=row_mask, other=0.0)
        g = tl.load(G + rows[:, None] * D + offs_d[None, :], mask=row_mask, other=0.0).to(V.dtype.element_ty)
        lse = tl.load(LSE + rows, mask=in_rows, other=float("inf"))
        delta = tl.load(DELTA + rows, mask=in_rows, other=0.0)
        mu, gs = g, delta  # unused by newton_light
        if not LIGHT:
            mu = tl.load(MU + b * stride_mb + h * stride_mh + offs_m[:, None] * stride_mt + offs_d[None, :] * stride_md,
                         mask=row_mask, other=0.0).to(V.dtype.element_ty)
            gs = tl.load(GS + rows, mask=in_rows, other=0.0)
        dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        dmu = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        k_base, v_base, pad_base = b * stride_kb + h * stride_kh, b * stride_vb + h * stride_vh, b * stride_pad_b
        first_pos = offset + pid_m * BLOCK_M
        full_end = (first_pos // BLOCK_N) * BLOCK_N
        dq, dmu = _backward_q_tiles(
            dq, dmu, q, mu, g, gs, lse, delta, K, V, PAD, k_base, v_base, pad_base, stride_kn, stride_kd,
            stride_vn, stride_vd, stride_pad_n, offset + offs_m, offs_d, 0, full_end, S, D, scale2, PRECISION,
            BLOCK_N, False, HAS_PAD, LIGHT, UPCAST)
        dq, dmu = _backward_q_tiles(
            dq, dmu, q, mu, g, gs, lse, delta, K, V, PAD, k_base, v_base, pad_base, stride_kn, stride_kd,
            stride_vn, stride_vd, stride_pad_n, offset + offs_m, offs_d, full_end,
            tl.minimum(S, first_pos + BLOCK_M), S, D, scale2, PRECISION, BLOCK_N, True, HAS_PAD, LIGHT, UPCAST)
        tl.store(DQ + rows[:, None] * D + offs_d[None, :], (dq * scaling).to(DQ.dtype.element_ty), mask=row_mask)
        if not LIGHT:
            tl.store(DMU + rows[:, None] * D + offs_d[None, :], dmu.to(DMU.dtype.element_ty), mask=row_mask)


# ---------------------------------------------------------------------------------------------------------------------
# Launchers and autograd functions
# ---------------------------------------------------------------------------------------------------------------------


def _blocks(kernel: str, tensor: torch.Tensor, head_dim: int) -> tuple[int, int]:
    if tensor.device.type != "cuda":
        return INTERPRETER_BLOCKS[kernel]
    return (GPU_BLOCKS if head_dim <= 64 else GPU_BLOCKS_LARGE_HEADS)[kernel]


def _launch_options(tensor: torch.Tensor) -> dict:
    """Constexprs and launch options shared by the three kernels."""
    if tensor.dtype == torch.float32:
        # fp32 tiles: TF32 tensor cores only where torch allows them for fp32 matmuls.
        precision = "tf32" if tensor.is_cuda and torch.backends.cuda.matmul.allow_tf32 else "ieee"
    else:
        precision = "tf32"  # ignored for half-precision tiles
    options = {"PRECISION": precision, "UPCAST": KERNELS_INTERPRETED and tensor.dtype == torch.bfloat16}
    if tensor.is_cuda and not KERNELS_INTERPRETED:
        options.update(num_warps=GPU_NUM_WARPS, num_stages=GPU_NUM_STAGES)
    return options


def _strides(*tensors: torch.Tensor) -> list[int]:
    return [stride for tensor in tensors for stride in tensor.stride()]


def _padding(key_padding_mask: torch.Tensor | None, key: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    if key_padding_mask is None:
        return key, [0, 0]  # never read (HAS_PAD=False)
    padding = key_padding_mask.to(torch.int8)
    return padding, list(padding.stride())


def _forward(query, key, value, mean, scaling: float, key_padding_mask, light: bool):
    batch, heads, q_len, head_dim = query.shape
    kv_len = key.shape[2]
    block_m, block_n = _blocks("forward", query, head_dim)
    out = torch.empty(batch, heads, q_len, head_dim, device=query.device, dtype=torch.float32)
    second = torch.empty(batch, heads, q_len, device=query.device, dtype=torch.float32)
    lse = torch.empty(batch, heads, q_len, device=query.device, dtype=torch.float32)
    mean_arg = query if mean is None else mean
    padding, padding_strides = _padding(key_padding_mask, key)
    grid = (triton.cdiv(q_len, block_m), batch * heads)
    _second_pass_forward[grid](
        query, key, value, mean_arg, padding, out, second, lse,
        *_strides(query, key, value, mean_arg), *padding_strides,
        heads, q_len, kv_len, head_dim, scaling * math.log2(math.e),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
        HAS_PAD=key_padding_mask is not None, LIGHT=light, **_launch_options(query),
    )
    return out, second, lse


def _backward(query, key, value, mean, scaling: float, key_padding_mask, grad_out, grad_second, lse, delta,
              light: bool):
    batch, heads, q_len, head_dim = query.shape
    kv_len = key.shape[2]
    mean_arg = query if mean is None else mean
    grad_second = delta if grad_second is None else grad_second  # not read by newton_light
    padding, padding_strides = _padding(key_padding_mask, key)
    dq = torch.empty(query.shape, device=query.device, dtype=query.dtype)
    dk = torch.empty(key.shape, device=key.device, dtype=key.dtype)
    dv = torch.empty(value.shape, device=value.device, dtype=value.dtype)
    dmu = None if mean is None else torch.empty(mean.shape, device=mean.device, dtype=mean.dtype)
    common = dict(BLOCK_D=max(16, triton.next_power_of_2(head_dim)), HAS_PAD=key_padding_mask is not None,
                  LIGHT=light, **_launch_options(query))
    arguments = (*_strides(query, key, value, mean_arg), *padding_strides, heads, q_len, kv_len, head_dim,
                 scaling * math.log2(math.e), scaling)
    block_m, block_n = _blocks("backward_kv", query, head_dim)
    _second_pass_backward_kv[(triton.cdiv(kv_len, block_n), batch * heads)](
        query, key, value, mean_arg, padding, grad_out, grad_second, lse, delta, dk, dv, *arguments,
        BLOCK_M=block_m, BLOCK_N=block_n, **common)
    block_m, block_n = _blocks("backward_q", query, head_dim)
    _second_pass_backward_q[(triton.cdiv(q_len, block_m), batch * heads)](
        query, key, value, mean_arg, padding, grad_out, grad_second, lse, delta, dq, query if dmu is None else dmu,
        *arguments, BLOCK_M=block_m, BLOCK_N=block_n, **common)
    return dq, dk, dv, dmu


class _NewtonSecondMoments(torch.autograd.Function):
    """Fused `(sum_i p_ti (v_i . mu_t) v_i, sum_i p_ti ||v_i||^2)`; backward recomputes p from q, k and the
    log-sum-exp. With `Delta_t = g_t . products_t + h_t second_t` (g, h the incoming gradients):
    dp_ti = (v_i . mu_t)(g_t . v_i) + h_t ||v_i||^2,  ds_ti = p_ti (dp_ti - Delta_t),  dq = scaling ds k,
    dk = scaling ds^T q,  dmu_t = sum_i p_ti (g_t . v_i) v_i,
    dv_i = sum_t p_ti [(v_i . mu_t) g_t + (g_t . v_i) mu_t + 2 h_t v_i]."""

    @staticmethod
    def forward(ctx, query, key, value, mean, scaling, key_padding_mask):
        products, second, lse = _forward(query, key, value, mean, scaling, key_padding_mask, light=False)
        ctx.save_for_backward(query, key, value, mean, key_padding_mask, products, second, lse)
        ctx.scaling = scaling
        return products, second.unsqueeze(-1)

    @staticmethod
    def backward(ctx, grad_products, grad_second):
        query, key, value, mean, key_padding_mask, products, second, lse = ctx.saved_tensors
        grad_products = torch.zeros_like(products) if grad_products is None else grad_products.float().contiguous()
        grad_second = (torch.zeros_like(second) if grad_second is None
                       else grad_second.squeeze(-1).float().contiguous())
        delta = (grad_products * products).sum(-1) + grad_second * second
        dq, dk, dv, dmu = _backward(query, key, value, mean, ctx.scaling, key_padding_mask, grad_products,
                                    grad_second, lse, delta, light=False)
        return dq, dk, dv, dmu, None, None


class _LightSecondMoment(torch.autograd.Function):
    """Fused `sum_i p_ti v_i * v_i`; backward: dp_ti = g_t . (v_i * v_i), Delta_t = g_t . out_t,
    dv_i = 2 v_i * sum_t p_ti g_t, dq / dk as in `_NewtonSecondMoments`."""

    @staticmethod
    def forward(ctx, query, key, value, scaling, key_padding_mask):
        squares, _, lse = _forward(query, key, value, None, scaling, key_padding_mask, light=True)
        ctx.save_for_backward(query, key, value, key_padding_mask, squares, lse)
        ctx.scaling = scaling
        return squares

    @staticmethod
    def backward(ctx, grad_squares):
        query, key, value, key_padding_mask, squares, lse = ctx.saved_tensors
        grad_squares = grad_squares.float().contiguous()
        delta = (grad_squares * squares).sum(-1)
        dq, dk, dv, _ = _backward(query, key, value, None, ctx.scaling, key_padding_mask, grad_squares, None, lse,
                                  delta, light=True)
        return dq, dk, dv, None, None


def _require_kernels(query: torch.Tensor, head_dim: int) -> None:
    if not fused_kernels_available(query):
        raise RuntimeError(
            "The fused Newton kernels need Triton and a CUDA tensor (or, for CPU tensors, TRITON_INTERPRET=1 at import "
            "and at the call); "
            f"got a {query.device.type} tensor with Triton {'installed' if triton else 'not installed'}. Check "
            "`fused_kernels_available(tensor)` first, or use the PyTorch path (`..._reference`)."
        )
    if head_dim > MAX_HEAD_DIM:
        raise ValueError(f"The fused Newton kernels support head_dim <= {MAX_HEAD_DIM}, got {head_dim}.")


def newton_second_moments(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mean: torch.Tensor,
                          scaling: float, key_padding_mask: torch.Tensor | None = None
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused `(sum_i p_ti (v_i . mu_t) v_i, sum_i p_ti ||v_i||^2)` with `p = causal softmax(scaling * q k^T)`.

    query, mean (B, H, Tq, D); key, value (B, H, S, D), S >= Tq, the queries being the last Tq positions (a KV cache);
    any strides; fp32 / bf16 / fp16 (mean may be fp32 with half inputs). key_padding_mask: None or (B, >= S) bool,
    True = real token (only the first S columns are read). Returns fp32 (B, H, Tq, D) and (B, H, Tq, 1);
    differentiable in query, key, value and mean.
    """
    key_padding_mask = _check_inputs(query, key, value, mean, key_padding_mask)
    _require_kernels(query, query.shape[-1])
    if query.numel() == 0:  # nothing to launch
        return newton_second_moments_reference(query, key, value, mean, scaling, key_padding_mask)
    return _NewtonSecondMoments.apply(query, key, value, mean, float(scaling), key_padding_mask)


def light_second_moment(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float,
                        key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Fused `sum_i p_ti v_i * v_i` (fp32, (B, H, Tq, D)); arguments as in `newton_second_moments`."""
    key_padding_mask = _check_inputs(query, key, value, None, key_padding_mask)
    _require_kernels(query, query.shape[-1])
    if query.numel() == 0:
        return light_second_moment_reference(query, key, value, scaling, key_padding_mask)
    return _LightSecondMoment.apply(query, key, value, float(scaling), key_padding_mask)


__all__ = [
    "causal_key_padding_mask",
    "fused_kernels_available",
    "light_second_moment",
    "light_second_moment_reference",
    "newton_second_moments",
    "newton_second_moments_reference",
    "reference_probabilities",
]
