// SNELL backward: G_S = dYᵀ·X tiles (a cuBLAS GEMM done by the caller) through the mode's chain rule and the
// kernel derivative, reduced into dA, dB and the kernel scalars with fixed-order split reductions (no
// atomics: deterministic). ΔW is regenerated from A and B, never stored.
#include <cuda_runtime.h>

#include <cstdint>

#include "snell_common.cuh"

namespace pysnell {
namespace {

// ---- backward

// Partial sums written by each block; reduced in a fixed order by the reduce kernels.
struct BackwardParts {
  float* dB;    // (col tiles, m, r)
  float* dA;    // (groups · row tiles, r, n)
  float* scal;  // (blocks, pieces + 3)
};

// Row and column reductions of the E tile (Es [TI][LDT]) for factor dims [k0, k0 + width):
// distance form (piecewise, snella, rbf): dB_i = b_i·Σ_j E − Σ_j E·a_j, dA_j = a_j·Σ_i E − Σ_i E·b_i;
// dot form (linear, sigmoid): dB_i = Σ_j E·a_j, dA_j = Σ_i E·b_i.
__device__ void reduce_tile(const Ctx& c, const Tile& t, const SnellFactors& f, const float* Es, float* rs,
                            float* cs, int k0, int width, bool distance, const BackwardParts& parts) {
  if (distance) {
    if (threadIdx.x < TI) {
      float s = 0.f;
      for (int jj = 0; jj < TJ; ++jj) s = __fadd_rn(s, Es[threadIdx.x * LDT + jj]);
      rs[threadIdx.x] = s;
    } else if (threadIdx.x < TI + TJ) {
      const int jj = threadIdx.x - TI;
      float s = 0.f;
      for (int ii = 0; ii < TI; ++ii) s = __fadd_rn(s, Es[ii * LDT + jj]);
      cs[jj] = s;
    }
    __syncthreads();
  }
  const int64_t m = f.m, n = f.n;
  const int r = c.r;
  for (int o = threadIdx.x; o < TI * width; o += NT) {
    const int ii = o / width, kk = k0 + o % width;
    if (ii >= t.rows) continue;
    float s = 0.f;
    for (int jj = 0; jj < TJ; ++jj) s = __fmaf_rn(Es[ii * LDT + jj], c.As[kk * LDT + jj], s);
    const float v = distance ? __fsub_rn(__fmul_rn(c.Bs[kk * LDT + ii], rs[ii]), s) : s;
    parts.dB[(static_cast<int64_t>(t.ct) * m + t.row0 + ii) * r + kk] = v;
  }
  const int rtiles = gridDim.y;
  const int64_t rtg = static_cast<int64_t>(t.g) * rtiles + t.rt;
  for (int o = threadIdx.x; o < TJ * width; o += NT) {
    const int jj = o % TJ, kk = k0 + o / TJ;
    if (jj >= t.cols) continue;
    float s = 0.f;
    for (int ii = 0; ii < TI; ++ii) s = __fmaf_rn(Es[ii * LDT + jj], c.Bs[kk * LDT + ii], s);
    const float v = distance ? __fsub_rn(__fmul_rn(c.As[kk * LDT + jj], cs[jj]), s) : s;
    parts.dA[(rtg * r + kk) * n + t.col0 + jj] = v;
  }
}

template <int KK>
__global__ void __launch_bounds__(NT)
    snell_backward_kernel(SnellFactors f, const float* colstats, SnellSparsify sp, const void* grad, DType gdt,
                          BackwardParts parts) {
  extern __shared__ float4 smem4[];
  __shared__ float scratch[32];
  float* smem = reinterpret_cast<float*>(smem4);
  const Tile t = tile_of(f);
  const Ctx c = load_factors(f, t, smem);
  float* Es = smem + factor_smem_floats(f.r, f.pieces);
  float* rs = Es + TI * LDT;
  float* cs = rs + TI;
  float4 cst[4];
  if constexpr (KK == K_SNELLA) load_colstats(colstats, f, t, cst);
  float dw[4][4], aux[4][4], aux2[4][4];
  regen<KK>(c, cst, dw, aux, aux2);
  const SparseState s = sparse_state(sp, f, t.g);
  const int count = t.cols - t.tx * 4 < 4 ? t.cols - t.tx * 4 : 4;

  // Phase 1: U = the upstream gradient each kernel's factor reduction needs
  // (∂L/∂D for piecewise and snella, E directly for rbf, linear, sigmoid), and the α, β, γ partials.
  float U[4][4];
  float d_alpha = 0.f, d_beta = 0.f, d_gamma = 0.f;
  const float alpha = c.alpha(), beta = c.beta(), gamma = c.gamma();
#pragma unroll
  for (int x = 0; x < 4; ++x) {
    const bool row_ok = t.ty * 4 + x < t.rows && count > 0;
    float g[4] = {0.f, 0.f, 0.f, 0.f};
    if (row_ok) load4_as_float(grad, gdt, (t.row0 + t.ty * 4 + x) * f.n + t.col0 + t.tx * 4, count, g);
#pragma unroll
    for (int y = 0; y < 4; ++y) {
      const bool ok = row_ok && y < count;
      const float gd = ok ? sparsify_grad(s, round_to(c.dt, g[y]), dw[x][y]) : 0.f;
      float u = gd;
      if constexpr (KK == K_SNELLA) {
        const float z = aux[x][y], P = aux2[x][y];
        const float dZ = __fmul_rn(P, __fsub_rn(__fmul_rn(alpha, gd), __fmul_rn(alpha, cst[y].z)));
        if (ok) {
          d_alpha = __fmaf_rn(gd, P, d_alpha);
          d_beta = __fadd_rn(d_beta, gd);
          d_gamma = __fsub_rn(d_gamma, __fdiv_rn(__fmul_rn(dZ, z), gamma));
        }
        u = ok ? __fadd_rn(gd, __fdiv_rn(dZ, gamma)) : 0.f;
      } else if constexpr (KK == K_RBF) {
        const float sq = aux[x][y], K = aux2[x][y];
        const float gk = __fmul_rn(gd, K);
        if (ok) {
          d_alpha = __fadd_rn(d_alpha, gk);
          d_beta = __fsub_rn(d_beta, __fmul_rn(alpha, __fmul_rn(gk, sq)));
          d_gamma = __fadd_rn(d_gamma, gd);
        }
        u = __fmul_rn(__fmul_rn(-2.0f * alpha, beta), gk);
      } else if constexpr (KK == K_SIGMOID) {
        const float L = aux[x][y], sg = aux2[x][y];
        const float H = __fmul_rn(__fmul_rn(__fmul_rn(gd, alpha), sg), __fsub_rn(1.0f, sg));
        if (ok) {
          d_alpha = __fmaf_rn(gd, sg, d_alpha);
          d_gamma = __fadd_rn(d_gamma, gd);
          d_beta = __fmaf_rn(H, L, d_beta);
        }
        u = __fmul_rn(beta, H);
      }
      U[x][y] = ok ? u : 0.f;
    }
  }

  // Phase 2: E per piece (or once), its row/column reductions into this block's partials.
  const int nscal = f.pieces + 3;
  const int64_t blk = (static_cast<int64_t>(t.g) * gridDim.y + t.rt) * gridDim.x + t.ct;
  float* scal = parts.scal + blk * nscal;
  constexpr bool kPieces = (KK == K_PIECEWISE || KK == K_SNELLA);
  constexpr bool kDistance = (KK != K_LINEAR && KK != K_SIGMOID);
  const int passes = kPieces ? f.pieces : 1;
  const int width = kPieces ? f.r / f.pieces : f.r;
  for (int p = 0; p < passes; ++p) {
    float E[4][4];
    if constexpr (kPieces) {
      float acc[4][4];
      sq_dist(c, p * width, (p + 1) * width, acc);
      const float cp = c.sc[p];
      float d_coeff = 0.f;
#pragma unroll
      for (int x = 0; x < 4; ++x)
#pragma unroll
        for (int y = 0; y < 4; ++y) {
          const float dist = __fsqrt_rn(acc[x][y]);
          // torch's subgradient of the norm: 0 where the distance is 0.
          E[x][y] = dist > 0.f ? __fdiv_rn(__fmul_rn(cp, U[x][y]), dist) : 0.f;
          d_coeff = __fmaf_rn(U[x][y], dist, d_coeff);  // U is 0 outside the matrix
        }
      const float total = detail::block_sum(d_coeff, scratch);
      if (threadIdx.x == 0) scal[p] = total;
    } else {
#pragma unroll
      for (int x = 0; x < 4; ++x)
#pragma unroll
        for (int y = 0; y < 4; ++y) E[x][y] = U[x][y];
    }
#pragma unroll
    for (int x = 0; x < 4; ++x)
      *reinterpret_cast<float4*>(Es + (t.ty * 4 + x) * LDT + t.tx * 4) = make_float4(E[x][0], E[x][1], E[x][2], E[x][3]);
    __syncthreads();
    reduce_tile(c, t, f, Es, rs, cs, p * width, width, kDistance, parts);
    __syncthreads();  // before the next piece overwrites Es
  }
  if constexpr (!kPieces) {
    for (int p = threadIdx.x; p < f.pieces; p += NT) scal[p] = 0.f;
  }
  const float sa = detail::block_sum(d_alpha, scratch);
  const float sb = detail::block_sum(d_beta, scratch);
  const float sg = detail::block_sum(d_gamma, scratch);
  if (threadIdx.x == 0) {
    scal[f.pieces] = sa;
    scal[f.pieces + 1] = sb;
    scal[f.pieces + 2] = sg;
  }
}

__global__ void snell_reduce_factor_grads(const float* dB_part, int64_t col_tiles, const float* dA_part,
                                          int64_t row_tiles, int64_t m, int64_t n, int r, void* dA, void* dB,
                                          DType dt) {
  const int64_t total_b = m * r, total = total_b + static_cast<int64_t>(r) * n;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float s = 0.f;
    if (idx < total_b) {
      for (int64_t ct = 0; ct < col_tiles; ++ct) s = __fadd_rn(s, dB_part[ct * total_b + idx]);
      store_from_float(dB, dt, idx, s);
    } else {
      const int64_t e = idx - total_b;  // kk·n + j: dA's own layout
      const int64_t per = static_cast<int64_t>(r) * n;
      for (int64_t rt = 0; rt < row_tiles; ++rt) s = __fadd_rn(s, dA_part[rt * per + e]);
      store_from_float(dA, dt, e, s);
    }
  }
}

__global__ void snell_reduce_scalars(const float* part, int64_t blocks, int nscal, float* out) {
  __shared__ double scratch[32];
  const int sidx = blockIdx.x;
  double s = 0.0;
  for (int64_t b = threadIdx.x; b < blocks; b += blockDim.x) s += static_cast<double>(part[b * nscal + sidx]);
  const double total = detail::block_sum(s, scratch);
  if (threadIdx.x == 0) out[sidx] = static_cast<float>(total);
}

cudaError_t launch_backward(const SnellFactors& f, const float* colstats, const SnellSparsify& sp, const void* grad,
                            DType gdt, const BackwardParts& parts, cudaStream_t stream) {
  const Grid g = grid_of(f);
  const size_t smem = backward_smem_bytes(f);
  PYSNELL_SNELL_DISPATCH(f.kernel, {
    PYSNELL_RETURN_IF_ERROR(detail::allow_smem(snell_backward_kernel<KK>, smem));
    snell_backward_kernel<KK><<<g.grid, NT, smem, stream>>>(f, colstats, sp, grad, gdt, parts);
    return cudaGetLastError();
  })
}

}  // namespace

static size_t backward_layout(const SnellFactors& f, size_t* off_dA, size_t* off_scal, size_t* off_colpart) {
  const Grid g = grid_of(f);
  const size_t dB = detail::align_up(sizeof(float) * g.col_tiles * f.m * f.r, 256);
  const size_t dA = detail::align_up(sizeof(float) * f.groups * g.row_tiles * f.r * f.n, 256);
  const size_t blocks = static_cast<size_t>(g.col_tiles) * g.row_tiles * f.groups;
  const size_t scal = detail::align_up(sizeof(float) * blocks * (f.pieces + 3), 256);
  const size_t colpart = f.kernel == SnellKernel::snella ? colstats_part_bytes(f) : 0;
  *off_dA = dB;
  *off_scal = dB + dA;
  *off_colpart = dB + dA + scal;
  return dB + dA + scal + colpart;
}

size_t snell_backward_workspace_bytes(const SnellFactors& f) {
  if (!valid(f)) return 0;
  size_t a, b, c;
  return backward_layout(f, &a, &b, &c);
}

cudaError_t snell_backward(const SnellFactors& f, float* colstats, SnellSparsify sp, const void* grad,
                           DType grad_dtype, void* dA, void* dB, float* dscalars, void* workspace,
                           size_t workspace_bytes, cudaStream_t stream) {
  if (!valid(f)) return cudaErrorInvalidValue;
  if (f.kernel == SnellKernel::snella && colstats == nullptr) return cudaErrorInvalidValue;
  size_t off_dA, off_scal, off_colpart;
  if (workspace_bytes < backward_layout(f, &off_dA, &off_scal, &off_colpart)) return cudaErrorInvalidValue;
  char* ws = static_cast<char*>(workspace);
  BackwardParts parts;
  parts.dB = reinterpret_cast<float*>(ws);
  parts.dA = reinterpret_cast<float*>(ws + off_dA);
  parts.scal = reinterpret_cast<float*>(ws + off_scal);
  const Grid g = grid_of(f);
  if (f.kernel == SnellKernel::snella) {  // Σ_i G_D·P per column, needed by every element's dZ
    PYSNELL_RETURN_IF_ERROR(run_colstats_pass<true>(f, colstats, sp, grad, grad_dtype,
                                                    reinterpret_cast<float2*>(ws + off_colpart), stream));
  }
  PYSNELL_RETURN_IF_ERROR(launch_backward(f, colstats, sp, grad, grad_dtype, parts, stream));
  const int64_t outs = f.m * f.r + static_cast<int64_t>(f.r) * f.n;
  const int64_t want = detail::ceil_div(outs, 256);
  const unsigned int blocks = static_cast<unsigned int>(want < 65535 ? want : 65535);
  snell_reduce_factor_grads<<<blocks, 256, 0, stream>>>(parts.dB, g.col_tiles, parts.dA, f.groups * g.row_tiles,
                                                        f.m, f.n, f.r, dA, dB, f.dtype);
  PYSNELL_RETURN_IF_ERROR(cudaGetLastError());
  const int64_t nblocks = g.col_tiles * g.row_tiles * f.groups;
  snell_reduce_scalars<<<f.pieces + 3, 256, 0, stream>>>(parts.scal, nblocks, f.pieces + 3, dscalars);
  return cudaGetLastError();
}

}  // namespace pysnell
