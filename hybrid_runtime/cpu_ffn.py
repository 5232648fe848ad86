"""Cold-neuron FFN on the CPU: Numba kernels over the predicted-active rows of one layer.

A layer's cold neurons are kept neuron-major, like the GPU's hot block: `gate`, `up` and `down`
are (n_cold, d), one row per neuron (down is HF's `down_proj.weight` transposed). For one token

    g_i = gate_i . x        a_i = act(g_i) * (up_i . x)        y = sum_i a_i * down_i

over the active neurons i only. A neuron whose activated gate is zero (the predictor's set is
a superset of the true one) costs its gate row only: its up and down rows are never read.

Storage at rest is 16-bit or 8-bit, never an fp32 copy (a 7B model's cold half must fit a
consumer PC's RAM); accumulation is fp32.
- "bf16": bf16 bit patterns in uint16 arrays. Numba has no half type: bf16 -> fp32 is the
  16-bit pattern shifted left by 16 and reinterpreted (an LLVM bitcast intrinsic below).
- "fp16": fp16 bit patterns in uint16 arrays, widened by the CPU's F16C conversion (an LLVM
  `fpext half` intrinsic below), or where a CPU lacks F16C by 32-bit integer bit manipulation
  (exact for normals, subnormals, inf and nan, ~half the speed). Both vectorise.
- "int8": symmetric per-row quantisation, w ~= q * scale, q in [-127, 127], one fp32 scale per
  row (`quantize_rows_int8`).

Kernels (`cold_ffn_decode_kernel`, `cold_ffn_batch_kernel`) are module-level
`@njit(parallel=True, nogil=True, cache=True, fastmath=True)` drivers on plain arrays; the
per-row work is in plain `@njit` helpers. They release the GIL, so the runtime can run them in
a Python thread while the GPU computes the hot neurons.

Threads: the drivers use `numba.get_num_threads()` threads, which `numba.set_num_threads(n)`
sets *per calling thread* (Numba's setting is thread-local): a runtime that calls the kernels
from a worker thread must call `numba.set_num_threads` in that worker. Numba picks the `omp`
threading layer where it can (`tbb`, `omp`, then `workqueue`); under `workqueue` only one
thread at a time may run parallel kernels. A `ColdFFN` owns a workspace: one caller at a time.

Speed (bench/bench_cpu_ffn.py): the decode kernel reads each active neuron's rows once, four
neurons at a time (four memory streams per thread; one stream per thread stalls at every row
start and reached half the bandwidth). One core of the 2-core dev VM: bf16 ~18 GB/s of active
rows (single-core sequential read roof ~31-34 GB/s), fp16 and int8 ~12-13 GB/s; the
16-core GPU host needs only ~5.4 GB/s per core to reach its 86 GB/s roof.

Entry points:
`act` is an activation name (with FATReLU's `threshold`) or an `activations.Activation` (which can
carry a SiLU magnitude cut).
- `cold_ffn(cold, x, active, act, threshold)` / `cold_ffn_batch(...)`: validate everything,
  allocate the output; for tests and one-off calls.
- `ColdFFN(cold, act, threshold)`: validated once at construction; `.decode(x, active, out)` and
  `.batch(x, active, out)` call the kernels unchecked (the decode hot path).
- `cold_ffn_ref` / `cold_ffn_batch_ref`: numpy references the tests compare the kernels to.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import numba
import numpy as np
import torch
from llvmlite import ir
from numba import njit, prange, types
from numba.core.extending import intrinsic, overload

from hybrid_runtime.activations import ACT_DRELU, ACT_FATRELU, ACT_RELU2, ACT_SILU, ACT_SILU_MAGNITUDE, Activation
from hybrid_runtime.errors import UserError

# storage formats (the `fmt` argument of the kernels); float32 arrays (cpu_decode.py's fp32 models) are
# recognised by their dtype, whatever `fmt` says
FMT_BF16, FMT_FP16, FMT_INT8, FMT_F32 = 0, 1, 2, 3
FORMATS = {"bf16": FMT_BF16, "fp16": FMT_FP16, "int8": FMT_INT8}
# llama.cpp's block formats (quant.py): rows are uint8 arrays of blocks, read by the _block_* helpers
FMT_Q8_0, FMT_Q4_0, FMT_Q4_1 = 4, 5, 6
BLOCK_FORMATS = {"q8_0": FMT_Q8_0, "q4_0": FMT_Q4_0, "q4_1": FMT_Q4_1}
COLD_FORMATS = (*FORMATS, *BLOCK_FORMATS)   # what ColdRows can hold

# activation kinds (the `act` argument of the kernels): Activation.kernel_code (activations.py)

_INT8_QMAX = 127.0
_QUANT_CHUNK_ROWS = 1024  # rows converted at a time: bounds the transient fp32 memory


# ----------------------------------------------------------------------------- bit conversions

@intrinsic
def _f32_from_bits(typingctx, bits):
    """Reinterpret the low 32 bits of an integer as a float32 (LLVM bitcast, no conversion)."""
    if not isinstance(bits, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        v = args[0]
        i32 = ir.IntType(32)
        if v.type.width > 32:
            v = builder.trunc(v, i32)
        elif v.type.width < 32:
            v = builder.zext(v, i32)
        return builder.bitcast(v, ir.FloatType())

    return types.float32(bits), codegen


@njit(inline="always")
def _bf16_to_f32(h):
    return _f32_from_bits(np.uint32(h) << np.uint32(16))


@intrinsic
def _fp16_to_f32_bits(typingctx, bits):
    """IEEE half bits -> float32 by integer arithmetic, exact for normals, subnormals, +-0, inf and
    nan (payload kept); for CPUs without F16C.

    Written in LLVM IR so every step stays 32-bit (Numba would widen integer arithmetic to
    64 bits, which vectorises 3x slower): normals rebias the exponent (15 -> 127), inf/nan set
    it to all ones, subnormals are m * 2^-24 (exact in fp32); the branches are selects.
    """
    if not isinstance(bits, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        i32 = ir.IntType(32)

        def c(n):
            return ir.Constant(i32, n)

        v = args[0]
        if v.type.width > 16:
            v = builder.trunc(v, ir.IntType(16))
        h = builder.zext(v, i32)
        em = builder.and_(h, c(0x7FFF))                          # exponent and mantissa
        sign = builder.shl(builder.and_(h, c(0x8000)), c(16))
        shifted = builder.shl(em, c(13))
        normal = builder.add(shifted, c(0x38000000))             # exponent + (127 - 15)
        infnan = builder.add(shifted, c(0x70000000))             # exponent 31 -> 255
        out = builder.select(builder.icmp_unsigned(">=", em, c(0x7C00)), infnan, normal)
        sub = builder.fmul(builder.sitofp(em, ir.FloatType()), ir.Constant(ir.FloatType(), 2.0 ** -24))
        out = builder.select(builder.icmp_unsigned("<", em, c(0x0400)), builder.bitcast(sub, i32), out)
        return builder.bitcast(builder.or_(out, sign), ir.FloatType())

    return types.float32(bits), codegen


@intrinsic
def _fp16_to_f32_f16c(typingctx, bits):
    """IEEE half bits -> float32 as an LLVM `fpext half to float`: on x86 with F16C this is the
    hardware conversion (vcvtph2ps, 8 or 16 lanes at a time), ~2x the bandwidth of the integer
    version. Exact for every non-nan pattern; a signalling nan comes back quiet."""
    if not isinstance(bits, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        v = args[0]
        if v.type.width > 16:
            v = builder.trunc(v, ir.IntType(16))
        elif v.type.width < 16:   # int8 rows also type-check this branch (never taken for them)
            v = builder.zext(v, ir.IntType(16))
        return builder.fpext(builder.bitcast(v, ir.HalfType()), ir.FloatType())

    return types.float32(bits), codegen


def _host_has_f16c() -> bool:
    # LLVM lowers `fpext half` to a library call where the CPU lacks F16C, and Numba's JIT does not
    # link that call: decide once, at import, from the features LLVM itself sees.
    import llvmlite.binding as llvm
    try:
        return bool(llvm.get_host_cpu_features().get("f16c", False))
    except RuntimeError:
        return False


HAS_F16C = _host_has_f16c()
_fp16_to_f32 = _fp16_to_f32_f16c if HAS_F16C else _fp16_to_f32_bits


@intrinsic
def _prefetch(typingctx, row, j):
    """Hint the CPU to fetch row[j]'s cache line (llvm.prefetch: read, high locality)."""
    if not isinstance(row, types.Array) or not isinstance(j, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        ary = context.make_array(signature.args[0])(context, builder, args[0])
        i8p = ir.IntType(8).as_pointer()
        ptr = builder.bitcast(builder.gep(ary.data, [args[1]]), i8p)
        i32 = ir.IntType(32)
        fnty = ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32])
        try:
            fn = builder.module.get_global("llvm.prefetch.p0")
        except KeyError:
            fn = ir.Function(builder.module, fnty, "llvm.prefetch.p0")
        builder.call(fn, [ptr, ir.Constant(i32, 0), ir.Constant(i32, 3), ir.Constant(i32, 1)])
        return context.get_dummy_value()

    return types.void(row, j), codegen


@njit(inline="always")
def _prefetch_row(row):
    step = 64 // row.itemsize
    for j in range(0, row.shape[0], step):
        _prefetch(row, j)


@njit(inline="always")
def _prefetch_rows(w, r0, r1):
    """Prefetch rows [r0, r1) of w (clipped to its rows), one hint per 64-byte line. The hardware
    prefetcher alone keeps too few lines in flight when 16-bit rows are converted as they stream
    (measured: a bf16 matrix-vector product from DRAM 14 -> 20 GB/s on the 2-core dev VM)."""
    for r in range(r0, min(r1, w.shape[0])):
        _prefetch_row(w[r])


# ----------------------------------------------------------------------------- per-row helpers

@njit(inline="always")
def _row_scale(scales, r, fmt):
    if fmt == FMT_INT8:
        return scales[r]
    return np.float32(1.0)


def _w(w, j, fmt):
    """Element j of a stored row as fp32 (unscaled). Compiled per array dtype (the overload below):
    uint16 rows are bf16 or fp16 bits by `fmt` (loop-invariant: LLVM unswitches the loops that call
    this into one vectorised loop per format), int8 rows are widened, float32 rows read as they are.
    uint8 rows are blocks (a weight is not one element): a typing error, read them with the _block_* helpers."""
    raise NotImplementedError("only callable from Numba-compiled code")


@overload(_w, inline="always")
def _w_typed(w, j, fmt):
    if w.dtype == types.float32:
        return lambda w, j, fmt: w[j]
    if w.dtype == types.uint16:
        def half(w, j, fmt):
            if fmt == FMT_BF16:
                return _bf16_to_f32(w[j])
            return _fp16_to_f32(w[j])
        return half
    if w.dtype == types.int8:
        return lambda w, j, fmt: np.float32(w[j])
    raise numba.core.errors.TypingError(f"_w: rows of {w.dtype} are not element-wise weights")


@njit
def _dot_row(w, fmt, x):
    """w . x for one stored row w (d,) (unscaled for int8); fp32 accumulation."""
    acc = np.float32(0.0)
    for j in range(x.shape[0]):
        acc += _w(w, j, fmt) * x[j]
    return acc


@njit
def _dot_row4(w0, w1, w2, w3, fmt, x):
    """Four rows dotted with x in one pass: four memory streams in flight instead of one
    (a single row's stream stalls at every row and page start; measured ~2x the bandwidth)."""
    a0 = np.float32(0.0)
    a1 = np.float32(0.0)
    a2 = np.float32(0.0)
    a3 = np.float32(0.0)
    for j in range(x.shape[0]):
        xj = x[j]
        a0 += _w(w0, j, fmt) * xj
        a1 += _w(w1, j, fmt) * xj
        a2 += _w(w2, j, fmt) * xj
        a3 += _w(w3, j, fmt) * xj
    return a0, a1, a2, a3


@njit
def _axpy_row(a, w, fmt, out):
    """out += a * w for one stored row w (a already includes the int8 scale)."""
    for j in range(out.shape[0]):
        out[j] += a * _w(w, j, fmt)


@njit
def _axpy_row4(a0, w0, a1, w1, a2, w2, a3, w3, fmt, out):
    """out += sum_k a_k * w_k over four rows: four streams, one read-modify-write of out."""
    for j in range(out.shape[0]):
        out[j] += (a0 * _w(w0, j, fmt) + a1 * _w(w1, j, fmt)) + (a2 * _w(w2, j, fmt) + a3 * _w(w3, j, fmt))


@njit
def _decode_row(w, fmt, scale, out):
    """out = w as fp32 (int8: times its row scale)."""
    if fmt == FMT_INT8:
        for j in range(out.shape[0]):
            out[j] = _w(w, j, fmt) * scale
    else:                                      # bit-exact, nan payloads included
        for j in range(out.shape[0]):
            out[j] = _w(w, j, fmt)


# ----------------------------------------------------------------------------- block rows
# A row of blocks (quant.py): per 32 weights an fp16 scale d (Q4_1: then an fp16 min m) and the codes.
# Q8_0: w = d * q (q int8); Q4_0: w = d * (q - 8); Q4_1: w = d * q + m (q a nibble: byte k of a block holds
# weight k in its low nibble, weight k + 16 in its high one). Block rows are read only by the helpers below
# (`_w` refuses them); the element-wise helpers above never see them.

@njit(inline="always")
def _half_at(row, o):
    """The little-endian fp16 at bytes o, o + 1 of a block row, as fp32."""
    return _fp16_to_f32(np.uint32(row[o]) | (np.uint32(row[o + 1]) << np.uint32(8)))


# Block dot products: x quantized to int8 per 32 weights (as llama.cpp does), then one
# integer dot product per block, written as LLVM vector IR (sum of 32 widened products) that LLVM lowers to
# vpdpbusd on CPUs with AVX512-VNNI / AVX-VNNI and to vpmaddwd elsewhere. Numba's own integer arithmetic
# widens to int64 and never reaches these instructions (measured: 12.7 vs 4.3 G weights/s a core for Q4).

def _load_codes(builder, data, offset, nibbles: bool):
    """One block's 32 codes as <32 x i8> from the bytes at data + offset: 32 int8 codes, or 16 bytes of nibbles
    (weight k in the low nibble of byte k, weight k + 16 in the high one)."""
    i8, i32 = ir.IntType(8), ir.IntType(32)
    n = 16 if nibbles else 32
    vec = ir.VectorType(i8, n)
    c = builder.load(builder.bitcast(builder.gep(data, [offset]), vec.as_pointer()), align=1)
    if not nibbles:
        return c
    lo = builder.and_(c, ir.Constant(vec, [15] * 16))
    hi = builder.lshr(c, ir.Constant(vec, [4] * 16))
    return builder.shuffle_vector(lo, hi, ir.Constant(ir.VectorType(i32, 32), list(range(32))))


def _vector_dot_codegen(signed_codes: bool, nibbles: bool):
    def codegen(context, builder, sig, args):
        row = context.make_array(sig.args[0])(context, builder, args[0])
        xq = context.make_array(sig.args[2])(context, builder, args[2])
        i8, i32 = ir.IntType(8), ir.IntType(32)
        v32 = ir.VectorType(i8, 32)
        v32i = ir.VectorType(i32, 32)
        x = builder.load(builder.bitcast(builder.gep(xq.data, [args[3]]), v32.as_pointer()), align=1)
        w = _load_codes(builder, row.data, args[1], nibbles)
        if not nibbles:   # int8 codes + 128 as unsigned bytes (xor of the sign bit): u8 x s8, the form vpdpbusd takes
            w = builder.xor(w, ir.Constant(v32, [0x80] * 32))
        xw = builder.sext(x, v32i)
        name = "llvm.vector.reduce.add.v32i32"
        try:
            fn = builder.module.get_global(name)
        except KeyError:
            fn = ir.Function(builder.module, ir.FunctionType(i32, [v32i]), name)
        total = builder.call(fn, [builder.mul(builder.zext(w, v32i), xw)])
        if signed_codes:                                   # back to q * x: minus 128 * sum(x), in integers
            total = builder.sub(total, builder.shl(builder.call(fn, [xw]), ir.Constant(i32, 7)))
        return builder.sext(total, ir.IntType(64))
    return codegen


def _check_isum_args(row, o, xq, j0) -> bool:
    return (isinstance(row, types.Array) and row.dtype == types.uint8 and isinstance(xq, types.Array)
            and xq.dtype == types.int8 and isinstance(o, types.Integer) and isinstance(j0, types.Integer))


@intrinsic
def _q4_isum(typingctx, row, o, xq, j0):
    """sum_k q_k * xq[j0 + k] over one Q4 block: 32 nibble codes (0..15) at row[o:o + 16], int8 xq."""
    if not _check_isum_args(row, o, xq, j0):
        return None
    return types.int64(row, o, xq, j0), _vector_dot_codegen(signed_codes=False, nibbles=True)


@intrinsic
def _q8_isum(typingctx, row, o, xq, j0):
    """sum_k q_k * xq[j0 + k] over one Q8_0 block: 32 int8 codes q at row[o:o + 32], int8 xq; computed as
    sum (q_k + 128) xq_k - 128 sum xq_k, since unsigned x signed bytes is what VNNI multiplies in one instruction."""
    if not _check_isum_args(row, o, xq, j0):
        return None
    return types.int64(row, o, xq, j0), _vector_dot_codegen(signed_codes=True, nibbles=False)


def _axpy_block_codegen(nibbles: bool):
    """out[j0:j0 + 32] += scale * q + offset for one block's 32 codes, as 32-lane vector IR (the codes
    widened in registers; Numba's scalar loop with the nibble split ran at ~2 G weights/s a core)."""
    def codegen(context, builder, sig, args):
        row = context.make_array(sig.args[0])(context, builder, args[0])
        out = context.make_array(sig.args[2])(context, builder, args[2])
        i32, f32 = ir.IntType(32), ir.FloatType()
        v32i, v32f = ir.VectorType(i32, 32), ir.VectorType(f32, 32)
        c = _load_codes(builder, row.data, args[1], nibbles)
        q = builder.uitofp(builder.zext(c, v32i), v32f) if nibbles else builder.sitofp(builder.sext(c, v32i), v32f)

        def splat(v):
            undef = ir.Constant(v32f, None)
            one = builder.insert_element(undef, v, ir.Constant(i32, 0))
            return builder.shuffle_vector(one, undef, ir.Constant(v32i, [0] * 32))
        ptr = builder.bitcast(builder.gep(out.data, [args[3]]), v32f.as_pointer())
        y = builder.load(ptr, align=4)
        y = builder.fadd(y, builder.fadd(builder.fmul(q, splat(args[4])), splat(args[5])))
        builder.store(y, ptr, align=4)
        return context.get_dummy_value()
    return codegen


def _check_axpy_args(row, o, out, j0, scale, offset) -> bool:
    return (isinstance(row, types.Array) and row.dtype == types.uint8 and isinstance(out, types.Array)
            and out.dtype == types.float32 and isinstance(o, types.Integer) and isinstance(j0, types.Integer)
            and scale == types.float32 and offset == types.float32)


@intrinsic
def _q4_axpy(typingctx, row, o, out, j0, scale, offset):
    """out[j0 + k] += scale * q_k + offset over one Q4 block's 32 nibble codes at row[o:o + 16]."""
    if not _check_axpy_args(row, o, out, j0, scale, offset):
        return None
    return types.void(row, o, out, j0, scale, offset), _axpy_block_codegen(nibbles=True)


@intrinsic
def _q8_axpy(typingctx, row, o, out, j0, scale, offset):
    """out[j0 + k] += scale * q_k + offset over one Q8_0 block's 32 int8 codes at row[o:o + 32]."""
    if not _check_axpy_args(row, o, out, j0, scale, offset):
        return None
    return types.void(row, o, out, j0, scale, offset), _axpy_block_codegen(nibbles=False)


@njit(fastmath=True)
def quantize_x(x, xq, dx, xs):
    """x (d,) fp32 -> per block of 32: xq int8 codes, dx the scale (max|x| / 127), xs = dx * sum(codes);
    x ~= dx * xq. Rounded half away from zero."""
    for b in range(x.shape[0] // 32):
        j0 = b * 32
        m = np.float32(0.0)
        for k in range(32):
            m = max(m, abs(x[j0 + k]))
        d = m / np.float32(127.0)
        inv = np.float32(1.0) / d if d > 0 else np.float32(0.0)
        total = 0
        for k in range(32):
            v = x[j0 + k] * inv
            q = np.int8(np.floor(abs(v) + np.float32(0.5)) * (np.float32(1.0) if v >= 0 else np.float32(-1.0)))
            xq[j0 + k] = q
            total += q
        dx[b] = d
        xs[b] = d * np.float32(total)


@njit(fastmath=True)
def _block_dot_row_q(w, fmt, xq, dx, xs):
    """w . x for one block row with x given as quantize_x's (xq, dx, xs): integer block dot products,
    scaled per block in fp32. One loop per format: a format test inside the block loop kept LLVM from
    vectorising it as well (measured: Q4_0 10.7 -> 15.2 G weights/s a core)."""
    acc = np.float32(0.0)
    if fmt == FMT_Q8_0:
        for b in range(dx.shape[0]):
            o = b * 34
            acc += _half_at(w, o) * (dx[b] * np.float32(_q8_isum(w, o + 2, xq, b * 32)))
    elif fmt == FMT_Q4_0:
        for b in range(dx.shape[0]):
            o = b * 18
            acc += _half_at(w, o) * (dx[b] * np.float32(_q4_isum(w, o + 2, xq, b * 32)) - np.float32(8.0) * xs[b])
    else:
        for b in range(dx.shape[0]):
            o = b * 20
            acc += _half_at(w, o) * (dx[b] * np.float32(_q4_isum(w, o + 4, xq, b * 32))) + _half_at(w, o + 2) * xs[b]
    return acc


@njit(fastmath=True)
def _block_axpy_row(a, w, fmt, out):
    """out += a * w for one block row: one vector update of 32 outputs per block (_q4_axpy / _q8_axpy)."""
    nb = out.shape[0] // 32
    zero = np.float32(0.0)
    if fmt == FMT_Q8_0:
        for b in range(nb):
            _q8_axpy(w, b * 34 + 2, out, b * 32, np.float32(a * _half_at(w, b * 34)), zero)
    elif fmt == FMT_Q4_0:
        for b in range(nb):
            ad = np.float32(a * _half_at(w, b * 18))
            _q4_axpy(w, b * 18 + 2, out, b * 32, ad, np.float32(-8.0) * ad)
    else:
        for b in range(nb):
            _q4_axpy(w, b * 20 + 4, out, b * 32, np.float32(a * _half_at(w, b * 20)),
                     np.float32(a * _half_at(w, b * 20 + 2)))


@njit
def _block_decode_row(w, fmt, out):
    """out = the row's weights in fp32."""
    out[:] = 0.0
    _block_axpy_row(np.float32(1.0), w, fmt, out)


@njit
def _dot_rows(w, scales, fmt, rows, x, out):
    """out[i] = (w[rows[i]] . x) * scale[rows[i]], four rows at a time."""
    n = rows.shape[0]
    n4 = n - n % 4
    for i in range(0, n4, 4):
        for k in range(i + 4, min(i + 8, n)):        # the next four rows, while these four stream
            _prefetch_row(w[rows[k]])
        out[i], out[i + 1], out[i + 2], out[i + 3] = _dot_row4(
            w[rows[i]], w[rows[i + 1]], w[rows[i + 2]], w[rows[i + 3]], fmt, x)
    for i in range(n4, n):
        out[i] = _dot_row(w[rows[i]], fmt, x)
    if fmt == FMT_INT8:
        for i in range(n):
            out[i] *= scales[rows[i]]


@njit
def _axpy_rows(w, scales, fmt, rows, a, out):
    """out += sum_i a[i] * scale[rows[i]] * w[rows[i]], four rows at a time."""
    n = rows.shape[0]
    if fmt == FMT_INT8:
        for i in range(n):
            a[i] *= scales[rows[i]]
    n4 = n - n % 4
    for i in range(0, n4, 4):
        for k in range(i + 4, min(i + 8, n)):
            _prefetch_row(w[rows[k]])
        _axpy_row4(a[i], w[rows[i]], a[i + 1], w[rows[i + 1]], a[i + 2], w[rows[i + 2]],
                   a[i + 3], w[rows[i + 3]], fmt, out)
    for i in range(n4, n):
        _axpy_row(a[i], w[rows[i]], fmt, out)


@njit(inline="always")
def _gate_act(g, act, threshold):
    """Activated gate value; zero means the neuron does not fire (its up/down rows are skipped)."""
    if act == ACT_FATRELU:
        return g if g >= threshold else np.float32(0.0)
    if act == ACT_RELU2:
        return g * g if g > 0 else np.float32(0.0)
    if act == ACT_SILU_MAGNITUDE or act == ACT_SILU:  # never zero: a magnitude cut needs u (_combine)
        return g / (np.float32(1.0) + np.exp(-g))
    return g if g > 0 else np.float32(0.0)        # relu, and drelu's gate half


@njit(inline="always")
def _combine(ga, u, act, threshold):
    """a = act(g) * u from the activated gate ga != 0 and the up value u (dReLU: relu on u too;
    a magnitude cut: 0 where |a| <= threshold, so the neuron's down row is skipped)."""
    if act == ACT_DRELU and u <= 0:
        return np.float32(0.0)
    if act == ACT_SILU_MAGNITUDE:
        a = ga * u
        return a if abs(a) > threshold else np.float32(0.0)
    return ga * u


@njit(inline="always")
def _keep_firing(rows, act, threshold, a, live):
    """Compact in place: the neurons of `rows` whose activated gate (a holds their gate products) is
    non-zero, into live[:n] with a[:n] their activated gates; returns n."""
    n = 0
    for i in range(rows.shape[0]):                   # n <= i
        ga = _gate_act(a[i], act, threshold)
        if ga != 0:
            live[n] = rows[i]
            a[n] = ga
            n += 1
    return n


@njit(inline="always")
def _keep_nonzero(n_live, act, threshold, a, u, live):
    """Compact in place: of live[:n_live] (activated gates a, up products u), the neurons whose activation is
    non-zero, into live[:n] with a[:n] their activations; returns n."""
    n = 0
    for i in range(n_live):
        ai = _combine(a[i], u[i], act, threshold)
        if ai != 0:
            live[n] = live[i]
            a[n] = ai
            n += 1
    return n


@njit
def _sparse_ffn_rows(gate, up, down, gate_scale, up_scale, down_scale, fmt, x, rows, act, threshold,
                     a, u, live, out):
    """out += FFN of token x over the neurons `rows` (one chunk of the active list).

    Three passes, each over four rows at a time: gate rows of all `rows`; up rows of the neurons
    whose gate fired; down rows of the neurons with a non-zero activation. A non-firing neuron
    costs its gate row only. a, u (fp32) and live (int64) are workspaces of at least len(rows).
    """
    n = rows.shape[0]
    a = a[:n]
    live = live[:n]
    _dot_rows(gate, gate_scale, fmt, rows, x, a)
    n_live = _keep_firing(rows, act, threshold, a, live)
    u = u[:n_live]
    _dot_rows(up, up_scale, fmt, live[:n_live], x, u)
    n_out = _keep_nonzero(n_live, act, threshold, a, u, live)
    _axpy_rows(down, down_scale, fmt, live[:n_out], a[:n_out], out)


@njit(fastmath=True, cache=True)
def decode_rows(w, fmt, scales):
    """Stored rows (n, d) -> fp32 (n, d), with the kernels' own conversion code (tests use it)."""
    out = np.empty(w.shape, np.float32)
    for r in range(w.shape[0]):
        _decode_row(w[r], fmt, _row_scale(scales, r, fmt), out[r])
    return out


@njit(parallel=True, nogil=True, cache=True, fastmath=True)
def decode_block_rows(w, fmt, out):
    """Block rows w (n, row bytes) -> out (n, d) fp32, rows in parallel (quant.BlockLinear's prefill)."""
    for r in prange(w.shape[0]):
        _block_decode_row(w[r], fmt, out[r])


# ----------------------------------------------------------------------------- drivers

@njit(parallel=True, nogil=True, cache=True, fastmath=True)
def cold_ffn_decode_kernel(gate, up, down, gate_scale, up_scale, down_scale, fmt,
                           x, active, act, threshold, partial, work, work_idx, y):
    """y = sum over active cold rows r of a_r * down_r, for one token.

    gate/up/down (n_cold, d) stored rows; *_scale (n_cold,) fp32 for int8, unused (size 0) else;
    x (d,) fp32; active (n_active,) int32 local row indices, each in [0, n_cold) (unchecked);
    partial (n_chunks, d) fp32 workspace: chunk c accumulates into partial[c] (one chunk per
    thread: n_chunks = numba.get_num_threads()), merged after the parallel loop; work (n_chunks, 2, m)
    fp32 and work_idx (n_chunks, m) int64 are chunk c's activation and row lists, m >= ceil(n_active /
    n_chunks) (nothing is allocated per call); y (d,) fp32 is overwritten.

    Chunk c takes every n-th entry of the active list starting at c, not a contiguous block: cold
    rows are stored most-frequent-first and a predicted row near the front fires more often (it
    then costs three rows, a non-firing one only its gate row), so contiguous blocks would give the
    first threads the most bytes and the rest would wait for them.
    """
    n_active = active.shape[0]
    n_used = min(partial.shape[0], n_active)
    for c in prange(n_used):
        buf = partial[c]
        buf[:] = 0.0
        _sparse_ffn_rows(gate, up, down, gate_scale, up_scale, down_scale, fmt, x,
                         active[c:n_active:n_used], act, threshold, work[c, 0], work[c, 1], work_idx[c], buf)
    _merge_partials(partial, n_used, y)


@njit(parallel=True, nogil=True, cache=True, fastmath=True)
def _merge_partials(partial, n_used, y):
    """y = sum of the first n_used per-chunk partial sums, parallel over column blocks of y."""
    d = y.shape[0]
    block = 256
    for b in prange((d + block - 1) // block):
        j0 = b * block
        j1 = min(d, j0 + block)
        yb = y[j0:j1]
        yb[:] = 0.0
        for c in range(n_used):
            _add_into(yb, partial[c, j0:j1])


@njit
def _block_sparse_ffn_rows(gate, up, down, fmt, xq, dx, xs, rows, act, threshold, a, u, live, out):
    """`_sparse_ffn_rows` for block rows: gate and up rows by integer block dot products with x as
    quantize_x's (xq, dx, xs); the down rows of the neurons that fire added into out in fp32. The row four
    ahead is prefetched (bench_cpu_ffn, q4_0, 7.5k x 4096 rows from DRAM: 2 ahead 4.9 GB/s, 4 ahead 6.8,
    8 ahead 5.9; single runs on a noisy VM)."""
    n = rows.shape[0]
    for i in range(n):
        if i + 4 < n:
            _prefetch_row(gate[rows[i + 4]])
        a[i] = _block_dot_row_q(gate[rows[i]], fmt, xq, dx, xs)
    n_live = _keep_firing(rows, act, threshold, a, live)
    for i in range(n_live):
        if i + 4 < n_live:
            _prefetch_row(up[live[i + 4]])
        u[i] = _block_dot_row_q(up[live[i]], fmt, xq, dx, xs)
    n_out = _keep_nonzero(n_live, act, threshold, a, u, live)
    for i in range(n_out):
        if i + 4 < n_out:
            _prefetch_row(down[live[i + 4]])
        _block_axpy_row(a[i], down[live[i]], fmt, out)


@njit(parallel=True, nogil=True, cache=True, fastmath=True)
def block_cold_ffn_decode_kernel(gate, up, down, fmt, x, active, act, threshold, partial, work, work_idx,
                                 xq, dx, xs, y):
    """`cold_ffn_decode_kernel` for block rows (quant.py formats): x quantized to int8 per block once
    (xq (>= d,) int8, dx, xs (>= d/32,) fp32 workspaces), chunks of the active list per thread as there."""
    d = x.shape[0]
    nb = d // 32
    xqv, dxv, xsv = xq[:d], dx[:nb], xs[:nb]
    quantize_x(x, xqv, dxv, xsv)
    n_active = active.shape[0]
    n_used = min(partial.shape[0], n_active)
    for c in prange(n_used):
        buf = partial[c]
        buf[:] = 0.0
        _block_sparse_ffn_rows(gate, up, down, fmt, xqv, dxv, xsv, active[c:n_active:n_used], act, threshold,
                               work[c, 0], work[c, 1], work_idx[c], buf)
    _merge_partials(partial, n_used, y)


@njit
def _dot4_f32(rows, x, t):
    """rows[0..3] . x[t] for fp32 rows decoded from storage."""
    a0 = np.float32(0.0)
    a1 = np.float32(0.0)
    a2 = np.float32(0.0)
    a3 = np.float32(0.0)
    for j in range(x.shape[1]):
        xj = x[t, j]
        a0 += rows[0, j] * xj
        a1 += rows[1, j] * xj
        a2 += rows[2, j] * xj
        a3 += rows[3, j] * xj
    return a0, a1, a2, a3


@njit
def _dot4x4_f32(rows, x, t, out):
    """out[k, s] = rows[k] . x[t + s] for k, s < 4: a 4x4 register tile (16 accumulators, 8 loads
    per 16 FMAs; ~2.5x the FLOP rate of one token at a time)."""
    a00 = a01 = a02 = a03 = np.float32(0.0)
    a10 = a11 = a12 = a13 = np.float32(0.0)
    a20 = a21 = a22 = a23 = np.float32(0.0)
    a30 = a31 = a32 = a33 = np.float32(0.0)
    for j in range(x.shape[1]):
        x0 = x[t, j]
        x1 = x[t + 1, j]
        x2 = x[t + 2, j]
        x3 = x[t + 3, j]
        r = rows[0, j]
        a00 += r * x0
        a01 += r * x1
        a02 += r * x2
        a03 += r * x3
        r = rows[1, j]
        a10 += r * x0
        a11 += r * x1
        a12 += r * x2
        a13 += r * x3
        r = rows[2, j]
        a20 += r * x0
        a21 += r * x1
        a22 += r * x2
        a23 += r * x3
        r = rows[3, j]
        a30 += r * x0
        a31 += r * x1
        a32 += r * x2
        a33 += r * x3
    out[0, 0], out[0, 1], out[0, 2], out[0, 3] = a00, a01, a02, a03
    out[1, 0], out[1, 1], out[1, 2], out[1, 3] = a10, a11, a12, a13
    out[2, 0], out[2, 1], out[2, 2], out[2, 3] = a20, a21, a22, a23
    out[3, 0], out[3, 1], out[3, 2], out[3, 3] = a30, a31, a32, a33


@njit
def _rows_times_tokens(rows, x, out):
    """out[k, t] = rows[k] . x[t] for the 4 rows and all T tokens (4x4 tiles, then a 4x1 tail)."""
    T = x.shape[0]
    tile = np.empty((4, 4), np.float32)
    T4 = T - T % 4
    for t in range(0, T4, 4):
        _dot4x4_f32(rows, x, t, tile)
        out[:, t:t + 4] = tile
    for t in range(T4, T):
        out[0, t], out[1, t], out[2, t], out[3, t] = _dot4_f32(rows, x, t)


@njit
def _axpy4x4_f32(a, seg, y, t):
    """y[t + s] += sum_k a[k, s] * seg[k] for s < 4: each seg element loaded once for 4 tokens."""
    a00, a01, a02, a03 = a[0, 0], a[0, 1], a[0, 2], a[0, 3]
    a10, a11, a12, a13 = a[1, 0], a[1, 1], a[1, 2], a[1, 3]
    a20, a21, a22, a23 = a[2, 0], a[2, 1], a[2, 2], a[2, 3]
    a30, a31, a32, a33 = a[3, 0], a[3, 1], a[3, 2], a[3, 3]
    for j in range(y.shape[1]):
        s0 = seg[0, j]
        s1 = seg[1, j]
        s2 = seg[2, j]
        s3 = seg[3, j]
        y[t, j] += (a00 * s0 + a10 * s1) + (a20 * s2 + a30 * s3)
        y[t + 1, j] += (a01 * s0 + a11 * s1) + (a21 * s2 + a31 * s3)
        y[t + 2, j] += (a02 * s0 + a12 * s1) + (a22 * s2 + a32 * s3)
        y[t + 3, j] += (a03 * s0 + a13 * s1) + (a23 * s2 + a33 * s3)


@njit
def _axpy4_f32(a, seg, y, t):
    """y[t] += sum_k a[k, t] * seg[k]."""
    a0, a1, a2, a3 = a[0, t], a[1, t], a[2, t], a[3, t]
    for j in range(y.shape[1]):
        y[t, j] += (a0 * seg[0, j] + a1 * seg[1, j]) + (a2 * seg[2, j] + a3 * seg[3, j])


@njit
def _batch_acts(gate, up, gate_scale, up_scale, fmt, x, active, lo, hi, act, threshold, acts):
    """acts[i, t] = a of neuron active[i] for token t, for i in [lo, hi): four rows at a time,
    decoded to fp32 once and dotted with every token; up rows only of neurons firing somewhere."""
    T, d = x.shape
    rows = np.zeros((4, d), np.float32)              # rows past the chunk's end stay zero
    dots = np.empty((4, T), np.float32)
    for i0 in range(lo, hi, 4):
        n = min(4, hi - i0)
        for k in range(n):
            r = active[i0 + k]
            _decode_row(gate[r], fmt, _row_scale(gate_scale, r, fmt), rows[k])
        if n < 4:
            rows[n:] = 0.0
        _rows_times_tokens(rows, x, dots)
        any_fire = False
        for k in range(n):
            fires = False
            for t in range(T):
                ga = _gate_act(dots[k, t], act, threshold)
                acts[i0 + k, t] = ga
                fires |= ga != 0
            if fires:
                r = active[i0 + k]
                _decode_row(up[r], fmt, _row_scale(up_scale, r, fmt), rows[k])
                any_fire = True
            else:
                rows[k] = 0.0
        if not any_fire:
            continue
        _rows_times_tokens(rows, x, dots)
        for k in range(n):
            for t in range(T):
                ga = acts[i0 + k, t]
                if ga != 0:
                    acts[i0 + k, t] = _combine(ga, dots[k, t], act, threshold)


@njit
def _batch_down_block(down, down_scale, fmt, active, live, acts, j0, j1, y):
    """y[:, j0:j1] = sum over neurons `live` (indices into active) of acts[i, t] * down[active[i], j0:j1]."""
    T = acts.shape[1]
    T4 = T - T % 4
    yblk = np.zeros((T, j1 - j0), np.float32)
    seg = np.zeros((4, j1 - j0), np.float32)
    a = np.zeros((4, T), np.float32)                 # rows past the end stay zero
    n_live = live.shape[0]
    for g0 in range(0, n_live, 4):
        n = min(4, n_live - g0)
        for k in range(n):
            i = live[g0 + k]
            r = active[i]
            _decode_row(down[r, j0:j1], fmt, _row_scale(down_scale, r, fmt), seg[k])
            a[k] = acts[i]
        if n < 4:
            seg[n:] = 0.0
            a[n:] = 0.0
        for t in range(0, T4, 4):
            _axpy4x4_f32(a[:, t:t + 4], seg, yblk, t)
        for t in range(T4, T):
            _axpy4_f32(a, seg, yblk, t)
    y[:, j0:j1] = yblk


@njit(parallel=True, nogil=True, cache=True, fastmath=True)
def cold_ffn_batch_kernel(gate, up, down, gate_scale, up_scale, down_scale, fmt,
                          x, active, act, threshold, n_threads, y):
    """Prefill: y[t] = sum over the union set `active` of a_{t,r} * down_r, for T tokens.

    x (T, d) fp32; a_{t,r} is zero where token t's gate does not fire; y (T, d) overwritten;
    n_threads: numba.get_num_threads() of the caller (phase 1 splits the active rows in as many chunks).
    Phase 1, parallel over chunks of active rows: every token's activation of every neuron
    (`_batch_acts`). Phase 2, parallel over column blocks of y (each block owned by one thread:
    no per-thread buffers): the down rows' block times the non-zero activations.
    Each stored row is read once whatever T is; the work is T dot products per row.
    """
    T, d = x.shape
    n_active = active.shape[0]
    acts = np.zeros((n_active, T), np.float32)      # a_{t,r} per neuron
    n_chunks = min(n_active, n_threads)
    rows_per_chunk = (n_active + n_chunks - 1) // n_chunks if n_chunks > 0 else 0
    for c in prange(n_chunks):
        _batch_acts(gate, up, gate_scale, up_scale, fmt, x, active, c * rows_per_chunk,
                    min(n_active, (c + 1) * rows_per_chunk), act, threshold, acts)
    live = np.empty(n_active, np.int64)             # neurons with a non-zero a for some token
    n_live = 0
    for i in range(n_active):
        for t in range(T):
            if acts[i, t] != 0:
                live[n_live] = i
                n_live += 1
                break
    block = 256
    for b in prange((d + block - 1) // block):
        _batch_down_block(down, down_scale, fmt, active, live[:n_live], acts,
                          b * block, min(d, (b + 1) * block), y)


@njit
def _add_into(out, a):
    for j in range(out.shape[0]):  # loops from 0 on views: no negative-index wraparound, vectorises
        out[j] += a[j]


# ----------------------------------------------------------------------------- storage

def _half_bits(t: torch.Tensor, dtype: torch.dtype) -> np.ndarray:
    """A (n, d) tensor as `dtype` bit patterns in a new numpy uint16 array, converted in row chunks.

    Always a fresh numpy allocation: it holds exactly these rows (a view would keep the whole
    source tensor, hot rows included, alive) and numpy asks the kernel for huge pages on large
    arrays (fewer TLB misses when the kernels jump between rows).
    """
    t = t.detach()
    out = np.empty(tuple(t.shape), np.uint16)
    for i in range(0, t.shape[0], _QUANT_CHUNK_ROWS):
        chunk = t[i:i + _QUANT_CHUNK_ROWS].to("cpu")
        if dtype == torch.float16 and chunk.dtype != torch.float16:
            _check_fits_fp16(chunk)
        out[i:i + len(chunk)] = chunk.to(dtype).contiguous().view(torch.int16).numpy().view(np.uint16)
    return out


def _check_fits_fp16(chunk: torch.Tensor) -> None:
    if not torch.isfinite(chunk).all():
        raise UserError("cold FFN weights contain inf/nan; refusing to store them")
    if chunk.numel() and chunk.abs().amax() > 65504.0:
        raise UserError("cold FFN weights exceed the fp16 range (65504): store them as bf16 or int8")


def _block_rows(w: torch.Tensor, fmt: str) -> np.ndarray:
    """(n, d) tensor -> (n, row bytes) uint8 blocks in a new numpy array, converted in row chunks."""
    from hybrid_runtime.quant import block_row_bytes, to_blocks
    w = w.detach()
    out = np.empty((w.shape[0], block_row_bytes(w.shape[1], fmt)), np.uint8)
    for i in range(0, w.shape[0], _QUANT_CHUNK_ROWS):
        chunk = w[i:i + _QUANT_CHUNK_ROWS].to("cpu").float()
        if not torch.isfinite(chunk).all():
            raise UserError("cold FFN weights contain inf/nan; refusing to quantize them")
        out[i:i + len(chunk)] = to_blocks(chunk, fmt).numpy()
    return out


def quantize_rows_int8(w: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-row int8: w (n, d) -> q (n, d) int8 in [-127, 127], scale (n,) fp32, w ~= q * scale.

    Rows are converted in chunks, so only a chunk ever exists in fp32. An all-zero row gets scale 0.
    """
    if w.dim() != 2:
        raise UserError(f"quantize_rows_int8: expected a 2-D (rows, d) tensor, got shape {tuple(w.shape)}")
    w = w.detach().to("cpu")
    n, d = w.shape
    q = np.empty((n, d), np.int8)
    scale = np.empty(n, np.float32)
    for i in range(0, n, _QUANT_CHUNK_ROWS):
        chunk = w[i:i + _QUANT_CHUNK_ROWS].float()                 # (c, d)
        if not torch.isfinite(chunk).all():
            raise UserError("cold FFN weights contain inf/nan; refusing to quantize them")
        s = chunk.abs().amax(dim=1) / _INT8_QMAX                   # (c,)
        inv = torch.where(s > 0, 1.0 / s, torch.zeros_like(s))
        q[i:i + len(chunk)] = torch.round(chunk * inv[:, None]).clamp_(-127, 127).to(torch.int8).numpy()
        scale[i:i + len(chunk)] = s.numpy()
    return q, scale


@dataclass
class ColdRows:
    """One layer's cold neurons as the CPU kernels read them: neuron-major stored rows.

    gate, up, down: (n_cold, d) uint16 (fmt "bf16"/"fp16": bit patterns) or int8 (fmt "int8"), or
    (n_cold, d/32 * block bytes) uint8 blocks (fmt "q8_0"/"q4_0"/"q4_1", quant.py; every row, down's too,
    blocked along d); gate_scale, up_scale, down_scale: (n_cold,) fp32 per-row scales for int8, empty (0,)
    otherwise.
    """
    fmt: str
    gate: np.ndarray
    up: np.ndarray
    down: np.ndarray
    gate_scale: np.ndarray
    up_scale: np.ndarray
    down_scale: np.ndarray

    def __post_init__(self) -> None:
        if self.fmt not in FORMATS and self.fmt not in BLOCK_FORMATS:
            raise UserError(f"cold row format {self.fmt!r} unknown (supported: {', '.join(COLD_FORMATS)})")
        want = np.int8 if self.fmt == "int8" else np.uint8 if self.fmt in BLOCK_FORMATS else np.uint16
        n_scale = self.gate.shape[0] if self.fmt == "int8" else 0
        shape = self.gate.shape
        for name in ("gate", "up", "down"):
            a = getattr(self, name)
            if a.dtype != want or a.ndim != 2 or a.shape != shape or not a.flags.c_contiguous:
                raise UserError(f"cold rows {name}: expected C-contiguous {np.dtype(want).name} {shape}, "
                                f"got {a.dtype} {a.shape}")
        for name in ("gate_scale", "up_scale", "down_scale"):
            a = getattr(self, name)
            if a.dtype != np.float32 or a.shape != (n_scale,) or not a.flags.c_contiguous:
                raise UserError(f"cold rows {name}: expected float32 ({n_scale},), got {a.dtype} {a.shape}")

    @classmethod
    def from_torch(cls, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor,
                   fmt: str | None = None) -> "ColdRows":
        """Build from (n_cold, d) tensors (fp32/fp16/bf16; `down` already neuron-major).

        fmt None keeps a bf16/fp16 source's format (bf16 for fp32). The rows are always copied into
        new numpy arrays (in row chunks: no full-size temporary, never an fp32 copy of the layer).
        """
        if not (gate.shape == up.shape == down.shape and gate.dim() == 2):
            raise UserError(f"cold rows: gate/up/down must be equal (n_cold, d) shapes, got "
                            f"{tuple(gate.shape)}, {tuple(up.shape)}, {tuple(down.shape)}")
        if fmt is None:
            fmt = {torch.float16: "fp16"}.get(gate.dtype, "bf16")
        if fmt not in COLD_FORMATS:
            raise UserError(f"cold row format {fmt!r} unknown (supported: {', '.join(COLD_FORMATS)})")
        empty = np.zeros(0, np.float32)
        if fmt in BLOCK_FORMATS:
            g, u, dn = (_block_rows(t, fmt) for t in (gate, up, down))
            return cls(fmt, g, u, dn, empty, empty.copy(), empty.copy())
        if fmt == "int8":
            (g, gs), (u, us), (dn, ds) = (quantize_rows_int8(t) for t in (gate, up, down))
            return cls(fmt, g, u, dn, gs, us, ds)
        dtype = torch.bfloat16 if fmt == "bf16" else torch.float16
        return cls(fmt, _half_bits(gate, dtype), _half_bits(up, dtype), _half_bits(down, dtype),
                   empty, empty.copy(), empty.copy())

    @property
    def n_rows(self) -> int:
        return self.gate.shape[0]

    @property
    def dim(self) -> int:
        if self.fmt in BLOCK_FORMATS:
            from hybrid_runtime.quant import BLOCK, BLOCK_BYTES
            return self.gate.shape[1] // BLOCK_BYTES[self.fmt] * BLOCK
        return self.gate.shape[1]

    @property
    def is_blocks(self) -> bool:
        return self.fmt in BLOCK_FORMATS

    @property
    def fmt_code(self) -> int:
        return BLOCK_FORMATS[self.fmt] if self.is_blocks else FORMATS[self.fmt]

    @property
    def row_bytes(self) -> int:
        """Bytes of one neuron's gate (or up, or down) row, scale included."""
        if self.is_blocks:
            return self.gate.shape[1]
        return self.dim * self.gate.itemsize + (4 if self.fmt == "int8" else 0)

    @property
    def nbytes(self) -> int:
        return 3 * self.n_rows * self.row_bytes

    def dequantize(self, rows: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(gate, up, down) of the given rows (all if None) as fp32 numpy, decoded with plain numpy."""
        idx = np.arange(self.n_rows) if rows is None else np.asarray(rows)
        out = []
        for w, s in ((self.gate, self.gate_scale), (self.up, self.up_scale), (self.down, self.down_scale)):
            w = w[idx]
            if self.is_blocks:
                from hybrid_runtime.quant import from_blocks
                out.append(from_blocks(torch.from_numpy(np.ascontiguousarray(w)), self.fmt).numpy())
            elif self.fmt == "bf16":
                out.append((w.astype(np.uint32) << 16).view(np.float32))
            elif self.fmt == "fp16":
                out.append(w.view(np.float16).astype(np.float32))
            else:
                out.append(w.astype(np.float32) * s[idx, None])
        return out[0], out[1], out[2]


# ----------------------------------------------------------------------------- references

def as_activation(act: str | Activation, threshold: float = 0.0) -> Activation:
    return act if isinstance(act, Activation) else Activation(act, threshold)


def cold_ffn_batch_ref(cold: ColdRows, x: np.ndarray, active: np.ndarray, act: str,
                       threshold: float = 0.0) -> np.ndarray:
    """Dense numpy reference over the active rows: x (T, d) -> y (T, d) fp32 (fp64 math)."""
    gate, up, down = (w.astype(np.float64) for w in cold.dequantize(np.asarray(active, np.int64)))
    x = np.asarray(x, np.float64)
    a = as_activation(act, threshold).numpy(x @ gate.T, x @ up.T)     # (T, n_active)
    return (a @ down).astype(np.float32)


def cold_ffn_ref(cold: ColdRows, x: np.ndarray, active: np.ndarray, act: str,
                 threshold: float = 0.0) -> np.ndarray:
    """Dense numpy reference for one token: x (d,) -> y (d,) fp32."""
    return cold_ffn_batch_ref(cold, np.asarray(x)[None], active, act, threshold)[0]


# ----------------------------------------------------------------------------- entry points

def _check_active(active: np.ndarray, n_rows: int) -> None:
    if not (isinstance(active, np.ndarray) and active.dtype == np.int32 and active.ndim == 1
            and active.flags.c_contiguous):
        raise UserError(f"active: expected a contiguous 1-D int32 array, got "
                        f"{getattr(active, 'dtype', type(active).__name__)} {getattr(active, 'shape', '')}")
    if active.size and (active.min() < 0 or active.max() >= n_rows):
        raise UserError(f"active: row indices must lie in [0, {n_rows}), got [{active.min()}, {active.max()}]")


def _check_f32(name: str, a: np.ndarray, shape: tuple) -> None:
    if not (isinstance(a, np.ndarray) and a.dtype == np.float32 and a.shape == shape
            and a.flags.c_contiguous):
        raise UserError(f"{name}: expected a contiguous float32 array of shape {shape}, got "
                        f"{getattr(a, 'dtype', type(a).__name__)} {getattr(a, 'shape', '')}")


_ready: set[str] = set()        # kernels this process has already called (loaded or compiled)


def _first_call(name: str, kernel, *args) -> None:
    """A kernel's first call in this process: Numba loads it from its on-disk cache (well under a second) or,
    the first time after an install, compiles it (tens of seconds on a small CPU). Say so while it happens,
    once, and how long it took, so a first run does not look hung."""
    from hybrid_runtime.errors import log
    said = threading.Event()

    def announce() -> None:
        said.set()
        log(f"compiling the CPU kernels ({name}): first run after an install, later runs load them from the cache")

    timer = threading.Timer(1.0, announce)
    timer.daemon = True
    t0 = time.perf_counter()
    timer.start()
    try:
        kernel(*args)
    finally:
        timer.cancel()
        _ready.add(name)
    if said.is_set():
        log(f"CPU kernels ({name}) compiled in {time.perf_counter() - t0:.1f} s")


class ColdFFN:
    """One layer's cold FFN bound to its rows and activation: checked once, then unchecked calls.

    `decode(x, active, out)` / `batch(x, active, out)` pass straight to the kernels: the caller
    guarantees x (d,) / (T, d) float32 contiguous, active int32 with indices in [0, n_rows), and
    out of x's shape (overwritten). Out-of-range indices are not caught here (memory corruption).
    """

    def __init__(self, cold: ColdRows, act: str, threshold: float = 0.0):
        activation = as_activation(act, threshold)
        self.cold = cold
        # the rows as the kernel takes them (block rows carry their scales)
        self._args = ((cold.gate, cold.up, cold.down, cold.fmt_code) if cold.is_blocks else
                      (cold.gate, cold.up, cold.down, cold.gate_scale, cold.up_scale, cold.down_scale, cold.fmt_code))
        self.activation = activation
        self._act = activation.kernel_code
        self._threshold = np.float32(activation.kernel_threshold)
        self._workspaces(numba.get_num_threads())

    def _workspaces(self, n_threads: int) -> None:
        """Per-thread partial sums and row lists of the decode kernel, made once (and again if the
        thread count changes): nothing is allocated per token."""
        d = self.cold.dim
        self._xq = (np.empty(d, np.int8), np.empty(d // 32, np.float32), np.empty(d // 32, np.float32))  # blocks
        self._partial = np.empty((n_threads, d), np.float32)
        self._work = np.empty((n_threads, 2, self.cold.n_rows), np.float32)
        self._work_idx = np.empty((n_threads, self.cold.n_rows), np.int64)

    def decode(self, x: np.ndarray, active: np.ndarray, out: np.ndarray) -> np.ndarray:
        n_threads = numba.get_num_threads()   # thread-local in Numba: follow the calling thread's setting
        if self._partial.shape[0] != n_threads:
            self._workspaces(n_threads)
        if self.cold.is_blocks:
            args = (*self._args, x, active, self._act, self._threshold, self._partial, self._work, self._work_idx,
                    *self._xq, out)
            if "block_decode" in _ready:
                block_cold_ffn_decode_kernel(*args)
            else:
                _first_call("block_decode", block_cold_ffn_decode_kernel, *args)
            return out
        args = (*self._args, x, active, self._act, self._threshold, self._partial, self._work, self._work_idx, out)
        if "decode" in _ready:
            cold_ffn_decode_kernel(*args)
        else:
            _first_call("decode", cold_ffn_decode_kernel, *args)
        return out

    def batch(self, x: np.ndarray, active: np.ndarray, out: np.ndarray) -> np.ndarray:
        if self.cold.is_blocks:   # no batched block kernel yet: the prompt's tokens one at a time (prefill only)
            for t in range(x.shape[0]):
                self.decode(x[t], active, out[t])
            return out
        args = (*self._args, x, active, self._act, self._threshold, numba.get_num_threads(), out)
        if "batch" in _ready:
            cold_ffn_batch_kernel(*args)
        else:
            _first_call("batch", cold_ffn_batch_kernel, *args)
        return out


def cold_ffn(cold: ColdRows, x: np.ndarray, active: np.ndarray, act: str, threshold: float = 0.0,
             out: np.ndarray | None = None) -> np.ndarray:
    """Checked one-token cold FFN: x (d,) fp32, active (n,) int32 -> y (d,) fp32."""
    _check_f32("x", x, (cold.dim,))
    _check_active(active, cold.n_rows)
    out = np.empty(cold.dim, np.float32) if out is None else out
    _check_f32("out", out, (cold.dim,))
    return ColdFFN(cold, act, threshold).decode(x, active, out)


def cold_ffn_batch(cold: ColdRows, x: np.ndarray, active: np.ndarray, act: str, threshold: float = 0.0,
                   out: np.ndarray | None = None) -> np.ndarray:
    """Checked prefill cold FFN over the union set: x (T, d) fp32, active (n,) int32 -> y (T, d) fp32."""
    if not (isinstance(x, np.ndarray) and x.ndim == 2):
        raise UserError(f"x: expected a (T, {cold.dim}) float32 array, got {getattr(x, 'shape', type(x).__name__)}")
    _check_f32("x", x, (x.shape[0], cold.dim))
    _check_active(active, cold.n_rows)
    out = np.empty(x.shape, np.float32) if out is None else out
    _check_f32("out", out, x.shape)
    return ColdFFN(cold, act, threshold).batch(x, active, out)
