// Force-included ahead of a `.cu` source (the same text NVRTC compiles) to build it as host
// C++ for the emulated device. It supplies CUDA's qualifiers, built-in variables, intrinsics,
// barriers and warp shuffles; nothing in the kernel text changes.
#pragma once
#include <cmath>
#include <cstring>
#include <cstdint>
#include "emu.h"

#define CONVOY_EMULATED 1
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
// Block-scope thread_local is static: one copy per OS thread, shared by the block's fibers.
#define __shared__ thread_local
// The launch's dynamic shared memory: one buffer per launch, ending at a guard page.
#define DYNAMIC_SHARED(type, name) type* name = reinterpret_cast<type*>(::emu::dynamic_shared)

#define threadIdx (::emu::current_fiber->thread_idx)
#define blockIdx (::emu::block_idx)
#define blockDim (::emu::block_dim)
#define gridDim (::emu::grid_dim)
#define warpSize 32

// CUDA's built-in vector types the kernels use.
struct __attribute__((aligned(16))) uint4 {
    unsigned int x, y, z, w;
};

#define __syncthreads() ::emu::sync_threads(__FILE__, __LINE__)
#define __trap() ::emu::fault(7, "__trap() called")

inline float __int_as_float(int v) { float f; std::memcpy(&f, &v, 4); return f; }
inline float __uint_as_float(unsigned int v) { float f; std::memcpy(&f, &v, 4); return f; }
inline int __float_as_int(float f) { int v; std::memcpy(&v, &f, 4); return v; }
inline unsigned int __float_as_uint(float f) { unsigned int v; std::memcpy(&v, &f, 4); return v; }
inline float __expf(float x) { return expf(x); }
inline float __logf(float x) { return logf(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned int min(unsigned int a, unsigned int b) { return a < b ? a : b; }
inline unsigned int max(unsigned int a, unsigned int b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
inline float min(float a, float b) { return fminf(a, b); }
inline float max(float a, float b) { return fmaxf(a, b); }

namespace emu {
template <typename T>
inline uint64_t to_bits(T v) {
    static_assert(sizeof(T) <= 8, "a shuffled value is at most 8 bytes");
    uint64_t b = 0;
    std::memcpy(&b, &v, sizeof(T));
    return b;
}
template <typename T>
inline T from_bits(uint64_t b) {
    T v;
    std::memcpy(&v, &b, sizeof(T));
    return v;
}
inline int lane_id() { return current_fiber->linear & 31; }
// The first lane of `lane`'s segment of `width` lanes.
inline int segment_base(int lane, int width) { return lane & ~(width - 1); }
inline void check_width(int width) {
    if (width <= 0 || width > 32 || (width & (width - 1)) != 0)
        fault(5, "shuffle width is not a power of two in 1..=32");
}
}  // namespace emu

// Tensor cores: the warp's m16n8k16 bf16 MMA, modelled by the runtime over the PTX ISA's
// fragment layouts (a warp-collective: the whole warp arrives, then D is computed once).
inline void mma_bf16_16816(const unsigned int* a, const unsigned int* b, const float* c, float* d) {
    static_assert(sizeof(unsigned int) == sizeof(uint32_t), "a register is 32 bits");
    ::emu::mma_m16n8k16_bf16(a, b, c, d);
}

// Warp shuffles. Each is an exchange among the lanes `mask` names (a barrier of that warp, not
// of the block); the lane reads the value `src` published. Segments of `width` lanes follow
// CUDA: `__shfl_sync` wraps its source lane inside the segment; `xor` may read an earlier
// segment but reads its own value for a later one; `down` and `up` read their own value past
// the segment's end or before its start.
template <typename T>
inline T __shfl_sync(unsigned int mask, T v, int src_lane, int width = 32) {
    ::emu::check_width(width);
    int lane = ::emu::lane_id();
    int src = ::emu::segment_base(lane, width) + (src_lane & (width - 1));
    return ::emu::from_bits<T>(::emu::shuffle(mask, ::emu::to_bits(v), src));
}
template <typename T>
inline T __shfl_xor_sync(unsigned int mask, T v, int lane_mask, int width = 32) {
    ::emu::check_width(width);
    int lane = ::emu::lane_id();
    int src = lane ^ lane_mask;
    if (src > 31 || ::emu::segment_base(src, width) > ::emu::segment_base(lane, width)) src = lane;
    return ::emu::from_bits<T>(::emu::shuffle(mask, ::emu::to_bits(v), src));
}
template <typename T>
inline T __shfl_down_sync(unsigned int mask, T v, unsigned int delta, int width = 32) {
    ::emu::check_width(width);
    int lane = ::emu::lane_id();
    int src = lane + (int)delta;
    if (::emu::segment_base(src, width) != ::emu::segment_base(lane, width)) src = lane;
    return ::emu::from_bits<T>(::emu::shuffle(mask, ::emu::to_bits(v), src));
}
template <typename T>
inline T __shfl_up_sync(unsigned int mask, T v, unsigned int delta, int width = 32) {
    ::emu::check_width(width);
    int lane = ::emu::lane_id();
    int src = lane - (int)delta;
    if (src < ::emu::segment_base(lane, width)) src = lane;
    return ::emu::from_bits<T>(::emu::shuffle(mask, ::emu::to_bits(v), src));
}
