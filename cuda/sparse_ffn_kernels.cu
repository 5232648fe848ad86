// Sparse FFN kernels for activation-sparse (ReLU-family) LLaMA FFNs, neuron-major weights.
//
// Layout (see ARCHITECTURE.md): gate, up, down are all (f, d) row-major, one row per neuron,
// so every kernel streams whole contiguous rows (coalesced, 16-byte loads).
//
// Every kernel is free of host synchronisation so a decode step can be captured in a CUDA graph:
// the number of active neurons stays on the device (`count`, int32), buffers are sized for the
// worst case (`n_max` = capacity of `idx`), kernels read `count` themselves and idle threads exit.
//
// Activations `a` are fp32 and *neuron-indexed*: a[b, i] is neuron i's activation. The sparse
// kernels write only the selected neurons a[:, idx[:count]]; the down kernel reads only those.
// One layout serves the predictor path (idx from logits) and the dense-gate path (a fully written).
//
// This file includes no torch headers: the launchers take raw pointers and a stream and return
// the launch's cudaError_t; `sparse_ffn.cpp` checks tensors and calls them.

#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <cstdint>

namespace sparse_ffn {

enum DType : int { kF32 = 0, kF16 = 1, kBF16 = 2, kU8 = 3 };
enum Act : int { kSilu = 0, kRelu = 1, kFatRelu = 2, kRelu2 = 3, kDRelu = 4 };

constexpr unsigned kFull = 0xffffffffu;

// ---------------------------------------------------------------- element helpers

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_float(uint8_t v) { return static_cast<float>(v); }

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// Two 16-bit floats in one 32-bit word -> two floats, in registers (no address taken, so
// nothing is forced into local memory).
template <typename T> __device__ __forceinline__ float2 unpack2(uint32_t w);
template <> __device__ __forceinline__ float2 unpack2<__nv_bfloat16>(uint32_t w) {
  return make_float2(__uint_as_float(w << 16), __uint_as_float(w & 0xffff0000u));
}
template <> __device__ __forceinline__ float2 unpack2<__half>(uint32_t w) {
  float lo, hi;
  asm("{\n\t.reg .b16 l, h;\n\tmov.b32 {l, h}, %2;\n\tcvt.f32.f16 %0, l;\n\tcvt.f32.f16 %1, h;\n\t}"
      : "=f"(lo), "=f"(hi) : "r"(w));
  return make_float2(lo, hi);
}

// VEC consecutive elements of T. VEC == 1: one element (any alignment). VEC == 8 (fp16/bf16):
// 16 bytes moved by one vector load and kept as raw words until converted.
template <typename T, int VEC>
struct Pack {
  static_assert(VEC == 1, "vector packs are 8 x 16-bit");
  T v;
  __device__ __forceinline__ void to_floats(float (&out)[1]) const { out[0] = to_float(v); }
};
template <typename T>
struct Pack<T, 8> {
  static_assert(sizeof(T) == 2, "vector packs are 8 x 16-bit");
  uint4 raw;
  __device__ __forceinline__ void to_floats(float (&out)[8]) const {
    const float2 a = unpack2<T>(raw.x), b = unpack2<T>(raw.y), c = unpack2<T>(raw.z), d = unpack2<T>(raw.w);
    out[0] = a.x; out[1] = a.y; out[2] = b.x; out[3] = b.y;
    out[4] = c.x; out[5] = c.y; out[6] = d.x; out[7] = d.y;
  }
};

// Weights are read once per call: bypass L1 so `x` (re-read by every warp) stays there.
template <typename T, int VEC>
__device__ __forceinline__ Pack<T, VEC> load_stream(const T* p) {
  Pack<T, VEC> out;
  if constexpr (VEC == 8) {
    asm("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
        : "=r"(out.raw.x), "=r"(out.raw.y), "=r"(out.raw.z), "=r"(out.raw.w)
        : "l"(p));
  } else {
    out.v = __ldg(p);
  }
  return out;
}

// Small, reused operands (x): cached read-only path.
template <typename T, int VEC>
__device__ __forceinline__ Pack<T, VEC> load_cached(const T* p) {
  Pack<T, VEC> out;
  if constexpr (VEC == 8) {
    out.raw = __ldg(reinterpret_cast<const uint4*>(p));
  } else {
    out.v = __ldg(p);
  }
  return out;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFull, v, o);
  return v;
}

// The gate half of the activation; zero exactly when the neuron is inactive for this token.
__device__ __forceinline__ float gate_act(float g, int act, float threshold) {
  switch (act) {
    case kSilu: return g / (1.0f + expf(-g));
    case kFatRelu: return g >= threshold ? g : 0.0f;
    case kRelu2: return g > 0.0f ? g * g : 0.0f;
    default: return g > 0.0f ? g : 0.0f;  // relu, drelu
  }
}
__device__ __forceinline__ bool gate_active(float g, int act, float threshold) {
  switch (act) {
    case kSilu: return true;
    case kFatRelu: return g >= threshold;
    default: return g > 0.0f;
  }
}
__device__ __forceinline__ float up_act(float u, int act) {
  return act == kDRelu ? (u > 0.0f ? u : 0.0f) : u;
}

// ---------------------------------------------------------------- active_indices

// MODE bits: 1 = inclusive (>=), 2 = magnitude (|s|). uint8 flags pass when non-zero.
template <typename T, int MODE>
__device__ __forceinline__ bool passes(T v, float threshold) {
  if constexpr (sizeof(T) == 1) {
    return v != 0;
  } else {
    float s = to_float(v);
    if constexpr (MODE & 2) s = fabsf(s);
    if constexpr (MODE & 1) return s >= threshold;
    else return s > threshold;
  }
}

constexpr int kCompactThreads = 1024;
constexpr int kCompactItems = 16;  // consecutive elements per thread: a 16-bit mask each

// One block compacts the passing columns of (B, f) scores into ascending indices.
// Each thread owns kCompactItems consecutive columns, so a block-wide exclusive scan of the
// per-thread counts gives every index its slot in order: deterministic, no atomics.
template <typename T, int MODE>
__global__ void __launch_bounds__(kCompactThreads)
compact_kernel(const T* __restrict__ scores, int64_t ld, int B, int f, float threshold,
               int* __restrict__ idx, int* __restrict__ count) {
  __shared__ int warp_excl[32];
  __shared__ int tile_total;
  const int t = threadIdx.x, lane = t & 31, warp = t >> 5;
  const int n_warps = blockDim.x >> 5;
  int running = 0;
  for (int tile = 0; tile < f; tile += blockDim.x * kCompactItems) {
    const int first = tile + t * kCompactItems;
    unsigned bits = 0;
    for (int b = 0; b < B; ++b) {
      const T* row = scores + b * ld;
#pragma unroll
      for (int k = 0; k < kCompactItems; ++k)  // predicated, independent loads: all in flight
        if (first + k < f && passes<T, MODE>(__ldg(row + first + k), threshold)) bits |= 1u << k;
    }
    const int n = __popc(bits);
    int incl = n;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      int up = __shfl_up_sync(kFull, incl, o);
      if (lane >= o) incl += up;
    }
    if (lane == 31) warp_excl[warp] = incl;
    __syncthreads();
    if (warp == 0) {
      int wt = lane < n_warps ? warp_excl[lane] : 0;
      int wi = wt;
#pragma unroll
      for (int o = 1; o < 32; o <<= 1) {
        int up = __shfl_up_sync(kFull, wi, o);
        if (lane >= o) wi += up;
      }
      if (lane < n_warps) warp_excl[lane] = wi - wt;
      if (lane == 31) tile_total = wi;
    }
    __syncthreads();
    int pos = running + warp_excl[warp] + incl - n;
    while (bits) {
      const int k = __ffs(bits) - 1;
      bits &= bits - 1;
      idx[pos++] = first + k;
    }
    running += tile_total;
    __syncthreads();  // warp_excl / tile_total are rewritten by the next tile
  }
  if (t == 0) *count = running;
}

// For B > 2 rows: first reduce "passes in any row" per column with the whole GPU
// (coalesced over columns), then compact the flags with one block.
template <typename T, int MODE>
__global__ void any_row_kernel(const T* __restrict__ scores, int64_t ld, int B, int f,
                               float threshold, uint8_t* __restrict__ flags) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= f) return;
  uint8_t any = 0;
  for (int b = 0; b < B && !any; ++b) any = passes<T, MODE>(__ldg(scores + b * ld + i), threshold);
  flags[i] = any;
}

template <typename T, int MODE>
static cudaError_t active_indices_t(const T* scores, int64_t ld, int B, int f, float threshold,
                                    int* idx, int* count, uint8_t* flags, cudaStream_t stream) {
  if (B > 2 && f > 0) {
    any_row_kernel<T, MODE><<<(f + 255) / 256, 256, 0, stream>>>(scores, ld, B, f, threshold, flags);
    compact_kernel<uint8_t, 0><<<1, kCompactThreads, 0, stream>>>(flags, 0, 1, f, 0.f, idx, count);
  } else {
    compact_kernel<T, MODE><<<1, kCompactThreads, 0, stream>>>(scores, ld, B, f, threshold, idx, count);
  }
  return cudaGetLastError();
}

template <typename T>
static cudaError_t active_indices_mode(const void* scores, int64_t ld, int B, int f, float threshold,
                                       bool inclusive, bool magnitude, int* idx, int* count,
                                       uint8_t* flags, cudaStream_t stream) {
  const T* s = static_cast<const T*>(scores);
  const int mode = (inclusive ? 1 : 0) | (magnitude ? 2 : 0);
  switch (mode) {
    case 0: return active_indices_t<T, 0>(s, ld, B, f, threshold, idx, count, flags, stream);
    case 1: return active_indices_t<T, 1>(s, ld, B, f, threshold, idx, count, flags, stream);
    case 2: return active_indices_t<T, 2>(s, ld, B, f, threshold, idx, count, flags, stream);
    default: return active_indices_t<T, 3>(s, ld, B, f, threshold, idx, count, flags, stream);
  }
}

cudaError_t launch_active_indices(int dtype, const void* scores, int64_t ld, int B, int f,
                                  float threshold, bool inclusive, bool magnitude, int* idx,
                                  int* count, uint8_t* flags, cudaStream_t stream) {
  switch (dtype) {
    case kF32:
      return active_indices_mode<float>(scores, ld, B, f, threshold, inclusive, magnitude, idx, count, flags, stream);
    case kF16:
      return active_indices_mode<__half>(scores, ld, B, f, threshold, inclusive, magnitude, idx, count, flags, stream);
    case kBF16:
      return active_indices_mode<__nv_bfloat16>(scores, ld, B, f, threshold, inclusive, magnitude, idx, count, flags, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

// ---------------------------------------------------------------- gate + up

constexpr int kGateUpThreads = 256;

// acc[b] = dot(w[0:d], x[b, 0:d]) for b < nb, summed over the warp (every lane gets the sum).
// U packs per lane are loaded before any is used: U * 16 bytes in flight per lane.
template <typename T, int VEC, int BT, int U>
__device__ __forceinline__ void warp_dot(const T* __restrict__ w, const T* __restrict__ x,
                                         int64_t ldx, int d, int nb, int lane, float (&acc)[BT]) {
#pragma unroll
  for (int b = 0; b < BT; ++b) acc[b] = 0.f;
  for (int k0 = lane * VEC; k0 < d; k0 += 32 * VEC * U) {
    Pack<T, VEC> wp[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int k = k0 + u * 32 * VEC;
      if (k < d) wp[u] = load_stream<T, VEC>(w + k);
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int k = k0 + u * 32 * VEC;
      if (k < d) {
        float wf[VEC];
        wp[u].to_floats(wf);
#pragma unroll
        for (int b = 0; b < BT; ++b) {
          if (b < nb) {
            float xf[VEC];
            load_cached<T, VEC>(x + b * ldx + k).to_floats(xf);
#pragma unroll
            for (int e = 0; e < VEC; ++e) acc[b] = fmaf(wf[e], xf[e], acc[b]);
          }
        }
      }
    }
  }
#pragma unroll
  for (int b = 0; b < BT; ++b) acc[b] = warp_sum(acc[b]);
}

// One warp per selected neuron (grid-stride over j < count): gate dot (or the given gate
// pre-activation), then the up dot only if the neuron is active for some row of the batch
// tile, so predicted-but-inactive neurons and the dense-gate path's inactive neurons cost
// no up bytes. idx == nullptr means all f neurons (the dense-gate path).
template <typename T, int VEC, int BT, bool GATE_GIVEN>
__global__ void __launch_bounds__(kGateUpThreads)
gate_up_kernel(const T* __restrict__ x, int64_t ldx, const T* __restrict__ gate,
               const T* __restrict__ up, const T* __restrict__ g_given, int64_t ldg,
               const int* __restrict__ idx, const int* __restrict__ count, int n_max,
               float* __restrict__ a, int64_t lda, int B, int d, int f, int act, float threshold) {
  // Packs in flight per lane: a whole 4096-wide row in one round trip at batch 1.
  constexpr int U = BT == 1 ? 16 : (BT == 2 ? 8 : 4);
  const int lane = threadIdx.x & 31;
  const int warp = (blockIdx.x * blockDim.x + threadIdx.x) >> 5;
  const int n_warps = (gridDim.x * blockDim.x) >> 5;
  const int b0 = blockIdx.y * BT;
  const int nb = min(BT, B - b0);
  x += b0 * ldx;
  a += b0 * lda;
  if constexpr (GATE_GIVEN) g_given += b0 * ldg;
  const int n = idx ? min(*count, n_max) : f;
  for (int j = warp; j < n; j += n_warps) {
    const int row = idx ? __ldg(idx + j) : j;
    if (static_cast<unsigned>(row) >= static_cast<unsigned>(f)) continue;  // bad index: skip, never fault
    float g[BT];
    if constexpr (GATE_GIVEN) {
#pragma unroll
      for (int b = 0; b < BT; ++b) g[b] = b < nb ? to_float(__ldg(g_given + b * ldg + row)) : 0.f;
    } else {
      warp_dot<T, VEC, BT, U>(gate + static_cast<int64_t>(row) * d, x, ldx, d, nb, lane, g);
    }
    bool any = false;
#pragma unroll
    for (int b = 0; b < BT; ++b) any |= (b < nb) && gate_active(g[b], act, threshold);
    float u[BT];
#pragma unroll
    for (int b = 0; b < BT; ++b) u[b] = 0.f;
    if (any) warp_dot<T, VEC, BT, U>(up + static_cast<int64_t>(row) * d, x, ldx, d, nb, lane, u);
    if (lane == 0) {
#pragma unroll
      for (int b = 0; b < BT; ++b)
        if (b < nb) a[b * lda + row] = any ? gate_act(g[b], act, threshold) * up_act(u[b], act) : 0.f;
    }
  }
}

template <typename T, int VEC, int BT, bool GATE_GIVEN>
static cudaError_t gate_up_launch(const T* x, int64_t ldx, const T* gate, const T* up, const T* g,
                                  int64_t ldg, const int* idx, const int* count, int n_max, float* a,
                                  int64_t lda, int B, int d, int f, int act, float threshold,
                                  int num_sms, cudaStream_t stream) {
  auto kernel = gate_up_kernel<T, VEC, BT, GATE_GIVEN>;
  // A persistent grid: as many blocks as can be resident at once (a host-side query, no sync),
  // never more than there are rows; warps grid-stride over the selected rows.
  static int resident_per_sm = 0;
  if (resident_per_sm == 0) {
    int r = 0;
    cudaError_t err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&r, kernel, kGateUpThreads, 0);
    if (err != cudaSuccess) return err;
    resident_per_sm = r > 0 ? r : 1;
  }
  const int rows = idx ? n_max : f;
  const int warps_per_block = kGateUpThreads / 32;
  int blocks = (rows + warps_per_block - 1) / warps_per_block;
  const int resident = num_sms * resident_per_sm;
  blocks = blocks < resident ? blocks : resident;
  if (blocks < 1) blocks = 1;
  dim3 grid(blocks, (B + BT - 1) / BT);
  kernel<<<grid, kGateUpThreads, 0, stream>>>(
      x, ldx, gate, up, g, ldg, idx, count, n_max, a, lda, B, d, f, act, threshold);
  return cudaGetLastError();
}

template <typename T, int VEC, bool GATE_GIVEN>
static cudaError_t gate_up_bt(const T* x, int64_t ldx, const T* gate, const T* up, const T* g,
                              int64_t ldg, const int* idx, const int* count, int n_max, float* a,
                              int64_t lda, int B, int d, int f, int act, float threshold, int num_sms,
                              cudaStream_t stream) {
#define GATE_UP_CASE(BT_)                                                                        \
  return gate_up_launch<T, VEC, BT_, GATE_GIVEN>(x, ldx, gate, up, g, ldg, idx, count, n_max, a, \
                                                 lda, B, d, f, act, threshold, num_sms, stream)
  if (B <= 1) GATE_UP_CASE(1);
  if (B <= 2) GATE_UP_CASE(2);
  if (B <= 4) GATE_UP_CASE(4);
  GATE_UP_CASE(8);
#undef GATE_UP_CASE
}

static bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

template <typename T>
static cudaError_t gate_up_typed(const void* x, int64_t ldx, const void* gate, const void* up,
                                 const void* g, int64_t ldg, const int* idx, const int* count,
                                 int n_max, float* a, int64_t lda, int B, int d, int f, int act,
                                 float threshold, int num_sms, cudaStream_t stream) {
  constexpr int VEC = 16 / sizeof(T);
  const T* xt = static_cast<const T*>(x);
  const T* gt = static_cast<const T*>(gate);
  const T* ut = static_cast<const T*>(up);
  const T* gg = static_cast<const T*>(g);
  const bool vec_ok = d % VEC == 0 && (ldx * sizeof(T)) % 16 == 0 && aligned16(x) && aligned16(up) &&
                      (g != nullptr || aligned16(gate));
  if (g != nullptr) {
    if (vec_ok) return gate_up_bt<T, VEC, true>(xt, ldx, gt, ut, gg, ldg, idx, count, n_max, a, lda, B, d, f, act, threshold, num_sms, stream);
    return gate_up_bt<T, 1, true>(xt, ldx, gt, ut, gg, ldg, idx, count, n_max, a, lda, B, d, f, act, threshold, num_sms, stream);
  }
  if (vec_ok) return gate_up_bt<T, VEC, false>(xt, ldx, gt, ut, gg, ldg, idx, count, n_max, a, lda, B, d, f, act, threshold, num_sms, stream);
  return gate_up_bt<T, 1, false>(xt, ldx, gt, ut, gg, ldg, idx, count, n_max, a, lda, B, d, f, act, threshold, num_sms, stream);
}

// gate == nullptr: g (B, f) holds the gate pre-activations. idx == nullptr: all f neurons.
cudaError_t launch_gate_up(int dtype, const void* x, int64_t ldx, const void* gate, const void* up,
                           const void* g, int64_t ldg, const int* idx, const int* count, int n_max,
                           float* a, int64_t lda, int B, int d, int f, int act, float threshold,
                           int num_sms, cudaStream_t stream) {
  if (B <= 0 || f <= 0 || (idx != nullptr && n_max <= 0)) return cudaSuccess;  // nothing to write
  switch (dtype) {
    case kF16:
      return gate_up_typed<__half>(x, ldx, gate, up, g, ldg, idx, count, n_max, a, lda, B, d, f, act, threshold, num_sms, stream);
    case kBF16:
      return gate_up_typed<__nv_bfloat16>(x, ldx, gate, up, g, ldg, idx, count, n_max, a, lda, B, d, f, act, threshold, num_sms, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

// ---------------------------------------------------------------- sparse down

constexpr int kDownLanesPerRow = 4;  // 4 lanes x 16 B = 64 contiguous bytes of a row per block
template <int BT> __host__ __device__ constexpr int down_threads() { return BT == 1 ? 512 : 256; }

// y[b, cols] = sum_j a[b, idx[j]] * down[idx[j], cols]: each block owns a slice of
// W = 4 * VEC output columns and walks ALL selected rows, so no two blocks write the same
// output and no atomics are needed; the sum order is fixed (deterministic). Its threads (512
// at batch 1, else 256) are row groups of 4 lanes; each lane keeps U rows' 16-byte loads in
// flight, so 1024 rows are requested per round trip at batch 1. The selected rows and their
// activations are staged in shared memory a chunk at a time (two dependent round trips per
// chunk: idx, then a); rows whose activations are all zero are skipped.
template <typename T, int VEC, int BT, typename OutT>
__global__ void __launch_bounds__(down_threads<BT>())
sparse_down_kernel(const float* __restrict__ a, int64_t lda, const T* __restrict__ down,
                   const int* __restrict__ idx, const int* __restrict__ count, int n_max,
                   OutT* __restrict__ y, int64_t ldy, int B, int d, int f) {
  constexpr int THREADS = down_threads<BT>();
  constexpr int W = kDownLanesPerRow * VEC;
  constexpr int GROUPS = THREADS / kDownLanesPerRow;
  constexpr int WARPS = THREADS / 32;
  constexpr int U = BT <= 2 ? 8 : (BT == 4 ? 4 : 2);
  constexpr int CHUNK = BT <= 2 ? 2048 : 4096 / BT;
  constexpr int PER = CHUNK / THREADS;  // staged entries per thread
  static_assert(CHUNK % THREADS == 0, "chunk");
  __shared__ int s_row[CHUNK];
  __shared__ float s_a[CHUNK][BT];
  __shared__ float s_part[WARPS][BT][W];

  const int t = threadIdx.x, lane = t & 31, warp = t >> 5;
  const int c = t % kDownLanesPerRow, grp = t / kDownLanesPerRow;
  const int col = blockIdx.x * W + c * VEC;
  const bool col_ok = col < d;  // d % VEC == 0 on every path, so a pack is all in or all out
  const int b0 = blockIdx.y * BT;
  const int nb = min(BT, B - b0);
  a += b0 * lda;

  float acc[BT][VEC];
#pragma unroll
  for (int b = 0; b < BT; ++b)
#pragma unroll
    for (int e = 0; e < VEC; ++e) acc[b][e] = 0.f;

  const int n = min(*count, n_max);
  for (int c0 = 0; c0 < n; c0 += CHUNK) {
    const int cn = min(CHUNK, n - c0);
    // all index loads, then all activation loads: two round trips for the whole chunk
    int srow[PER];
#pragma unroll
    for (int p = 0; p < PER; ++p) {
      const int jj = t + p * THREADS;
      srow[p] = jj < cn ? __ldg(idx + c0 + jj) : -1;
      if (static_cast<unsigned>(srow[p]) >= static_cast<unsigned>(f)) srow[p] = -1;
    }
    float sa[PER][BT];
#pragma unroll
    for (int p = 0; p < PER; ++p)
#pragma unroll
      for (int b = 0; b < BT; ++b) sa[p][b] = (srow[p] >= 0 && b < nb) ? a[b * lda + srow[p]] : 0.f;
#pragma unroll
    for (int p = 0; p < PER; ++p) {
      const int jj = t + p * THREADS;
      if (jj < cn) {
        bool nonzero = false;
#pragma unroll
        for (int b = 0; b < BT; ++b) {
          s_a[jj][b] = sa[p][b];
          nonzero |= sa[p][b] != 0.f;
        }
        s_row[jj] = nonzero ? srow[p] : -1;
      }
    }
    __syncthreads();
    for (int j0 = grp; j0 < cn; j0 += GROUPS * U) {
      int rows[U];
      Pack<T, VEC> p[U];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int j = j0 + u * GROUPS;
        rows[u] = (j < cn && col_ok) ? s_row[j] : -1;
        if (rows[u] >= 0) p[u] = load_stream<T, VEC>(down + static_cast<int64_t>(rows[u]) * d + col);
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        if (rows[u] >= 0) {
          const int j = j0 + u * GROUPS;
          float wf[VEC];
          p[u].to_floats(wf);
#pragma unroll
          for (int b = 0; b < BT; ++b) {
            const float av = s_a[j][b];
#pragma unroll
            for (int e = 0; e < VEC; ++e) acc[b][e] = fmaf(av, wf[e], acc[b][e]);
          }
        }
      }
    }
    __syncthreads();  // s_row / s_a are refilled by the next chunk
  }

  // Lanes l, l^4, l^8, l^16 hold the same columns: fold the warp's 8 row groups, then the warps.
#pragma unroll
  for (int b = 0; b < BT; ++b)
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      float v = acc[b][e];
      v += __shfl_xor_sync(kFull, v, 4);
      v += __shfl_xor_sync(kFull, v, 8);
      v += __shfl_xor_sync(kFull, v, 16);
      acc[b][e] = v;
    }
  if (lane < kDownLanesPerRow) {
#pragma unroll
    for (int b = 0; b < BT; ++b)
#pragma unroll
      for (int e = 0; e < VEC; ++e) s_part[warp][b][c * VEC + e] = acc[b][e];
  }
  __syncthreads();
  for (int o = t; o < BT * W; o += THREADS) {
    const int b = o / W, cc = o % W;
    const int out_col = blockIdx.x * W + cc;
    if (b < nb && out_col < d) {
      float s = 0.f;
#pragma unroll
      for (int w = 0; w < WARPS; ++w) s += s_part[w][b][cc];
      y[(b0 + b) * ldy + out_col] = from_float<OutT>(s);
    }
  }
}

template <typename T, int VEC, int BT, typename OutT>
static cudaError_t down_launch(const float* a, int64_t lda, const T* down, const int* idx,
                               const int* count, int n_max, OutT* y, int64_t ldy, int B, int d, int f,
                               cudaStream_t stream) {
  constexpr int W = kDownLanesPerRow * VEC;
  dim3 grid((d + W - 1) / W, (B + BT - 1) / BT);
  sparse_down_kernel<T, VEC, BT, OutT><<<grid, down_threads<BT>(), 0, stream>>>(a, lda, down, idx, count, n_max, y, ldy, B, d, f);
  return cudaGetLastError();
}

template <typename T, int VEC, typename OutT>
static cudaError_t down_bt(const float* a, int64_t lda, const T* down, const int* idx, const int* count,
                           int n_max, OutT* y, int64_t ldy, int B, int d, int f, cudaStream_t stream) {
  if (B <= 1) return down_launch<T, VEC, 1, OutT>(a, lda, down, idx, count, n_max, y, ldy, B, d, f, stream);
  if (B <= 2) return down_launch<T, VEC, 2, OutT>(a, lda, down, idx, count, n_max, y, ldy, B, d, f, stream);
  if (B <= 4) return down_launch<T, VEC, 4, OutT>(a, lda, down, idx, count, n_max, y, ldy, B, d, f, stream);
  return down_launch<T, VEC, 8, OutT>(a, lda, down, idx, count, n_max, y, ldy, B, d, f, stream);
}

template <typename T, typename OutT>
static cudaError_t down_typed(const float* a, int64_t lda, const void* down, const int* idx,
                              const int* count, int n_max, void* y, int64_t ldy, int B, int d, int f,
                              cudaStream_t stream) {
  constexpr int VEC = 16 / sizeof(T);
  const T* dt = static_cast<const T*>(down);
  OutT* yt = static_cast<OutT*>(y);
  if (d % VEC == 0 && aligned16(down))
    return down_bt<T, VEC, OutT>(a, lda, dt, idx, count, n_max, yt, ldy, B, d, f, stream);
  return down_bt<T, 1, OutT>(a, lda, dt, idx, count, n_max, yt, ldy, B, d, f, stream);
}

cudaError_t launch_sparse_down(int dtype, int out_dtype, const float* a, int64_t lda, const void* down,
                               const int* idx, const int* count, int n_max, void* y, int64_t ldy,
                               int B, int d, int f, cudaStream_t stream) {
  if (B <= 0 || d <= 0) return cudaSuccess;
  // n_max == 0 still launches: y must be written (zeros).
  if (n_max < 0) return cudaErrorInvalidValue;
  if (dtype == kF16 && out_dtype == kF16)
    return down_typed<__half, __half>(a, lda, down, idx, count, n_max, y, ldy, B, d, f, stream);
  if (dtype == kF16 && out_dtype == kF32)
    return down_typed<__half, float>(a, lda, down, idx, count, n_max, y, ldy, B, d, f, stream);
  if (dtype == kBF16 && out_dtype == kBF16)
    return down_typed<__nv_bfloat16, __nv_bfloat16>(a, lda, down, idx, count, n_max, y, ldy, B, d, f, stream);
  if (dtype == kBF16 && out_dtype == kF32)
    return down_typed<__nv_bfloat16, float>(a, lda, down, idx, count, n_max, y, ldy, B, d, f, stream);
  return cudaErrorInvalidValue;
}

}  // namespace sparse_ffn
