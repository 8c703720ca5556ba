// Host-side interface of the token-stats kernels (csrc/token_stats.cu).
//
// Kept free of torch headers on purpose: token_stats.cu includes only CUDA headers, so nvcc
// compiles it in seconds; bindings.cpp does the tensor checks, allocation and registration.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace erm {

enum class DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

inline int elem_size(DType d) { return d == DType::kFloat32 ? 4 : 2; }

// Row r of the logits starts at element (r / inner_rows) * stride_outer + (r % inner_rows) *
// stride_inner of `logits` (a plain (N, V) tensor: inner_rows = N, stride_outer = 0); the last
// dimension is contiguous.
struct RowLayout {
  int64_t inner_rows;
  int64_t stride_outer;
  int64_t stride_inner;
};

// What forward and backward both read: the logits' rows, their targets and the op's scalars.
struct RowsArgs {
  const void* logits;
  const int64_t* targets;  // (N,)
  int64_t n;
  int64_t v;
  RowLayout layout;
  int64_t ignore_index;
  float alpha;
  DType dtype;
};

struct FwdArgs : RowsArgs {
  float* logprob;       // (N,)
  float* lse;           // (N,)
  float* target_logit;  // (N,)
  float* entropy;       // (N,) or nullptr when not asked
  float* state;         // (N, 2): the row max m and ln Σ exp((z − m)/α), for the backward
  float* workspace;     // N * splits * 3 floats when splits > 1, else unused
};

struct FwdPlan {
  int splits;     // CTAs per row (vocabulary split); 1 = no split, no workspace
  int64_t chunk;  // vocabulary elements per split
  int threads;    // threads per CTA
};

struct BwdArgs : RowsArgs {
  const float* state;    // (N, 2) from the forward: (m, ln s) per row
  const float* entropy;  // may be nullptr when g_entropy is nullptr
  const float* g_logprob;
  const float* g_lse;
  const float* g_target_logit;
  const float* g_entropy;  // any of the four upstream grads may be nullptr (= zero)
  void* grad;              // (N, V) contiguous, logits' dtype
};

int sm_count(int device);
FwdPlan plan_forward(int64_t n, int64_t v, DType dtype, int device);
// Launch on `stream`; the caller checks cudaGetLastError().
void launch_forward(const FwdArgs& args, const FwdPlan& plan, cudaStream_t stream);
void launch_backward(const BwdArgs& args, int device, cudaStream_t stream);

}  // namespace erm
