// SNELL forward: the per-group thresholds by radix selection over regenerated ΔW (three histogram passes),
// W_eff = W0 + S in the GEMM dtype (or S alone for the branch form, or raw ΔW for the merge op), and the
// snella column statistics. The GEMM x·W_effᵀ itself is a cuBLAS call made by the binding's caller.
#include <cuda_runtime.h>

#include <cstdint>

#include "snell_common.cuh"

namespace pysnell {
namespace {

// ---- selection: three histogram passes over regenerated ΔW

template <int KK>
__global__ void __launch_bounds__(NT)
    snell_hist_kernel(SnellFactors f, const float* colstats, RankSpec rs, radix::Workspace ws, float* thresholds,
                      int pass) {
  extern __shared__ float4 smem4[];
  __shared__ unsigned int sh[2][radix::kMaxBins];
  float* smem = reinterpret_cast<float*>(smem4);
  const int64_t first_ct = static_cast<int64_t>(blockIdx.x) * kHistColTiles;
  const int64_t col_tiles = detail::ceil_div(f.n, TJ);
  Tile t = tile_of(f, first_ct);
  const radix::PassView v = radix::pass_view(ws.states + t.g, pass);
  radix::clear_shared(sh);
  const Ctx c = load_factors(f, t, smem);  // its barrier also covers the clear
  for (int i = 0; i < kHistColTiles && first_ct + i < col_tiles; ++i) {
    if (i > 0) {  // next column tile: same B rows, new A columns
      t = tile_of(f, first_ct + i);
      __syncthreads();
      load_a_tile(f, t, const_cast<float*>(c.As));  // the A tile load_factors laid out
      __syncthreads();
    }
    float4 cst[4];
    if constexpr (KK == K_SNELLA) load_colstats(colstats, f, t, cst);
    float dw[4][4], aux[4][4], aux2[4][4];
    regen<KK>(c, cst, dw, aux, aux2);
#pragma unroll
    for (int x = 0; x < 4; ++x)
#pragma unroll
      for (int y = 0; y < 4; ++y)
        if (t.ty * 4 + x < t.rows && t.tx * 4 + y < t.cols) radix::count_key(sh, v, radix::key_of(dw[x][y]));
  }
  const int64_t group_size = (f.m / f.groups) * f.n;
  radix::flush_and_pick(sh, ws, t.g, v, gridDim.x * gridDim.y, rs, group_size, thresholds);
}

// ---- W_eff = W0 + S (or S, or raw ΔW)

template <int KK>
__global__ void __launch_bounds__(NT)
    snell_weff_kernel(SnellFactors f, const float* colstats, SnellSparsify sp, const void* weight, DType wdt,
                      void* out, DType odt) {
  extern __shared__ float4 smem4[];
  const Tile t = tile_of(f);
  const Ctx c = load_factors(f, t, reinterpret_cast<float*>(smem4));
  float4 cst[4];
  if constexpr (KK == K_SNELLA) load_colstats(colstats, f, t, cst);
  float dw[4][4], aux[4][4], aux2[4][4];
  regen<KK>(c, cst, dw, aux, aux2);
  const SparseState s = sparse_state(sp, f, t.g);
  const int count = t.cols - t.tx * 4 < 4 ? t.cols - t.tx * 4 : 4;
  if (count <= 0) return;
#pragma unroll
  for (int x = 0; x < 4; ++x) {
    if (t.ty * 4 + x >= t.rows) continue;
    const int64_t idx = (t.row0 + t.ty * 4 + x) * f.n + t.col0 + t.tx * 4;
    float w0[4] = {0.f, 0.f, 0.f, 0.f};
    if (weight != nullptr) load4_as_float(weight, wdt, idx, count, w0);
    float o[4];
#pragma unroll
    for (int y = 0; y < 4; ++y) {
      const float S = sparsify_value(s, dw[x][y]);
      o[y] = weight != nullptr ? __fadd_rn(w0[y], S) : S;
    }
    store4_from_float(out, odt, idx, count, o);
  }
}

}  // namespace

size_t snell_colstats_workspace_bytes(const SnellFactors& f) { return valid(f) ? colstats_part_bytes(f) : 0; }

cudaError_t snell_colstats(const SnellFactors& f, float* colstats, void* workspace, size_t workspace_bytes,
                           cudaStream_t stream) {
  if (!valid(f) || f.kernel != SnellKernel::snella) return cudaErrorInvalidValue;
  if (workspace_bytes < colstats_part_bytes(f)) return cudaErrorInvalidValue;
  const SnellSparsify none = {nullptr, nullptr, 0.0, SnellMode::reference};
  return run_colstats_pass<false>(f, colstats, none, nullptr, DType::f32, static_cast<float2*>(workspace), stream);
}

size_t snell_select_workspace_bytes(const SnellFactors& f) { return valid(f) ? radix::workspace_bytes(f.groups) : 0; }

cudaError_t snell_select(const SnellFactors& f, const float* colstats, RankSpec rank, float* thresholds,
                         void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  if (!valid(f) || rank.k >= 0) return cudaErrorInvalidValue;
  if (f.kernel == SnellKernel::snella && colstats == nullptr) return cudaErrorInvalidValue;
  if (workspace_bytes < radix::workspace_bytes(f.groups)) return cudaErrorInvalidValue;
  PYSNELL_RETURN_IF_ERROR(cudaMemsetAsync(workspace, 0, radix::workspace_bytes(f.groups), stream));
  const radix::Workspace ws = radix::carve(workspace, f.groups);
  const dim3 grid = hist_grid(f);
  const size_t smem = factor_smem_bytes(f);
  PYSNELL_SNELL_DISPATCH(f.kernel, {
    PYSNELL_RETURN_IF_ERROR(detail::allow_smem(snell_hist_kernel<KK>, smem));
    for (int pass = 0; pass < radix::kPasses; ++pass) {
      snell_hist_kernel<KK><<<grid, NT, smem, stream>>>(f, colstats, rank, ws, thresholds, pass);
      PYSNELL_RETURN_IF_ERROR(cudaGetLastError());
    }
    return cudaSuccess;
  })
}

cudaError_t snell_weff(const SnellFactors& f, const float* colstats, SnellSparsify sp, const void* weight,
                       DType weight_dtype, void* out, DType out_dtype, cudaStream_t stream) {
  if (!valid(f)) return cudaErrorInvalidValue;
  if (f.kernel == SnellKernel::snella && colstats == nullptr) return cudaErrorInvalidValue;
  const Grid g = grid_of(f);
  const size_t smem = factor_smem_bytes(f);
  PYSNELL_SNELL_DISPATCH(f.kernel, {
    PYSNELL_RETURN_IF_ERROR(detail::allow_smem(snell_weff_kernel<KK>, smem));
    snell_weff_kernel<KK><<<g.grid, NT, smem, stream>>>(f, colstats, sp, weight, weight_dtype, out, out_dtype);
    return cudaGetLastError();
  })
}

// ---- the branch form's keep mask (training with dropout / drop-path): bits, and v ⊙ D

namespace {

constexpr int kDropoutThreads = 256;
constexpr int64_t kDropoutMaxGridY = 65535;

// A thread per (column, row stride): consecutive threads take consecutive bytes / elements of a row.
__global__ void __launch_bounds__(kDropoutThreads)
    snell_dropout_pack_kernel(const uint8_t* keep, int64_t rows, int64_t n, int64_t nb, uint8_t* bits) {
  const int64_t byte = static_cast<int64_t>(blockIdx.x) * kDropoutThreads + threadIdx.x;
  if (byte >= nb) return;
  for (int64_t t = blockIdx.y; t < rows; t += gridDim.y) {
    const uint8_t* row = keep + t * n;
    unsigned int packed = 0;
#pragma unroll
    for (int b = 0; b < 8; ++b) {
      const int64_t j = byte * 8 + b;
      if (j < n && row[j] != 0) packed |= 1u << b;
    }
    bits[t * nb + byte] = static_cast<uint8_t>(packed);
  }
}

template <typename T>
__global__ void __launch_bounds__(kDropoutThreads)
    snell_dropout_apply_kernel(const T* v, const uint8_t* bits, const float* row_scale, int64_t rows, int64_t n,
                               int64_t nb, T* out) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kDropoutThreads + threadIdx.x;
  if (j >= n) return;
  for (int64_t t = blockIdx.y; t < rows; t += gridDim.y) {
    float scale = row_scale[t];
    if (bits != nullptr && ((bits[t * nb + (j >> 3)] >> (j & 7)) & 1) == 0) scale = 0.0f;
    // a product, as the reference: a dropped NaN stays NaN
    out[t * n + j] = detail::from_float<T>(detail::to_float(v[t * n + j]) * scale);
  }
}

dim3 dropout_grid(int64_t rows, int64_t cols) {
  const int64_t y = rows < kDropoutMaxGridY ? rows : kDropoutMaxGridY;
  return dim3(static_cast<unsigned int>(detail::ceil_div(cols, kDropoutThreads)), static_cast<unsigned int>(y));
}

}  // namespace

cudaError_t snell_dropout_pack(const uint8_t* keep, int64_t rows, int64_t n, uint8_t* bits, cudaStream_t stream) {
  const int64_t nb = detail::ceil_div(n, 8);
  if (rows <= 0 || nb <= 0) return cudaSuccess;
  snell_dropout_pack_kernel<<<dropout_grid(rows, nb), kDropoutThreads, 0, stream>>>(keep, rows, n, nb, bits);
  return cudaGetLastError();
}

template <typename T>
cudaError_t snell_dropout_apply(const T* v, const uint8_t* bits, const float* row_scale, int64_t rows, int64_t n,
                                T* out, cudaStream_t stream) {
  if (rows <= 0 || n <= 0) return cudaSuccess;
  snell_dropout_apply_kernel<T><<<dropout_grid(rows, n), kDropoutThreads, 0, stream>>>(
      v, bits, row_scale, rows, n, detail::ceil_div(n, 8), out);
  return cudaGetLastError();
}

#define PYSNELL_INSTANTIATE_DROPOUT(T)                                                                       \
  template cudaError_t snell_dropout_apply<T>(const T*, const uint8_t*, const float*, int64_t, int64_t, T*, \
                                              cudaStream_t);

PYSNELL_INSTANTIATE_DROPOUT(float)
PYSNELL_INSTANTIATE_DROPOUT(__half)
PYSNELL_INSTANTIATE_DROPOUT(__nv_bfloat16)

}  // namespace pysnell
