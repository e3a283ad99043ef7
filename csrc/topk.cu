// Threshold selection and in-place top-k masking of tensors in memory (bf16, fp16, fp32).
//
// Passes over x: three histogram passes (radix_select.cuh), then one masking pass. k-mode adds a tie
// count pass between them, used only when the k-th largest key has more copies than k still needs:
// the ties are then kept in increasing flat-index order through a prefix count over the blocks.
// Each block owns one contiguous chunk of its group (a whole number of 2048-element tiles), the same
// chunk in every pass, so the tie order of the count pass and the masking pass agree.
#include <cuda_runtime.h>

#include <cstdint>

#include "common.cuh"
#include "pysnell_cuda.h"
#include "radix_select.cuh"

namespace pysnell {
namespace {

using radix::kThreads;
constexpr int kVec = 8;                   // consecutive elements per thread and tile (one packed-mask byte)
constexpr int kTile = kThreads * kVec;    // elements per block and tile
constexpr int kBlocksPerSm = 4;

// Raw storage words: the masking pass never does arithmetic on x, it only writes zero bits.
template <typename T>
struct Raw;
template <>
struct Raw<float> {
  using word = uint32_t;
  static __device__ __forceinline__ float to_float(word w) { return __uint_as_float(w); }
};
template <>
struct Raw<__half> {
  using word = uint16_t;
  static __device__ __forceinline__ float to_float(word w) { return __half2float(__ushort_as_half(w)); }
};
template <>
struct Raw<__nv_bfloat16> {
  using word = uint16_t;
  static __device__ __forceinline__ float to_float(word w) { return __uint_as_float(static_cast<uint32_t>(w) << 16); }
};

// Elements [e0, e0 + 8) of a group (those at or past `end` read as 0). Returns whether one aligned
// 16-byte (or 2×16-byte) access covered all eight, in which case store8 may write them back the same way.
template <typename T>
__device__ __forceinline__ bool load8(const T* base, int64_t e0, int64_t end, typename Raw<T>::word (&w)[kVec]) {
  using W = typename Raw<T>::word;
  const W* p = reinterpret_cast<const W*>(base) + e0;
  const bool vec = (e0 + kVec <= end) && ((reinterpret_cast<uintptr_t>(p) & 15u) == 0u);
  if (vec) {
    if constexpr (sizeof(W) == 4) {
      const uint4 a = reinterpret_cast<const uint4*>(p)[0];
      const uint4 b = reinterpret_cast<const uint4*>(p)[1];
      w[0] = a.x, w[1] = a.y, w[2] = a.z, w[3] = a.w;
      w[4] = b.x, w[5] = b.y, w[6] = b.z, w[7] = b.w;
    } else {
      const uint4 a = reinterpret_cast<const uint4*>(p)[0];
      const uint32_t words[4] = {a.x, a.y, a.z, a.w};
#pragma unroll
      for (int u = 0; u < kVec; ++u) w[u] = static_cast<W>(words[u / 2] >> (16 * (u % 2)));
    }
  } else {
#pragma unroll
    for (int u = 0; u < kVec; ++u) w[u] = (e0 + u < end) ? p[u] : W(0);
  }
  return vec;
}

template <typename T>
__device__ __forceinline__ void store8(T* base, int64_t e0, int64_t end, bool vec, const typename Raw<T>::word (&w)[kVec],
                                       uint32_t dropped) {
  using W = typename Raw<T>::word;
  W* p = reinterpret_cast<W*>(base) + e0;
  if (vec) {
    if constexpr (sizeof(W) == 4) {
      reinterpret_cast<uint4*>(p)[0] = make_uint4(w[0], w[1], w[2], w[3]);
      reinterpret_cast<uint4*>(p)[1] = make_uint4(w[4], w[5], w[6], w[7]);
    } else {
      uint32_t words[4] = {0u, 0u, 0u, 0u};
#pragma unroll
      for (int u = 0; u < kVec; ++u) words[u / 2] |= static_cast<uint32_t>(w[u]) << (16 * (u % 2));
      reinterpret_cast<uint4*>(p)[0] = make_uint4(words[0], words[1], words[2], words[3]);
    }
  } else {
#pragma unroll
    for (int u = 0; u < kVec; ++u)
      if (((dropped >> u) & 1u) && e0 + u < end) p[u] = W(0);
  }
}

struct Chunks {
  int64_t chunk;  // elements per block (a multiple of kTile)
  int64_t blocks;
};

Chunks chunking(int64_t groups, int64_t group_size) {
  const int64_t target = detail::ceil_div(static_cast<int64_t>(detail::device_sm_count()) * kBlocksPerSm, groups);
  const int64_t tiles = detail::ceil_div(group_size > 0 ? group_size : 1, kTile);
  const int64_t tiles_per_block = detail::ceil_div(tiles, target > 0 ? target : 1);
  Chunks c;
  c.chunk = tiles_per_block * kTile;
  c.blocks = detail::ceil_div(group_size > 0 ? group_size : 1, c.chunk);
  return c;
}

// ---- kernels

template <typename T>
__global__ void __launch_bounds__(kThreads)
    hist_kernel(const T* __restrict__ x, int64_t group_size, int64_t chunk, RankSpec rs, radix::Workspace ws,
                float* thresholds, int pass) {
  __shared__ unsigned int sh[2][radix::kMaxBins];
  const int group = blockIdx.y;
  const radix::PassView v = radix::pass_view(ws.states + group, pass);
  radix::clear_shared(sh);
  __syncthreads();
  const T* base = x + static_cast<int64_t>(group) * group_size;
  const int64_t start = static_cast<int64_t>(blockIdx.x) * chunk;
  const int64_t end = start + chunk < group_size ? start + chunk : group_size;
  for (int64_t tile = start; tile < end; tile += kTile) {
    const int64_t e0 = tile + static_cast<int64_t>(threadIdx.x) * kVec;
    if (e0 >= end) continue;
    typename Raw<T>::word w[kVec];
    load8(base, e0, end, w);
#pragma unroll
    for (int u = 0; u < kVec; ++u)
      if (e0 + u < end) radix::count_key(sh, v, radix::key_of(Raw<T>::to_float(w[u])));
  }
  radix::flush_and_pick(sh, ws, group, v, gridDim.x, rs, group_size, thresholds);
}

// k-mode: keys equal to the selected one, per block, when only some of them are kept.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    tie_count_kernel(const T* __restrict__ x, int64_t numel, int64_t chunk, radix::Workspace ws,
                     unsigned long long* tie_counts) {
  __shared__ unsigned long long scratch[32];
  const radix::GroupState* st = ws.states;
  if (st->need >= st->tie_count) return;  // every tie is kept: no order needed
  const uint32_t tkey = st->prefix[0];
  const int64_t start = static_cast<int64_t>(blockIdx.x) * chunk;
  const int64_t end = start + chunk < numel ? start + chunk : numel;
  unsigned long long mine = 0ull;
  for (int64_t tile = start; tile < end; tile += kTile) {
    const int64_t e0 = tile + static_cast<int64_t>(threadIdx.x) * kVec;
    if (e0 >= end) continue;
    typename Raw<T>::word w[kVec];
    load8(x, e0, end, w);
#pragma unroll
    for (int u = 0; u < kVec; ++u)
      if (e0 + u < end && radix::key_of(Raw<T>::to_float(w[u])) == tkey) ++mine;
  }
  const unsigned long long total = detail::block_sum(mine, scratch);
  if (threadIdx.x == 0) tie_counts[blockIdx.x] = total;
}

template <typename T, bool KMODE>
__global__ void __launch_bounds__(kThreads)
    mask_kernel(T* __restrict__ x, int64_t numel, int64_t chunk, RankSpec rs, radix::Workspace ws,
                const float* threshold, const unsigned long long* tie_counts, uint8_t* packed) {
  __shared__ unsigned long long scratch[32];
  __shared__ unsigned int scratch32[32];
  const radix::GroupState* st = ws.states;
  const int64_t start = static_cast<int64_t>(blockIdx.x) * chunk;
  const int64_t end = start + chunk < numel ? start + chunk : numel;

  // Quantile mode: keep key > t, or everything at sparsity 0.
  float t = 0.f;
  bool keep_all = false;
  // k-mode: keep key > t_key, and the first `need` keys equal to it in flat-index order.
  uint32_t tkey = 0u;
  bool ordered = false;
  unsigned long long need = 0ull, seen = 0ull;
  if constexpr (KMODE) {
    tkey = st->prefix[0];
    need = st->need;
    ordered = need < st->tie_count;
    if (ordered) {
      unsigned long long before = 0ull;
      for (int64_t b = threadIdx.x; b < blockIdx.x; b += blockDim.x) before += tie_counts[b];
      seen = detail::block_sum(before, scratch);  // ties in the chunks before this block's
    }
  } else {
    t = *threshold;
    const double s = rs.sparsity_dev != nullptr ? *rs.sparsity_dev : rs.sparsity;
    keep_all = (s == 0.0);
  }

  for (int64_t tile = start; tile < end; tile += kTile) {  // uniform trip count: the scan below needs it
    const int64_t e0 = tile + static_cast<int64_t>(threadIdx.x) * kVec;
    typename Raw<T>::word w[kVec];
    bool vec = false;
    uint32_t kept = 0u;
#pragma unroll
    for (int u = 0; u < kVec; ++u) w[u] = 0;
    if (e0 < end) vec = load8(x, e0, end, w);
    if constexpr (KMODE) {
      unsigned int ties = 0u;
      uint32_t keys[kVec];
#pragma unroll
      for (int u = 0; u < kVec; ++u) {
        keys[u] = radix::key_of(Raw<T>::to_float(w[u]));
        if (e0 + u < end && keys[u] == tkey) ++ties;
      }
      unsigned long long rank = 0ull;
      if (ordered) {
        unsigned int tile_total;
        rank = seen + detail::block_exclusive_scan(e0 < end ? ties : 0u, scratch32, &tile_total);
        seen += tile_total;
      }
#pragma unroll
      for (int u = 0; u < kVec; ++u) {
        bool keep = keys[u] > tkey;
        if (keys[u] == tkey && e0 + u < end) {
          keep = !ordered || rank < need;
          ++rank;
        }
        kept |= static_cast<uint32_t>(keep) << u;
      }
    } else {
#pragma unroll
      for (int u = 0; u < kVec; ++u) {
        const float a = fabsf(Raw<T>::to_float(w[u]));
        const float key = (a != a) ? -1.0f : a;
        kept |= static_cast<uint32_t>(keep_all || key > t) << u;
      }
    }
    if (e0 >= end) continue;
    const uint32_t valid = e0 + kVec <= end ? 0xffu : ((1u << (end - e0)) - 1u);
    const uint32_t dropped = ~kept & valid;
    if (dropped != 0u) {
#pragma unroll
      for (int u = 0; u < kVec; ++u)
        if ((dropped >> u) & 1u) w[u] = 0;
      store8(x, e0, end, vec, w, dropped);
    }
    if (packed != nullptr) packed[e0 / kVec] = static_cast<uint8_t>(kept & valid);
  }
}

}  // namespace

size_t topk_workspace_bytes(int64_t groups, int64_t group_size) {
  const Chunks c = chunking(groups, group_size);
  return radix::workspace_bytes(groups) + detail::align_up(sizeof(unsigned long long) * c.blocks, 256);
}

template <typename T>
static cudaError_t run_histograms(const T* x, int64_t groups, int64_t group_size, const Chunks& c, RankSpec rs,
                                  const radix::Workspace& ws, float* thresholds, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned int>(c.blocks), static_cast<unsigned int>(groups));
  for (int pass = 0; pass < radix::kPasses; ++pass) {
    hist_kernel<T><<<grid, kThreads, 0, stream>>>(x, group_size, c.chunk, rs, ws, thresholds, pass);
    PYSNELL_RETURN_IF_ERROR(cudaGetLastError());
  }
  return cudaSuccess;
}

template <typename T>
cudaError_t topk_threshold(const T* x, int64_t groups, int64_t group_size, RankSpec rank, float* thresholds,
                           void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  if (groups <= 0 || group_size <= 0) return cudaSuccess;
  if (groups > kMaxGroups || rank.k >= 0) return cudaErrorInvalidValue;
  if (workspace_bytes < topk_workspace_bytes(groups, group_size)) return cudaErrorInvalidValue;
  const Chunks c = chunking(groups, group_size);
  PYSNELL_RETURN_IF_ERROR(cudaMemsetAsync(workspace, 0, radix::workspace_bytes(groups), stream));
  const radix::Workspace ws = radix::carve(workspace, groups);
  return run_histograms(x, groups, group_size, c, rank, ws, thresholds, stream);
}

template <typename T>
cudaError_t topk_mask_inplace(T* x, int64_t numel, RankSpec rank, float* threshold, uint8_t* packed,
                              void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  if (numel <= 0) return cudaSuccess;
  if (rank.k == 0 || rank.k > numel) return cudaErrorInvalidValue;
  if (workspace_bytes < topk_workspace_bytes(1, numel)) return cudaErrorInvalidValue;
  const Chunks c = chunking(1, numel);
  PYSNELL_RETURN_IF_ERROR(cudaMemsetAsync(workspace, 0, radix::workspace_bytes(1), stream));
  const radix::Workspace ws = radix::carve(workspace, 1);
  auto* tie_counts =
      reinterpret_cast<unsigned long long*>(static_cast<char*>(workspace) + radix::workspace_bytes(1));
  PYSNELL_RETURN_IF_ERROR(run_histograms<T>(x, 1, numel, c, rank, ws, threshold, stream));
  const dim3 grid(static_cast<unsigned int>(c.blocks));
  if (rank.k >= 0) {
    tie_count_kernel<T><<<grid, kThreads, 0, stream>>>(x, numel, c.chunk, ws, tie_counts);
    PYSNELL_RETURN_IF_ERROR(cudaGetLastError());
    mask_kernel<T, true><<<grid, kThreads, 0, stream>>>(x, numel, c.chunk, rank, ws, threshold, tie_counts, packed);
  } else {
    mask_kernel<T, false><<<grid, kThreads, 0, stream>>>(x, numel, c.chunk, rank, ws, threshold, tie_counts, packed);
  }
  return cudaGetLastError();
}

#define PYSNELL_INSTANTIATE_TOPK(T)                                                                           \
  template cudaError_t topk_threshold<T>(const T*, int64_t, int64_t, RankSpec, float*, void*, size_t,          \
                                         cudaStream_t);                                                        \
  template cudaError_t topk_mask_inplace<T>(T*, int64_t, RankSpec, float*, uint8_t*, void*, size_t, cudaStream_t);

PYSNELL_INSTANTIATE_TOPK(float)
PYSNELL_INSTANTIATE_TOPK(__half)
PYSNELL_INSTANTIATE_TOPK(__nv_bfloat16)

}  // namespace pysnell
