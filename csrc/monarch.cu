// Monarch multiply (fly layout) forward and backward as strided batched GEMMs.
//
// Both permutations of the Monarch product are index arithmetic, so every stage is a batched GEMM whose
// operands are strided views of x, w1, w2, dy and one (T, k·q) intermediate: no permutation copies, no
// padded copies (missing input features read as zero through a validity rule, cut output features are
// never written). bf16 / fp16 run on tensor cores (wmma 16×16×16, float32 accumulation); fp32 runs on
// FFMA so that it matches the float32 reference (TF32 would not). Reductions over tokens (the weight
// gradients) split K into fixed chunks whose float32 partials are summed in order: deterministic.
#include <cuda_runtime.h>
#include <mma.h>

#include <cstdint>
#include <initializer_list>

#include "common.cuh"
#include "pysnell_cuda.h"

namespace pysnell {
namespace {

using detail::from_float;
using detail::to_float;

constexpr int BM = 64, BN = 64;
constexpr int kTcThreads = 128, kTcBK = 32;    // tensor cores: 4 warps of 32×32
constexpr int kFmaThreads = 256, kFmaBK = 16;  // fp32: 16×16 threads of 4×4
constexpr int64_t kNoLimit = INT64_MAX;

// A strided 2-D view per batch: element (z, i0, i1) lives at ptr[z·sz + i0·s0 + i1·s1] and exists when
// i0, i1 are inside the matrix and z·vz + i0·v0 + i1·v1 < limit (the feature index, for padding).
struct View {
  const void* ptr;
  int64_t sz, s0, s1;
  int64_t vz, v0, v1, limit;
};

struct Gemm {
  int64_t batch, M, N, K;
  View A;        // (M, K)
  View B;        // (K, N)
  View C;        // (M, N), written (C.ptr is the output)
  const void* bias;  // nullable: indexed by C's feature index z·vz + i0·v0 + i1·v1
};

__device__ __forceinline__ int64_t feature(const View& v, int64_t z, int64_t i0, int64_t i1) {
  return z * v.vz + i0 * v.v0 + i1 * v.v1;
}

// Stage a (R0 × R1) tile of a view into registers, ELEMS per thread, walking the dimension with the
// smaller stride fastest so that neighbouring threads touch neighbouring addresses. Thread t's u-th
// element sits a fixed step after its first one, so the addressing is one add per element.
template <typename T, int R0, int R1, int THREADS>
struct TileLoader {
  static_assert(THREADS % R0 == 0 && THREADS % R1 == 0, "tile extents must divide the thread count");
  static constexpr int ELEMS = R0 * R1 / THREADS;
  T reg[ELEMS];

  // First element (a0, b0) of this thread and the step (da, db) between its elements.
  __device__ __forceinline__ static void walk(bool fast1, int* a0, int* b0, int* da, int* db) {
    const int t = threadIdx.x;
    if (fast1) {
      *a0 = t / R1, *b0 = t % R1, *da = THREADS / R1, *db = 0;
    } else {
      *a0 = t % R0, *b0 = t / R0, *da = 0, *db = THREADS / R0;
    }
  }

  __device__ __forceinline__ void load(const View& v, int64_t z, int64_t o0, int64_t o1, int64_t d0, int64_t d1) {
    int a0, b0, da, db;
    walk(v.s1 <= v.s0, &a0, &b0, &da, &db);
    const int64_t c0 = o0 + a0, c1 = o1 + b0;
    // 64-bit math once per tile; 32-bit steps per element (the host keeps strides below 2^23).
    const T* p = static_cast<const T*>(v.ptr) + (z * v.sz + c0 * v.s0 + c1 * v.s1);
    const int step = static_cast<int>(da * v.s0 + db * v.s1);
    const int fstep = static_cast<int>(da * v.v0 + db * v.v1);
    const int64_t left_f = v.limit - feature(v, z, c0, c1);
    const int64_t left0 = d0 - c0, left1 = d1 - c1;
    const int n0 = static_cast<int>(left0 < 0 ? 0 : (left0 > ELEMS * THREADS ? ELEMS * THREADS : left0));
    const int n1 = static_cast<int>(left1 < 0 ? 0 : (left1 > ELEMS * THREADS ? ELEMS * THREADS : left1));
    const int nf = static_cast<int>(left_f < 0 ? 0 : (left_f > (int64_t{1} << 30) ? (int64_t{1} << 30) : left_f));
#pragma unroll
    for (int u = 0; u < ELEMS; ++u) {
      const bool ok = u * da < n0 && u * db < n1 && u * fstep < nf;
      reg[u] = ok ? p[u * step] : from_float<T>(0.f);
    }
  }

  // Write to shared memory as tile[a·ld_a + b·ld_b] (converted to S).
  template <typename S>
  __device__ __forceinline__ void store(const View& v, S* tile, int ld_a, int ld_b) const {
    int a0, b0, da, db;
    walk(v.s1 <= v.s0, &a0, &b0, &da, &db);
    int idx = a0 * ld_a + b0 * ld_b;
    const int step = da * ld_a + db * ld_b;
#pragma unroll
    for (int u = 0; u < ELEMS; ++u) {
      if constexpr (sizeof(S) == sizeof(T)) {
        tile[idx] = reg[u];
      } else {
        tile[idx] = to_float(reg[u]);
      }
      idx += step;
    }
  }
};

// Write the block's float32 tile Cs [BM][BN + 4]: into the split-K partials when `partial` is set,
// else into C (bias added, converted to T).
template <typename T>
__device__ void epilogue(const Gemm& g, const float* Cs, int64_t z, int64_t split, int64_t m0, int64_t n0,
                         float* partial) {
  constexpr int LDC = BN + 4;
  if (partial != nullptr) {
    for (int e = threadIdx.x; e < BM * BN; e += blockDim.x) {
      const int ii = e / BN, jj = e % BN;
      const int64_t i = m0 + ii, j = n0 + jj;
      if (i < g.M && j < g.N) partial[((split * g.batch + z) * g.M + i) * g.N + j] = Cs[ii * LDC + jj];
    }
    return;
  }
  const bool fast1 = g.C.s1 <= g.C.s0;
  T* out = static_cast<T*>(const_cast<void*>(g.C.ptr));
  const T* bias = static_cast<const T*>(g.bias);
  for (int e = threadIdx.x; e < BM * BN; e += blockDim.x) {
    const int ii = fast1 ? e / BN : e % BM;
    const int jj = fast1 ? e % BN : e / BM;
    const int64_t i = m0 + ii, j = n0 + jj;
    if (i >= g.M || j >= g.N) continue;
    const int64_t f = feature(g.C, z, i, j);
    if (f >= g.C.limit) continue;
    float v = Cs[ii * LDC + jj];
    if (bias != nullptr) v = __fadd_rn(v, to_float(bias[f]));
    out[z * g.C.sz + i * g.C.s0 + j * g.C.s1] = from_float<T>(v);
  }
}

template <typename T>
__global__ void __launch_bounds__(kTcThreads) gemm_tc_kernel(Gemm g, int64_t k_chunk, float* partial) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  using namespace nvcuda;
  constexpr int BK = kTcBK, LDA = BK + 8, LDB = BN + 8, LDC = BN + 4;
  __shared__ __align__(32) T As[BM * LDA];  // [m][k]
  __shared__ __align__(32) T Bs[BK * LDB];  // [k][n]
  __shared__ __align__(32) float Cs[BM * LDC];
  const int64_t z = blockIdx.z % g.batch, split = blockIdx.z / g.batch;
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * BM, n0 = static_cast<int64_t>(blockIdx.x) * BN;
  const int64_t kbeg = split * k_chunk;
  const int64_t kend = kbeg + k_chunk < g.K ? kbeg + k_chunk : g.K;
  const int warp = threadIdx.x / 32, wm = warp / 2, wn = warp % 2;

  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][2];
#pragma unroll
  for (int a = 0; a < 2; ++a)
#pragma unroll
    for (int b = 0; b < 2; ++b) wmma::fill_fragment(acc[a][b], 0.f);

  TileLoader<T, BM, BK, kTcThreads> la;
  TileLoader<T, BK, BN, kTcThreads> lb;
  if (kbeg < kend) {
    la.load(g.A, z, m0, kbeg, g.M, kend);
    lb.load(g.B, z, kbeg, n0, kend, g.N);
  }
  for (int64_t k0 = kbeg; k0 < kend; k0 += BK) {
    la.store(g.A, As, LDA, 1);
    lb.store(g.B, Bs, LDB, 1);
    __syncthreads();
    if (k0 + BK < kend) {  // the next tile's loads overlap this tile's math
      la.load(g.A, z, m0, k0 + BK, g.M, kend);
      lb.load(g.B, z, k0 + BK, n0, kend, g.N);
    }
#pragma unroll
    for (int kk = 0; kk < BK; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa[2];
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> fb[2];
#pragma unroll
      for (int a = 0; a < 2; ++a) wmma::load_matrix_sync(fa[a], As + (wm * 32 + a * 16) * LDA + kk, LDA);
#pragma unroll
      for (int b = 0; b < 2; ++b) wmma::load_matrix_sync(fb[b], Bs + kk * LDB + wn * 32 + b * 16, LDB);
#pragma unroll
      for (int a = 0; a < 2; ++a)
#pragma unroll
        for (int b = 0; b < 2; ++b) wmma::mma_sync(acc[a][b], fa[a], fb[b], acc[a][b]);
    }
    __syncthreads();
  }
#pragma unroll
  for (int a = 0; a < 2; ++a)
#pragma unroll
    for (int b = 0; b < 2; ++b)
      wmma::store_matrix_sync(Cs + (wm * 32 + a * 16) * LDC + wn * 32 + b * 16, acc[a][b], LDC, wmma::mem_row_major);
  __syncthreads();
  epilogue<T>(g, Cs, z, split, m0, n0, partial);
#else
  __trap();  // tensor-core path needs sm_80 or newer
#endif
}

__global__ void __launch_bounds__(kFmaThreads) gemm_fma_kernel(Gemm g, int64_t k_chunk, float* partial) {
  constexpr int BK = kFmaBK, LDS = BM + 4, LDC = BN + 4;
  __shared__ __align__(16) float As[BK * LDS];  // [k][m]
  __shared__ __align__(16) float Bs[BK * LDS];  // [k][n]
  __shared__ __align__(16) float Cs[BM * LDC];
  const int64_t z = blockIdx.z % g.batch, split = blockIdx.z / g.batch;
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * BM, n0 = static_cast<int64_t>(blockIdx.x) * BN;
  const int64_t kbeg = split * k_chunk;
  const int64_t kend = kbeg + k_chunk < g.K ? kbeg + k_chunk : g.K;
  const int ty = threadIdx.x / 16, tx = threadIdx.x % 16;
  float acc[4][4];
#pragma unroll
  for (int a = 0; a < 4; ++a)
#pragma unroll
    for (int b = 0; b < 4; ++b) acc[a][b] = 0.f;
  TileLoader<float, BM, BK, kFmaThreads> la;
  TileLoader<float, BK, BN, kFmaThreads> lb;
  if (kbeg < kend) {
    la.load(g.A, z, m0, kbeg, g.M, kend);
    lb.load(g.B, z, kbeg, n0, kend, g.N);
  }
  for (int64_t k0 = kbeg; k0 < kend; k0 += BK) {
    la.store(g.A, As, 1, LDS);  // As[k][m]
    lb.store(g.B, Bs, LDS, 1);  // Bs[k][n]
    __syncthreads();
    if (k0 + BK < kend) {
      la.load(g.A, z, m0, k0 + BK, g.M, kend);
      lb.load(g.B, z, k0 + BK, n0, kend, g.N);
    }
#pragma unroll
    for (int kk = 0; kk < BK; ++kk) {
      const float4 a4 = *reinterpret_cast<const float4*>(As + kk * LDS + ty * 4);
      const float4 b4 = *reinterpret_cast<const float4*>(Bs + kk * LDS + tx * 4);
      const float a[4] = {a4.x, a4.y, a4.z, a4.w};
      const float b[4] = {b4.x, b4.y, b4.z, b4.w};
#pragma unroll
      for (int x = 0; x < 4; ++x)
#pragma unroll
        for (int y = 0; y < 4; ++y) acc[x][y] = __fmaf_rn(a[x], b[y], acc[x][y]);
    }
    __syncthreads();
  }
#pragma unroll
  for (int x = 0; x < 4; ++x)
    *reinterpret_cast<float4*>(Cs + (ty * 4 + x) * LDC + tx * 4) = make_float4(acc[x][0], acc[x][1], acc[x][2], acc[x][3]);
  __syncthreads();
  epilogue<float>(g, Cs, z, split, m0, n0, partial);
}

// Sum the split-K partials in split order and write C.
template <typename T>
__global__ void splitk_reduce_kernel(Gemm g, int64_t splits, const float* partial) {
  const int64_t total = g.batch * g.M * g.N;
  const bool fast1 = g.C.s1 <= g.C.s0;
  T* out = static_cast<T*>(const_cast<void*>(g.C.ptr));
  const T* bias = static_cast<const T*>(g.bias);
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t z = e / (g.M * g.N), rest = e % (g.M * g.N);
    const int64_t i = fast1 ? rest / g.N : rest % g.M;
    const int64_t j = fast1 ? rest % g.N : rest / g.M;
    const int64_t f = feature(g.C, z, i, j);
    if (f >= g.C.limit) continue;
    float v = 0.f;
    for (int64_t s = 0; s < splits; ++s) v = __fadd_rn(v, partial[((s * g.batch + z) * g.M + i) * g.N + j]);
    if (bias != nullptr) v = __fadd_rn(v, to_float(bias[f]));
    out[z * g.C.sz + i * g.C.s0 + j * g.C.s1] = from_float<T>(v);
  }
}

// How many K chunks: enough blocks to fill the GPU when the output is small and K long (weight grads).
struct Split {
  int64_t splits, chunk;
};

template <typename T>
Split split_of(const Gemm& g) {
  const int64_t bk = sizeof(T) == 4 ? kFmaBK : kTcBK;
  const int64_t tiles = g.batch * detail::ceil_div(g.M, BM) * detail::ceil_div(g.N, BN);
  if (tiles == 0 || g.K == 0) return Split{1, bk};  // no tokens: nothing to split (and no division by 0)
  const int64_t want = 2 * static_cast<int64_t>(detail::device_sm_count());
  int64_t splits = 1;
  if (tiles < want && g.K >= 4 * 256) {
    splits = detail::ceil_div(want, tiles);
    const int64_t max_splits = g.K / 256;  // at least 256 of K per split
    if (splits > max_splits) splits = max_splits;
    if (splits > 64) splits = 64;
    if (splits < 1) splits = 1;
  }
  Split s;
  s.chunk = detail::ceil_div(detail::ceil_div(g.K, splits), bk) * bk;
  s.splits = detail::ceil_div(g.K, s.chunk);
  return s;
}

template <typename T>
size_t partial_bytes(const Gemm& g) {
  const Split s = split_of<T>(g);
  return s.splits > 1 ? detail::align_up(sizeof(float) * s.splits * g.batch * g.M * g.N, 256) : 0;
}

template <typename T>
cudaError_t run_gemm(const Gemm& g, float* partial, cudaStream_t stream) {
  if (g.batch <= 0 || g.M <= 0 || g.N <= 0) return cudaSuccess;
  const Split s = split_of<T>(g);
  const int64_t gy = detail::ceil_div(g.M, BM);
  const int64_t gz = g.batch * s.splits;
  if (gy > 65535 || gz > 65535) return cudaErrorInvalidValue;
  const dim3 grid(static_cast<unsigned int>(detail::ceil_div(g.N, BN)), static_cast<unsigned int>(gy),
                  static_cast<unsigned int>(gz));
  float* part = s.splits > 1 ? partial : nullptr;
  if (s.splits > 1 && partial == nullptr) return cudaErrorInvalidValue;
  if constexpr (sizeof(T) == 4) {
    gemm_fma_kernel<<<grid, kFmaThreads, 0, stream>>>(g, s.chunk, part);
  } else {
    gemm_tc_kernel<T><<<grid, kTcThreads, 0, stream>>>(g, s.chunk, part);
  }
  PYSNELL_RETURN_IF_ERROR(cudaGetLastError());
  if (s.splits > 1) {
    const int64_t want = detail::ceil_div(g.batch * g.M * g.N, 256);
    splitk_reduce_kernel<T><<<static_cast<unsigned int>(want < 65535 ? want : 65535), 256, 0, stream>>>(g, s.splits,
                                                                                                     part);
    PYSNELL_RETURN_IF_ERROR(cudaGetLastError());
  }
  return cudaSuccess;
}

View view(const void* p, int64_t sz, int64_t s0, int64_t s1) { return View{p, sz, s0, s1, 0, 0, 0, kNoLimit}; }

View view(const void* p, int64_t sz, int64_t s0, int64_t s1, int64_t vz, int64_t v0, int64_t v1, int64_t limit) {
  return View{p, sz, s0, s1, vz, v0, v1, limit};
}

// The stages, in the notation of spec/MONARCH.md: out1[b, ki·q + qj] (= "mid", (T, k·q)), stage 2 reads
// mid[b, ri·l + li]; y[b, si·l + li].
Gemm stage1(const MonarchShape& sh, const void* x, const void* w1, void* mid) {
  const int64_t kq = sh.k * sh.q;
  Gemm g;
  g.batch = sh.k, g.M = sh.tokens, g.N = sh.q, g.K = sh.p;
  g.A = view(x, sh.p, sh.n_in, 1, sh.p, 0, 1, sh.n_in);  // x[b, ki·p + pp]
  g.B = view(w1, sh.q * sh.p, 1, sh.p);                   // w1[ki, qj, pp] as (pp, qj)
  g.C = view(mid, sh.q, kq, 1);                            // mid[b, ki·q + qj]
  g.bias = nullptr;
  return g;
}

Gemm stage2(const MonarchShape& sh, const void* mid, const void* w2, const void* bias, void* y) {
  const int64_t kq = sh.k * sh.q;
  Gemm g;
  g.batch = sh.l, g.M = sh.tokens, g.N = sh.s, g.K = sh.r;
  g.A = view(mid, 1, kq, sh.l);                                              // mid[b, ri·l + li]
  g.B = view(w2, sh.s * sh.r, 1, sh.r);                                      // w2[li, si, ri] as (ri, si)
  g.C = view(y, 1, sh.out_features, sh.l, 1, 0, sh.l, sh.out_features);     // y[b, si·l + li]
  g.bias = bias;
  return g;
}

template <typename T>
size_t forward_partials(const MonarchShape& sh) {
  size_t b = partial_bytes<T>(stage1(sh, nullptr, nullptr, nullptr));
  const size_t b2 = partial_bytes<T>(stage2(sh, nullptr, nullptr, nullptr, nullptr));
  return b > b2 ? b : b2;
}

struct BackwardGemms {
  Gemm dmid, dw2, dw1, dx, mid;
};

BackwardGemms backward_gemms(const MonarchShape& sh, const void* dy, const void* x, const void* w1, const void* w2,
                             void* dx, void* dw1, void* dw2, void* mid, void* dmid) {
  const int64_t kq = sh.k * sh.q, out = sh.out_features;
  BackwardGemms b;
  b.mid = stage1(sh, x, w1, mid);
  // dmid[b, ri·l + li] = Σ_si dy[b, si·l + li]·w2[li, si, ri]
  b.dmid.batch = sh.l, b.dmid.M = sh.tokens, b.dmid.N = sh.r, b.dmid.K = sh.s;
  b.dmid.A = view(dy, 1, out, sh.l, 1, 0, sh.l, out);
  b.dmid.B = view(w2, sh.s * sh.r, sh.r, 1);
  b.dmid.C = view(dmid, 1, kq, sh.l);
  b.dmid.bias = nullptr;
  // dw2[li, si, ri] = Σ_b dy[b, si·l + li]·mid[b, ri·l + li]
  b.dw2.batch = sh.l, b.dw2.M = sh.s, b.dw2.N = sh.r, b.dw2.K = sh.tokens;
  b.dw2.A = view(dy, 1, sh.l, out, 1, sh.l, 0, out);
  b.dw2.B = view(mid, 1, kq, sh.l);
  b.dw2.C = view(dw2, sh.s * sh.r, sh.r, 1);
  b.dw2.bias = nullptr;
  // dw1[ki, qj, pp] = Σ_b dmid[b, ki·q + qj]·x[b, ki·p + pp]
  b.dw1.batch = sh.k, b.dw1.M = sh.q, b.dw1.N = sh.p, b.dw1.K = sh.tokens;
  b.dw1.A = view(dmid, sh.q, 1, kq);
  b.dw1.B = view(x, sh.p, sh.n_in, 1, sh.p, 0, 1, sh.n_in);
  b.dw1.C = view(dw1, sh.q * sh.p, sh.p, 1);
  b.dw1.bias = nullptr;
  // dx[b, ki·p + pp] = Σ_qj dmid[b, ki·q + qj]·w1[ki, qj, pp]
  b.dx.batch = sh.k, b.dx.M = sh.tokens, b.dx.N = sh.p, b.dx.K = sh.q;
  b.dx.A = view(dmid, sh.q, kq, 1);
  b.dx.B = view(w1, sh.q * sh.p, sh.p, 1);
  b.dx.C = view(dx, sh.p, sh.n_in, 1, sh.p, 0, 1, sh.n_in);
  b.dx.bias = nullptr;
  return b;
}

template <typename T>
size_t backward_partials(const MonarchShape& sh) {
  const BackwardGemms b = backward_gemms(sh, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr,
                                         nullptr);
  size_t most = 0;
  for (const Gemm* g : {&b.mid, &b.dmid, &b.dw2, &b.dw1, &b.dx}) {
    const size_t p = partial_bytes<T>(*g);
    most = p > most ? p : most;
  }
  return most;
}

bool valid(const MonarchShape& sh) {
  if (sh.tokens < 0 || sh.n_in <= 0 || sh.out_features <= 0) return false;
  if (sh.k <= 0 || sh.q <= 0 || sh.p <= 0 || sh.l <= 0 || sh.s <= 0 || sh.r <= 0) return false;
  // Strides and feature counts stay below 2^23 so the loaders' per-element steps fit in 32 bits.
  constexpr int64_t kMaxExtent = int64_t{1} << 23;
  for (int64_t e : {sh.k * sh.q, sh.k * sh.p, sh.l * sh.s, sh.q * sh.p, sh.s * sh.r})
    if (e >= kMaxExtent) return false;
  return sh.l * sh.r == sh.k * sh.q && sh.n_in <= sh.k * sh.p && sh.out_features <= sh.l * sh.s;
}

size_t mid_bytes(const MonarchShape& sh, size_t elem) { return detail::align_up(elem * sh.tokens * sh.k * sh.q, 256); }

}  // namespace

size_t monarch_workspace_bytes(const MonarchShape& sh, size_t elem_size) {
  if (!valid(sh)) return 0;
  const size_t partials = elem_size == 4 ? forward_partials<float>(sh) : forward_partials<__half>(sh);
  return mid_bytes(sh, elem_size) + partials;
}

size_t monarch_backward_workspace_bytes(const MonarchShape& sh, size_t elem_size) {
  if (!valid(sh)) return 0;
  const size_t partials = elem_size == 4 ? backward_partials<float>(sh) : backward_partials<__half>(sh);
  return 2 * mid_bytes(sh, elem_size) + partials;
}

template <typename T>
cudaError_t monarch_forward(const MonarchShape& sh, const T* x, const T* w1, const T* w2, const T* bias, T* y,
                            void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  if (!valid(sh)) return cudaErrorInvalidValue;
  if (sh.tokens == 0) return cudaSuccess;
  if (workspace_bytes < monarch_workspace_bytes(sh, sizeof(T))) return cudaErrorInvalidValue;
  char* ws = static_cast<char*>(workspace);
  void* mid = ws;
  float* partial = reinterpret_cast<float*>(ws + mid_bytes(sh, sizeof(T)));
  PYSNELL_RETURN_IF_ERROR(run_gemm<T>(stage1(sh, x, w1, mid), partial, stream));
  return run_gemm<T>(stage2(sh, mid, w2, bias, y), partial, stream);
}

template <typename T>
cudaError_t monarch_backward(const MonarchShape& sh, const T* dy, const T* x, const T* w1, const T* w2, T* dx,
                             T* dw1, T* dw2, void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  if (!valid(sh)) return cudaErrorInvalidValue;
  if (sh.tokens == 0) {  // sums over no tokens: zero weight gradients (as the forward, before the workspace)
    if (dw1 != nullptr) PYSNELL_RETURN_IF_ERROR(cudaMemsetAsync(dw1, 0, sizeof(T) * sh.k * sh.q * sh.p, stream));
    if (dw2 != nullptr) PYSNELL_RETURN_IF_ERROR(cudaMemsetAsync(dw2, 0, sizeof(T) * sh.l * sh.s * sh.r, stream));
    return cudaSuccess;
  }
  if (workspace_bytes < monarch_backward_workspace_bytes(sh, sizeof(T))) return cudaErrorInvalidValue;
  char* ws = static_cast<char*>(workspace);
  void* mid = ws;
  void* dmid = ws + mid_bytes(sh, sizeof(T));
  float* partial = reinterpret_cast<float*>(ws + 2 * mid_bytes(sh, sizeof(T)));
  const BackwardGemms b = backward_gemms(sh, dy, x, w1, w2, dx, dw1, dw2, mid, dmid);
  if (dw2 != nullptr) {
    PYSNELL_RETURN_IF_ERROR(run_gemm<T>(b.mid, partial, stream));
    PYSNELL_RETURN_IF_ERROR(run_gemm<T>(b.dw2, partial, stream));
  }
  if (dx == nullptr && dw1 == nullptr) return cudaSuccess;
  PYSNELL_RETURN_IF_ERROR(run_gemm<T>(b.dmid, partial, stream));
  if (dw1 != nullptr) PYSNELL_RETURN_IF_ERROR(run_gemm<T>(b.dw1, partial, stream));
  if (dx != nullptr) PYSNELL_RETURN_IF_ERROR(run_gemm<T>(b.dx, partial, stream));
  return cudaSuccess;
}

#define PYSNELL_INSTANTIATE_MONARCH(T)                                                                          \
  template cudaError_t monarch_forward<T>(const MonarchShape&, const T*, const T*, const T*, const T*, T*, void*, \
                                          size_t, cudaStream_t);                                                 \
  template cudaError_t monarch_backward<T>(const MonarchShape&, const T*, const T*, const T*, const T*, T*, T*,  \
                                           T*, void*, size_t, cudaStream_t);

PYSNELL_INSTANTIATE_MONARCH(float)
PYSNELL_INSTANTIATE_MONARCH(__half)
PYSNELL_INSTANTIATE_MONARCH(__nv_bfloat16)

}  // namespace pysnell
