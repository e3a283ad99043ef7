// The one translation unit that sees torch: checks arguments, allocates outputs and scratch with the
// caching allocator, and calls the raw-pointer launchers of pysnell_cuda.h on the current stream.
// Ops are registered with torch.library under the namespace "pysnell_cuda", so torch.compile can trace
// them (their fake implementations live in pysnell/_cuda_ops.py). No op synchronises with the host.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <limits>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>

#include "pysnell_cuda.h"

// The build's source hash (csrc/__init__.py), passed as a bare token and stringified here.
#define PYSNELL_STRINGIFY_(x) #x
#define PYSNELL_STRINGIFY(x) PYSNELL_STRINGIFY_(x)
#ifdef PYSNELL_SOURCE_HASH_TOKEN
#define PYSNELL_SOURCE_HASH PYSNELL_STRINGIFY(PYSNELL_SOURCE_HASH_TOKEN)
#else
#define PYSNELL_SOURCE_HASH "unknown"
#endif

namespace {

using at::Tensor;

void check_cuda(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "pysnell CUDA kernel ", what, " failed: ", cudaGetErrorString(err));
}

pysnell::DType dtype_of(at::ScalarType st, const char* name);

void check_on_cuda(const Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), "pysnell CUDA op: ", name, " must be a CUDA tensor, got device ", t.device());
}

pysnell::DType dtype_of(at::ScalarType st, const char* name) {
  switch (st) {
    case at::kFloat:
      return pysnell::DType::f32;
    case at::kHalf:
      return pysnell::DType::f16;
    case at::kBFloat16:
      return pysnell::DType::bf16;
    default:
      TORCH_CHECK(false, "pysnell CUDA op: ", name, " must be float32, float16 or bfloat16, got ", st);
  }
}

pysnell::DType dtype_of(const Tensor& t, const char* name) { return dtype_of(t.scalar_type(), name); }

Tensor workspace(size_t bytes, const Tensor& like) {
  return at::empty({static_cast<int64_t>(bytes > 0 ? bytes : 1)}, like.options().dtype(at::kByte));
}

cudaStream_t stream_of(const Tensor& t) { return c10::cuda::getCurrentCUDAStream(t.device().index()).stream(); }

// The sparsity as a device float64 scalar when given as a tensor (no host sync), else the float.
struct Sparsity {
  Tensor holder;
  const double* dev = nullptr;
  double value = 0.0;
};

Sparsity sparsity_of(double value, const std::optional<Tensor>& tensor, const Tensor& like) {
  Sparsity s;
  s.value = value;
  if (tensor.has_value() && tensor->defined()) {
    TORCH_CHECK(tensor->numel() == 1, "pysnell CUDA op: sparsity must be a scalar tensor, got shape ",
                tensor->sizes());
    s.holder = tensor->detach().to(like.device(), at::kDouble).reshape({}).contiguous();
    s.dev = s.holder.data_ptr<double>();
  }
  return s;
}

// ---- top-k

template <typename Fn>
void dispatch_float(const Tensor& t, const char* name, Fn&& fn) {
  switch (t.scalar_type()) {
    case at::kFloat:
      fn(static_cast<float*>(nullptr));
      break;
    case at::kHalf:
      fn(static_cast<__half*>(nullptr));
      break;
    case at::kBFloat16:
      fn(static_cast<__nv_bfloat16*>(nullptr));
      break;
    default:
      TORCH_CHECK(false, "pysnell CUDA op: ", name, " must be float32, float16 or bfloat16, got ", t.scalar_type());
  }
}

Tensor topk_threshold(const Tensor& x2d, double sparsity, const std::optional<Tensor>& sparsity_tensor) {
  check_on_cuda(x2d, "x");
  TORCH_CHECK(x2d.dim() == 2, "pysnell CUDA topk_threshold: x must be 2-D (groups, N), got shape ", x2d.sizes());
  const c10::cuda::CUDAGuard guard(x2d.device());
  const Tensor x = x2d.contiguous();
  const int64_t groups = x.size(0), n = x.size(1);
  TORCH_CHECK(groups <= pysnell::kMaxGroups, "pysnell CUDA topk_threshold: at most ", pysnell::kMaxGroups,
              " groups, got ", groups);
  Tensor out = at::zeros({groups}, x.options().dtype(at::kFloat));
  if (groups == 0 || n == 0) return out;
  const Sparsity s = sparsity_of(sparsity, sparsity_tensor, x);
  const pysnell::RankSpec rank{s.dev, s.value, -1};
  const size_t bytes = pysnell::topk_workspace_bytes(groups, n);
  Tensor ws = workspace(bytes, x);
  dispatch_float(x, "x", [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    check_cuda(pysnell::topk_threshold<T>(static_cast<const T*>(x.data_ptr()), groups, n, rank,
                                          out.data_ptr<float>(), ws.data_ptr(), bytes, stream_of(x)),
               "topk_threshold");
  });
  return out;
}

std::tuple<Tensor, Tensor> topk_mask_(const Tensor& x, double sparsity, const std::optional<Tensor>& sparsity_tensor,
                                      int64_t k, bool want_packed) {
  check_on_cuda(x, "x");
  TORCH_CHECK(x.is_contiguous(), "pysnell CUDA topk_mask_: x must be contiguous (mask a contiguous copy instead)");
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t n = x.numel();
  Tensor threshold = at::zeros({}, x.options().dtype(at::kFloat));
  Tensor packed = at::zeros({want_packed ? (n + 7) / 8 : 0}, x.options().dtype(at::kByte));
  if (n == 0) return {threshold, packed};
  TORCH_CHECK(k <= n, "pysnell CUDA topk_mask_: k must be in [0, numel=", n, "], got ", k);
  if (k == 0) {  // keep nothing
    x.zero_();
    threshold.fill_(std::numeric_limits<float>::infinity());
    return {threshold, packed};
  }
  const Sparsity s = sparsity_of(sparsity, sparsity_tensor, x);
  const pysnell::RankSpec rank{s.dev, s.value, k > 0 ? k : -1};
  const size_t bytes = pysnell::topk_workspace_bytes(1, n);
  Tensor ws = workspace(bytes, x);
  uint8_t* packed_ptr = want_packed ? packed.data_ptr<uint8_t>() : nullptr;
  dispatch_float(x, "x", [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    check_cuda(pysnell::topk_mask_inplace<T>(static_cast<T*>(x.data_ptr()), n, rank, threshold.data_ptr<float>(),
                                             packed_ptr, ws.data_ptr(), bytes, stream_of(x)),
               "topk_mask_");
  });
  return {threshold, packed};
}

// ---- SNELL

struct Factors {
  pysnell::SnellFactors f;
  Tensor A, B, coeffs, alpha, beta, gamma;  // keep the contiguous copies alive
};

Factors factors_of(const Tensor& A, const Tensor& B, const Tensor& coeffs, const Tensor& alpha, const Tensor& beta,
                   const Tensor& gamma, int64_t kernel, int64_t pieces, int64_t groups) {
  check_on_cuda(A, "A");
  check_on_cuda(B, "B");
  TORCH_CHECK(A.dim() == 2 && B.dim() == 2, "pysnell CUDA SNELL: A must be (r, in) and B (out, r), got ", A.sizes(),
              " and ", B.sizes());
  TORCH_CHECK(B.size(1) == A.size(0), "pysnell CUDA SNELL: B must be (out, r=", A.size(0), "), got ", B.sizes());
  TORCH_CHECK(B.scalar_type() == A.scalar_type(), "pysnell CUDA SNELL: A and B must share a dtype, got ",
              A.scalar_type(), " and ", B.scalar_type());
  const int64_t r = A.size(0);
  TORCH_CHECK(r >= 1 && r <= pysnell::kSnellMaxRank, "pysnell CUDA SNELL: rank r must be in [1, ",
              pysnell::kSnellMaxRank, "], got ", r);
  TORCH_CHECK(pieces >= 1 && r % pieces == 0, "pysnell CUDA SNELL: r=", r, " must be divisible by pieces=", pieces);
  TORCH_CHECK(groups >= 1 && groups <= pysnell::kMaxGroups && B.size(0) % groups == 0,
              "pysnell CUDA SNELL: out_features=", B.size(0), " must be divisible by out_groups=", groups);
  TORCH_CHECK((B.size(0) / groups + 63) / 64 <= 65535, "pysnell CUDA SNELL: too many rows per group (",
              B.size(0) / groups, ")");
  TORCH_CHECK(kernel >= 0 && kernel <= static_cast<int64_t>(pysnell::SnellKernel::snella),
              "pysnell CUDA SNELL: unknown kernel id ", kernel);
  TORCH_CHECK(coeffs.numel() == pieces, "pysnell CUDA SNELL: coeffs must have pieces=", pieces, " entries, got ",
              coeffs.numel());
  TORCH_CHECK(alpha.numel() == 1 && beta.numel() == 1 && gamma.numel() == 1,
              "pysnell CUDA SNELL: alpha, beta and gamma must be scalars");
  Factors out;
  const auto opts = A.options();
  out.A = A.contiguous();
  out.B = B.contiguous();
  out.coeffs = coeffs.detach().to(opts).contiguous();
  out.alpha = alpha.detach().to(opts).reshape({1}).contiguous();
  out.beta = beta.detach().to(opts).reshape({1}).contiguous();
  out.gamma = gamma.detach().to(opts).reshape({1}).contiguous();
  pysnell::SnellFactors& f = out.f;
  f.A = out.A.data_ptr();
  f.B = out.B.data_ptr();
  f.coeffs = out.coeffs.data_ptr();
  f.alpha = out.alpha.data_ptr();
  f.beta = out.beta.data_ptr();
  f.gamma = out.gamma.data_ptr();
  f.dtype = dtype_of(A, "A");
  f.m = B.size(0);
  f.n = A.size(1);
  f.r = static_cast<int>(r);
  f.pieces = static_cast<int>(pieces);
  f.groups = static_cast<int>(groups);
  f.kernel = static_cast<pysnell::SnellKernel>(kernel);
  return out;
}

const float* colstats_ptr(const std::optional<Tensor>& colstats, const Factors& fx) {
  if (fx.f.kernel != pysnell::SnellKernel::snella) return nullptr;
  TORCH_CHECK(colstats.has_value() && colstats->defined(),
              "pysnell CUDA SNELL: the snella kernel needs colstats (from snell_colstats)");
  TORCH_CHECK(colstats->scalar_type() == at::kFloat && colstats->is_contiguous() &&
                  colstats->numel() == static_cast<int64_t>(fx.f.groups) * fx.f.n * 4,
              "pysnell CUDA SNELL: colstats must be a contiguous float32 (groups, n, 4) tensor");
  return colstats->data_ptr<float>();
}

Tensor snell_colstats(const Tensor& A, const Tensor& B, const Tensor& coeffs, const Tensor& alpha, const Tensor& beta,
                      const Tensor& gamma, int64_t kernel, int64_t pieces, int64_t groups) {
  const c10::cuda::CUDAGuard guard(A.device());
  const Factors fx = factors_of(A, B, coeffs, alpha, beta, gamma, kernel, pieces, groups);
  TORCH_CHECK(fx.f.kernel == pysnell::SnellKernel::snella, "pysnell CUDA snell_colstats: only the snella kernel");
  Tensor out = at::empty({groups, fx.f.n, 4}, A.options().dtype(at::kFloat));
  const size_t bytes = pysnell::snell_colstats_workspace_bytes(fx.f);
  Tensor ws = workspace(bytes, A);
  check_cuda(pysnell::snell_colstats(fx.f, out.data_ptr<float>(), ws.data_ptr(), bytes, stream_of(A)),
             "snell_colstats");
  return out;
}

Tensor snell_select(const Tensor& A, const Tensor& B, const Tensor& coeffs, const Tensor& alpha, const Tensor& beta,
                    const Tensor& gamma, const std::optional<Tensor>& colstats, double sparsity,
                    const std::optional<Tensor>& sparsity_tensor, int64_t kernel, int64_t pieces, int64_t groups) {
  const c10::cuda::CUDAGuard guard(A.device());
  const Factors fx = factors_of(A, B, coeffs, alpha, beta, gamma, kernel, pieces, groups);
  const float* cst = colstats_ptr(colstats, fx);
  const Sparsity s = sparsity_of(sparsity, sparsity_tensor, A);
  Tensor out = at::empty({groups}, A.options().dtype(at::kFloat));
  const size_t bytes = pysnell::snell_select_workspace_bytes(fx.f);
  Tensor ws = workspace(bytes, A);
  const pysnell::RankSpec rank{s.dev, s.value, -1};
  check_cuda(pysnell::snell_select(fx.f, cst, rank, out.data_ptr<float>(), ws.data_ptr(), bytes, stream_of(A)),
             "snell_select");
  return out;
}

pysnell::SnellSparsify sparsify_of(const std::optional<Tensor>& thresholds, const Sparsity& s, int64_t mode,
                                   const Factors& fx) {
  TORCH_CHECK(mode >= 0 && mode <= static_cast<int64_t>(pysnell::SnellMode::mask), "pysnell CUDA SNELL: unknown mode id ",
              mode);
  pysnell::SnellSparsify sp{nullptr, s.dev, s.value, static_cast<pysnell::SnellMode>(mode)};
  if (thresholds.has_value() && thresholds->defined()) {
    TORCH_CHECK(thresholds->scalar_type() == at::kFloat && thresholds->is_contiguous() &&
                    thresholds->numel() == fx.f.groups && thresholds->is_cuda(),
                "pysnell CUDA SNELL: thresholds must be a contiguous float32 CUDA tensor of out_groups=", fx.f.groups,
                " values");
    sp.thresholds = thresholds->data_ptr<float>();
  }
  return sp;
}

Tensor snell_weff(const Tensor& A, const Tensor& B, const Tensor& coeffs, const Tensor& alpha, const Tensor& beta,
                  const Tensor& gamma, const std::optional<Tensor>& colstats, const std::optional<Tensor>& weight,
                  const std::optional<Tensor>& thresholds, double sparsity,
                  const std::optional<Tensor>& sparsity_tensor, int64_t kernel, int64_t pieces, int64_t mode,
                  int64_t groups, at::ScalarType out_dtype) {
  const c10::cuda::CUDAGuard guard(A.device());
  const Factors fx = factors_of(A, B, coeffs, alpha, beta, gamma, kernel, pieces, groups);
  const float* cst = colstats_ptr(colstats, fx);
  const Sparsity s = sparsity_of(sparsity, sparsity_tensor, A);
  const pysnell::SnellSparsify sp = sparsify_of(thresholds, s, mode, fx);
  Tensor w;
  pysnell::DType wdt = pysnell::DType::f32;
  if (weight.has_value() && weight->defined()) {
    check_on_cuda(*weight, "weight");
    TORCH_CHECK(weight->dim() == 2 && weight->size(0) == fx.f.m && weight->size(1) == fx.f.n,
                "pysnell CUDA snell_weff: weight must be (out=", fx.f.m, ", in=", fx.f.n, "), got ", weight->sizes());
    w = weight->contiguous();
    wdt = dtype_of(w, "weight");
  }
  Tensor out = at::empty({fx.f.m, fx.f.n}, A.options().dtype(out_dtype));
  check_cuda(pysnell::snell_weff(fx.f, cst, sp, w.defined() ? w.data_ptr() : nullptr, wdt, out.data_ptr(),
                                 dtype_of(out_dtype, "out_dtype"), stream_of(A)),
             "snell_weff");
  return out;
}

std::tuple<Tensor, Tensor, Tensor> snell_backward(const Tensor& grad, const Tensor& A, const Tensor& B,
                                                  const Tensor& coeffs, const Tensor& alpha, const Tensor& beta,
                                                  const Tensor& gamma, const std::optional<Tensor>& colstats,
                                                  const std::optional<Tensor>& thresholds, double sparsity,
                                                  const std::optional<Tensor>& sparsity_tensor, int64_t kernel,
                                                  int64_t pieces, int64_t mode, int64_t groups) {
  const c10::cuda::CUDAGuard guard(A.device());
  const Factors fx = factors_of(A, B, coeffs, alpha, beta, gamma, kernel, pieces, groups);
  const float* cst = colstats_ptr(colstats, fx);
  check_on_cuda(grad, "grad");
  TORCH_CHECK(grad.dim() == 2 && grad.size(0) == fx.f.m && grad.size(1) == fx.f.n,
              "pysnell CUDA snell_backward: grad must be (out=", fx.f.m, ", in=", fx.f.n, "), got ", grad.sizes());
  const Tensor g = grad.contiguous();
  const Sparsity s = sparsity_of(sparsity, sparsity_tensor, A);
  const pysnell::SnellSparsify sp = sparsify_of(thresholds, s, mode, fx);
  Tensor dA = at::empty_like(fx.A);
  Tensor dB = at::empty_like(fx.B);
  Tensor dscalars = at::empty({pieces + 3}, A.options().dtype(at::kFloat));
  const size_t bytes = pysnell::snell_backward_workspace_bytes(fx.f);
  Tensor ws = workspace(bytes, A);
  check_cuda(pysnell::snell_backward(fx.f, const_cast<float*>(cst), sp, g.data_ptr(), dtype_of(g, "grad"),
                                     dA.data_ptr(), dB.data_ptr(), dscalars.data_ptr<float>(), ws.data_ptr(), bytes,
                                     stream_of(A)),
             "snell_backward");
  return {dA, dB, dscalars};
}

// ---- the whole layer step, one host call each way
//
// The same sequence as the Python composition of the ops above (select, W_eff, the GEMMs, the factor
// gradients), in one call: a layer step then costs two Python-to-C++ transitions instead of about ten.
// Every GEMM runs in the activations' dtype on cuBLAS, as at the Python level.

std::tuple<Tensor, Tensor> snell_layer_forward(const Tensor& x2, const std::optional<Tensor>& weight,
                                               const std::optional<Tensor>& bias, const Tensor& A, const Tensor& B,
                                               const Tensor& coeffs, const Tensor& alpha, const Tensor& beta,
                                               const Tensor& gamma, const std::optional<Tensor>& colstats,
                                               double sparsity, const std::optional<Tensor>& sparsity_tensor,
                                               bool known_zero, int64_t kernel, int64_t pieces, int64_t mode,
                                               int64_t groups) {
  check_on_cuda(x2, "x2");
  TORCH_CHECK(x2.dim() == 2 && x2.size(1) == A.size(1), "pysnell CUDA snell_layer_forward: x2 must be (T, in=",
              A.size(1), "), got ", x2.sizes());
  const c10::cuda::CUDAGuard guard(A.device());
  Tensor W;
  Tensor thresholds;
  if (known_zero) {  // sparsity 0 known on the host: ΔW unsparsified, thresholds 0
    thresholds = at::zeros({groups}, A.options().dtype(at::kFloat));
    W = snell_weff(A, B, coeffs, alpha, beta, gamma, colstats, weight, std::nullopt, 0.0, std::nullopt, kernel, pieces,
                   mode, groups, x2.scalar_type());
  } else {
    thresholds = snell_select(A, B, coeffs, alpha, beta, gamma, colstats, sparsity, sparsity_tensor, kernel, pieces,
                              groups);
    W = snell_weff(A, B, coeffs, alpha, beta, gamma, colstats, weight, thresholds, sparsity, sparsity_tensor, kernel,
                   pieces, mode, groups, x2.scalar_type());
  }
  std::optional<Tensor> b;
  if (bias.has_value() && bias->defined()) b = bias->to(x2.scalar_type());
  return {at::linear(x2, W, b), thresholds};
}

// -> (dx, dweight, dbias, dA, dB, dscalars); a result not asked for is an empty tensor.
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> snell_layer_backward(
    const Tensor& dy2, const Tensor& x2, const std::optional<Tensor>& weight, const Tensor& A, const Tensor& B,
    const Tensor& coeffs, const Tensor& alpha, const Tensor& beta, const Tensor& gamma,
    const std::optional<Tensor>& colstats, const std::optional<Tensor>& thresholds, double sparsity,
    const std::optional<Tensor>& sparsity_tensor, int64_t kernel, int64_t pieces, int64_t mode, int64_t groups,
    bool need_x, bool need_w, bool need_b, bool need_factor) {
  check_on_cuda(dy2, "dy2");
  check_on_cuda(x2, "x2");
  TORCH_CHECK(dy2.dim() == 2 && x2.dim() == 2 && dy2.size(0) == x2.size(0) && dy2.size(1) == B.size(0) &&
                  x2.size(1) == A.size(1),
              "pysnell CUDA snell_layer_backward: dy2 must be (T, out=", B.size(0), ") and x2 (T, in=", A.size(1),
              "), got ", dy2.sizes(), " and ", x2.sizes());
  TORCH_CHECK(!need_w || (weight.has_value() && weight->defined()),
              "pysnell CUDA snell_layer_backward: need_w without a weight");
  const c10::cuda::CUDAGuard guard(A.device());
  const Tensor none = at::empty({0}, dy2.options());
  Tensor dx = none, dweight = none, dbias = none, dA = none, dB = none, dscalars = none;
  if (need_x) {  // W_eff lives only for this GEMM: the peak holds one m×n buffer at a time
    dx = at::mm(dy2, snell_weff(A, B, coeffs, alpha, beta, gamma, colstats, weight, thresholds, sparsity,
                                sparsity_tensor, kernel, pieces, mode, groups, dy2.scalar_type()));
  }
  if (need_b) dbias = dy2.sum(0);
  if (need_w || need_factor) {
    const Tensor grad_s = at::mm(dy2.t(), x2.to(dy2.scalar_type()));  // G_S in the GEMM dtype
    if (need_w) dweight = grad_s.to(A.scalar_type()).to(weight->scalar_type());
    if (need_factor) {
      std::tie(dA, dB, dscalars) = snell_backward(grad_s, A, B, coeffs, alpha, beta, gamma, colstats, thresholds,
                                                  sparsity, sparsity_tensor, kernel, pieces, mode, groups);
    }
  }
  return {dx, dweight, dbias, dA, dB, dscalars};
}

// ---- the branch form's keep mask

Tensor snell_dropout_pack(const Tensor& keep) {
  check_on_cuda(keep, "keep");
  TORCH_CHECK(keep.dim() == 2 && keep.scalar_type() == at::kBool,
              "pysnell CUDA snell_dropout_pack: keep must be a 2-D (T, n) bool mask, got ", keep.scalar_type(), " ",
              keep.sizes());
  const c10::cuda::CUDAGuard guard(keep.device());
  const Tensor k = keep.contiguous();
  const int64_t rows = k.size(0), n = k.size(1);
  Tensor bits = at::empty({rows, (n + 7) / 8}, k.options().dtype(at::kByte));
  check_cuda(pysnell::snell_dropout_pack(static_cast<const uint8_t*>(k.data_ptr()), rows, n,
                                         bits.data_ptr<uint8_t>(), stream_of(k)),
             "snell_dropout_pack");
  return bits;
}

Tensor snell_dropout_apply(const Tensor& v2, const std::optional<Tensor>& bits, const Tensor& row_scale) {
  check_on_cuda(v2, "v");
  TORCH_CHECK(v2.dim() == 2, "pysnell CUDA snell_dropout_apply: v must be 2-D (T, n), got ", v2.sizes());
  const c10::cuda::CUDAGuard guard(v2.device());
  const int64_t rows = v2.size(0), n = v2.size(1);
  Tensor b;
  if (bits.has_value() && bits->defined()) {
    check_on_cuda(*bits, "bits");
    TORCH_CHECK(bits->scalar_type() == at::kByte && bits->dim() == 2 && bits->size(0) == rows &&
                    bits->size(1) == (n + 7) / 8,
                "pysnell CUDA snell_dropout_apply: bits must be uint8 of shape (", rows, ", ", (n + 7) / 8, "), got ",
                bits->scalar_type(), " ", bits->sizes());
    b = bits->contiguous();
  }
  check_on_cuda(row_scale, "row_scale");
  TORCH_CHECK(row_scale.dim() == 1 && row_scale.size(0) == rows,
              "pysnell CUDA snell_dropout_apply: row_scale must have shape (", rows, ",), got ", row_scale.sizes());
  const Tensor v = v2.contiguous();
  const Tensor scale = row_scale.to(at::kFloat).contiguous();
  Tensor out = at::empty({rows, n}, v.options());
  dispatch_float(v, "v", [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    check_cuda(pysnell::snell_dropout_apply<T>(static_cast<const T*>(v.data_ptr()),
                                               b.defined() ? b.data_ptr<uint8_t>() : nullptr, scale.data_ptr<float>(),
                                               rows, n, static_cast<T*>(out.data_ptr()), stream_of(v)),
               "snell_dropout_apply");
  });
  return out;
}

// ---- Monarch

pysnell::MonarchShape monarch_shape(const Tensor& x, const Tensor& w1, const Tensor& w2, int64_t out_features) {
  TORCH_CHECK(x.dim() == 2, "pysnell CUDA Monarch: x must be 2-D (tokens, features), got ", x.sizes());
  TORCH_CHECK(w1.dim() == 3 && w2.dim() == 3, "pysnell CUDA Monarch: w1 and w2 must be 3-D, got ", w1.sizes(), " and ",
              w2.sizes());
  TORCH_CHECK(w1.scalar_type() == x.scalar_type() && w2.scalar_type() == x.scalar_type(),
              "pysnell CUDA Monarch: x, w1 and w2 must share a dtype");
  pysnell::MonarchShape sh;
  sh.tokens = x.size(0);
  sh.n_in = x.size(1);
  sh.out_features = out_features;
  sh.k = w1.size(0), sh.q = w1.size(1), sh.p = w1.size(2);
  sh.l = w2.size(0), sh.s = w2.size(1), sh.r = w2.size(2);
  TORCH_CHECK(sh.l * sh.r == sh.k * sh.q, "pysnell CUDA Monarch: factors do not chain (l·r != k·q)");
  TORCH_CHECK(sh.n_in <= sh.k * sh.p && out_features >= 1 && out_features <= sh.l * sh.s,
              "pysnell CUDA Monarch: need in_features <= k·p and 1 <= out_features <= l·s");
  TORCH_CHECK((sh.tokens + 63) / 64 <= 65535, "pysnell CUDA Monarch: at most ", 65535 * 64, " tokens per call");
  return sh;
}

template <typename Fn>
void dispatch_monarch(const Tensor& t, Fn&& fn) {
  dispatch_float(t, "x", std::forward<Fn>(fn));
}

Tensor monarch_forward(const Tensor& x2, const Tensor& w1, const Tensor& w2, const std::optional<Tensor>& bias,
                       int64_t out_features) {
  check_on_cuda(x2, "x");
  const c10::cuda::CUDAGuard guard(x2.device());
  const pysnell::MonarchShape sh = monarch_shape(x2, w1, w2, out_features);
  const Tensor x = x2.contiguous(), a = w1.contiguous(), b = w2.contiguous();
  Tensor bz;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->numel() >= out_features, "pysnell CUDA Monarch: bias needs out_features=", out_features,
                " entries, got ", bias->numel());
    bz = bias->to(x.scalar_type()).contiguous();
  }
  Tensor y = at::empty({sh.tokens, out_features}, x.options());
  if (sh.tokens == 0) return y;
  const size_t bytes = pysnell::monarch_workspace_bytes(sh, x.element_size());
  TORCH_CHECK(bytes > 0, "pysnell CUDA Monarch: unsupported shape (feature counts must stay below 2^23)");
  Tensor ws = workspace(bytes, x);
  dispatch_monarch(x, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    check_cuda(pysnell::monarch_forward<T>(sh, static_cast<const T*>(x.data_ptr()),
                                           static_cast<const T*>(a.data_ptr()), static_cast<const T*>(b.data_ptr()),
                                           bz.defined() ? static_cast<const T*>(bz.data_ptr()) : nullptr,
                                           static_cast<T*>(y.data_ptr()), ws.data_ptr(), bytes, stream_of(x)),
               "monarch_forward");
  });
  return y;
}

std::tuple<Tensor, Tensor, Tensor> monarch_backward(const Tensor& dy2, const Tensor& x2, const Tensor& w1,
                                                    const Tensor& w2, bool need_x, bool need_w1, bool need_w2) {
  check_on_cuda(x2, "x");
  const c10::cuda::CUDAGuard guard(x2.device());
  const pysnell::MonarchShape sh = monarch_shape(x2, w1, w2, dy2.size(-1));
  TORCH_CHECK(dy2.dim() == 2 && dy2.size(0) == sh.tokens, "pysnell CUDA Monarch: dy must be (tokens=", sh.tokens,
              ", out), got ", dy2.sizes());
  const Tensor x = x2.contiguous(), a = w1.contiguous(), b = w2.contiguous(), dy = dy2.to(x.scalar_type()).contiguous();
  Tensor dx = need_x ? at::empty_like(x) : at::empty({0}, x.options());
  Tensor dw1 = need_w1 ? at::empty_like(a) : at::empty({0}, x.options());
  Tensor dw2 = need_w2 ? at::empty_like(b) : at::empty({0}, x.options());
  if (sh.tokens == 0) {  // sums over no tokens
    if (need_w1) dw1.zero_();
    if (need_w2) dw2.zero_();
    return {dx, dw1, dw2};
  }
  const size_t bytes = pysnell::monarch_backward_workspace_bytes(sh, x.element_size());
  TORCH_CHECK(bytes > 0, "pysnell CUDA Monarch: unsupported shape (feature counts must stay below 2^23)");
  Tensor ws = workspace(bytes, x);
  dispatch_monarch(x, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    auto ptr = [](Tensor& t, bool need) { return need ? static_cast<T*>(t.data_ptr()) : nullptr; };
    check_cuda(pysnell::monarch_backward<T>(sh, static_cast<const T*>(dy.data_ptr()),
                                            static_cast<const T*>(x.data_ptr()), static_cast<const T*>(a.data_ptr()),
                                            static_cast<const T*>(b.data_ptr()), ptr(dx, need_x), ptr(dw1, need_w1),
                                            ptr(dw2, need_w2), ws.data_ptr(), bytes, stream_of(x)),
               "monarch_backward");
  });
  return {dx, dw1, dw2};
}

std::string build_info() { return PYSNELL_SOURCE_HASH; }

}  // namespace

TORCH_LIBRARY(pysnell_cuda, m) {
  m.def("build_info() -> str", &build_info);
  m.def("topk_threshold(Tensor x, float sparsity, Tensor? sparsity_tensor) -> Tensor");
  m.def("topk_mask_(Tensor(a!) x, float sparsity, Tensor? sparsity_tensor, int k, bool want_packed) -> (Tensor, Tensor)");
  m.def(
      "snell_colstats(Tensor A, Tensor B, Tensor coeffs, Tensor alpha, Tensor beta, Tensor gamma, int kernel, "
      "int pieces, int groups) -> Tensor");
  m.def(
      "snell_select(Tensor A, Tensor B, Tensor coeffs, Tensor alpha, Tensor beta, Tensor gamma, Tensor? colstats, "
      "float sparsity, Tensor? sparsity_tensor, int kernel, int pieces, int groups) -> Tensor");
  m.def(
      "snell_weff(Tensor A, Tensor B, Tensor coeffs, Tensor alpha, Tensor beta, Tensor gamma, Tensor? colstats, "
      "Tensor? weight, Tensor? thresholds, float sparsity, Tensor? sparsity_tensor, int kernel, int pieces, int mode, "
      "int groups, ScalarType out_dtype) -> Tensor");
  m.def(
      "snell_backward(Tensor grad, Tensor A, Tensor B, Tensor coeffs, Tensor alpha, Tensor beta, Tensor gamma, "
      "Tensor(a!)? colstats, Tensor? thresholds, float sparsity, Tensor? sparsity_tensor, int kernel, int pieces, "
      "int mode, int groups) -> (Tensor, Tensor, Tensor)");
  m.def(
      "snell_layer_forward(Tensor x2, Tensor? weight, Tensor? bias, Tensor A, Tensor B, Tensor coeffs, Tensor alpha, "
      "Tensor beta, Tensor gamma, Tensor? colstats, float sparsity, Tensor? sparsity_tensor, bool known_zero, "
      "int kernel, int pieces, int mode, int groups) -> (Tensor, Tensor)");
  m.def(
      "snell_layer_backward(Tensor dy2, Tensor x2, Tensor? weight, Tensor A, Tensor B, Tensor coeffs, Tensor alpha, "
      "Tensor beta, Tensor gamma, Tensor(a!)? colstats, Tensor? thresholds, float sparsity, Tensor? sparsity_tensor, "
      "int kernel, int pieces, int mode, int groups, bool need_x, bool need_w, bool need_b, bool need_factor) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("snell_dropout_pack(Tensor keep) -> Tensor");
  m.def("snell_dropout_apply(Tensor v, Tensor? bits, Tensor row_scale) -> Tensor");
  m.def("monarch_forward(Tensor x, Tensor w1, Tensor w2, Tensor? bias, int out_features) -> Tensor");
  m.def(
      "monarch_backward(Tensor dy, Tensor x, Tensor w1, Tensor w2, bool need_x, bool need_w1, bool need_w2) "
      "-> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(pysnell_cuda, CUDA, m) {
  m.impl("topk_threshold", &topk_threshold);
  m.impl("topk_mask_", &topk_mask_);
  m.impl("snell_colstats", &snell_colstats);
  m.impl("snell_select", &snell_select);
  m.impl("snell_weff", &snell_weff);
  m.impl("snell_backward", &snell_backward);
  m.impl("snell_layer_forward", &snell_layer_forward);
  m.impl("snell_layer_backward", &snell_layer_backward);
  m.impl("snell_dropout_pack", &snell_dropout_pack);
  m.impl("snell_dropout_apply", &snell_dropout_apply);
  m.impl("monarch_forward", &monarch_forward);
  m.impl("monarch_backward", &monarch_backward);
}
