// The emulated device's thread model, shared by the runtime (runtime.cpp) and the shim that
// turns a `.cu` source into host C++ (shim.h).
//
// A launch runs its blocks one after another on the calling OS thread. Each CUDA thread of a
// block is a fiber with its own stack; fibers run until they reach a barrier
// (`__syncthreads`), a warp exchange (`__shfl_*_sync`, `mma.sync`) or their end, and the scheduler releases
// a barrier when every live thread of the block waits at the same call site, and an exchange
// when every lane its mask names waits at an exchange. `__shared__` arrays are `thread_local`:
// one block runs at a time per OS thread, so all fibers of a block see the same copy.
#pragma once
#include <cstddef>
#include <cstdint>

struct emu_dim3 {
    unsigned int x, y, z;
};

namespace emu {

// One CUDA thread.
struct Fiber {
    void* sp;                 // saved stack pointer while suspended
    emu_dim3 thread_idx;
    int linear;               // x + y * bdx + z * bdx * bdy
    int state;                // FiberState
    const char* site_file;    // barrier call site while waiting at one
    int site_line;
    // A pending warp exchange.
    unsigned int shfl_mask;
    int shfl_src;             // lane whose value this lane receives
    uint64_t shfl_value;      // this lane's published value
    uint64_t shfl_result;
    // A warp-collective operation in place of a value exchange (nullptr: a shuffle): run once
    // when every lane has arrived, over each lane's published `shfl_value`.
    void (*collective)(Fiber* lanes, int count);
    unsigned char* stack;     // base of the usable stack (above the guard page)
};

enum FiberState { kRunnable = 0, kAtBarrier = 1, kAtShuffle = 2, kDone = 3 };

extern thread_local Fiber* current_fiber;
extern thread_local emu_dim3 block_idx, block_dim, grid_dim;
extern thread_local void* dynamic_shared;

// Suspend the calling thread at a block barrier until the whole block arrives.
void sync_threads(const char* file, int line);
// Publish `value`, wait for the lanes `mask` names, and return the value of lane `src`.
uint64_t shuffle(unsigned int mask, uint64_t value, int src);
// The warp-level matrix multiply-accumulate `mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32`
// (a tensor-core instruction): every lane of the full warp passes its fragments, laid out as
// the PTX ISA states (A: 4 registers of 2 bf16, B: 2 registers of 2 bf16, C and D: 4 f32), and
// waits for the whole warp; D = A x B + C is computed once the last lane arrives. `d` may be `c`.
void mma_m16n8k16_bf16(const uint32_t* a, const uint32_t* b, const float* c, float* d);
// Abort the launch with a fault of `kind` and `message`; never returns.
[[noreturn]] void fault(int kind, const char* message);

}  // namespace emu
