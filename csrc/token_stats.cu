// Fused per-token softmax statistics: forward (logprob, lse, target logit, entropy) and backward.
//
// Math, for logits z (row of length V), temperature α, x = z/α, p = softmax(x), target a:
//   lse = logsumexp(x), logprob = z[a]/α − lse, entropy H = lse − Σ p·x
//   dz_j = p_j/α · (g_lse − g_lp − g_H·(x_j − lse + H)) + [j == a]·(g_lp/α + g_tl)
//
// Forward: one read of the logits. Each thread keeps an online (m, s, w) with m the running max of
// the *raw* logits, s = Σ 2^d and w = Σ 2^d·d for d = (z − m)·log2(e)/α ≤ 0 (base-2 units, so each
// element costs one FADD, one FMUL and one MUFU.EX2); keeping m in raw units makes z[a] − m exact,
// which keeps logprob accurate for large logits, and no finite logit overflows. States merge as
//   m = max(m1, m2), s = Σ s_i 2^{d_i}, w = Σ 2^{d_i}(w_i + s_i d_i), d_i = (m_i − m)·log2(e)/α
// and at the end lse = m/α + ln s, logprob = min(0, (z[a] − m)/α − ln s), H = ln2·(log2 s − w/s).
// (+inf) − (+inf) counts as 0 (`cdiff`): the +inf entries of a row share its probability mass.
// Each row's state (m, ln s) is written for the backward: p = exp((z − m)/α − ln s).
// Loads are 16-byte vectors (8 bf16/fp16 or 4 fp32) from the first 16-byte-aligned element of the
// range, with a scalar head and tail, so any row offset / V works. When there are too few rows to
// fill the GPU, the vocabulary is split across CTAs: each writes its (m, s, w) to a workspace and
// a combine kernel (one warp per row) merges them.
//
// Backward: one read of the logits and one write of the gradient (input dtype), a 1-D grid over
// (row, vocabulary chunk), from the saved (m, ln s); the target-class term is added in float32
// before the single cast.
#include "token_stats.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstring>
#include <mutex>
#include <vector>

namespace erm {
namespace {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.69314718055994531f;
constexpr int kFwdMaxThreads = 512;
constexpr int kBwdMaxThreads = 256;
constexpr int kFwdUnroll = 4;  // 16-byte vectors in flight per thread
constexpr int kBwdUnroll = 4;

// ------------------------------------------------------------------------------------------------
// Element traits: 16-byte vector <-> float[kVec], scalar load / store.
template <DType D>
struct Elem;

template <>
struct Elem<DType::kFloat32> {
  using T = float;
  static constexpr int kVec = 4;
  __device__ __forceinline__ static float load1(const T* p) { return __ldg(p); }
  __device__ __forceinline__ static void unpack(const uint4& u, float* f) {
    f[0] = __uint_as_float(u.x);
    f[1] = __uint_as_float(u.y);
    f[2] = __uint_as_float(u.z);
    f[3] = __uint_as_float(u.w);
  }
  __device__ __forceinline__ static uint4 pack(const float* f) {
    return make_uint4(__float_as_uint(f[0]), __float_as_uint(f[1]), __float_as_uint(f[2]),
                      __float_as_uint(f[3]));
  }
  __device__ __forceinline__ static void store1(T* p, float f) { *p = f; }
};

// 16-bit types: a 16-byte vector is 8 values, two per 32-bit word; Self supplies unpack2 / pack2.
template <class Self>
struct Elem16 {
  using T = unsigned short;
  static constexpr int kVec = 8;
  __device__ __forceinline__ static void unpack(const uint4& u, float* f) {
    Self::unpack2(u.x, f);
    Self::unpack2(u.y, f + 2);
    Self::unpack2(u.z, f + 4);
    Self::unpack2(u.w, f + 6);
  }
  __device__ __forceinline__ static uint4 pack(const float* f) {
    return make_uint4(Self::pack2(f[0], f[1]), Self::pack2(f[2], f[3]), Self::pack2(f[4], f[5]),
                      Self::pack2(f[6], f[7]));
  }
};

template <>
struct Elem<DType::kBFloat16> : Elem16<Elem<DType::kBFloat16>> {
  __device__ __forceinline__ static float load1(const T* p) {
    return __uint_as_float(static_cast<unsigned int>(__ldg(p)) << 16);
  }
  __device__ __forceinline__ static void unpack2(unsigned int w, float* f) {
    f[0] = __uint_as_float(w << 16);
    f[1] = __uint_as_float(w & 0xffff0000u);
  }
  __device__ __forceinline__ static unsigned int pack2(float a, float b) {
    __nv_bfloat162 h = __floats2bfloat162_rn(a, b);  // .x (low half) = a
    unsigned int r;
    memcpy(&r, &h, sizeof(r));
    return r;
  }
  __device__ __forceinline__ static void store1(T* p, float f) {
    *p = __bfloat16_as_ushort(__float2bfloat16_rn(f));
  }
};

template <>
struct Elem<DType::kFloat16> : Elem16<Elem<DType::kFloat16>> {
  __device__ __forceinline__ static float load1(const T* p) {
    return __half2float(__ushort_as_half(__ldg(p)));
  }
  __device__ __forceinline__ static void unpack2(unsigned int w, float* f) {
    __half2 h;
    memcpy(&h, &w, sizeof(w));
    const float2 v = __half22float2(h);
    f[0] = v.x;
    f[1] = v.y;
  }
  __device__ __forceinline__ static unsigned int pack2(float a, float b) {
    __half2 h = __floats2half2_rn(a, b);
    unsigned int r;
    memcpy(&r, &h, sizeof(r));
    return r;
  }
  __device__ __forceinline__ static void store1(T* p, float f) {
    *p = __half_as_ushort(__float2half_rn(f));
  }
};

__device__ __forceinline__ int64_t row_offset(int64_t row, const RowLayout& l) {
  const int64_t outer = row / l.inner_rows;
  return outer * l.stride_outer + (row - outer * l.inner_rows) * l.stride_inner;
}

// Elements before the first 16-byte-aligned address at or after p (at most len).
template <typename T>
__device__ __forceinline__ int64_t head_len(const T* p, int64_t len) {
  const unsigned int mis = static_cast<unsigned int>(reinterpret_cast<uintptr_t>(p) & 15u);
  const int64_t h = static_cast<int64_t>(((16u - mis) & 15u) / sizeof(T));
  return h < len ? h : len;
}

// a − b, with (+inf) − (+inf) = 0 (entries equal to an infinite row max share the mass).
__device__ __forceinline__ float cdiff(float a, float b) { return a == b ? 0.f : a - b; }

// ------------------------------------------------------------------------------------------------
// Online (m, s, w) state.
struct Acc {
  float m;  // running max of raw logits (−inf: nothing but −inf seen)
  float s;  // Σ 2^d
  float w;  // Σ 2^d · d   (entropy only)
};

__device__ __forceinline__ Acc acc_identity() { return Acc{-INFINITY, 0.f, 0.f}; }

// Fold K logits into the state; c2 = log2(e)/α.
template <bool ENT, int K>
__device__ __forceinline__ void acc_add(Acc& a, const float* z, float c2) {
  float vm = z[0];
#pragma unroll
  for (int k = 1; k < K; ++k) vm = fmaxf(vm, z[k]);
  if (vm > a.m) {  // new max (rare after the first few groups): rescale
    const float dm = (a.m - vm) * c2;  // −inf when nothing was seen (or vm = +inf): scale 0
    const float sc = exp2f(dm);
    if (ENT) a.w = sc > 0.f ? sc * fmaf(a.s, dm, a.w) : 0.f;
    a.s *= sc;
    a.m = vm;
  }
  // m = −inf means every z here is −inf too: centre on 0 so that d = −inf, 2^d = 0 (not NaN)
  const float m = a.m == -INFINITY ? 0.f : a.m;
#pragma unroll
  for (int k = 0; k < K; ++k) {
    const float d = cdiff(z[k], m) * c2;
    const float e = exp2f(d);
    a.s += e;
    if (ENT) a.w = fmaf(e, fmaxf(d, -FLT_MAX), a.w);  // 0·(−inf) → 0; NaN still propagates via e
  }
}

template <bool ENT>
__device__ __forceinline__ void acc_merge(Acc& a, const Acc& b, float c2) {
  const float m = fmaxf(a.m, b.m);
  if (m == -INFINITY) {
    a = acc_identity();
    return;
  }
  const float da = cdiff(a.m, m) * c2, db = cdiff(b.m, m) * c2;
  const float ea = exp2f(da), eb = exp2f(db);
  if (ENT) {
    const float wa = ea > 0.f ? ea * fmaf(a.s, da, a.w) : 0.f;
    const float wb = eb > 0.f ? eb * fmaf(b.s, db, b.w) : 0.f;
    a.w = wa + wb;
  }
  a.s = a.s * ea + b.s * eb;
  a.m = m;
}

template <bool ENT>
__device__ __forceinline__ void warp_reduce(Acc& a, float c2) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    Acc b;
    b.m = __shfl_xor_sync(0xffffffffu, a.m, off);
    b.s = __shfl_xor_sync(0xffffffffu, a.s, off);
    b.w = ENT ? __shfl_xor_sync(0xffffffffu, a.w, off) : 0.f;
    acc_merge<ENT>(a, b, c2);
  }
}

// Result valid in thread 0. blockDim.x must be a multiple of 32.
template <bool ENT>
__device__ __forceinline__ void block_reduce(Acc& a, float c2) {
  __shared__ float sm[3][32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  warp_reduce<ENT>(a, c2);
  if (blockDim.x == 32) return;
  if (lane == 0) {
    sm[0][warp] = a.m;
    sm[1][warp] = a.s;
    sm[2][warp] = a.w;
  }
  __syncthreads();
  if (warp == 0) {
    const int nw = blockDim.x >> 5;
    a = lane < nw ? Acc{sm[0][lane], sm[1][lane], sm[2][lane]} : acc_identity();
    warp_reduce<ENT>(a, c2);
  }
}

// Fold logits row[begin, end) into this thread's state (the block covers the range together).
template <DType D, bool ENT>
__device__ __forceinline__ void fwd_range(Acc& acc, const typename Elem<D>::T* row, int64_t begin,
                                          int64_t end, float c2) {
  using E = Elem<D>;
  constexpr int V = E::kVec;
  const typename E::T* p = row + begin;
  const int64_t len = end - begin;
  if (len <= 0) return;
  const int64_t tid = threadIdx.x, bd = blockDim.x;
  const int64_t head = head_len(p, len);
  if (tid < head) {
    const float z = E::load1(p + tid);
    acc_add<ENT, 1>(acc, &z, c2);
  }
  const uint4* vp = reinterpret_cast<const uint4*>(p + head);
  const int64_t nvec = (len - head) / V;
  int64_t i = tid;
  for (; i + (kFwdUnroll - 1) * bd < nvec; i += kFwdUnroll * bd) {
    uint4 u[kFwdUnroll];
#pragma unroll
    for (int k = 0; k < kFwdUnroll; ++k) u[k] = __ldg(vp + i + k * bd);
    float z[kFwdUnroll * V];
#pragma unroll
    for (int k = 0; k < kFwdUnroll; ++k) E::unpack(u[k], z + k * V);
    acc_add<ENT, kFwdUnroll * V>(acc, z, c2);
  }
  for (; i < nvec; i += bd) {
    float z[V];
    E::unpack(__ldg(vp + i), z);
    acc_add<ENT, V>(acc, z, c2);
  }
  const int64_t tail = head + nvec * V;
  if (tid < len - tail) {
    const float z = E::load1(p + tail + tid);
    acc_add<ENT, 1>(acc, &z, c2);
  }
}

// Write the four outputs of one row from its merged state (called by a single thread).
template <DType D, bool ENT>
__device__ __forceinline__ void finish_row(const FwdArgs& a, int64_t row,
                                           const typename Elem<D>::T* base, const Acc& acc) {
  const int64_t t = a.targets[row];
  const bool valid = t != a.ignore_index;
  float zt = 0.f;
  if (valid) zt = (t >= 0 && t < a.v) ? Elem<D>::load1(base + t) : NAN;  // range checked in Python
  const float m = acc.m == -INFINITY ? 0.f : acc.m;  // all −inf: s = 0, lse = −inf
  const float ln_s = log2f(acc.s) * kLn2;
  a.lse[row] = __fdiv_rn(m, a.alpha) + ln_s;
  a.target_logit[row] = zt;
  const float lp = __fdiv_rn(cdiff(zt, m), a.alpha) - ln_s;
  a.logprob[row] = valid ? (lp > 0.f ? 0.f : lp) : 0.f;  // ≤ 0 whatever the rounding; NaN stays
  a.state[2 * row] = m;
  a.state[2 * row + 1] = ln_s;
  if (ENT) a.entropy[row] = kLn2 * (log2f(acc.s) - __fdiv_rn(acc.w, acc.s));
}

template <DType D, bool ENT>
__global__ void __launch_bounds__(kFwdMaxThreads)
    fwd_kernel(const FwdArgs a, const int splits, const int64_t chunk, const float c2) {
  using T = typename Elem<D>::T;
  const int64_t bid = blockIdx.x;
  const int64_t row = bid / splits;
  const int split = static_cast<int>(bid - row * splits);
  const T* base = static_cast<const T*>(a.logits) + row_offset(row, a.layout);
  const int64_t begin = split * chunk;
  const int64_t end = begin + chunk < a.v ? begin + chunk : a.v;
  Acc acc = acc_identity();
  fwd_range<D, ENT>(acc, base, begin, end, c2);
  block_reduce<ENT>(acc, c2);
  if (threadIdx.x == 0) {
    if (splits == 1) {
      finish_row<D, ENT>(a, row, base, acc);
    } else {
      float* ws = a.workspace + (row * splits + split) * 3;
      ws[0] = acc.m;
      ws[1] = acc.s;
      ws[2] = acc.w;
    }
  }
}

// One warp per row merges the per-split states.
template <DType D, bool ENT>
__global__ void __launch_bounds__(256)
    combine_kernel(const FwdArgs a, const int splits, const float c2) {
  using T = typename Elem<D>::T;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (blockDim.x >> 5) + (threadIdx.x >> 5);
  const int lane = threadIdx.x & 31;
  if (row >= a.n) return;  // whole warps exit together
  Acc acc = acc_identity();
  const float* ws = a.workspace + row * splits * 3;
  for (int k = lane; k < splits; k += 32) {
    const Acc b{ws[3 * k], ws[3 * k + 1], ws[3 * k + 2]};
    acc_merge<ENT>(acc, b, c2);
  }
  warp_reduce<ENT>(acc, c2);
  if (lane == 0) {
    const T* base = static_cast<const T*>(a.logits) + row_offset(row, a.layout);
    finish_row<D, ENT>(a, row, base, acc);
  }
}

// ------------------------------------------------------------------------------------------------
// Backward.
struct RowGrad {
  float ia2;    // log2(e)/α
  float m;      // the row max saved by the forward (0 for an all −inf row)
  float ls2;    // ln s·log2(e) = log2 s (small: its rounding is relative to log2 s, not to lse)
  float c;      // (g_lse − g_lp − g_H·H)/α
  float g2;     // g_H/α · ln 2  (d is in base-2 units)
  float tadd;   // g_lp/α + g_tl on the target column (valid rows)
  int64_t tgt;  // target column, −1 when none
};

__device__ __forceinline__ float grad_elem(float z, const RowGrad& r) {
  // log2 p = (z − m)·log2(e)/α − log2 s, centred on the row max: z − m is exact for nearby
  // values, so large common offsets cost no digits
  const float d = fmaf(cdiff(z, r.m), r.ia2, -r.ls2);
  const float p = exp2f(d);
  const float g = p * fmaf(-r.g2, d, r.c);
  return p == 0.f ? 0.f : g;  // p = 0 (e.g. z = −inf): no contribution, even if g2·d overflows
}

template <DType D>
__device__ __forceinline__ void bwd_block(const BwdArgs& a, int64_t bid, int chunks, int64_t chunk,
                                          float inv_alpha, float ia2);

// inv_alpha = 1/α and ia2 = log2(e)/α come from the host, correctly rounded (device division
// under --use_fast_math is approximate), and equal to the forward's constant.
template <DType D>
__global__ void __launch_bounds__(kBwdMaxThreads)
    bwd_kernel(const BwdArgs a, const int chunks, const int64_t chunk, const float inv_alpha,
               const float ia2) {
  const int64_t total = a.n * chunks;
  for (int64_t bid = blockIdx.x; bid < total; bid += gridDim.x)
    bwd_block<D>(a, bid, chunks, chunk, inv_alpha, ia2);
}

// One (row, vocabulary chunk) of the backward, by the whole CTA.
template <DType D>
__device__ __forceinline__ void bwd_block(const BwdArgs& a, const int64_t bid, const int chunks,
                                          const int64_t chunk, const float inv_alpha,
                                          const float ia2) {
  using E = Elem<D>;
  using T = typename E::T;
  constexpr int V = E::kVec;
  const int64_t row = bid / chunks;
  const int64_t cidx = bid - row * chunks;
  const T* in = static_cast<const T*>(a.logits) + row_offset(row, a.layout);
  T* out = static_cast<T*>(a.grad) + row * a.v;

  RowGrad r;
  {
    const int64_t t = a.targets[row];
    const bool valid = t != a.ignore_index && t >= 0 && t < a.v;
    const float glp = (valid && a.g_logprob) ? a.g_logprob[row] : 0.f;
    const float glse = a.g_lse ? a.g_lse[row] : 0.f;
    const float gtl = (valid && a.g_target_logit) ? a.g_target_logit[row] : 0.f;
    const float gh = a.g_entropy ? a.g_entropy[row] : 0.f;
    const float h = a.g_entropy ? a.entropy[row] : 0.f;
    r.ia2 = ia2;
    r.m = a.state[2 * row];
    r.ls2 = a.state[2 * row + 1] * kLog2e;
    r.c = (glse - glp - gh * h) * inv_alpha;
    r.g2 = gh * inv_alpha * kLn2;
    r.tadd = valid ? fmaf(glp, inv_alpha, gtl) : 0.f;
    r.tgt = valid ? t : -1;
  }

  const int64_t begin = cidx * chunk;
  const int64_t end = begin + chunk < a.v ? begin + chunk : a.v;
  const int64_t len = end - begin;
  if (len <= 0) return;
  const T* p = in + begin;
  T* q = out + begin;
  const int64_t tid = threadIdx.x, bd = blockDim.x;
  const int64_t head = head_len(p, len);
  if (tid < head) {
    const int64_t j = begin + tid;
    float g = grad_elem(E::load1(p + tid), r);
    if (j == r.tgt) g += r.tadd;
    E::store1(q + tid, g);
  }
  const uint4* vp = reinterpret_cast<const uint4*>(p + head);
  T* qv = q + head;
  // vector stores need the output at the same 16-byte phase as the input
  const bool co_aligned = (reinterpret_cast<uintptr_t>(qv) & 15u) == 0;
  const int64_t nvec = (len - head) / V;
  const int64_t j0 = begin + head;  // column of vector 0, element 0

  auto emit = [&](const uint4& u, int64_t i) {
    float f[V];
    E::unpack(u, f);
#pragma unroll
    for (int k = 0; k < V; ++k) f[k] = grad_elem(f[k], r);
    const int64_t koff = r.tgt - (j0 + i * V);
    if (koff >= 0 && koff < V) {
#pragma unroll
      for (int k = 0; k < V; ++k)
        if (k == koff) f[k] += r.tadd;
    }
    if (co_aligned) {
      reinterpret_cast<uint4*>(qv)[i] = E::pack(f);
    } else {
#pragma unroll
      for (int k = 0; k < V; ++k) E::store1(qv + i * V + k, f[k]);
    }
  };

  int64_t i = tid;
  for (; i + (kBwdUnroll - 1) * bd < nvec; i += kBwdUnroll * bd) {
    uint4 u[kBwdUnroll];
#pragma unroll
    for (int k = 0; k < kBwdUnroll; ++k) u[k] = __ldg(vp + i + k * bd);
#pragma unroll
    for (int k = 0; k < kBwdUnroll; ++k) emit(u[k], i + k * bd);
  }
  for (; i < nvec; i += bd) emit(__ldg(vp + i), i);
  const int64_t tail = head + nvec * V;
  if (tid < len - tail) {
    const int64_t j = begin + tail + tid;
    float g = grad_elem(E::load1(p + tail + tid), r);
    if (j == r.tgt) g += r.tadd;
    E::store1(q + tail + tid, g);
  }
}

// ------------------------------------------------------------------------------------------------
inline int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline int64_t round_up(int64_t a, int64_t b) { return cdiv(a, b) * b; }
inline int vec_of(DType d) { return d == DType::kFloat32 ? 4 : 8; }
inline int threads_for(int64_t vectors, int64_t per_thread, int lo, int hi) {
  const int64_t t = round_up(std::max<int64_t>(1, cdiv(vectors, per_thread)), 32);
  return static_cast<int>(std::min<int64_t>(hi, std::max<int64_t>(lo, t)));
}

constexpr int64_t kMinSplitBytes = 4096;  // smallest vocabulary slice a forward split CTA reads
constexpr int kMaxSplits = 256;

template <DType D>
void launch_forward_t(const FwdArgs& a, const FwdPlan& pl, cudaStream_t stream) {
  const float c2 = kLog2e / a.alpha;
  const unsigned int grid = static_cast<unsigned int>(a.n * pl.splits);
  if (a.entropy) {
    fwd_kernel<D, true><<<grid, pl.threads, 0, stream>>>(a, pl.splits, pl.chunk, c2);
  } else {
    fwd_kernel<D, false><<<grid, pl.threads, 0, stream>>>(a, pl.splits, pl.chunk, c2);
  }
  if (pl.splits > 1) {
    constexpr int kWarps = 8;
    const unsigned int cgrid = static_cast<unsigned int>(cdiv(a.n, kWarps));
    if (a.entropy) {
      combine_kernel<D, true><<<cgrid, kWarps * 32, 0, stream>>>(a, pl.splits, c2);
    } else {
      combine_kernel<D, false><<<cgrid, kWarps * 32, 0, stream>>>(a, pl.splits, c2);
    }
  }
}

}  // namespace

int sm_count(int device) {
  static std::mutex mu;
  static std::vector<int> cache;
  std::lock_guard<std::mutex> lock(mu);
  if (device < 0) device = 0;
  if (static_cast<int>(cache.size()) <= device) cache.resize(device + 1, 0);
  if (cache[device] == 0) {
    int n = 0;
    if (cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device) != cudaSuccess || n <= 0) {
      (void)cudaGetLastError();
      n = 108;
    }
    cache[device] = n;
  }
  return cache[device];
}

FwdPlan plan_forward(int64_t n, int64_t v, DType dtype, int device) {
  FwdPlan pl{1, v, 0};
  // Split the vocabulary when rows alone give fewer than ~4 CTAs per SM: below that, whole SMs idle
  // (n < #SMs) or the last wave is badly unbalanced (e.g. 300 rows on 132 SMs: 3 vs 2 per SM).
  const int64_t want_ctas = 4 * static_cast<int64_t>(sm_count(device));
  if (n < want_ctas) {
    const int64_t min_chunk = kMinSplitBytes / elem_size(dtype);
    const int64_t want = cdiv(want_ctas, n);
    const int64_t most = std::max<int64_t>(1, v / min_chunk);
    const int64_t splits = std::min<int64_t>(std::min<int64_t>(want, most), kMaxSplits);
    if (splits > 1) {
      pl.chunk = round_up(cdiv(v, splits), 64);  // keeps split starts at one 16-byte phase
      pl.splits = static_cast<int>(cdiv(v, pl.chunk));
      if (pl.splits == 1) pl.chunk = v;
    }
  }
  // ~8 vectors per thread (two unrolled batches) before growing the block
  pl.threads = threads_for(cdiv(pl.chunk, vec_of(dtype)), 2 * kFwdUnroll, 64, kFwdMaxThreads);
  return pl;
}

void launch_forward(const FwdArgs& a, const FwdPlan& pl, cudaStream_t stream) {
  switch (a.dtype) {
    case DType::kFloat32: launch_forward_t<DType::kFloat32>(a, pl, stream); break;
    case DType::kBFloat16: launch_forward_t<DType::kBFloat16>(a, pl, stream); break;
    case DType::kFloat16: launch_forward_t<DType::kFloat16>(a, pl, stream); break;
  }
}

void launch_backward(const BwdArgs& a, int device, cudaStream_t stream) {
  const int vec = vec_of(a.dtype);
  // full chunk: every thread of a 256-thread CTA does kBwdUnroll vectors
  const int64_t max_chunk = static_cast<int64_t>(kBwdMaxThreads) * vec * kBwdUnroll;
  int64_t chunk = std::min<int64_t>(max_chunk, round_up(a.v, 64));
  const int64_t want_ctas = 2 * static_cast<int64_t>(sm_count(device));
  if (a.n * cdiv(a.v, chunk) < want_ctas) {  // few rows: smaller chunks to fill the GPU
    const int64_t min_chunk = kMinSplitBytes / elem_size(a.dtype);
    chunk = std::max<int64_t>(round_up(cdiv(a.v, cdiv(want_ctas, a.n)), 64), min_chunk);
    chunk = std::min<int64_t>(chunk, max_chunk);
  }
  const int64_t chunks = cdiv(a.v, chunk);
  const int threads =
      threads_for(cdiv(std::min<int64_t>(chunk, a.v), vec), kBwdUnroll, 64, kBwdMaxThreads);
  // grid-stride over (row, chunk) blocks beyond 2^31 − 1 of them
  const unsigned int grid = static_cast<unsigned int>(std::min<int64_t>(a.n * chunks, 0x7fffffff));
  const float inv_alpha = 1.f / a.alpha;  // host: IEEE division
  const float ia2 = kLog2e / a.alpha;     // the forward's c2
  switch (a.dtype) {
    case DType::kFloat32:
      bwd_kernel<DType::kFloat32><<<grid, threads, 0, stream>>>(a, static_cast<int>(chunks), chunk,
                                                                 inv_alpha, ia2);
      break;
    case DType::kBFloat16:
      bwd_kernel<DType::kBFloat16><<<grid, threads, 0, stream>>>(a, static_cast<int>(chunks), chunk,
                                                                 inv_alpha, ia2);
      break;
    case DType::kFloat16:
      bwd_kernel<DType::kFloat16><<<grid, threads, 0, stream>>>(a, static_cast<int>(chunks), chunk,
                                                                 inv_alpha, ia2);
      break;
  }
}

}  // namespace erm
