// Device helpers shared by the kernel files: dtype conversion, block reductions and scans, launch checks.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <mutex>

#include "pysnell_cuda.h"

// Return the first launch error of the enqueued kernels (no synchronisation).
#define PYSNELL_RETURN_IF_ERROR(expr)   \
  do {                                  \
    const cudaError_t err_ = (expr);    \
    if (err_ != cudaSuccess) return err_; \
  } while (0)

namespace pysnell {
namespace detail {

// ---- host

// Streaming multiprocessors of the current device (cached per device).
inline int device_sm_count() {
  static int cache[64] = {0};
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0) return 80;
  if (dev < 64 && cache[dev] > 0) return cache[dev];
  int sms = 0;
  if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess || sms <= 0) sms = 80;
  if (dev < 64) cache[dev] = sms;
  return sms;
}

inline size_t align_up(size_t v, size_t a) { return (v + a - 1) / a * a; }

__host__ __device__ inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Let `kernel` take `bytes` of dynamic shared memory. Set whenever dynamic memory is used: the default
// limit is 48 KB for static plus dynamic together, and several kernels also hold 16 KB of static
// histograms. Cached per kernel and device, so the driver call happens once.
template <typename Kernel>
inline cudaError_t allow_smem(Kernel kernel, size_t bytes) {
  if (bytes == 0) return cudaSuccess;
  struct Entry {
    const void* fn;
    int device;
    size_t bytes;
  };
  static std::mutex mutex;
  static Entry done[128];
  static int used = 0;
  int device = 0;
  PYSNELL_RETURN_IF_ERROR(cudaGetDevice(&device));
  const void* fn = reinterpret_cast<const void*>(kernel);
  std::lock_guard<std::mutex> guard(mutex);
  for (int i = 0; i < used; ++i)
    if (done[i].fn == fn && done[i].device == device && done[i].bytes >= bytes) return cudaSuccess;
  PYSNELL_RETURN_IF_ERROR(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
  if (used < 128) done[used++] = {fn, device, bytes};
  return cudaSuccess;
}

// ---- dtype conversion

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ __half from_float<__half>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// Runtime-dtype element access (the dtype branch is uniform across a launch).
__device__ __forceinline__ float load_as_float(const void* p, DType dt, int64_t i) {
  switch (dt) {
    case DType::f16:
      return __half2float(static_cast<const __half*>(p)[i]);
    case DType::bf16:
      return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
    default:
      return static_cast<const float*>(p)[i];
  }
}

__device__ __forceinline__ void store_from_float(void* p, DType dt, int64_t i, float v) {
  switch (dt) {
    case DType::f16:
      static_cast<__half*>(p)[i] = __float2half_rn(v);
      break;
    case DType::bf16:
      static_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16_rn(v);
      break;
    default:
      static_cast<float*>(p)[i] = v;
  }
}

// The float32 value of v after rounding to dt (what a tensor of dtype dt would hold).
__device__ __forceinline__ float round_to(DType dt, float v) {
  switch (dt) {
    case DType::f16:
      return __half2float(__float2half_rn(v));
    case DType::bf16:
      return __bfloat162float(__float2bfloat16_rn(v));
    default:
      return v;
  }
}

__device__ __forceinline__ size_t dtype_size(DType dt) { return dt == DType::f32 ? 4 : 2; }

// Four consecutive elements [i, i+4) of a row; `count` (<= 4) of them exist. One vector access when aligned.
__device__ __forceinline__ void load4_as_float(const void* p, DType dt, int64_t i, int count, float (&v)[4]) {
  const size_t es = dtype_size(dt);
  const char* addr = static_cast<const char*>(p) + i * static_cast<int64_t>(es);
  if (count == 4 && (reinterpret_cast<uintptr_t>(addr) % (4 * es)) == 0) {
    if (dt == DType::f32) {
      const float4 w = *reinterpret_cast<const float4*>(addr);
      v[0] = w.x, v[1] = w.y, v[2] = w.z, v[3] = w.w;
    } else {
      const uint2 w = *reinterpret_cast<const uint2*>(addr);
      const uint32_t words[2] = {w.x, w.y};
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        const uint16_t bits = static_cast<uint16_t>(words[u / 2] >> (16 * (u % 2)));
        v[u] = dt == DType::bf16 ? __uint_as_float(static_cast<uint32_t>(bits) << 16)
                                 : __half2float(__ushort_as_half(bits));
      }
    }
    return;
  }
#pragma unroll
  for (int u = 0; u < 4; ++u) v[u] = u < count ? load_as_float(p, dt, i + u) : 0.f;
}

__device__ __forceinline__ void store4_from_float(void* p, DType dt, int64_t i, int count, const float (&v)[4]) {
  const size_t es = dtype_size(dt);
  char* addr = static_cast<char*>(p) + i * static_cast<int64_t>(es);
  if (count == 4 && (reinterpret_cast<uintptr_t>(addr) % (4 * es)) == 0) {
    if (dt == DType::f32) {
      *reinterpret_cast<float4*>(addr) = make_float4(v[0], v[1], v[2], v[3]);
    } else {
      uint32_t words[2] = {0u, 0u};
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        const uint16_t bits = dt == DType::bf16 ? __bfloat16_as_ushort(__float2bfloat16_rn(v[u]))
                                                : __half_as_ushort(__float2half_rn(v[u]));
        words[u / 2] |= static_cast<uint32_t>(bits) << (16 * (u % 2));
      }
      *reinterpret_cast<uint2*>(addr) = make_uint2(words[0], words[1]);
    }
    return;
  }
#pragma unroll
  for (int u = 0; u < 4; ++u)
    if (u < count) store_from_float(p, dt, i + u, v[u]);
}

// ---- block-wide reductions and scans (fixed order: deterministic)

template <typename V>
__device__ __forceinline__ V warp_sum(V v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

// Sum over the block; the result is valid in every thread. `scratch`: >= 32 elements of shared memory.
template <typename V>
__device__ V block_sum(V v, V* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = (blockDim.x + 31) >> 5;
  v = warp_sum(v);
  __syncthreads();  // scratch may still be read by a previous call
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  V total = V(0);
  for (int w = 0; w < warps; ++w) total += scratch[w];
  return total;
}

// Exclusive prefix sum over the block in thread order; *total gets the block total.
// `scratch`: >= 32 elements of shared memory.
template <typename V>
__device__ V block_exclusive_scan(V v, V* scratch, V* total) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = (blockDim.x + 31) >> 5;
  V incl = v;
#pragma unroll
  for (int off = 1; off < 32; off <<= 1) {
    const V up = __shfl_up_sync(0xffffffffu, incl, off);
    if (lane >= off) incl += up;
  }
  __syncthreads();
  if (lane == 31) scratch[warp] = incl;
  __syncthreads();
  V before = V(0), all = V(0);
  for (int w = 0; w < warps; ++w) {
    if (w < warp) before += scratch[w];
    all += scratch[w];
  }
  *total = all;
  return before + incl - v;
}

}  // namespace detail
}  // namespace pysnell
