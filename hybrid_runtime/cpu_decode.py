"""One decode token on the CPU as one Numba call: the whole model, every layer, no torch op.

Why: batch-1 decode reads every weight once per token, so on a CPU its speed is the memory bandwidth,
if nothing else costs. torch's eager forward (model.py) pays ~25 operator dispatches a layer
(~0.3 ms a layer on the 2-core dev VM, as much as the weights of a small model take to read), and
its bf16 matrix-vector product on CPUs without AVX512-BF16 is slower than fp32 per token although it
reads half the bytes. This step computes exactly what `Transformer.forward` computes for one token,
with the same tensors (numpy views of the model's parameters and KV cache: no copy of a weight; the
prefill still runs `Transformer.forward`, which fills the same cache), in fp32 arithmetic.

Per layer: RMSNorm -> qkv = Wqkv x (+ bias) -> RoPE on q, k -> k, v into the cache at `pos` ->
attention of each head over cache slots [start, kv_len) (start > 0 only with a sliding window) ->
Wo (+ bias) -> h += scale * branch -> the FFN -> h += scale * branch. Then the final norm and lm_head.

The FFN of each layer is what the model's FFN module is:
- `FeedForward` (dense): every gate, up and down row is read (`_dense_ffn`), whatever the activation
  (SiLU, or a ReLU model run densely: the baseline the sparse modes are measured against).
- `HybridFFN` with every row cold (exact mode, `hybrid-run --exact` on the CPU): all gate rows; up
  rows only where the gate fires; down rows only where the activation is non-zero
  (`cpu_ffn.cold_ffn_decode_kernel` over all rows).
- `PredictedHybridFFN` with every row cold (predictor mode): the predictor MLP (relu(W1 x + b1),
  W2 z + b2 > threshold) picks the candidate rows, then the same kernel over those rows only.
- `MoEFeedForward` (Mixtral): router logits -> softmax -> top-k (ties to the lower expert, as torch.topk) ->
  weights renormalised; the chosen experts' dense FFNs, added in expert order (as the forward adds them).
- `HybridMoEFFN` with every row cold (a hybrid Mixtral on the CPU): the same routing, then each chosen
  expert's cold rows through the cold kernel: all of them (exact), or the rows its slice of the predictor
  marks (predictor: relu(W1 x + b1) once a layer, then W2 z + b2 for the chosen experts' rows only).
A layer is one fused pass: no Python between the predictor and the rows, no allocation per token
(every buffer is a workspace made once).

Storage: weights as the model holds them (float32, or bf16 bit patterns in uint16: Numba has no
half type); cold rows as `ColdRows` stores them (bf16, fp16 or int8). The KV cache is the model's
(float32, or bf16 rounded to nearest even on store). Arithmetic and accumulation are fp32 throughout;
torch's bf16 forward rounds intermediates (q, k, v, the branch outputs) to bf16, this step does not,
so bf16 logits agree with torch's to bf16 rounding, fp32 logits to fp32 summation order.

Threads: the matrix-vector products split rows over `numba.get_num_threads()` threads (set by
`--threads`); the FFN splits neurons (per-thread partial sums, merged); attention splits heads.

Reference: `Transformer.forward` (tests/test_cpu_decode.py compares logits over many steps and every
config feature: GQA, attention bias, sliding window, MiniCPM scales, tied embeddings, each activation,
each FFN mode and storage format).
"""
from __future__ import annotations

import math

import numba
import numpy as np
import torch
from llvmlite import ir
from numba import njit, prange, types
from numba.core.extending import intrinsic, overload
from numba.typed import List

from hybrid_runtime.cpu_ffn import (BLOCK_FORMATS, FMT_BF16, FMT_F32, _axpy_row, _axpy_row4, _block_dot_row_q,
                                    _combine, _dot_row, _dot_row4, _first_call, _gate_act, _prefetch_rows, _ready, _w,
                                    block_cold_ffn_decode_kernel, cold_ffn_decode_kernel, quantize_x)
from hybrid_runtime.errors import log

FFN_DENSE, FFN_EXACT, FFN_PREDICTED, FFN_MOE, FFN_MOE_EXACT, FFN_MOE_PREDICTED = 0, 1, 2, 3, 4, 5
_ROWS_PER_TASK = 16  # matrix-vector rows per parallel task: 4 streams of 4 rows


# ----------------------------------------------------------------------------- element stores

@intrinsic
def _bits_from_f32(typingctx, x):
    """Reinterpret a float32 as its 32 bits (LLVM bitcast)."""
    if not isinstance(x, types.Float):
        return None

    def codegen(context, builder, signature, args):
        v = args[0]
        if v.type != ir.FloatType():
            v = builder.fptrunc(v, ir.FloatType())
        return builder.bitcast(v, ir.IntType(32))

    return types.uint32(x), codegen


def _put(a, j, v):
    """a[j] = v in a's storage type (float32, or bf16 bits rounded to nearest even)."""
    raise NotImplementedError("only callable from Numba-compiled code")


@overload(_put, inline="always")
def _put_typed(a, j, v):
    if a.dtype == types.float32:
        def put_f32(a, j, v):
            a[j] = v
        return put_f32

    def put_bf16(a, j, v):
        b = _bits_from_f32(np.float32(v))
        if (b & np.uint32(0x7F800000)) == np.uint32(0x7F800000) and (b & np.uint32(0x7FFFFF)) != 0:
            a[j] = np.uint16((b >> np.uint32(16)) | np.uint32(0x40))       # nan stays a (quiet) nan
        else:
            a[j] = np.uint16((b + np.uint32(0x7FFF) + ((b >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16))
    return put_bf16


# ----------------------------------------------------------------------------- per-layer pieces

@njit(parallel=True, nogil=True, cache=True, fastmath=True)
def _matvec(w, fmt, x, out):
    """out[r] = w[r] . x for every row r of w (n, d): tasks of 16 rows, four rows (four memory
    streams) at a time; the last n % 16 rows after the parallel loop."""
    n = w.shape[0]
    n_full = n // _ROWS_PER_TASK
    for t in prange(n_full):
        r0 = t * _ROWS_PER_TASK
        for k in range(_ROWS_PER_TASK // 4):
            r = r0 + 4 * k
            _prefetch_rows(w, r + 4, r + 8)
            out[r], out[r + 1], out[r + 2], out[r + 3] = _dot_row4(w[r], w[r + 1], w[r + 2], w[r + 3], fmt, x)
    for r in range(n_full * _ROWS_PER_TASK, n):
        out[r] = _dot_row(w[r], fmt, x)


@njit(parallel=True, nogil=True, cache=True, fastmath=True)
def _block_matvec(w, fmt, x, out, xq, dx, xs):
    """out[r] = w[r] . x for every block row r of w (n, row bytes), as llama.cpp computes it: x quantized
    to int8 per block of 32 once (`quantize_x` into the workspaces xq (>= d,) int8, dx, xs (>= d/32,)
    fp32), then integer block dot products (`_block_dot_row_q`) in tasks of 16 rows, the next rows
    prefetched while one streams."""
    d = x.shape[0]
    nb = d // 32
    xq, dx, xs = xq[:d], dx[:nb], xs[:nb]
    quantize_x(x, xq, dx, xs)
    n = w.shape[0]
    n_tasks = (n + _ROWS_PER_TASK - 1) // _ROWS_PER_TASK
    for t in prange(n_tasks):
        r0 = t * _ROWS_PER_TASK
        for r in range(r0, min(r0 + _ROWS_PER_TASK, n)):
            _prefetch_rows(w, r + 1, r + 3)
            out[r] = _block_dot_row_q(w[r], fmt, xq, dx, xs)


def _mv(w, fmt, x, out, xq, dx, xs):
    """out = w x: `_matvec` for element rows, `_block_matvec` for block rows (compiled per dtype; xq, dx,
    xs are the block path's workspaces)."""
    raise NotImplementedError("only callable from Numba-compiled code")


@overload(_mv)
def _mv_typed(w, fmt, x, out, xq, dx, xs):
    if w.dtype == types.uint8:
        return lambda w, fmt, x, out, xq, dx, xs: _block_matvec(w, fmt, x, out, xq, dx, xs)
    return lambda w, fmt, x, out, xq, dx, xs: _matvec(w, fmt, x, out)


@njit(nogil=True, cache=True, fastmath=True)
def _rms_norm(h, weight, eps, out):
    """out = weight * h / rms(h) (weight fp32)."""
    ss = np.float32(0.0)
    for j in range(h.shape[0]):
        ss += h[j] * h[j]
    r = np.float32(1.0) / np.sqrt(ss / np.float32(h.shape[0]) + np.float32(eps))
    for j in range(h.shape[0]):
        out[j] = weight[j] * (h[j] * r)


@njit(nogil=True, cache=True, fastmath=True)
def _rope(v, cos, sin):
    """HF rotate-half RoPE in place on one head v (hs,): v = v * cos + [v2, v1] * sin (sin's first half
    carries rotate_half's minus sign, see Transformer.setup_cache)."""
    half = v.shape[0] // 2
    for i in range(half):
        x1 = v[i]
        x2 = v[i + half]
        v[i] = x1 * cos[i] + x2 * sin[i]
        v[i + half] = x2 * cos[i + half] + x1 * sin[i + half]


@njit(parallel=True, nogil=True, cache=True, fastmath=True)
def _attention(qkv, n_heads, n_kv_heads, head_dim, kc, vc, fmt, start, kv_len, scores, out):
    """out (nh*hs,) = softmax(q k^T / sqrt(hs)) v per head over cache slots [start, kv_len);
    qkv (fp32) holds q then k then v heads; kc, vc (nkv, S, hs) the layer's cache; scores (nh, S)."""
    group = n_heads // n_kv_heads
    scale = np.float32(1.0 / math.sqrt(head_dim))
    for hh in prange(n_heads):
        kvh = hh // group
        q = qkv[hh * head_dim:(hh + 1) * head_dim]
        s = scores[hh]
        m = np.float32(-np.inf)
        for t in range(start, kv_len):
            krow = kc[kvh, t]
            acc = np.float32(0.0)
            for j in range(head_dim):
                acc += q[j] * _w(krow, j, fmt)
            acc *= scale
            s[t] = acc
            m = max(m, acc)
        denom = np.float32(0.0)
        for t in range(start, kv_len):
            e = np.exp(s[t] - m)
            s[t] = e
            denom += e
        o = out[hh * head_dim:(hh + 1) * head_dim]
        o[:] = 0.0
        inv = np.float32(1.0) / denom
        for t in range(start, kv_len):
            p = s[t] * inv
            vrow = vc[kvh, t]
            for j in range(head_dim):
                o[j] += p * _w(vrow, j, fmt)


@njit(parallel=True, nogil=True, cache=True, fastmath=True)
def _dense_ffn(gate, up, down, fmt, x, act, threshold, a, partial, y):
    """y = down^T (act(gate x) * (up x)) reading every row (the dense baseline); a (f,) and partial
    (n_threads, d) are workspaces."""
    f = gate.shape[0]
    n_full = f // 4
    for t in prange(n_full):
        r = 4 * t
        _prefetch_rows(gate, r + 4, r + 8)
        _prefetch_rows(up, r + 4, r + 8)
        g0, g1, g2, g3 = _dot_row4(gate[r], gate[r + 1], gate[r + 2], gate[r + 3], fmt, x)
        u0, u1, u2, u3 = _dot_row4(up[r], up[r + 1], up[r + 2], up[r + 3], fmt, x)
        a[r] = _combine(_gate_act(g0, act, threshold), u0, act, threshold)
        a[r + 1] = _combine(_gate_act(g1, act, threshold), u1, act, threshold)
        a[r + 2] = _combine(_gate_act(g2, act, threshold), u2, act, threshold)
        a[r + 3] = _combine(_gate_act(g3, act, threshold), u3, act, threshold)
    for r in range(4 * n_full, f):
        a[r] = _combine(_gate_act(_dot_row(gate[r], fmt, x), act, threshold), _dot_row(up[r], fmt, x),
                        act, threshold)
    n_parts = partial.shape[0]
    d = x.shape[0]
    for c in prange(n_parts):                  # thread c: neurons [lo, hi) into its own partial sum
        buf = partial[c]
        buf[:] = 0.0
        lo = f * c // n_parts
        hi = f * (c + 1) // n_parts
        r = lo
        while r + 4 <= hi:
            _prefetch_rows(down, r + 4, min(r + 8, hi))
            _axpy_row4(a[r], down[r], a[r + 1], down[r + 1], a[r + 2], down[r + 2], a[r + 3], down[r + 3], fmt, buf)
            r += 4
        while r < hi:
            _axpy_row(a[r], down[r], fmt, buf)
            r += 1
    for j in range(d):
        acc = np.float32(0.0)
        for c in range(n_parts):
            acc += partial[c, j]
        y[j] = acc


@njit(nogil=True, cache=True, fastmath=True)
def _predict(w1, b1, w2, b2, threshold, x, z, logits, rows):
    """Candidate rows of one layer: relu(w1 x + b1) -> w2 z + b2 > threshold. Returns how many of
    `rows` (int32 workspace) are filled, in increasing order."""
    _predictor_hidden(w1, b1, x, z)
    return _predicted_rows(w2, b2, threshold, z, logits, rows)


@njit(nogil=True, cache=True, fastmath=True)
def _predictor_hidden(w1, b1, x, z):
    """z = relu(w1 x + b1): the predictor's hidden layer."""
    _matvec(w1, FMT_F32, x, z)
    for i in range(z.shape[0]):
        z[i] = max(z[i] + b1[i], np.float32(0.0))


@njit(nogil=True, cache=True, fastmath=True)
def _predicted_rows(w2, b2, threshold, z, logits, rows):
    """The rows i of w2 (n, r) with w2[i] z + b2[i] > threshold into `rows`, in increasing order; returns
    how many."""
    _matvec(w2, FMT_F32, z, logits)
    n = 0
    for i in range(logits.shape[0]):
        if logits[i] + b2[i] > threshold:
            rows[n] = i
            n += 1
    return n


@njit(nogil=True, cache=True, fastmath=False)
def _route(router, x, top_k, p, chosen):
    """Mixtral's router for one token: p = softmax(router x) (fp32); the top_k experts (ties to the lower
    index) into chosen[:top_k] in increasing expert order; p[e] of a chosen expert becomes its weight
    renormalised over the chosen ones. Returns top_k."""
    n = router.shape[0]
    for e in range(n):
        p[e] = _dot_row(router[e], FMT_F32, x)
    m = p[0]
    for e in range(1, n):
        m = max(m, p[e])
    total = np.float32(0.0)
    for e in range(n):
        p[e] = np.exp(p[e] - m)
        total += p[e]
    for e in range(n):
        p[e] /= total
    for c in range(top_k):
        best = -1
        for e in range(n):
            taken = False
            for q in range(c):
                if chosen[q] == e:
                    taken = True
            if not taken and (best < 0 or p[e] > p[best]):
                best = e
        chosen[c] = best
    kept = np.float32(0.0)
    for c in range(top_k):
        kept += p[chosen[c]]
    for c in range(top_k):
        p[chosen[c]] /= kept
    for c in range(1, top_k):                              # insertion sort: expert order
        v = chosen[c]
        q = c - 1
        while q >= 0 and chosen[q] > v:
            chosen[q + 1] = chosen[q]
            q -= 1
        chosen[q + 1] = v
    return top_k


@njit(nogil=True, cache=True, fastmath=True)
def _block_dense_ffn(gate, up, down, fmt_gate, fmt_up, fmt_down, x, act, threshold, a, u, y, xq, dx, xs):
    """The dense FFN over block rows: a = act(gate x) * (up x); y = down a with down (d, f) in the
    checkpoint's orientation (its blocks run along the neurons). a, u (f,) and xq, dx, xs are workspaces."""
    _block_matvec(gate, fmt_gate, x, a, xq, dx, xs)
    _block_matvec(up, fmt_up, x, u, xq, dx, xs)
    for i in range(a.shape[0]):
        a[i] = _combine(_gate_act(a[i], act, threshold), u[i], act, threshold)
    _block_matvec(down, fmt_down, a, y, xq, dx, xs)


def _ffn_dense(gate, up, down, fmt, x, act, threshold, a, u, partial, y, xq, dx, xs):
    """y = the dense gated FFN of x over one layer's (or expert's) rows; fmt is the layer's row of `fmts`; a, u
    (f,) and the rest workspaces. Compiled per weight dtype: element rows -> `_dense_ffn` (down neuron-major),
    block rows -> `_block_dense_ffn` (down in the checkpoint's (d, f) orientation)."""
    raise NotImplementedError("only callable from Numba-compiled code")


@overload(_ffn_dense)
def _ffn_dense_typed(gate, up, down, fmt, x, act, threshold, a, u, partial, y, xq, dx, xs):
    if gate.dtype == types.uint8:
        return lambda gate, up, down, fmt, x, act, threshold, a, u, partial, y, xq, dx, xs: _block_dense_ffn(
            gate, up, down, fmt[2], fmt[3], fmt[4], x, act, threshold, a, u, y, xq, dx, xs)
    return lambda gate, up, down, fmt, x, act, threshold, a, u, partial, y, xq, dx, xs: _dense_ffn(
        gate, up, down, fmt[2], x, act, threshold, a, partial, y)


def _ffn_cold(gate, up, down, gate_scale, up_scale, down_scale, fmt, x, active, act, threshold, partial, work,
              work_idx, xq, dx, xs, y):
    """y = the FFN of x over one layer's cold rows `active`. Compiled per row dtype: element rows ->
    `cold_ffn_decode_kernel`, block rows -> `block_cold_ffn_decode_kernel` (x rounded to int8 in xq, dx, xs)."""
    raise NotImplementedError("only callable from Numba-compiled code")


@overload(_ffn_cold)
def _ffn_cold_typed(gate, up, down, gate_scale, up_scale, down_scale, fmt, x, active, act, threshold, partial,
                    work, work_idx, xq, dx, xs, y):
    if gate.dtype == types.uint8:
        def block_rows(gate, up, down, gate_scale, up_scale, down_scale, fmt, x, active, act, threshold, partial,
                       work, work_idx, xq, dx, xs, y):
            block_cold_ffn_decode_kernel(gate, up, down, fmt, x, active, act, threshold, partial, work, work_idx,
                                         xq, dx, xs, y)
        return block_rows

    def element_rows(gate, up, down, gate_scale, up_scale, down_scale, fmt, x, active, act, threshold, partial,
                     work, work_idx, xq, dx, xs, y):
        cold_ffn_decode_kernel(gate, up, down, gate_scale, up_scale, down_scale, fmt, x, active, act, threshold,
                               partial, work, work_idx, y)
    return element_rows


# ----------------------------------------------------------------------------- the token

@njit(nogil=True, cache=True, fastmath=True)
def decode_token_kernel(
        token, pos, start, kv_len,                                     # scalars of this step
        emb, emb_scale, emb_fmt, fmts, out_fmt, n_heads, n_kv_heads, head_dim, eps, residual_scale,
        attn_norm, wqkv, bqkv, wo, bo, kcache, vcache, cache_fmt, rope_cos, rope_sin,
        ffn_norm, ffn_mode, gate, up, down, gate_scale, up_scale, down_scale, act, act_threshold,
        pred_w1, pred_b1, pred_w2, pred_b2, pred_threshold, pred_reads_residual,
        router, top_k,
        final_norm, out_w, logit_scale,
        h, xn, qkv, scores, att, branch, ffn_a, partial, pred_z, pred_logits, rows, all_rows, sparse_work,
        sparse_idx, expert_out, router_p, chosen, xq, dx, xs, logits):
    """One token through every layer into `logits` (V,). Per-layer arguments are typed Lists (one
    entry per layer) or arrays indexed by layer; gate/up/down hold one entry per layer, or per (layer,
    expert) at layer * n_experts + e for an MoE model; fmts (L, 5) is the storage format of each layer's
    qkv, wo, gate, up and down (FMT_*); everything after `logit_scale` is a workspace."""
    d = h.shape[0]
    e = emb[token]
    for j in range(d):
        h[j] = _w(e, j, emb_fmt) * emb_scale
    q_kv = (n_heads + n_kv_heads) * head_dim
    cos = rope_cos[pos]
    sin = rope_sin[pos]
    for layer in range(len(wqkv)):
        # ---- attention
        _rms_norm(h, attn_norm[layer], eps, xn)
        _mv(wqkv[layer], fmts[layer, 0], xn, qkv, xq, dx, xs)
        b = bqkv[layer]
        for i in range(b.shape[0]):
            qkv[i] += b[i]
        for hh in range(n_heads + n_kv_heads):
            _rope(qkv[hh * head_dim:(hh + 1) * head_dim], cos, sin)
        kc = kcache[layer]
        vc = vcache[layer]
        for kvh in range(n_kv_heads):
            krow = kc[kvh, pos]
            vrow = vc[kvh, pos]
            for j in range(head_dim):
                _put(krow, j, qkv[n_heads * head_dim + kvh * head_dim + j])
                _put(vrow, j, qkv[q_kv + kvh * head_dim + j])
        _attention(qkv, n_heads, n_kv_heads, head_dim, kc, vc, cache_fmt, start, kv_len, scores, att)
        _mv(wo[layer], fmts[layer, 1], att, branch, xq, dx, xs)
        b = bo[layer]
        for i in range(b.shape[0]):
            branch[i] += b[i]
        for j in range(d):
            h[j] += residual_scale * branch[j]
        # ---- FFN
        _rms_norm(h, ffn_norm[layer], eps, xn)
        mode = ffn_mode[layer]
        fmt = fmts[layer]
        if mode == FFN_DENSE:
            # (pred_logits, (f,), is free in a dense layer: the block FFN's up products)
            _ffn_dense(gate[layer], up[layer], down[layer], fmt, xn, act[layer], act_threshold[layer], ffn_a,
                       pred_logits, partial, branch, xq, dx, xs)
        elif mode == FFN_MOE or mode == FFN_MOE_EXACT or mode == FFN_MOE_PREDICTED:
            n_experts = router[layer].shape[0]
            k = _route(router[layer], xn, top_k, router_p[:n_experts], chosen)
            if mode == FFN_MOE_PREDICTED:
                z = pred_z[:pred_w1[layer].shape[0]]
                _predictor_hidden(pred_w1[layer], pred_b1[layer], h if pred_reads_residual else xn, z)
            branch[:] = 0.0
            for c in range(k):                               # in expert order
                e = chosen[c]
                i = layer * n_experts + e
                if mode == FFN_MOE:
                    # (pred_logits, (f,), is free here: the block FFN's up products)
                    _ffn_dense(gate[i], up[i], down[i], fmt, xn, act[layer], act_threshold[layer], ffn_a,
                               pred_logits, partial, expert_out, xq, dx, xs)
                else:
                    f = gate[i].shape[0]
                    if mode == FFN_MOE_PREDICTED:
                        n = _predicted_rows(pred_w2[layer][e * f:(e + 1) * f], pred_b2[layer][e * f:(e + 1) * f],
                                            pred_threshold[layer], z, pred_logits[:f], rows)
                        active = rows[:n]
                    else:
                        active = all_rows[:f]
                    _ffn_cold(gate[i], up[i], down[i], gate_scale[i], up_scale[i], down_scale[i], fmt[2], xn,
                              active, act[layer], act_threshold[layer], partial, sparse_work, sparse_idx, xq, dx, xs,
                              expert_out)
                w = router_p[e]
                for j in range(d):
                    branch[j] += expert_out[j] * w
        else:
            if mode == FFN_PREDICTED:
                n = _predict(pred_w1[layer], pred_b1[layer], pred_w2[layer], pred_b2[layer],
                             pred_threshold[layer], h if pred_reads_residual else xn,
                             pred_z[:pred_w1[layer].shape[0]], pred_logits, rows)
                active = rows[:n]
            else:
                active = all_rows[:gate[layer].shape[0]]
            _ffn_cold(gate[layer], up[layer], down[layer], gate_scale[layer], up_scale[layer], down_scale[layer],
                      fmt[2], xn, active, act[layer], act_threshold[layer], partial, sparse_work, sparse_idx,
                      xq, dx, xs, branch)
        for j in range(d):
            h[j] += residual_scale * branch[j]
    _rms_norm(h, final_norm, eps, xn)
    for j in range(d):
        xn[j] *= logit_scale
    _mv(out_w, out_fmt, xn, logits, xq, dx, xs)


# ----------------------------------------------------------------------------- the step object

def _np(t: torch.Tensor) -> np.ndarray:
    """A numpy view of a CPU tensor's storage (bf16 as its uint16 bits); no copy."""
    t = t.detach()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16)
    return t.numpy()


def _f32(t: torch.Tensor | None, n: int = 0) -> np.ndarray:
    """A small fp32 copy (norm gains, biases, predictors); an empty array for None."""
    return np.zeros(n, np.float32) if t is None else t.detach().float().contiguous().numpy().copy()


def _typed(arrays: list[np.ndarray]) -> List:
    out = List()
    for a in arrays:
        out.append(np.ascontiguousarray(a))
    return out


# Every ModelConfig field this step implements (tests/test_cpu_decode.py covers each). A field added to
# ModelConfig later is a feature this step does not know: such a model decodes eagerly (said once) until
# the step implements it and the field is listed here; a test fails when the list falls behind.
HANDLED_CONFIG_FIELDS = frozenset({
    "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "vocab_size", "head_dim", "norm_eps",
    "rope_theta", "rope_scaling",                 # through the model's rope_cos / rope_sin tables
    "max_seq_len", "tie_embeddings", "act", "act_threshold", "attention_bias", "sliding_window",
    "scale_emb", "scale_depth", "dim_model_base", "residual_scale", "logit_scale",
    "architecture", "bos_token_id", "eos_token_ids",   # no effect on the forward
    "n_experts", "experts_per_token",   # MoE: the MoEFeedForward layers (FFN_MOE)
})


def unsupported_reason(model) -> str | None:
    """Why `CpuDecodeStep` cannot run this model (None: it can)."""
    import dataclasses

    from hybrid_runtime.hybrid import HybridFFN, HybridMoEFFN
    from hybrid_runtime.model import Attention, Block, FeedForward, MoEFeedForward
    from hybrid_runtime.quant import BlockFeedForward, BlockLinear
    unknown = {f.name for f in dataclasses.fields(model.config)} - HANDLED_CONFIG_FIELDS
    if unknown:
        return f"config field(s) {', '.join(sorted(unknown))} not implemented by the one-call CPU decode"
    if any(type(layer) is not Block or type(layer.attn) is not Attention for layer in model.layers):
        return "a block or attention module other than the engine's own (e.g. layer offload)"
    w = model.tok_embeddings.weight
    if w.device.type != "cpu":
        return "the model is not on the CPU"
    if model.layers[0].attn.kv_cache is None:
        return "no KV cache (setup_cache not called)"
    # float32 and bf16 arrays may mix (the kernels dispatch on the array dtype); fp16 bits would read as bf16
    dtypes = {p.dtype for p in model.parameters()} | {layer.attn.kv_cache.k.dtype for layer in model.layers}
    if not dtypes <= {torch.float32, torch.bfloat16}:
        return f"weights in {', '.join(sorted(str(d).replace('torch.', '') for d in dtypes))} (float32 or bfloat16 only)"
    kinds = set()
    for layer in model.layers:
        ffn = layer.ffn
        if isinstance(ffn, HybridFFN):
            if ffn.hot_gate.shape[0]:
                return "hot FFN rows on the CPU (--hot-fraction > 0 on --device cpu)"
            if ffn.cold is None:
                return "a layer without cold rows"
            kinds.add((type(ffn).__name__, ffn.cold.cold.gate.dtype))
        elif isinstance(ffn, HybridMoEFFN):
            if any(ffn.n_hot):
                return "hot FFN rows on the CPU (--hot-fraction > 0 on --device cpu)"
            if any(c is None for c in ffn.cold):
                return "an expert without cold rows"
            kinds.add(("HybridMoEFFN", ffn.predictor is not None, ffn.cold[0].cold.gate.dtype))
        elif type(ffn) is FeedForward:
            kinds.add(("FeedForward", ffn.gate.dtype))
        elif type(ffn) is MoEFeedForward:
            gate = ffn.experts[0].gate
            kinds.add(("MoEFeedForward", getattr(gate, "blocks", gate).dtype))   # float rows or BlockLinear
        elif type(ffn) is BlockFeedForward:
            kinds.add(("BlockFeedForward", torch.uint8))
        else:
            return f"FFN module {type(ffn).__name__}"
    if len(kinds) > 1:
        return "layers with different FFN kinds"
    blocks = {isinstance(m, BlockLinear) for layer in model.layers for m in (layer.attn.wqkv, layer.attn.wo)}
    blocks.add(isinstance(model.output, BlockLinear))
    if len(blocks) > 1:
        return "block-quantized and float attention / output matrices mixed"
    return None


def _matrix(m) -> tuple[np.ndarray, int]:
    """(stored rows, FMT_* code) of an nn.Linear, a BlockLinear or a weight tensor (no copy)."""
    from hybrid_runtime.quant import BlockLinear
    if isinstance(m, BlockLinear):
        return m.blocks.numpy(), BLOCK_FORMATS[m.fmt]
    t = m.weight if isinstance(m, torch.nn.Linear) else m
    return _np(t), FMT_BF16 if t.dtype == torch.bfloat16 else FMT_F32


class CpuDecodeStep:
    """`step(tokens (1, 1), input_pos (1,), kv_len)` -> logits (1, 1, V) fp32, like
    `Transformer.forward` for one token, as one Numba call. The logits are a workspace of the step:
    valid until the next call. The model's KV cache must be set up (`setup_cache`) first."""

    def __init__(self, model):
        from hybrid_runtime.hybrid import HybridMoEFFN, PredictedHybridFFN
        why = unsupported_reason(model)
        if why is not None:
            raise ValueError(f"CpuDecodeStep cannot run this model: {why}")
        cfg = model.config
        self.model, self.config = model, cfg
        layers = model.layers
        attn0 = layers[0].attn
        qkv = [_matrix(layer.attn.wqkv) for layer in layers]
        wo = [_matrix(layer.attn.wo) for layer in layers]
        out_w, out_fmt = _matrix(model.output)
        emb = model.tok_embeddings.weight
        self.emb_fmt = FMT_BF16 if emb.dtype == torch.bfloat16 else FMT_F32
        self.cache_fmt = FMT_BF16 if attn0.kv_cache.k.dtype == torch.bfloat16 else FMT_F32
        L = cfg.n_layers
        q_rows = (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim
        ffn0 = layers[0].ffn
        hybrid = hasattr(ffn0, "cold")
        if isinstance(ffn0, HybridMoEFFN):
            # one entry per (layer, expert) at layer * n_experts + e, as for MoEFeedForward
            colds = [c.cold for layer in layers for c in layer.ffn.cold]
            ffn_fmts = [(colds[0].fmt_code,) * 3] * L
            gate, up, down = ([getattr(c, n) for c in colds] for n in ("gate", "up", "down"))
            scales = [[getattr(c, n) for c in colds] for n in ("gate_scale", "up_scale", "down_scale")]
            acts = [layer.ffn.activation for layer in layers]
            act_codes = [a.kernel_code for a in acts]
            act_thr = [a.kernel_threshold for a in acts]
            predicted = ffn0.predictor is not None
            mode = FFN_MOE_PREDICTED if predicted else FFN_MOE_EXACT
            f_max = cfg.ffn_dim
        elif hybrid:
            colds = [layer.ffn.cold.cold for layer in layers]
            ffn_fmts = [(c.fmt_code,) * 3 for c in colds]
            gate, up, down = ([getattr(c, n) for c in colds] for n in ("gate", "up", "down"))
            scales = [[getattr(c, n) for c in colds] for n in ("gate_scale", "up_scale", "down_scale")]
            acts = [layer.ffn.activation for layer in layers]
            act_codes = [a.kernel_code for a in acts]
            act_thr = [a.kernel_threshold for a in acts]
            predicted = isinstance(ffn0, PredictedHybridFFN)
            mode = FFN_PREDICTED if predicted else FFN_EXACT
            f_max = max(c.n_rows for c in colds)
        else:
            moe = cfg.n_experts > 0
            # one entry per layer, or per (layer, expert) at layer * n_experts + e
            experts = [ex for layer in layers for ex in layer.ffn.experts] if moe else [layer.ffn for layer in layers]
            gate, up, down = ([_matrix(getattr(m, n)) for m in experts] for n in ("gate", "up", "down"))
            ffn_fmts = [(g[1], u[1], dn[1]) for g, u, dn in zip(gate, up, down)][::len(experts) // L]
            gate, up, down = ([a for a, _ in ms] for ms in (gate, up, down))
            empty = np.zeros(0, np.float32)
            scales = [[empty] * len(experts) for _ in range(3)]
            acts = [layer.ffn.activation for layer in layers]
            act_codes = [a.dense_kernel_code for a in acts]
            act_thr = [a.threshold for a in acts]
            predicted, mode = False, FFN_MOE if moe else FFN_DENSE
            f_max = cfg.ffn_dim
        if predicted:
            preds = [layer.ffn.predictor for layer in layers]
            w1 = [_f32(p.w1) for p in preds]
            b1 = [_f32(p.b1) for p in preds]
            w2 = [_f32(p.w2) for p in preds]
            b2 = [_f32(p.b2) for p in preds]
            thr = np.array([p.threshold for p in preds], np.float32)
            reads_residual = bool(ffn0.reads_residual)
            r_max = max(a.shape[0] for a in w1)
        else:
            w1 = w2 = [np.zeros((0, 0), np.float32)] * L
            b1 = b2 = [np.zeros(0, np.float32)] * L
            thr = np.zeros(L, np.float32)
            reads_residual, r_max = False, 0
        self.mode = ("dense", "exact", "predictor", "mixture-of-experts", "hybrid mixture-of-experts exact",
                     "hybrid mixture-of-experts predictor")[mode]
        routers = ([_f32(layer.ffn.router) for layer in layers] if mode in (FFN_MOE, FFN_MOE_EXACT, FFN_MOE_PREDICTED)
                   else [np.zeros((0, 0), np.float32)] * L)
        n_threads = numba.get_num_threads()
        S = model.max_seq_len
        self._weights = (
            _np(emb), np.float32(cfg.scale_emb), self.emb_fmt,
            np.array([(q[1], o[1], *f) for q, o, f in zip(qkv, wo, ffn_fmts)], np.int64), out_fmt,
            cfg.n_heads, cfg.n_kv_heads,
            cfg.head_dim, np.float32(cfg.norm_eps), np.float32(cfg.residual_scale),
            _typed([_f32(layer.attn_norm.weight) for layer in layers]),
            _typed([a for a, _ in qkv]),
            _typed([_f32(layer.attn.wqkv.bias) for layer in layers]),
            _typed([a for a, _ in wo]),
            _typed([_f32(layer.attn.wo.bias) for layer in layers]),
            _typed([_np(layer.attn.kv_cache.k[0]) for layer in layers]),
            _typed([_np(layer.attn.kv_cache.v[0]) for layer in layers]),
            self.cache_fmt, model.rope_cos.numpy(), model.rope_sin.numpy(),
            _typed([_f32(layer.ffn.norm.weight) for layer in layers]),
            np.full(L, mode, np.int64), _typed(gate), _typed(up), _typed(down),
            *(_typed(s) for s in scales), np.array(act_codes, np.int64), np.array(act_thr, np.float32),
            _typed(w1), _typed(b1), _typed(w2), _typed(b2), thr, reads_residual,
            _typed(routers), max(cfg.experts_per_token, 1),
            _f32(model.norm.weight), out_w, np.float32(cfg.logit_scale),
        )
        self._sizes = (q_rows, S, f_max, max(r_max, 1))
        self._make_work(n_threads)
        self.window = cfg.sliding_window or 0

    def _make_work(self, n_threads: int) -> None:
        """The kernel's workspaces (everything after `logit_scale` in its signature), made here and nowhere
        per token; again only when the thread count changes (the per-thread partial sums and row lists)."""
        cfg, (q_rows, S, f_max, r_max) = self.config, self._sizes
        d = cfg.dim
        x_max = max(d, f_max, cfg.n_heads * cfg.head_dim)   # the longest vector a block matrix multiplies
        self._n_threads = n_threads
        self._work = (
            np.zeros(d, np.float32), np.zeros(d, np.float32), np.zeros(q_rows, np.float32),        # h, xn, qkv
            np.zeros((cfg.n_heads, S), np.float32), np.zeros(cfg.n_heads * cfg.head_dim, np.float32),  # scores, att
            np.zeros(d, np.float32), np.zeros(f_max, np.float32), np.zeros((n_threads, d), np.float32),  # .., partial
            np.zeros(r_max, np.float32), np.zeros(f_max, np.float32), np.zeros(f_max, np.int32),      # predictor
            np.arange(f_max, dtype=np.int32),                                                          # all_rows
            np.zeros((n_threads, 2, f_max), np.float32), np.zeros((n_threads, f_max), np.int64),      # sparse
            np.zeros(d, np.float32), np.zeros(max(cfg.n_experts, 1), np.float32),                    # experts
            np.zeros(max(cfg.experts_per_token, 1), np.int64),
            np.zeros(x_max, np.int8), np.zeros(x_max // 32, np.float32), np.zeros(x_max // 32, np.float32),  # x as int8
            np.zeros(cfg.vocab_size, np.float32),                                                      # logits
        )
        self.logits = torch.from_numpy(self._work[-1]).view(1, 1, cfg.vocab_size)

    def describe(self) -> str:
        return (f"one-call Numba CPU decode ({self.mode} FFN, "
                f"{numba.get_num_threads()} threads, threading layer {numba.threading_layer()})")

    def __call__(self, tokens: torch.Tensor, input_pos: torch.Tensor, kv_len: int) -> torch.Tensor:
        if tokens.shape != (1, 1):
            raise ValueError(f"CpuDecodeStep decodes one token of one sequence, got tokens {tuple(tokens.shape)}")
        token, pos = int(tokens[0, 0]), int(input_pos[0])   # host tensors: no device sync
        if pos + 1 != kv_len or not 0 <= pos < self.model.max_seq_len:
            raise ValueError(f"position {pos} with kv_len {kv_len} (cache of {self.model.max_seq_len})")
        start = max(0, kv_len - self.window) if self.window else 0
        if numba.get_num_threads() != self._n_threads:   # --threads changed since construction
            self._make_work(numba.get_num_threads())
        args = (token, pos, start, kv_len, *self._weights, *self._work)
        if "decode_token" in _ready:
            decode_token_kernel(*args)
        else:
            _first_call("decode_token", decode_token_kernel, *args)
        return self.logits


def cpu_decode_step(model):
    """A `CpuDecodeStep` for the model, or None with one line on stderr saying why decode stays eager."""
    why = unsupported_reason(model)
    if why is not None:
        log(f"note: decoding with torch ops ({why}), not the one-call CPU decode (slower)")
        return None
    return CpuDecodeStep(model)
