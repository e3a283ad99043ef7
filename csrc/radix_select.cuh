// Exact radix select on float32 magnitude keys, shared by top-k masking (keys read from memory) and
// SNELL (keys regenerated from the factors). Three passes of 11 + 10 + 10 bits. Each block counts
// its keys in a shared-memory histogram, adds the non-zero bins to the group's global histogram, and
// the last block of the group to finish (threadfence + counter) picks the digit on the device, so a
// selection never synchronises with the host.
//
// Key of a magnitude v: 0 for NaN, else float_bits(|v|) + 1. For non-negative IEEE floats the bit
// pattern is monotone, so the unsigned key order is the order of |v| with NaN below every number
// (the reference ranks NaN as -1). Keys fit in 31 bits (+inf -> 0x7F800001).
//
// Two selections run side by side (the floor and ceil ranks of torch.quantile's linear rule); they
// share one histogram until their prefixes part.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "common.cuh"
#include "pysnell_cuda.h"

namespace pysnell {
namespace radix {

constexpr int kPasses = 3;
constexpr int kMaxBins = 2048;
constexpr int kThreads = 256;

__host__ __device__ __forceinline__ int pass_shift(int pass) { return pass == 0 ? 20 : (pass == 1 ? 10 : 0); }
__host__ __device__ __forceinline__ int pass_bits(int pass) { return pass == 0 ? 11 : 10; }

__device__ __forceinline__ uint32_t key_of(float v) {
  const float a = fabsf(v);
  return (a != a) ? 0u : (__float_as_uint(a) + 1u);
}

// The reference's float32 ranking key (NaN -> -1) of a radix key.
__device__ __forceinline__ float value_of_key(uint32_t key) { return key == 0u ? -1.0f : __uint_as_float(key - 1u); }

// Selection state of one group, zero-initialised by the launcher (prefixes 0, not split).
struct GroupState {
  uint32_t prefix[2];           // key bits chosen so far (lo, hi selection)
  uint32_t split;               // 1 once the two selections sit in different buckets
  uint32_t pad;
  unsigned long long rank[2];   // rank left inside the chosen bucket
  unsigned long long tie_count; // after the last pass: keys equal to the selected key (lo)
  unsigned long long need;      // k-mode: how many of those ties to keep, in flat-index order
};

// Global scratch of one selection over `groups` groups.
struct Workspace {
  GroupState* states;        // (groups,)
  unsigned long long* hist;  // (groups, 2, kMaxBins)
  unsigned int* done;        // (groups,) blocks finished in the current pass
};

inline size_t workspace_bytes(int64_t groups) {
  size_t b = detail::align_up(sizeof(GroupState) * groups, 256);
  b += detail::align_up(sizeof(unsigned long long) * 2 * kMaxBins * groups, 256);
  b += detail::align_up(sizeof(unsigned int) * groups, 256);
  return b;
}

// Carve the workspace; everything must start zeroed (one memset by the launcher).
inline Workspace carve(void* base, int64_t groups) {
  char* p = static_cast<char*>(base);
  Workspace ws;
  ws.states = reinterpret_cast<GroupState*>(p);
  p += detail::align_up(sizeof(GroupState) * groups, 256);
  ws.hist = reinterpret_cast<unsigned long long*>(p);
  p += detail::align_up(sizeof(unsigned long long) * 2 * kMaxBins * groups, 256);
  ws.done = reinterpret_cast<unsigned int*>(p);
  return ws;
}

// Per-block view of the current pass.
struct PassView {
  int pass;
  int shift;
  int hi_shift;  // bits above the current digit must match the prefix
  uint32_t mask;
  uint32_t prefix0;
  uint32_t prefix1;
  bool split;
};

__device__ __forceinline__ PassView pass_view(const GroupState* st, int pass) {
  PassView v;
  v.pass = pass;
  v.shift = pass_shift(pass);
  v.hi_shift = v.shift + pass_bits(pass);
  v.mask = (1u << pass_bits(pass)) - 1u;
  v.prefix0 = pass == 0 ? 0u : st->prefix[0];
  v.prefix1 = pass == 0 ? 0u : st->prefix[1];
  v.split = pass == 0 ? false : (st->split != 0u);
  return v;
}

// Shared histograms: sh[0] for the lo selection (and hi while not split), sh[1] for hi once split.
__device__ __forceinline__ void clear_shared(unsigned int (*sh)[kMaxBins]) {
  for (int b = threadIdx.x; b < 2 * kMaxBins; b += blockDim.x) sh[b / kMaxBins][b % kMaxBins] = 0u;
}

__device__ __forceinline__ void count_key(unsigned int (*sh)[kMaxBins], const PassView& v, uint32_t key) {
  // hi_shift is 31 in pass 0 and keys are < 2^31, so every key matches the empty prefix there.
  const uint32_t top = key >> v.hi_shift;
  const uint32_t digit = (key >> v.shift) & v.mask;
  if (top == (v.prefix0 >> v.hi_shift)) {
    atomicAdd(&sh[0][digit], 1u);
  } else if (v.split && top == (v.prefix1 >> v.hi_shift)) {
    atomicAdd(&sh[1][digit], 1u);
  }
}

// Order-statistic ranks (lo, hi) and the interpolation weight of torch.quantile's linear rule, written
// exactly as the reference computes them: pos = s·(N−1) in float64, lo = floor, hi = ceil, w = float(pos − lo).
__device__ __forceinline__ void quantile_ranks(const RankSpec& rs, int64_t n, unsigned long long* lo,
                                               unsigned long long* hi, float* w) {
  if (rs.k >= 0) {  // k-mode: the k-th largest = rank n − k ascending
    const long long k = rs.k < 1 ? 1 : (rs.k > n ? n : rs.k);
    *lo = *hi = static_cast<unsigned long long>(n - k);
    *w = 0.f;
    return;
  }
  const double s = rs.sparsity_dev != nullptr ? *rs.sparsity_dev : rs.sparsity;
  const double last = static_cast<double>(n > 0 ? n - 1 : 0);
  double pos = __dmul_rn(s, last);
  if (!(pos >= 0.0)) pos = 0.0;  // also NaN: no out-of-range rank ever reaches the pick
  if (pos > last) pos = last;
  const double flo = floor(pos), fhi = ceil(pos);
  *lo = static_cast<unsigned long long>(flo);
  *hi = static_cast<unsigned long long>(fhi);
  *w = __double2float_rn(__dsub_rn(pos, flo));
}

// torch.lerp's formula, with no fused multiply-add, so the threshold matches the reference bit for bit.
__device__ __forceinline__ float lerp_exact(float a, float b, float w) {
  const float d = __fsub_rn(b, a);
  return w < 0.5f ? __fadd_rn(a, __fmul_rn(w, d)) : __fsub_rn(b, __fmul_rn(d, __fsub_rn(1.0f, w)));
}

// Called by every thread of the group's last block: pick this pass's digit for both selections from the
// global histogram, advance the state, clear the histogram for the next pass. After the last pass, write
// the threshold (quantile: lerp of the two order statistics; k-mode: the k-th largest key).
__device__ inline void pick(GroupState* st, unsigned long long* hist, const RankSpec& rs, int64_t group_size,
                            int pass, float* threshold_out) {
  __shared__ unsigned long long scan_scratch[32];
  __shared__ unsigned long long found_before[2], found_count[2];
  __shared__ uint32_t found_digit[2];
  const int nbins = 1 << pass_bits(pass);
  const int per = nbins / kThreads;  // 8 or 4 bins per thread (blockDim.x == kThreads)
  unsigned long long rank[2];
  float w = 0.f;
  {
    unsigned long long lo, hi;
    quantile_ranks(rs, group_size, &lo, &hi, &w);
    if (pass == 0) {
      rank[0] = lo;
      rank[1] = hi;
    } else {
      rank[0] = st->rank[0];
      rank[1] = st->rank[1];
    }
  }
  const bool split = pass == 0 ? false : (st->split != 0u);
  if (threadIdx.x < 2) {
    found_digit[threadIdx.x] = 0u;
    found_before[threadIdx.x] = 0ull;
    found_count[threadIdx.x] = 0ull;
  }
  for (int sel = 0; sel < 2; ++sel) {
    const unsigned long long* h = hist + (split ? sel : 0) * kMaxBins;
    unsigned long long counts[8];
    unsigned long long mine = 0ull;
    for (int u = 0; u < per; ++u) {
      counts[u] = __ldcg(h + threadIdx.x * per + u);  // L2: the other blocks' atomics landed there
      mine += counts[u];
    }
    unsigned long long total;
    unsigned long long cum = detail::block_exclusive_scan(mine, scan_scratch, &total);
    for (int u = 0; u < per; ++u) {
      if (counts[u] > 0ull && cum <= rank[sel] && rank[sel] < cum + counts[u]) {
        found_digit[sel] = static_cast<uint32_t>(threadIdx.x * per + u);
        found_before[sel] = cum;
        found_count[sel] = counts[u];
      }
      cum += counts[u];
    }
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    const int shift = pass_shift(pass);
    uint32_t prefix[2];
    for (int sel = 0; sel < 2; ++sel) {
      prefix[sel] = (pass == 0 ? 0u : st->prefix[sel]) | (found_digit[sel] << shift);
      st->prefix[sel] = prefix[sel];
      st->rank[sel] = rank[sel] - found_before[sel];
    }
    st->split = (split || prefix[0] != prefix[1]) ? 1u : 0u;
    if (pass == kPasses - 1) {
      st->tie_count = found_count[0];
      st->need = found_count[0] - st->rank[0];  // ties to keep in k-mode (>= 1)
      const float v_lo = value_of_key(prefix[0]);
      const float v_hi = value_of_key(prefix[1]);
      *threshold_out = rs.k >= 0 ? v_lo : lerp_exact(v_lo, v_hi, w);
    }
  }
  // Clear both histograms for the next pass (all reads above are done).
  __syncthreads();
  for (int b = threadIdx.x; b < 2 * kMaxBins; b += blockDim.x) hist[b] = 0ull;
}

// Add this block's shared histograms to the group's global one; the last block of the group picks.
// `blocks_in_group`: how many blocks count keys of this group in this pass.
__device__ inline void flush_and_pick(unsigned int (*sh)[kMaxBins], const Workspace& ws, int group,
                                      const PassView& v, unsigned int blocks_in_group, const RankSpec& rs,
                                      int64_t group_size, float* thresholds) {
  __shared__ bool is_last;
  unsigned long long* hist = ws.hist + static_cast<int64_t>(group) * 2 * kMaxBins;
  __syncthreads();  // every count_key of this block is done
  const int nbins = 1 << pass_bits(v.pass);
  const int used = v.split ? 2 : 1;
  for (int b = threadIdx.x; b < used * nbins; b += blockDim.x) {
    const unsigned int c = sh[b / nbins][b % nbins];
    if (c != 0u) atomicAdd(hist + (b / nbins) * kMaxBins + (b % nbins), static_cast<unsigned long long>(c));
  }
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) is_last = atomicAdd(ws.done + group, 1u) == blocks_in_group - 1u;
  __syncthreads();
  if (!is_last) return;
  __threadfence();
  pick(ws.states + group, hist, rs, group_size, v.pass, thresholds + group);
  if (threadIdx.x == 0) ws.done[group] = 0u;
}

}  // namespace radix
}  // namespace pysnell
