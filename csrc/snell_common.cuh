// SNELL device code shared by snell_forward.cu and snell_backward.cu: ΔW = κ(B, A) regenerated tile by
// tile (never stored), the sparsification rules, the snella column statistics, grid and dispatch helpers.
//
// Tiles are 64 rows × 64 columns of ΔW, 256 threads, each owning rows ty·4 + a and columns tx·4 + c
// (a, c < 4). The factor tiles sit in shared memory as float32. Every value is computed with explicit
// round-to-nearest intrinsics (no contraction into FMAs), so every pass in every kernel regenerates
// bit-identical ΔW: the kept set W_eff applies is exactly the one the selection counted.
// Everything here sits in an anonymous namespace: each translation unit gets its own copy.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "common.cuh"
#include "pysnell_cuda.h"
#include "radix_select.cuh"

namespace pysnell {
namespace {

using detail::load4_as_float;
using detail::load_as_float;
using detail::round_to;
using detail::store4_from_float;
using detail::store_from_float;

constexpr int TI = 64;    // tile rows (outputs i)
constexpr int TJ = 64;    // tile columns (inputs j)
constexpr int NT = 256;   // threads per block (16 × 16)
constexpr int LDT = 68;   // leading dim of the factor tiles and the E tile: float4-aligned, 4-bank shift per row

constexpr int K_PIECEWISE = static_cast<int>(SnellKernel::piecewise);
constexpr int K_LINEAR = static_cast<int>(SnellKernel::linear);
constexpr int K_RBF = static_cast<int>(SnellKernel::rbf);
constexpr int K_SIGMOID = static_cast<int>(SnellKernel::sigmoid);
constexpr int K_SNELLA = static_cast<int>(SnellKernel::snella);

struct Tile {
  int g;          // group
  int rt;         // row tile inside the group
  int ct;         // column tile
  int64_t row0;   // first global row
  int rows;       // valid rows in this tile
  int64_t col0;   // first column
  int cols;       // valid columns
  int ty, tx;     // this thread's 4×4 block
};

// The tile of this block's (group, row tile) at column tile `ct` (default: blockIdx.x).
__device__ __forceinline__ Tile tile_of(const SnellFactors& f, int64_t ct) {
  Tile t;
  const int64_t mg = f.m / f.groups;
  t.g = blockIdx.z;
  t.rt = blockIdx.y;
  t.ct = static_cast<int>(ct);
  const int64_t r0 = static_cast<int64_t>(t.rt) * TI;
  t.row0 = static_cast<int64_t>(t.g) * mg + r0;
  t.rows = static_cast<int>(mg - r0 < TI ? mg - r0 : TI);
  t.col0 = static_cast<int64_t>(t.ct) * TJ;
  t.cols = static_cast<int>(f.n - t.col0 < TJ ? f.n - t.col0 : TJ);
  t.ty = threadIdx.x / 16;
  t.tx = threadIdx.x % 16;
  return t;
}

__device__ __forceinline__ Tile tile_of(const SnellFactors& f) { return tile_of(f, blockIdx.x); }

// Shared-memory layout: Bs [r][LDT] (B rows of the tile, transposed), As [r][LDT] (A columns),
// sc [pieces + 3] = {c_0 .. c_{P-1}, α, β, γ}.
struct Ctx {
  const float* Bs;
  const float* As;
  const float* sc;
  int r;
  int pieces;
  int ty, tx;
  DType dt;
  __device__ float alpha() const { return sc[pieces]; }
  __device__ float beta() const { return sc[pieces + 1]; }
  __device__ float gamma() const { return sc[pieces + 2]; }
};

__host__ __device__ __forceinline__ size_t factor_smem_floats(int r, int pieces) {
  return static_cast<size_t>(2) * r * LDT + ((pieces + 3 + 3) / 4) * 4;
}

__device__ __forceinline__ float load_scalar(const void* p, DType dt, int64_t i) {
  return p != nullptr ? load_as_float(p, dt, i) : 0.f;
}

// A's columns of the tile into As [r][LDT] (no barrier).
__device__ __forceinline__ void load_a_tile(const SnellFactors& f, const Tile& t, float* As) {
  for (int e = threadIdx.x; e < f.r * TJ; e += NT) {
    const int kk = e / TJ, jj = e % TJ;
    As[kk * LDT + jj] = jj < t.cols ? load_as_float(f.A, f.dtype, static_cast<int64_t>(kk) * f.n + t.col0 + jj) : 0.f;
  }
}

// Load the tile's factor slices and the kernel scalars into shared memory; ends with a barrier.
__device__ Ctx load_factors(const SnellFactors& f, const Tile& t, float* smem) {
  const int r = f.r;
  float* Bs = smem;
  float* As = smem + static_cast<size_t>(r) * LDT;
  float* sc = smem + static_cast<size_t>(2) * r * LDT;
  for (int e = threadIdx.x; e < TI * r; e += NT) {
    const int ii = e / r, kk = e - (e / r) * r;  // B's tile rows are one contiguous run of TI·r values
    Bs[kk * LDT + ii] = ii < t.rows ? load_as_float(f.B, f.dtype, (t.row0 + ii) * r + kk) : 0.f;
  }
  load_a_tile(f, t, As);
  for (int e = threadIdx.x; e < f.pieces + 3; e += NT) {
    float v;
    if (e < f.pieces) {
      v = load_scalar(f.coeffs, f.dtype, e);
    } else if (e == f.pieces) {
      v = load_scalar(f.alpha, f.dtype, 0);
    } else if (e == f.pieces + 1) {
      v = load_scalar(f.beta, f.dtype, 0);
    } else {
      v = load_scalar(f.gamma, f.dtype, 0);
    }
    sc[e] = v;
  }
  __syncthreads();
  Ctx c;
  c.Bs = Bs;
  c.As = As;
  c.sc = sc;
  c.r = r;
  c.pieces = f.pieces;
  c.ty = t.ty;
  c.tx = t.tx;
  c.dt = f.dtype;
  return c;
}

// Σ_{kk in [k0, k1)} (b_i[kk] − a_j[kk])² for the thread's 4×4 elements.
__device__ __forceinline__ void sq_dist(const Ctx& c, int k0, int k1, float (&acc)[4][4]) {
#pragma unroll
  for (int x = 0; x < 4; ++x)
#pragma unroll
    for (int y = 0; y < 4; ++y) acc[x][y] = 0.f;
  for (int kk = k0; kk < k1; ++kk) {
    const float4 b4 = *reinterpret_cast<const float4*>(c.Bs + kk * LDT + c.ty * 4);
    const float4 a4 = *reinterpret_cast<const float4*>(c.As + kk * LDT + c.tx * 4);
    const float b[4] = {b4.x, b4.y, b4.z, b4.w};
    const float a[4] = {a4.x, a4.y, a4.z, a4.w};
#pragma unroll
    for (int x = 0; x < 4; ++x)
#pragma unroll
      for (int y = 0; y < 4; ++y) {
        const float d = __fsub_rn(b[x], a[y]);
        acc[x][y] = __fmaf_rn(d, d, acc[x][y]);
      }
  }
}

// Σ_kk b_i[kk]·a_j[kk].
__device__ __forceinline__ void dot(const Ctx& c, float (&acc)[4][4]) {
#pragma unroll
  for (int x = 0; x < 4; ++x)
#pragma unroll
    for (int y = 0; y < 4; ++y) acc[x][y] = 0.f;
  for (int kk = 0; kk < c.r; ++kk) {
    const float4 b4 = *reinterpret_cast<const float4*>(c.Bs + kk * LDT + c.ty * 4);
    const float4 a4 = *reinterpret_cast<const float4*>(c.As + kk * LDT + c.tx * 4);
    const float b[4] = {b4.x, b4.y, b4.z, b4.w};
    const float a[4] = {a4.x, a4.y, a4.z, a4.w};
#pragma unroll
    for (int x = 0; x < 4; ++x)
#pragma unroll
      for (int y = 0; y < 4; ++y) acc[x][y] = __fmaf_rn(b[x], a[y], acc[x][y]);
  }
}

// D = Σ_p c_p‖b_i^(p) − a_j^(p)‖ (the piecewise kernel).
__device__ __forceinline__ void piecewise(const Ctx& c, float (&D)[4][4]) {
  const int d = c.r / c.pieces;
#pragma unroll
  for (int x = 0; x < 4; ++x)
#pragma unroll
    for (int y = 0; y < 4; ++y) D[x][y] = 0.f;
  for (int p = 0; p < c.pieces; ++p) {
    float acc[4][4];
    sq_dist(c, p * d, (p + 1) * d, acc);
    const float cp = c.sc[p];
#pragma unroll
    for (int x = 0; x < 4; ++x)
#pragma unroll
      for (int y = 0; y < 4; ++y) D[x][y] = __fadd_rn(D[x][y], __fmul_rn(cp, __fsqrt_rn(acc[x][y])));
  }
}

__device__ __forceinline__ float sigmoid(float v) { return __fdiv_rn(1.0f, __fadd_rn(1.0f, expf(-v))); }

// ΔW of the thread's elements, rounded to the factors' dtype (as the reference's merge returns it).
// aux/aux2 keep what the backward needs: snella z = D/γ and P; sigmoid L = b·a and σ; rbf ‖b − a‖² and K.
// cst: the snella column statistics {max z, Σ exp(z − max), ...} of the thread's 4 columns.
template <int KK>
__device__ __forceinline__ void regen(const Ctx& c, const float4 (&cst)[4], float (&dw)[4][4], float (&aux)[4][4],
                                      float (&aux2)[4][4]) {
  if constexpr (KK == K_LINEAR || KK == K_SIGMOID) {
    float L[4][4];
    dot(c, L);
#pragma unroll
    for (int x = 0; x < 4; ++x)
#pragma unroll
      for (int y = 0; y < 4; ++y) {
        if constexpr (KK == K_LINEAR) {
          dw[x][y] = round_to(c.dt, L[x][y]);
        } else {
          const float s = sigmoid(__fmul_rn(c.beta(), L[x][y]));
          aux[x][y] = L[x][y];
          aux2[x][y] = s;
          dw[x][y] = round_to(c.dt, __fadd_rn(__fmul_rn(c.alpha(), s), c.gamma()));
        }
      }
  } else if constexpr (KK == K_RBF) {
    float sq[4][4];
    sq_dist(c, 0, c.r, sq);
#pragma unroll
    for (int x = 0; x < 4; ++x)
#pragma unroll
      for (int y = 0; y < 4; ++y) {
        const float k = expf(__fmul_rn(-c.beta(), sq[x][y]));
        aux[x][y] = sq[x][y];
        aux2[x][y] = k;
        dw[x][y] = round_to(c.dt, __fadd_rn(__fmul_rn(c.alpha(), k), c.gamma()));
      }
  } else {
    float D[4][4];
    piecewise(c, D);
#pragma unroll
    for (int x = 0; x < 4; ++x)
#pragma unroll
      for (int y = 0; y < 4; ++y) {
        if constexpr (KK == K_PIECEWISE) {
          dw[x][y] = round_to(c.dt, D[x][y]);
        } else {
          const float dt_ = round_to(c.dt, D[x][y]);
          const float z = __fdiv_rn(dt_, c.gamma());
          const float P = __fdiv_rn(expf(__fsub_rn(z, cst[y].x)), cst[y].y);
          aux[x][y] = z;
          aux2[x][y] = P;
          dw[x][y] = round_to(c.dt, __fadd_rn(__fadd_rn(dt_, __fmul_rn(c.alpha(), P)), c.beta()));
        }
      }
  }
}

__device__ __forceinline__ void load_colstats(const float* colstats, const SnellFactors& f, const Tile& t,
                                              float4 (&cst)[4]) {
#pragma unroll
  for (int y = 0; y < 4; ++y) {
    const int64_t j = t.col0 + t.tx * 4 + y;
    cst[y] = (colstats != nullptr && j < f.n)
                 ? reinterpret_cast<const float4*>(colstats)[static_cast<int64_t>(t.g) * f.n + j]
                 : make_float4(0.f, 1.f, 0.f, 0.f);
  }
}

// Sparsification state of one block.
struct SparseState {
  bool active;   // thresholds given and sparsity != 0
  float t_keep;  // the group's float32 threshold: kept where |ΔW| > t, compared in float32 as selected
  float t_val;   // the same rounded to the factors' dtype, as the reference's paper mode subtracts it
  SnellMode mode;
  DType dt;
};

__device__ __forceinline__ SparseState sparse_state(const SnellSparsify& sp, const SnellFactors& f, int g) {
  SparseState s;
  const double sparsity = sp.sparsity_dev != nullptr ? *sp.sparsity_dev : sp.sparsity;
  s.active = sp.thresholds != nullptr && sparsity != 0.0;
  s.t_keep = s.active ? sp.thresholds[g] : 0.f;
  s.t_val = round_to(f.dtype, s.t_keep);
  s.mode = sp.mode;
  s.dt = f.dtype;
  return s;
}

// S from ΔW (spec §3): reference ΔW·|ΔW|, paper ΔW·(|ΔW| − t), mask ΔW, all where |ΔW| > t, else 0.
__device__ __forceinline__ float sparsify_value(const SparseState& s, float dw) {
  if (!s.active) return dw;
  const float mag = fabsf(dw);
  if (!(mag > s.t_keep)) return 0.f;  // a dropped NaN becomes 0
  switch (s.mode) {
    case SnellMode::paper:
      return round_to(s.dt, __fmul_rn(dw, round_to(s.dt, __fsub_rn(mag, s.t_val))));
    case SnellMode::mask:
      return dw;
    default:
      return round_to(s.dt, __fmul_rn(dw, mag));
  }
}

// ∂L/∂ΔW from ∂L/∂S (threshold constant): reference G·|ΔW|, paper G·(2|ΔW| − t), mask G, where kept.
__device__ __forceinline__ float sparsify_grad(const SparseState& s, float g, float dw) {
  if (!s.active) return g;
  const float mag = fabsf(dw);
  if (!(mag > s.t_keep)) return 0.f;
  switch (s.mode) {
    case SnellMode::paper:
      return round_to(s.dt, __fmul_rn(g, round_to(s.dt, __fsub_rn(round_to(s.dt, __fmul_rn(2.0f, mag)), s.t_val))));
    case SnellMode::mask:
      return g;
    default:
      return round_to(s.dt, __fmul_rn(g, mag));
  }
}

// ---- snella column statistics over each group's rows

struct MaxSum {
  float m;
  float s;
};

__device__ __forceinline__ MaxSum combine(MaxSum a, MaxSum b) {
  if (b.m == -INFINITY) return a;
  if (a.m == -INFINITY) return b;
  const float m = fmaxf(a.m, b.m);
  return {m, __fadd_rn(__fmul_rn(a.s, expf(__fsub_rn(a.m, m))), __fmul_rn(b.s, expf(__fsub_rn(b.m, m))))};
}

// WITH_GRAD = false: per column partial (max z, Σ exp(z − max)) over this tile's rows.
// WITH_GRAD = true: per column partial Σ_i G_D·P (G_D = ∂L/∂ΔW) using the finished statistics.
template <bool WITH_GRAD>
__global__ void __launch_bounds__(NT)
    snell_colstats_kernel(SnellFactors f, const float* colstats, SnellSparsify sp, const void* grad, DType gdt,
                          float2* part) {
  extern __shared__ float4 smem4[];
  __shared__ float2 red[16][TJ];
  const Tile t = tile_of(f);
  const Ctx c = load_factors(f, t, reinterpret_cast<float*>(smem4));
  float col_m[4], col_s[4];
  if constexpr (!WITH_GRAD) {
    float D[4][4];
    piecewise(c, D);
#pragma unroll
    for (int y = 0; y < 4; ++y) {
      MaxSum acc = {-INFINITY, 0.f};
#pragma unroll
      for (int x = 0; x < 4; ++x) {
        if (t.ty * 4 + x >= t.rows) continue;
        const float z = __fdiv_rn(round_to(c.dt, D[x][y]), c.gamma());
        acc = combine(acc, {z, 1.0f});
      }
      col_m[y] = acc.m;
      col_s[y] = acc.s;
    }
  } else {
    float4 cst[4];
    load_colstats(colstats, f, t, cst);
    float dw[4][4], z[4][4], P[4][4];
    regen<K_SNELLA>(c, cst, dw, z, P);
    const SparseState s = sparse_state(sp, f, t.g);
    const int count = t.cols - t.tx * 4 < 4 ? t.cols - t.tx * 4 : 4;
#pragma unroll
    for (int y = 0; y < 4; ++y) col_s[y] = 0.f, col_m[y] = 0.f;
#pragma unroll
    for (int x = 0; x < 4; ++x) {
      if (t.ty * 4 + x >= t.rows || count <= 0) continue;
      float g[4];
      load4_as_float(grad, gdt, (t.row0 + t.ty * 4 + x) * f.n + t.col0 + t.tx * 4, count, g);
#pragma unroll
      for (int y = 0; y < 4; ++y) {
        const float gd = sparsify_grad(s, round_to(c.dt, g[y]), dw[x][y]);
        if (y < count) col_s[y] = __fmaf_rn(gd, P[x][y], col_s[y]);
      }
    }
  }
#pragma unroll
  for (int y = 0; y < 4; ++y) red[t.ty][t.tx * 4 + y] = make_float2(col_m[y], col_s[y]);
  __syncthreads();
  if (threadIdx.x < TJ && static_cast<int>(threadIdx.x) < t.cols) {
    const int jj = threadIdx.x;
    MaxSum acc = {-INFINITY, 0.f};
    float sum = 0.f;
    for (int ty = 0; ty < 16; ++ty) {
      const float2 v = red[ty][jj];
      if constexpr (WITH_GRAD) {
        sum = __fadd_rn(sum, v.y);
      } else {
        acc = combine(acc, {v.x, v.y});
      }
    }
    const int rtiles = gridDim.y;
    const int64_t o = (static_cast<int64_t>(t.g) * rtiles + t.rt) * f.n + t.col0 + jj;
    part[o] = WITH_GRAD ? make_float2(0.f, sum) : make_float2(acc.m, acc.s);
  }
}

template <bool WITH_GRAD>
__global__ void snell_colstats_finalize(const float2* part, int rtiles, int64_t n, int64_t groups, float* colstats) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= groups * n) return;
  const int64_t g = idx / n, j = idx % n;
  MaxSum acc = {-INFINITY, 0.f};
  float sum = 0.f;
  for (int rt = 0; rt < rtiles; ++rt) {
    const float2 v = part[(g * rtiles + rt) * n + j];
    if constexpr (WITH_GRAD) {
      sum = __fadd_rn(sum, v.y);
    } else {
      acc = combine(acc, {v.x, v.y});
    }
  }
  if constexpr (WITH_GRAD) {
    colstats[idx * 4 + 2] = sum;
  } else {
    colstats[idx * 4 + 0] = acc.m;
    colstats[idx * 4 + 1] = acc.s;
    colstats[idx * 4 + 3] = 0.f;
  }
}

// ---- launch helpers

struct Grid {
  dim3 grid;
  int64_t col_tiles, row_tiles;  // row tiles per group
};

Grid grid_of(const SnellFactors& f) {
  Grid g;
  g.col_tiles = detail::ceil_div(f.n, TJ);
  g.row_tiles = detail::ceil_div(f.m / f.groups, TI);
  g.grid = dim3(static_cast<unsigned int>(g.col_tiles), static_cast<unsigned int>(g.row_tiles),
                static_cast<unsigned int>(f.groups));
  return g;
}

// The selection kernels sweep kHistColTiles column tiles per block: fewer shared histograms to clear
// and flush per element.
constexpr int kHistColTiles = 4;

dim3 hist_grid(const SnellFactors& f) {
  const Grid g = grid_of(f);
  return dim3(static_cast<unsigned int>(detail::ceil_div(g.col_tiles, kHistColTiles)), g.grid.y, g.grid.z);
}

bool valid(const SnellFactors& f) {
  if (f.m <= 0 || f.n <= 0 || f.r <= 0 || f.r > kSnellMaxRank) return false;
  if (f.pieces <= 0 || f.r % f.pieces != 0) return false;
  if (f.groups <= 0 || f.groups > kMaxGroups || f.m % f.groups != 0) return false;
  const int64_t rtiles = detail::ceil_div(f.m / f.groups, TI);
  if (rtiles > 65535 || detail::ceil_div(f.n, TJ) > 0x7fffffff) return false;
  const int k = static_cast<int>(f.kernel);
  return k >= 0 && k <= K_SNELLA;
}

size_t factor_smem_bytes(const SnellFactors& f) { return factor_smem_floats(f.r, f.pieces) * sizeof(float); }

size_t backward_smem_bytes(const SnellFactors& f) {
  return factor_smem_bytes(f) + (static_cast<size_t>(TI) * LDT + TI + TJ) * sizeof(float);
}

// Run the statement block with `KK` bound to the factors' kernel as a compile-time constant.
#define PYSNELL_SNELL_DISPATCH(KIND, ...)  \
  switch (KIND) {                          \
    case SnellKernel::piecewise: {         \
      constexpr int KK = K_PIECEWISE;      \
      __VA_ARGS__                          \
    }                                      \
    case SnellKernel::linear: {            \
      constexpr int KK = K_LINEAR;         \
      __VA_ARGS__                          \
    }                                      \
    case SnellKernel::rbf: {               \
      constexpr int KK = K_RBF;            \
      __VA_ARGS__                          \
    }                                      \
    case SnellKernel::sigmoid: {           \
      constexpr int KK = K_SIGMOID;        \
      __VA_ARGS__                          \
    }                                      \
    case SnellKernel::snella: {            \
      constexpr int KK = K_SNELLA;         \
      __VA_ARGS__                          \
    }                                      \
    default:                               \
      return cudaErrorInvalidValue;        \
  }

size_t colstats_part_bytes(const SnellFactors& f) {
  const Grid g = grid_of(f);
  return detail::align_up(sizeof(float2) * f.groups * g.row_tiles * f.n, 256);
}

template <bool WITH_GRAD>
cudaError_t run_colstats_pass(const SnellFactors& f, float* colstats, const SnellSparsify& sp, const void* grad,
                              DType gdt, float2* part, cudaStream_t stream) {
  const Grid g = grid_of(f);
  const size_t smem = factor_smem_bytes(f);
  const int64_t outs = f.groups * f.n;
  const unsigned int fin_blocks = static_cast<unsigned int>(detail::ceil_div(outs, 256));
  PYSNELL_RETURN_IF_ERROR(detail::allow_smem(snell_colstats_kernel<WITH_GRAD>, smem));
  snell_colstats_kernel<WITH_GRAD><<<g.grid, NT, smem, stream>>>(f, colstats, sp, grad, gdt, part);
  PYSNELL_RETURN_IF_ERROR(cudaGetLastError());
  snell_colstats_finalize<WITH_GRAD><<<fin_blocks, 256, 0, stream>>>(part, static_cast<int>(g.row_tiles), f.n,
                                                                     f.groups, colstats);
  return cudaGetLastError();
}

}  // namespace
}  // namespace pysnell
