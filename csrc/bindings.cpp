// Registration of the CUDA token-stats kernels as torch ops `torch.ops.erm_C.token_stats_fwd` /
// `token_stats_bwd`, plus the (otherwise empty) Python module `erm._C` whose import runs the
// registration. Validation happens in Python (erm/ops/cuda_impl.py) first; the checks here keep
// direct callers memory-safe.
#include <Python.h>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <tuple>

#include "token_stats.h"

#ifndef TORCH_EXTENSION_NAME
#define TORCH_EXTENSION_NAME _C
#endif

namespace {

using at::Tensor;

erm::DType to_dtype(const Tensor& logits) {
  switch (logits.scalar_type()) {
    case at::kFloat: return erm::DType::kFloat32;
    case at::kBFloat16: return erm::DType::kBFloat16;
    case at::kHalf: return erm::DType::kFloat16;
    default:
      TORCH_CHECK(false, "erm_C: logits must be float32, bfloat16 or float16, got ",
                  logits.scalar_type());
  }
}

// Checks shared by forward and backward; returns the arguments both kernels read.
erm::RowsArgs check_rows(const Tensor& logits, const Tensor& targets, double alpha,
                         int64_t ignore_index, int64_t inner_rows, int64_t stride_outer,
                         int64_t stride_inner) {
  TORCH_CHECK(logits.is_cuda(), "erm_C: logits must be a CUDA tensor");
  TORCH_CHECK(targets.device() == logits.device(), "erm_C: targets must be on the logits' device");
  TORCH_CHECK(targets.scalar_type() == at::kLong, "erm_C: targets must be int64");
  TORCH_CHECK(targets.is_contiguous(), "erm_C: targets must be contiguous");
  TORCH_CHECK(logits.dim() >= 1, "erm_C: logits must have shape (..., V)");
  const int64_t v = logits.size(-1);
  const int64_t n = targets.numel();
  TORCH_CHECK(v > 0 && n > 0, "erm_C: empty input");
  TORCH_CHECK(v == 1 || logits.stride(-1) == 1, "erm_C: logits must have a unit last stride");
  TORCH_CHECK(logits.numel() == n * v, "erm_C: logits hold ", logits.numel(),
              " elements, expected targets.numel() * V = ", n * v);
  TORCH_CHECK(inner_rows >= 1 && stride_outer >= 0 && stride_inner >= 0,
              "erm_C: bad row layout (inner_rows=", inner_rows, ", stride_outer=", stride_outer,
              ", stride_inner=", stride_inner, ")");
  TORCH_CHECK(n <= std::numeric_limits<int32_t>::max(), "erm_C: too many rows");
  // the last row must end inside the storage
  const int64_t last = n - 1;
  const int64_t max_off = (last / inner_rows) * stride_outer +
                          std::min<int64_t>(inner_rows - 1, last) * stride_inner + v;
  const int64_t avail = static_cast<int64_t>(logits.storage().nbytes() / logits.element_size()) -
                        logits.storage_offset();
  TORCH_CHECK(max_off <= avail, "erm_C: row layout (inner_rows=", inner_rows, ", stride_outer=",
              stride_outer, ", stride_inner=", stride_inner, ") reads past the logits' storage");
  TORCH_CHECK(alpha > 0.0 && std::isfinite(alpha), "erm_C: alpha must be finite and > 0");
  erm::RowsArgs r{};
  r.logits = logits.data_ptr();
  r.targets = targets.data_ptr<int64_t>();
  r.n = n;
  r.v = v;
  r.layout = erm::RowLayout{inner_rows, stride_outer, stride_inner};
  r.ignore_index = ignore_index;
  r.alpha = static_cast<float>(alpha);
  r.dtype = to_dtype(logits);
  return r;
}

const float* opt_rows(const std::optional<Tensor>& t, const Tensor& logits, int64_t n,
                      const char* name) {
  if (!t.has_value() || !t->defined() || t->numel() == 0) return nullptr;
  TORCH_CHECK(t->scalar_type() == at::kFloat, "erm_C: ", name, " must be float32");
  TORCH_CHECK(t->device() == logits.device(), "erm_C: ", name, " must be on the logits' device");
  TORCH_CHECK(t->is_contiguous() && t->numel() == n, "erm_C: ", name,
              " must be contiguous with one entry per row");
  return t->data_ptr<float>();
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> token_stats_fwd(const Tensor& logits,
                                                           const Tensor& targets, double alpha,
                                                           int64_t ignore_index, bool with_entropy,
                                                           int64_t inner_rows,
                                                           int64_t stride_outer,
                                                           int64_t stride_inner) {
  const erm::RowsArgs rows =
      check_rows(logits, targets, alpha, ignore_index, inner_rows, stride_outer, stride_inner);
  const int64_t n = rows.n;
  const c10::cuda::CUDAGuard guard(logits.device());
  const auto opts = logits.options().dtype(at::kFloat);
  Tensor logprob = at::empty({n}, opts);
  Tensor lse = at::empty({n}, opts);
  Tensor tl = at::empty({n}, opts);
  Tensor ent = at::empty({with_entropy ? n : 0}, opts);
  Tensor state = at::empty({n, 2}, opts);

  const int device = logits.get_device();
  const erm::FwdPlan plan = erm::plan_forward(n, rows.v, rows.dtype, device);
  TORCH_CHECK(n * plan.splits <= std::numeric_limits<int32_t>::max(), "erm_C: grid too large");
  Tensor ws;
  if (plan.splits > 1) ws = at::empty({n * plan.splits * 3}, opts);

  erm::FwdArgs a{};
  static_cast<erm::RowsArgs&>(a) = rows;
  a.logprob = logprob.data_ptr<float>();
  a.lse = lse.data_ptr<float>();
  a.target_logit = tl.data_ptr<float>();
  a.entropy = with_entropy ? ent.data_ptr<float>() : nullptr;
  a.state = state.data_ptr<float>();
  a.workspace = plan.splits > 1 ? ws.data_ptr<float>() : nullptr;
  erm::launch_forward(a, plan, c10::cuda::getCurrentCUDAStream(device).stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {logprob, lse, tl, ent, state};
}

Tensor token_stats_bwd(const Tensor& logits, const Tensor& targets, const Tensor& state,
                       const Tensor& ent, const std::optional<Tensor>& g_lp,
                       const std::optional<Tensor>& g_lse, const std::optional<Tensor>& g_tl,
                       const std::optional<Tensor>& g_ent, double alpha, int64_t ignore_index,
                       int64_t inner_rows, int64_t stride_outer, int64_t stride_inner) {
  const erm::RowsArgs rows =
      check_rows(logits, targets, alpha, ignore_index, inner_rows, stride_outer, stride_inner);
  const int64_t n = rows.n;
  const c10::cuda::CUDAGuard guard(logits.device());
  TORCH_CHECK(state.scalar_type() == at::kFloat && state.device() == logits.device() &&
                  state.is_contiguous() && state.dim() == 2 && state.size(0) == n &&
                  state.size(1) == 2,
              "erm_C: state must be a contiguous (N, 2) float32 tensor on the logits' device");
  erm::BwdArgs a{};
  static_cast<erm::RowsArgs&>(a) = rows;
  a.g_logprob = opt_rows(g_lp, logits, n, "g_logprob");
  a.g_lse = opt_rows(g_lse, logits, n, "g_lse");
  a.g_target_logit = opt_rows(g_tl, logits, n, "g_target_logit");
  a.g_entropy = opt_rows(g_ent, logits, n, "g_entropy");
  a.entropy = nullptr;
  if (a.g_entropy != nullptr) {
    a.entropy = opt_rows(ent, logits, n, "entropy");
    TORCH_CHECK(a.entropy != nullptr, "erm_C: g_entropy given but entropy is empty");
  }
  Tensor grad = at::empty({n, rows.v}, logits.options());
  a.state = state.data_ptr<float>();
  a.grad = grad.data_ptr();
  const int device = logits.get_device();
  erm::launch_backward(a, device, c10::cuda::getCurrentCUDAStream(device).stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return grad;
}

}  // namespace

TORCH_LIBRARY(erm_C, m) {
  m.def(
      "token_stats_fwd(Tensor logits, Tensor targets, float alpha, int ignore_index, "
      "bool with_entropy, int inner_rows, int stride_outer, int stride_inner) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "token_stats_bwd(Tensor logits, Tensor targets, Tensor state, Tensor ent, Tensor? g_lp, "
      "Tensor? g_lse, Tensor? g_tl, Tensor? g_ent, float alpha, int ignore_index, "
      "int inner_rows, int stride_outer, int stride_inner) -> Tensor");
}

TORCH_LIBRARY_IMPL(erm_C, CUDA, m) {
  m.impl("token_stats_fwd", &token_stats_fwd);
  m.impl("token_stats_bwd", &token_stats_bwd);
}

// The Python module: importing it (as erm._C) loads this library, which runs the registration.
#define ERM_CAT_(a, b) a##b
#define ERM_CAT(a, b) ERM_CAT_(a, b)
#define ERM_STR_(a) #a
#define ERM_STR(a) ERM_STR_(a)

PyMODINIT_FUNC ERM_CAT(PyInit_, TORCH_EXTENSION_NAME)(void) {
  static PyModuleDef def = {
      PyModuleDef_HEAD_INIT,
      ERM_STR(TORCH_EXTENSION_NAME),
      "erm CUDA kernels; the ops live in torch.ops.erm_C (token_stats_fwd, token_stats_bwd).",
      -1,
      nullptr,
  };
  return PyModule_Create(&def);
}
