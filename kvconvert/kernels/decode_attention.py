# Grid (B, NUM_SPLITS, cdiv(H, BLOCK_H)): split-K flash-decoding of absorbed latent attention (MQA over one latent
# stream). Each program takes all query heads of one batch row (up to 64; more heads tile over the third grid axis)
# against one chunk of cached positions, dequantizes the latent (and rope) tile in registers once for all heads,
# runs an fp32 online softmax (exp2, log2e folded into the scale) and writes a partial output and its log-sum-exp;
# a second kernel, grid (B, H), merges the splits. A tile is (BLOCK_T, columns), one row per position: the latent
# is both the keys (scores = q_lat · cᵀ) and the values (acc += p · c), so the one dequantized tile feeds both dots.
# A latent with a low-precision tail is two streams: a second tile, dot pair and accumulator, its output columns
# after the head's. Tile loads: every stored byte once, row-contiguous (int4 nibbles, 2-bit crumbs split and
# interleaved in registers), one (scale, zero) per position and quant group broadcast over the group. The widths are
# compile-time constants, so the column masks fold and the loads vectorize for any width (a runtime width vectorizes
# only where the JIT sees it divisible by 16). Per-value byte/scale/zero loads (`gather=True`, kept to compare) read
# a small share of the copy bandwidth: bench/kernels.py --sweep measures both on a GPU.
# Rope keys from the latent (HAS_ROPE_UP, kernels.RopeUp): the layer's rope_up rows (real and imaginary parts of each
# frequency pair apart) are loaded once per program and stay on chip (the compiler keeps them in shared memory
# across the loop); per tile the dequantized latent (head and tail) makes the keys with two more dot pairs, which
# are rotated at each slot's position (its own, a wrapped ring's, or a cache policy's, computed or read in the
# kernel) and scored: nothing the size of the cache is written. Per slot and layer that is 2·R·Wr FLOPs against the
# slot's few dozen bytes: compute-bound on every GPU (docs/design.md, "The runtime").
"""Triton decode attention over the quantized latent cache: `latent_decode_triton`, same semantics as
`latent_decode_ref` (reference.py). CUDA-graph safe: the grid depends on shapes and the cache capacity only (or a
host-side bound on the filled slots, `filled`), the valid range of every row is read from `seq_lens` inside the
kernel, and the launcher never syncs with the host."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ..cache_layout import Stream
from .reference import RopeUp

_DOT_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}
_LOG2E = 1.4426950408889634
_MAX_BLOCK_H = 64


@triton.jit
def _tile_columns(W, GROUP: tl.constexpr, GW: tl.constexpr, NG: tl.constexpr):
    """Tile column c -> (value index w, valid) of a stream whose groups of GROUP values sit in GW >= GROUP columns
    each (NG groups, powers of two: a tile is NG * GW wide). GW == GROUP (the usual power-of-two group): c = w."""
    c = tl.arange(0, NG * GW)
    if GW == GROUP:
        return c, c < W
    return c // GW * GROUP + c % GW, (c % GW < GROUP) & (c // GW * GROUP < W)


@triton.jit
def _load_tile(
    DATA, SCALES,
    offs_t, mask_t, W,
    stride_data_s, stride_data_w, stride_scales_s, stride_scales_g, stride_scales_k,
    BITS: tl.constexpr, GROUP: tl.constexpr, GW: tl.constexpr, NG: tl.constexpr, BLOCK_T: tl.constexpr,
    GATHER: tl.constexpr,
):
    """Positions offs_t of a stream as an fp32 (BLOCK_T, NG * GW) tile in _tile_columns' order; 0 where masked.
    Default: each stored byte loaded once as a row-contiguous tile (vector loads), int4 nibbles (2-bit crumbs) split
    and interleaved in registers, one (scale, zero) per position and group broadcast over the group's columns.
    GATHER (the earlier loop, kept for bench/kernels.py --sweep): one byte, scale and zero load per value."""
    row = offs_t[:, None].to(tl.int64) * stride_data_s  # int64: a cache can exceed 2^31 bytes
    w, ok = _tile_columns(W, GROUP, GW, NG)
    if GATHER:
        mask = mask_t[:, None] & ok[None, :]
        if BITS < 8:
            PACK: tl.constexpr = 8 // BITS
            packed = tl.load(DATA + row + (w // PACK)[None, :] * stride_data_w, mask=mask, other=0)
            codes = ((packed.to(tl.int32) >> (BITS * (w % PACK))[None, :]) & ((1 << BITS) - 1)).to(tl.float32)
        else:
            codes = tl.load(DATA + row + w[None, :] * stride_data_w, mask=mask, other=0).to(tl.float32)
        if BITS < 16:
            sc = SCALES + offs_t[:, None].to(tl.int64) * stride_scales_s + (w // GROUP)[None, :] * stride_scales_g
            scale = tl.load(sc, mask=mask, other=0).to(tl.float32)
            zero = tl.load(sc + stride_scales_k, mask=mask, other=0).to(tl.float32)
            codes = codes * scale + zero
        return codes
    if BITS == 4:  # byte b holds values 2b (low nibble) and 2b + 1 (high): bytes in the half-width column order
        wb, okb = _tile_columns(W // 2, GROUP // 2, GW // 2, NG)
        packed = tl.load(DATA + row + wb[None, :] * stride_data_w, mask=mask_t[:, None] & okb[None, :], other=0)
        packed = packed.to(tl.int32)
        codes = tl.interleave(packed & 0xF, packed >> 4).to(tl.float32)
    elif BITS == 2:  # byte b holds values 4b + j in bits [2j, 2j + 2): bytes in the quarter-width column order
        wb, okb = _tile_columns(W // 4, GROUP // 4, GW // 4, NG)
        packed = tl.load(DATA + row + wb[None, :] * stride_data_w, mask=mask_t[:, None] & okb[None, :], other=0)
        packed = packed.to(tl.int32)
        # interleave(interleave(v0, v2), interleave(v1, v3)) = v0, v1, v2, v3 per byte
        codes = tl.interleave(tl.interleave(packed & 3, (packed >> 4) & 3),
                              tl.interleave((packed >> 2) & 3, packed >> 6)).to(tl.float32)
    else:
        codes = tl.load(DATA + row + w[None, :] * stride_data_w, mask=mask_t[:, None] & ok[None, :],
                        other=0).to(tl.float32)
    if BITS < 16:  # value = code * scale + zero, (scale, zero) fp16 per position and group
        g = tl.arange(0, NG)
        gmask = mask_t[:, None] & (g * GROUP < W)[None, :]
        sc = SCALES + offs_t[:, None].to(tl.int64) * stride_scales_s + g[None, :] * stride_scales_g
        scale = tl.load(sc, mask=gmask, other=0).to(tl.float32)
        zero = tl.load(sc + stride_scales_k, mask=gmask, other=0).to(tl.float32)
        codes = tl.reshape(codes, (BLOCK_T, NG, GW)) * scale[:, :, None] + zero[:, :, None]
        codes = tl.reshape(codes, (BLOCK_T, NG * GW))
    return codes


@triton.jit
def _rotation(angle, scaling):
    """(scaling · cos, scaling · sin) of fp32 angles without the GPU's library sine and cosine (whose path for large
    arguments brings local memory and branches into the loop): the angle is reduced by whole quarter turns q to
    r in [-π/4, π/4] (π/2 split in a high part of 8 significant bits, exact times any q below 2^16, and the rest),
    sin r and cos r are Taylor polynomials (error below 2e-9 there), and the quadrant q mod 4 picks and signs them."""
    quarter = tl.floor(angle * 0.6366197723675814 + 0.5)
    r = (angle - quarter * 1.5703125) - quarter * 4.838267948966e-4
    q = quarter.to(tl.int32) & 3
    r2 = r * r
    s = r + r * r2 * (-1.0 / 6 + r2 * (1.0 / 120 + r2 * (-1.0 / 5040 + r2 * (1.0 / 362880))))
    c = 1.0 + r2 * (-0.5 + r2 * (1.0 / 24 + r2 * (-1.0 / 720 + r2 * (1.0 / 40320 + r2 * (-1.0 / 3628800)))))
    sin = tl.where(q == 0, s, tl.where(q == 1, c, tl.where(q == 2, -s, -c)))
    cos = tl.where(q == 0, c, tl.where(q == 1, -s, tl.where(q == 2, -c, s)))
    return cos * scaling, sin * scaling


@triton.jit
def _latent_decode_split_kernel(
    # pointers
    Q_LAT, Q_ROPE, LAT, LAT_SCALES, TAIL, TAIL_SCALES, ROPE, ROPE_SCALES, SEQ_LENS, LOG_W, KEY_SCALE, HEAD_BIAS, PART_OUT, PART_LSE, OUT,
    ROPE_UP, ROPE_UP_BIAS, ROPE_FREQ, ROPE_POS,
    # sizes
    H, CAP, CHUNK, WINDOW, qk_scale, HEADS_PER_KV, rope_scaling,
    # strides
    stride_ql_b, stride_ql_h, stride_ql_r,
    stride_qr_b, stride_qr_h, stride_qr_w,
    stride_lat_b, stride_lat_s, stride_lat_w,
    stride_lsc_b, stride_lsc_s, stride_lsc_g, stride_lsc_k,
    stride_tail_b, stride_tail_s, stride_tail_w,
    stride_tsc_b, stride_tsc_s, stride_tsc_g, stride_tsc_k,
    stride_rope_b, stride_rope_s, stride_rope_w,
    stride_rsc_b, stride_rsc_s, stride_rsc_g, stride_rsc_k,
    stride_lw_b, stride_lw_s,
    stride_ks_b, stride_ks_s, stride_ks_k,
    stride_hb_b, stride_hb_h,
    stride_po_b, stride_po_split, stride_po_h, stride_po_r,
    stride_pl_b, stride_pl_split, stride_pl_h,
    stride_out_b, stride_out_h, stride_out_r,
    stride_ru_w, stride_ru_r, stride_pos_b, stride_pos_s,
    # meta (the widths too: a compile-time column mask lets the tile loads vectorize)
    R: tl.constexpr, RT: tl.constexpr, WR: tl.constexpr,
    LAT_BITS: tl.constexpr, LAT_GROUP: tl.constexpr, LAT_GW: tl.constexpr, LAT_NG: tl.constexpr,
    TAIL_BITS: tl.constexpr, TAIL_GROUP: tl.constexpr, TAIL_GW: tl.constexpr, TAIL_NG: tl.constexpr,
    ROPE_BITS: tl.constexpr, ROPE_GROUP: tl.constexpr, ROPE_GW: tl.constexpr, ROPE_NG: tl.constexpr,
    HAS_Q_LAT: tl.constexpr, HAS_TAIL: tl.constexpr, HAS_ROPE: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_LOG_W: tl.constexpr,
    HAS_KEY_SCALE: tl.constexpr, HAS_HEAD_BIAS: tl.constexpr,
    HAS_ROPE_UP: tl.constexpr, HAS_ROPE_BIAS: tl.constexpr, HAS_POS: tl.constexpr, WH: tl.constexpr, WHP: tl.constexpr,
    DIRECT_OUT: tl.constexpr,
    DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_T: tl.constexpr, GATHER: tl.constexpr,
):
    """Grid (B, NUM_SPLITS, cdiv(H, BLOCK_H)), algorithm in the file's first comment. Writes out (B, H, R + RT) when
    DIRECT_OUT (one split), else fp32 partials (B, NUM_SPLITS, H, R + RT) and log2-sum-exps (B, NUM_SPLITS, H).
    HAS_ROPE_UP replaces the rope stream (HAS_ROPE) by keys rebuilt from the latent tile: Q_ROPE (B, H, 2 · WH) in
    pair order, ROPE_UP (2 · WH, R + RT), ROPE_UP_BIAS, ROPE_FREQ (WH,) fp32, ROPE_POS (B, CAP) fp32 (HAS_POS).

    Long on purpose: one Triton program read top to bottom (the row's valid range and query tiles; the loop over
    position tiles: dequantize, scores, online softmax; the store). What repeats is already a @triton.jit helper
    (_load_tile, _tile_columns). The rest stays inline: the softmax state (m_i, l_i, acc, acc_t) is carried through
    the loop, and q_tail, acc_t, ct, q_rope, k exist only under their HAS_* flags, so a helper would take and return
    a dozen tensors, some undefined when their flag is off, to be called once."""
    pid_b = tl.program_id(0)
    pid_split = tl.program_id(1)
    pid_h = tl.program_id(2)
    row_b = pid_b.to(tl.int64)  # batch offsets of a large cache overflow int32

    # Token p sits in slot p % CAP: a row longer than the capacity has wrapped around (a sliding-window group's
    # ring); it holds positions seq_len - CAP .. seq_len - 1, and the window keeps slots whose age is < WINDOW.
    seq_len = tl.load(SEQ_LENS + pid_b).to(tl.int32)
    start = pid_split * CHUNK
    end = tl.minimum(start + CHUNK, tl.minimum(seq_len, CAP))
    if HAS_WINDOW:  # not wrapped: the window is the slots from seq_len - WINDOW on
        start = tl.where(seq_len <= CAP, tl.maximum(start, seq_len - WINDOW), start)

    offs_h = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    mask_h = offs_h < H
    # queries, the accumulator and the output in the tiles' column order (_tile_columns): offs_r is each latent
    # column's value index, mask_r whether it holds one
    offs_r, mask_r = _tile_columns(R, LAT_GROUP, LAT_GW, LAT_NG)

    if HAS_TAIL:  # the latent's tail: its columns follow the head's (R of them) in q_lat and the output
        offs_rt, mask_rt = _tile_columns(RT, TAIL_GROUP, TAIL_GW, TAIL_NG)
    if HAS_Q_LAT:
        q_row = Q_LAT + pid_b * stride_ql_b + offs_h[:, None] * stride_ql_h
        q_lat = tl.load(q_row + offs_r[None, :] * stride_ql_r, mask=mask_h[:, None] & mask_r[None, :],
                        other=0).to(DOT_DTYPE)
        if HAS_TAIL:
            q_tail = tl.load(q_row + (R + offs_rt)[None, :] * stride_ql_r, mask=mask_h[:, None] & mask_rt[None, :],
                             other=0).to(DOT_DTYPE)
    if HAS_ROPE_UP:  # rope keys from the latent: the pairs' real (2j) and imaginary (2j + 1) parts apart
        offs_j = tl.arange(0, WHP)
        mask_j = offs_j < WH
        q_row = Q_ROPE + pid_b * stride_qr_b + offs_h[:, None] * stride_qr_h
        q_mask = mask_h[:, None] & mask_j[None, :]
        q_re = tl.load(q_row + (2 * offs_j)[None, :] * stride_qr_w, mask=q_mask, other=0).to(DOT_DTYPE)
        q_im = tl.load(q_row + (2 * offs_j + 1)[None, :] * stride_qr_w, mask=q_mask, other=0).to(DOT_DTYPE)
        # rope_up (Wr, R + RT), held on chip for the whole program: (WHP, tile columns) per part, head and tail
        u_row = ROPE_UP + (2 * offs_j)[:, None].to(tl.int64) * stride_ru_w
        u_mask = mask_j[:, None] & mask_r[None, :]
        u_re = tl.load(u_row + offs_r[None, :] * stride_ru_r, mask=u_mask, other=0).to(DOT_DTYPE)
        u_im = tl.load(u_row + stride_ru_w + offs_r[None, :] * stride_ru_r, mask=u_mask, other=0).to(DOT_DTYPE)
        if HAS_TAIL:
            ut_mask = mask_j[:, None] & mask_rt[None, :]
            ut_re = tl.load(u_row + (R + offs_rt)[None, :] * stride_ru_r, mask=ut_mask, other=0).to(DOT_DTYPE)
            ut_im = tl.load(u_row + stride_ru_w + (R + offs_rt)[None, :] * stride_ru_r, mask=ut_mask,
                            other=0).to(DOT_DTYPE)
        if HAS_ROPE_BIAS:
            b_re = tl.load(ROPE_UP_BIAS + 2 * offs_j, mask=mask_j, other=0).to(tl.float32)
            b_im = tl.load(ROPE_UP_BIAS + 2 * offs_j + 1, mask=mask_j, other=0).to(tl.float32)
        freq = tl.load(ROPE_FREQ + offs_j, mask=mask_j, other=0).to(tl.float32)
    if HAS_ROPE:
        offs_w, mask_w = _tile_columns(WR, ROPE_GROUP, ROPE_GW, ROPE_NG)
        q_rope = tl.load(Q_ROPE + pid_b * stride_qr_b + offs_h[:, None] * stride_qr_h + offs_w[None, :] * stride_qr_w,
                         mask=mask_h[:, None] & mask_w[None, :], other=0).to(DOT_DTYPE)

    if HAS_HEAD_BIAS:  # q_nope · b_k per head, in the scale's units
        head_bias = tl.load(HEAD_BIAS + pid_b * stride_hb_b + offs_h * stride_hb_h, mask=mask_h, other=0).to(tl.float32)
        head_bias = head_bias * qk_scale

    m_i = tl.full((BLOCK_H,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_H,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_H, LAT_NG * LAT_GW), dtype=tl.float32)
    if HAS_TAIL:
        acc_t = tl.zeros((BLOCK_H, TAIL_NG * TAIL_GW), dtype=tl.float32)

    for tile in range(start, end, BLOCK_T):
        offs_t = tile + tl.arange(0, BLOCK_T)
        mask_t = offs_t < end
        if HAS_WINDOW:
            mask_t = mask_t & ((seq_len - 1 - offs_t) % CAP < WINDOW)
        c = _load_tile(
            LAT + row_b * stride_lat_b, LAT_SCALES + row_b * stride_lsc_b,
            offs_t, mask_t, R,
            stride_lat_s, stride_lat_w, stride_lsc_s, stride_lsc_g, stride_lsc_k,
            LAT_BITS, LAT_GROUP, LAT_GW, LAT_NG, BLOCK_T, GATHER,
        ).to(DOT_DTYPE)
        scores = tl.zeros((BLOCK_H, BLOCK_T), dtype=tl.float32)
        if HAS_Q_LAT:
            scores = tl.dot(q_lat, tl.trans(c), scores, input_precision=DOT_PRECISION)
        if HAS_TAIL:
            ct = _load_tile(
                TAIL + row_b * stride_tail_b, TAIL_SCALES + row_b * stride_tsc_b,
                offs_t, mask_t, RT,
                stride_tail_s, stride_tail_w, stride_tsc_s, stride_tsc_g, stride_tsc_k,
                TAIL_BITS, TAIL_GROUP, TAIL_GW, TAIL_NG, BLOCK_T, GATHER,
            ).to(DOT_DTYPE)
            if HAS_Q_LAT:
                scores = tl.dot(q_tail, tl.trans(ct), scores, input_precision=DOT_PRECISION)
        if HAS_ROPE:
            k = _load_tile(
                ROPE + row_b * stride_rope_b, ROPE_SCALES + row_b * stride_rsc_b,
                offs_t, mask_t, WR,
                stride_rope_s, stride_rope_w, stride_rsc_s, stride_rsc_g, stride_rsc_k,
                ROPE_BITS, ROPE_GROUP, ROPE_GW, ROPE_NG, BLOCK_T, GATHER,
            ).to(DOT_DTYPE)
            scores = tl.dot(q_rope, tl.trans(k), scores, input_precision=DOT_PRECISION)
        if HAS_ROPE_UP:  # the slots' rope keys from the latent tile, in pair order, rotated at each slot's position
            k_re = tl.dot(c, tl.trans(u_re), input_precision=DOT_PRECISION)
            k_im = tl.dot(c, tl.trans(u_im), input_precision=DOT_PRECISION)
            if HAS_TAIL:
                k_re = tl.dot(ct, tl.trans(ut_re), k_re, input_precision=DOT_PRECISION)
                k_im = tl.dot(ct, tl.trans(ut_im), k_im, input_precision=DOT_PRECISION)
            if HAS_ROPE_BIAS:
                k_re += b_re[None, :]
                k_im += b_im[None, :]
            if HAS_POS:  # a cache policy's slot positions
                pos = tl.load(ROPE_POS + row_b * stride_pos_b + offs_t.to(tl.int64) * stride_pos_s, mask=mask_t,
                              other=0).to(tl.float32)
            else:  # slot s holds the row's last position p < seq_len with p % CAP == s (position s if not wrapped)
                pos = (offs_t + CAP * ((seq_len - 1 - offs_t) // CAP)).to(tl.float32)
            cos, sin = _rotation(pos[:, None] * freq[None, :], rope_scaling)
            scores = tl.dot(q_re, tl.trans((k_re * cos - k_im * sin).to(DOT_DTYPE)), scores,
                            input_precision=DOT_PRECISION)
            scores = tl.dot(q_im, tl.trans((k_re * sin + k_im * cos).to(DOT_DTYPE)), scores,
                            input_precision=DOT_PRECISION)
        scores = scores * qk_scale
        if HAS_HEAD_BIAS:
            scores += head_bias[:, None]
        if HAS_KEY_SCALE:  # a qk-norm source's key norm: one scalar per position and kv head
            ks = tl.load(KEY_SCALE + row_b * stride_ks_b + offs_t[None, :].to(tl.int64) * stride_ks_s
                         + (offs_h // HEADS_PER_KV)[:, None] * stride_ks_k,
                         mask=mask_h[:, None] & mask_t[None, :], other=0)
            scores = scores * ks.to(tl.float32)
        if HAS_LOG_W:  # a merged slot standing for w tokens scores log(w) higher (log2 units here)
            log_w = tl.load(LOG_W + row_b * stride_lw_b + offs_t.to(tl.int64) * stride_lw_s, mask=mask_t, other=0)
            scores += log_w.to(tl.float32)[None, :] * 1.4426950408889634
        scores = tl.where(mask_t[None, :], scores, float("-inf"))

        # a tile of a wrapped ring can lie wholly outside the window: keep exp2 away from -inf - -inf
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(scores - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(DOT_DTYPE), c, acc * alpha[:, None], input_precision=DOT_PRECISION)
        if HAS_TAIL:
            acc_t = tl.dot(p.to(DOT_DTYPE), ct, acc_t * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new

    # a split with no position keeps l = 0 and writes only lse = -inf: with a large capacity most splits are empty
    has_any = l_i > 0
    denom = tl.where(has_any, l_i, 1.0)[:, None]
    out = acc / denom
    mask_out = mask_h[:, None] & mask_r[None, :]
    if HAS_TAIL:
        out_t = acc_t / denom
        mask_out_t = mask_h[:, None] & mask_rt[None, :]
    if DIRECT_OUT:
        out_row = OUT + pid_b * stride_out_b + offs_h[:, None] * stride_out_h
        tl.store(out_row + offs_r[None, :] * stride_out_r, out.to(OUT.dtype.element_ty), mask=mask_out)
        if HAS_TAIL:
            tl.store(out_row + (R + offs_rt)[None, :] * stride_out_r, out_t.to(OUT.dtype.element_ty), mask=mask_out_t)
    else:
        po_row = PART_OUT + pid_b * stride_po_b + pid_split * stride_po_split + offs_h[:, None] * stride_po_h
        tl.store(po_row + offs_r[None, :] * stride_po_r, out, mask=mask_out & has_any[:, None])
        if HAS_TAIL:
            tl.store(po_row + (R + offs_rt)[None, :] * stride_po_r, out_t, mask=mask_out_t & has_any[:, None])
        lse = tl.where(has_any, m_i + tl.log2(tl.where(has_any, l_i, 1.0)), float("-inf"))
        tl.store(PART_LSE + pid_b * stride_pl_b + pid_split * stride_pl_split + offs_h * stride_pl_h, lse,
                 mask=mask_h)


@triton.jit
def _merge_splits_kernel(
    # pointers
    PART_OUT, PART_LSE, OUT,
    # sizes
    R, NUM_SPLITS,
    # strides
    stride_po_b, stride_po_split, stride_po_h, stride_po_r,
    stride_pl_b, stride_pl_split, stride_pl_h,
    stride_out_b, stride_out_h, stride_out_r,
    # meta
    BLOCK_S: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """Grid (B, H): out = Σ_i 2^(lse_i - M) out_i / Σ_i 2^(lse_i - M), M = max_i lse_i (log2 units). Splits are read
    BLOCK_S at a time as one (BLOCK_S, R) tile (independent loads, not a chain of one split per step); an empty
    split (lse = -inf) wrote no partial output and is masked out of the loads."""
    pid_b = tl.program_id(0)
    pid_h = tl.program_id(1)
    offs_r = tl.arange(0, BLOCK_R)
    mask_r = offs_r < R
    lse_row = PART_LSE + pid_b * stride_pl_b + pid_h * stride_pl_h
    po_row = PART_OUT + pid_b * stride_po_b + pid_h * stride_po_h
    m = tl.full((BLOCK_S,), float("-inf"), dtype=tl.float32)
    for s0 in range(0, NUM_SPLITS, BLOCK_S):
        offs_s = s0 + tl.arange(0, BLOCK_S)
        m = tl.maximum(m, tl.load(lse_row + offs_s * stride_pl_split, mask=offs_s < NUM_SPLITS, other=float("-inf")))
    lse_max = tl.max(m, 0)
    acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
    denom = tl.zeros((BLOCK_S,), dtype=tl.float32)
    for s0 in range(0, NUM_SPLITS, BLOCK_S):
        offs_s = s0 + tl.arange(0, BLOCK_S)
        lse = tl.load(lse_row + offs_s * stride_pl_split, mask=offs_s < NUM_SPLITS, other=float("-inf"))
        written = lse > float("-inf")
        w = tl.where(written, tl.exp2(lse - lse_max), 0.0)
        part = tl.load(po_row + offs_s[:, None] * stride_po_split + offs_r[None, :] * stride_po_r,
                       mask=written[:, None] & mask_r[None, :], other=0.0)
        acc += tl.sum(w[:, None] * part, 0)
        denom += w
    total = tl.sum(denom, 0)
    out = acc / tl.where(total > 0, total, 1.0)  # a row with no position at all: 0, as the one-split path gives
    tl.store(OUT + pid_b * stride_out_b + pid_h * stride_out_h + offs_r * stride_out_r,
             out.to(OUT.dtype.element_ty), mask=mask_r)


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _tile_config(block_h: int, block_r: int, block_wr: int) -> tuple[int, int]:
    """(BLOCK_T, num_warps). The dequantized tile (BLOCK_T x (BLOCK_R + BLOCK_WR) fp32 while it is built) and the
    accumulator (BLOCK_H x BLOCK_R fp32) live in registers: keep the tile to 32 values per thread, which keeps the
    kernel free of register spills from narrow latents to R = 512 at 4 bits (python -m bench.tools.compile_sm90 reports
    ptxas' register counts on sm_90a)."""
    per_position = block_r + block_wr
    num_warps = 4 if per_position <= 128 and block_h * block_r <= 2048 else 8
    block_t = 128
    while block_t > 16 and block_t * per_position > 32 * 32 * num_warps:
        block_t //= 2
    return block_t, num_warps


def _tile_geometry(bits: int, group: int, width: int) -> tuple[int, int, int]:
    """(GROUP, GW, NG) of a stream's tile (_tile_columns): quantized streams keep each group in GW = next power of
    two >= group columns (GW = group for the usual power-of-two groups: natural order), NG = next power of two >=
    the group count; 16-bit streams are one group. At least 16 columns (tl.dot's smallest K)."""
    if bits >= 16:
        gw = max(16, triton.next_power_of_2(width))
        return gw, gw, 1
    gw, ng = triton.next_power_of_2(group), triton.next_power_of_2(width // group)
    while gw * ng < 16:
        gw *= 2
    return group, gw, ng


def default_num_splits(batch: int, capacity: int, block_t: int, device: torch.device, programs_per_sm: int = 2) -> int:
    """About `programs_per_sm` programs per SM on CUDA; a few splits in the CPU interpreter. Never more splits than
    tiles."""
    tiles = triton.cdiv(capacity, block_t)
    if device.type == "cuda":
        sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
        want = triton.cdiv(programs_per_sm * sms, batch)
    else:
        want = 4
    return max(1, min(want, tiles))


@dataclass(frozen=True)
class _StreamArgs:
    """One stream as the split kernel takes it. An absent stream passes a placeholder tensor as both pointers, zero
    strides and 16 bits (its HAS_* flag keeps the kernel from reading it)."""

    data: torch.Tensor  # (B, S, bytes per position)
    scales: torch.Tensor  # (B, S, groups, 2) (scale, zero); `data` itself for 16-bit streams (unread)
    stride_data: tuple[int, int, int]
    stride_scales: tuple[int, int, int, int]
    bits: int
    geometry: tuple[int, int, int]  # (GROUP, GW, NG) of its tile: _tile_geometry

    @property
    def columns(self) -> int:  # the tile's width, NG * GW
        return self.geometry[1] * self.geometry[2]

    def meta(self, prefix: str) -> dict[str, int]:
        """The kernel's compile-time constants of this stream: {PREFIX}_BITS, _GROUP, _GW, _NG."""
        group, gw, ng = self.geometry
        return {f"{prefix}_BITS": self.bits, f"{prefix}_GROUP": group, f"{prefix}_GW": gw, f"{prefix}_NG": ng}


def _stream_args(stream: Stream | None, placeholder: torch.Tensor) -> _StreamArgs:
    if stream is None:
        return _StreamArgs(placeholder, placeholder, (0, 0, 0), (0, 0, 0, 0), 16, (16, 16, 1))
    if stream.bits >= 16:
        scales, stride_scales = stream.data, (0, 0, 0, 0)
    else:
        scales, stride_scales = stream.scales, tuple(stream.scales.stride())
    return _StreamArgs(stream.data, scales, tuple(stream.data.stride()), stride_scales, stream.bits,
                       _tile_geometry(stream.bits, stream.group, stream.width))


def _check_decode_inputs(q_lat, q_rope, latent, rope, tail, rope_up=None) -> None:
    if q_lat is None and q_rope is None:
        raise ValueError("latent_decode needs q_lat or q_rope")
    if rope_up is not None:
        width = latent.width + (tail.width if tail is not None else 0)
        B, S = latent.data.shape[:2]
        ok = (rope is None and q_rope is not None and q_rope.shape[-1] == rope_up.width and rope_up.width % 2 == 0
              and rope_up.weight.shape[1] == width and rope_up.freq.shape == (rope_up.width // 2,)
              and rope_up.freq.is_contiguous()
              and (rope_up.bias is None or (rope_up.bias.shape == (rope_up.width,) and rope_up.bias.is_contiguous()))
              and (rope_up.positions is None or (rope_up.positions.shape[0] == B and rope_up.positions.shape[1] >= S)))
        if not ok:
            raise ValueError("rope keys from the latent: q_rope over their even width Wr, no rope stream, rope_up "
                             "(Wr, latent width), contiguous freq (Wr/2) and bias (Wr), positions (B, >= capacity)")
    if q_rope is not None and rope is None and rope_up is None:
        raise ValueError("q_rope needs the rope stream")
    if any(s is not None and s.bits not in (2, 4, 8, 16) for s in (latent, tail, rope)):
        raise ValueError("streams are stored at 16, 8, 4 or 2 bits")


def _launch_config(B: int, H: int, S: int, block_r: int, block_wr: int, device: torch.device, num_splits: int | None,
                   block_t: int | None, num_warps: int | None, programs_per_sm: int | None) -> tuple[int, int, int, int, int]:
    """(BLOCK_H, BLOCK_T, num_warps, num_splits, chunk): the given launch parameters, the defaults for those left
    None; chunk is the positions per split, a whole number of BLOCK_T tiles."""
    block_h = min(max(16, triton.next_power_of_2(H)), _MAX_BLOCK_H)
    tile_t, tile_warps = _tile_config(block_h, block_r, block_wr)
    block_t = block_t or tile_t
    num_warps = num_warps or tile_warps
    if num_splits is None:
        num_splits = default_num_splits(B, S, block_t, device, programs_per_sm or 2)
    num_splits = max(1, int(num_splits))
    chunk = triton.cdiv(triton.cdiv(S, num_splits), block_t) * block_t
    return block_h, block_t, num_warps, num_splits, chunk


def _split_partials(out: torch.Tensor, num_splits: int) -> tuple[torch.Tensor, torch.Tensor, tuple, tuple]:
    """(part_out (B, NUM_SPLITS, H, R) fp32, part_lse (B, NUM_SPLITS, H) fp32 in log2 units, their strides) for
    `out` (B, H, R). One split writes `out` directly: `out` stands in for both, with zero strides."""
    if num_splits == 1:
        return out, out, (0, 0, 0, 0), (0, 0, 0)
    B, H, R = out.shape
    part_out = torch.empty(B, num_splits, H, R, dtype=torch.float32, device=out.device)
    part_lse = torch.empty(B, num_splits, H, dtype=torch.float32, device=out.device)
    return part_out, part_lse, part_out.stride(), part_lse.stride()


def _merge_splits(part_out: torch.Tensor, part_lse: torch.Tensor, out: torch.Tensor) -> None:
    """out (B, H, R) = the splits' partial outputs weighted by their log-sum-exps (_merge_splits_kernel)."""
    B, num_splits, H, R = part_out.shape
    _merge_splits_kernel[(B, H)](
        part_out, part_lse, out,
        R, num_splits,
        *part_out.stride(), *part_lse.stride(), *out.stride(),
        # a (BLOCK_S, BLOCK_R) fp32 tile of partial outputs per step: at most 4096 values (32 per thread)
        BLOCK_S=max(2, min(32, triton.next_power_of_2(num_splits), 4096 // triton.next_power_of_2(R))),
        BLOCK_R=triton.next_power_of_2(R),
        num_warps=4, enable_fp_fusion=True,
    )


def latent_decode_triton(
    q_lat: torch.Tensor | None,
    q_rope: torch.Tensor | None,
    latent: Stream,
    rope: Stream | None,
    seq_lens: torch.Tensor,
    softmax_scale: float,
    window: int | None = None,
    num_splits: int | None = None,
    log_weights: torch.Tensor | None = None,
    key_scale: torch.Tensor | None = None,
    head_bias: torch.Tensor | None = None,
    tail: Stream | None = None,
    rope_up: RopeUp | None = None,
    filled: int | None = None,
) -> torch.Tensor:
    """Triton `latent_decode_ref`: q_lat (B, H, R) or None, q_rope (B, H, Wr) or None, latent/rope/tail streams
    (B, S, ...), seq_lens (B,) int32, log_weights (B, S) fp32 or None, key_scale (B, S, K) or None, head_bias (B, H)
    or None, rope_up (rope keys rebuilt from the latent in the kernel) or None -> (B, H, R) in the queries' dtype (R:
    the latent's width, its tail's included).
    num_splits: split-K factor (None: about two programs per SM on CUDA). S = latent.data.shape[1] is the cache
    capacity; the grid depends on it, or with `filled` (a host-side bound on every row's min(seq_len, S): slots past
    it are never read) on min(S, filled). A CUDA graph replayed while the lengths grow needs a bound that holds for
    all of its replays (the runtime captures one graph per power-of-two bucket)."""
    return _latent_decode(q_lat, q_rope, latent, rope, seq_lens, softmax_scale, window, num_splits, log_weights=log_weights,
                          key_scale=key_scale, head_bias=head_bias, tail=tail, rope_up=rope_up, filled=filled)


def _latent_decode(q_lat, q_rope, latent, rope, seq_lens, softmax_scale, window, num_splits, block_t=None,
                   log_weights=None, num_warps=None, num_stages=None, programs_per_sm=None, key_scale=None,
                   head_bias=None, gather=False, tail=None, rope_up=None, filled=None):
    """latent_decode_triton with the launch parameters open (tests and bench/kernels.py --sweep): block_t,
    num_warps, num_stages (None: the defaults of _launch_config), programs_per_sm (sizes num_splits when that is
    None), gather (the earlier per-value loads, _load_tile). Checks the inputs, sizes the launch (_launch_config),
    allocates the split partials, launches the split kernel and merges the splits."""
    if q_rope is None:
        rope = rope_up = None  # like the reference: without rope queries no rope key enters the scores
    _check_decode_inputs(q_lat, q_rope, latent, rope, tail, rope_up)
    q = q_lat if q_lat is not None else q_rope
    B, H = q.shape[:2]
    R = latent.width
    RT = tail.width if tail is not None else 0
    S = latent.data.shape[1]
    lat_args, tail_args, rope_args = (_stream_args(s, latent.data) for s in (latent, tail, rope))
    block_r = lat_args.columns + (tail_args.columns if tail is not None else 0)
    wh = rope_up.width // 2 if rope_up is not None else 0
    whp = max(16, triton.next_power_of_2(wh))  # the rebuilt keys' tile: real and imaginary parts, WHP columns each
    block_wr = rope_args.columns if rope is not None else 2 * whp if rope_up is not None else 0
    span = S if filled is None else max(1, min(S, int(filled)))  # the slots the splits cover
    block_h, block_t, num_warps, num_splits, chunk = _launch_config(
        B, H, span, block_r, block_wr, latent.data.device, num_splits, block_t, num_warps, programs_per_sm,
    )
    placeholder, ru = latent.data, rope_up
    out = torch.empty(B, H, R + RT, dtype=q.dtype, device=latent.data.device)
    part_out, part_lse, stride_po, stride_pl = _split_partials(out, num_splits)
    dot_dtype = _DOT_DTYPES[q.dtype]

    _latent_decode_split_kernel[(B, num_splits, triton.cdiv(H, block_h))](
        q_lat if q_lat is not None else q, q_rope if q_rope is not None else q,
        lat_args.data, lat_args.scales, tail_args.data, tail_args.scales, rope_args.data, rope_args.scales, seq_lens,
        log_weights if log_weights is not None else out, key_scale if key_scale is not None else out,
        head_bias if head_bias is not None else out,
        part_out, part_lse, out,
        ru.weight if ru is not None else placeholder,
        ru.bias if ru is not None and ru.bias is not None else placeholder,
        ru.freq if ru is not None else placeholder,
        ru.positions if ru is not None and ru.positions is not None else placeholder,
        H, S, chunk, int(window) if window is not None else 0, float(softmax_scale) * _LOG2E,
        H // key_scale.shape[-1] if key_scale is not None else 1, float(ru.scaling) if ru is not None else 1.0,
        *(q_lat.stride() if q_lat is not None else (0, 0, 0)), *(q_rope.stride() if q_rope is not None else (0, 0, 0)),
        *lat_args.stride_data, *lat_args.stride_scales,
        *tail_args.stride_data, *tail_args.stride_scales,
        *rope_args.stride_data, *rope_args.stride_scales,
        *(log_weights.stride() if log_weights is not None else (0, 0)),
        *(key_scale.stride() if key_scale is not None else (0, 0, 0)),
        *(head_bias.stride() if head_bias is not None else (0, 0)),
        *stride_po, *stride_pl,
        *out.stride(),
        *(ru.weight.stride() if ru is not None else (0, 0)),
        *(ru.positions.stride() if ru is not None and ru.positions is not None else (0, 0)),
        R=R, RT=RT, WR=rope.width if rope is not None else 0,
        **lat_args.meta("LAT"), **tail_args.meta("TAIL"), **rope_args.meta("ROPE"),
        HAS_Q_LAT=q_lat is not None, HAS_TAIL=tail is not None, HAS_ROPE=rope is not None, HAS_WINDOW=window is not None,
        HAS_LOG_W=log_weights is not None, HAS_KEY_SCALE=key_scale is not None,
        HAS_HEAD_BIAS=head_bias is not None, HAS_ROPE_UP=ru is not None,
        HAS_ROPE_BIAS=ru is not None and ru.bias is not None, HAS_POS=ru is not None and ru.positions is not None,
        WH=wh, WHP=whp, DIRECT_OUT=num_splits == 1,
        DOT_DTYPE=dot_dtype, DOT_PRECISION="ieee" if dot_dtype == tl.float32 else "tf32",
        BLOCK_H=block_h, BLOCK_T=block_t, GATHER=bool(gather),
        num_warps=num_warps,
        **({"num_stages": num_stages} if num_stages else {}),
        enable_fp_fusion=True,  # code * scale + zero as one FMA
    )
    if num_splits > 1:
        _merge_splits(part_out, part_lse, out)
    return out
