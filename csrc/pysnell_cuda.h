// Host launchers of pysnell's CUDA kernels.
//
// Only CUDA headers here (no torch, c10 or ATen): the .cu files compile with plain nvcc, and the
// single binding translation unit (binding.cpp) includes this header next to torch. Every launcher
// takes raw device pointers, sizes and a stream, enqueues its kernels without synchronising with
// the host, and returns the first launch error (cudaSuccess otherwise). Scratch memory comes from
// the caller, sized by the matching *_workspace_bytes function.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace pysnell {

// Storage dtype of a tensor whose dtype is chosen at run time (SNELL factors, weights, outputs).
enum class DType : int { f32 = 0, f16 = 1, bf16 = 2 };

// Which order statistic(s) a selection finds. Quantile mode (k < 0): torch.quantile's linear rule at
// `sparsity`, read from `sparsity_dev` (a device float64 scalar) when it is not null, so that a
// sparsity held in a GPU buffer needs no host sync. k-mode (k >= 1): the k-th largest key.
struct RankSpec {
  const double* sparsity_dev;
  double sparsity;
  int64_t k;
};

// ------------------------------------------------------------------------------------------------
// Top-k: radix select on the float32 bits of |x| (NaN ranks below every number).

// Largest number of groups a selection handles in one launch (grid.y / grid.z limit).
constexpr int64_t kMaxGroups = 65535;

// Scratch for topk_threshold / topk_mask_inplace over `groups` contiguous groups of `group_size`.
size_t topk_workspace_bytes(int64_t groups, int64_t group_size);

// Quantile thresholds of |x| for each of `groups` contiguous groups of `group_size` elements.
// thresholds: float32 (groups,). Quantile mode only.
template <typename T>
cudaError_t topk_threshold(const T* x, int64_t groups, int64_t group_size, RankSpec rank, float* thresholds,
                           void* workspace, size_t workspace_bytes, cudaStream_t stream);

// Zero, in place, every element of x (numel elements) that is not kept; threshold: float32 scalar out.
// packed (nullable): ceil(numel / 8) bytes, bit i of byte j set when element 8j + i is kept.
// k-mode requires 1 <= k <= numel (k = 0 is the caller's job: zero everything).
template <typename T>
cudaError_t topk_mask_inplace(T* x, int64_t numel, RankSpec rank, float* threshold, uint8_t* packed,
                              void* workspace, size_t workspace_bytes, cudaStream_t stream);

// ------------------------------------------------------------------------------------------------
// SNELL: ΔW[i, j] = κ(b_i, a_j) regenerated tile by tile (never stored), selection, W_eff, backward.

enum class SnellKernel : int { piecewise = 0, linear = 1, rbf = 2, sigmoid = 3, snella = 4 };
enum class SnellMode : int { reference = 0, paper = 1, mask = 2 };

// Largest rank r the SNELL kernels take (the factor tiles live in shared memory).
constexpr int kSnellMaxRank = 256;

struct SnellFactors {
  const void* A;       // (r, n) row-major
  const void* B;       // (m, r) row-major
  const void* coeffs;  // (pieces,) device, same dtype as A
  const void* alpha;   // device scalars, same dtype as A
  const void* beta;
  const void* gamma;
  DType dtype;  // of A, B, coeffs, alpha, beta, gamma; ΔW is rounded to it (the reference merges in it)
  int64_t m;
  int64_t n;
  int r;
  int pieces;
  int groups;  // out_groups: m rows form `groups` equal groups (own thresholds, own softmax)
  SnellKernel kernel;
};

// How S follows from ΔW. thresholds == nullptr: no sparsification (S = ΔW).
struct SnellSparsify {
  const float* thresholds;  // (groups,) float32
  const double* sparsity_dev;
  double sparsity;  // sparsity 0 (host or device value) means S = ΔW
  SnellMode mode;
};

// Per-column softmax statistics of the "snella" kernel: float32 (groups, n, 4) = {max z, Σ exp(z − max),
// Σ_i G·P (backward only), unused} with z = D / γ over the rows of each group.
size_t snell_colstats_workspace_bytes(const SnellFactors& f);
cudaError_t snell_colstats(const SnellFactors& f, float* colstats, void* workspace, size_t workspace_bytes,
                           cudaStream_t stream);

// Per-group quantile thresholds (groups,) of |ΔW| (ΔW in f.dtype, selection in float32).
size_t snell_select_workspace_bytes(const SnellFactors& f);
cudaError_t snell_select(const SnellFactors& f, const float* colstats, RankSpec rank, float* thresholds,
                         void* workspace, size_t workspace_bytes, cudaStream_t stream);

// out (m, n) in out_dtype: W0 + S computed in float32 (weight == nullptr: S alone).
cudaError_t snell_weff(const SnellFactors& f, const float* colstats, SnellSparsify sp, const void* weight,
                       DType weight_dtype, void* out, DType out_dtype, cudaStream_t stream);

// Gradients of ΔW's parameters given grad = ∂L/∂S (m, n) in grad_dtype (cast to f.dtype first, as the
// reference does), through the sparsification (sp) and the kernel. dA (r, n), dB (m, r) in f.dtype;
// dscalars float32 (pieces + 3,) = {dcoeffs[0..pieces), dalpha, dbeta, dgamma} (zeros where the kernel
// has none). colstats: as computed by snell_colstats (snella only; its third column is filled here).
size_t snell_backward_workspace_bytes(const SnellFactors& f);
cudaError_t snell_backward(const SnellFactors& f, float* colstats, SnellSparsify sp, const void* grad,
                           DType grad_dtype, void* dA, void* dB, float* dscalars, void* workspace,
                           size_t workspace_bytes, cudaStream_t stream);

// The branch form's keep mask (training with dropout / drop-path): bits (rows, nb = ceil(n / 8)) uint8,
// bit j % 8 of byte j / 8 of row t set when element (t, j) is kept.
cudaError_t snell_dropout_pack(const uint8_t* keep, int64_t rows, int64_t n, uint8_t* bits, cudaStream_t stream);

// out (rows, n) = v ⊙ D: v[t, j]·(kept[t, j] ? row_scale[t] : 0), one float32 product rounded to T.
// bits nullable: every element kept.
template <typename T>
cudaError_t snell_dropout_apply(const T* v, const uint8_t* bits, const float* row_scale, int64_t rows, int64_t n,
                                T* out, cudaStream_t stream);

// ------------------------------------------------------------------------------------------------
// Monarch (fly layout, spec/MONARCH.md): x (T, n_in <= k·p), w1 (k, q, p), w2 (l, s, r), l·r = k·q,
// y (T, out_features <= l·s). Missing input features read as zeros; output features past
// out_features are not written.

struct MonarchShape {
  int64_t tokens;
  int64_t n_in;
  int64_t out_features;
  int64_t k, q, p;
  int64_t l, s, r;
};

// Scratch: the (T, k·q) intermediate.
size_t monarch_workspace_bytes(const MonarchShape& sh, size_t elem_size);

// y = Monarch(w1, w2)·x (+ bias, nullable).
template <typename T>
cudaError_t monarch_forward(const MonarchShape& sh, const T* x, const T* w1, const T* w2, const T* bias, T* y,
                            void* workspace, size_t workspace_bytes, cudaStream_t stream);

// dx (T, n_in), dw1, dw2 given dy (T, out_features); a null output pointer skips that gradient.
// Scratch: two (T, k·q) intermediates.
size_t monarch_backward_workspace_bytes(const MonarchShape& sh, size_t elem_size);
template <typename T>
cudaError_t monarch_backward(const MonarchShape& sh, const T* dy, const T* x, const T* w1, const T* w2, T* dx,
                             T* dw1, T* dw2, void* workspace, size_t workspace_bytes, cudaStream_t stream);

}  // namespace pysnell
