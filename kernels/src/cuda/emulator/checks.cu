// Kernels that break the rules on purpose, compiled into the emulated device only (never
// shipped to a GPU), so the emulator's own checks are tested. Each is named emu_check_*.

// Threads of one block at two different barriers.
extern "C" __global__ void emu_check_divergent_barrier(int* out) {
    if (threadIdx.x < 32) {
        __syncthreads();
    } else {
        __syncthreads();
    }
    out[threadIdx.x] = 1;
}

// Half the block returns while the other half waits at a barrier.
extern "C" __global__ void emu_check_exit_at_barrier(int* out) {
    if (threadIdx.x >= 32) return;
    __syncthreads();
    out[threadIdx.x] = 1;
}

// Lane 0 waits at a block barrier while its warp's other lanes wait for it at a shuffle.
extern "C" __global__ void emu_check_deadlock(int* out) {
    if (threadIdx.x == 0) {
        __syncthreads();
    } else {
        out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, (int)threadIdx.x, 1);
        __syncthreads();
    }
}

// A fixed-size shared array indexed past its end.
extern "C" __global__ void emu_check_shared_overflow(int index, float* out) {
    __shared__ float s[64];
    s[threadIdx.x] = (float)threadIdx.x;
    __syncthreads();
    if (threadIdx.x == 0) out[0] = s[index];
}

extern "C" __global__ void emu_check_trap() { __trap(); }

// The legal patterns: shuffles inside one warp's branch (a barrier of that warp only),
// every shuffle flavour, and a block reduction through shared memory. out[t] gets, for
// thread t: xor partner, down-by-1 (own value at the segment's end), up-by-1, broadcast of
// lane 3, and the block's sum of thread indices.
extern "C" __global__ void emu_check_shuffles(int* out) {
    __shared__ int warp_sums[32];
    int t = threadIdx.x, lane = t & 31, warp = t >> 5;
    int v = t;
    int x = __shfl_xor_sync(0xffffffffu, v, 5);
    int d = __shfl_down_sync(0xffffffffu, v, 1, 16);
    int u = __shfl_up_sync(0xffffffffu, v, 1);
    int b = __shfl_sync(0xffffffffu, v, 3);
    int s = v;
    for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
    if (lane == 0) warp_sums[warp] = s;
    __syncthreads();
    if (warp == 0) {
        int w = lane < (int)(blockDim.x >> 5) ? warp_sums[lane] : 0;
        for (int o = 16; o > 0; o >>= 1) w += __shfl_xor_sync(0xffffffffu, w, o);
        if (lane == 0) warp_sums[0] = w;
    }
    __syncthreads();
    out[t * 5 + 0] = x;
    out[t * 5 + 1] = d;
    out[t * 5 + 2] = u;
    out[t * 5 + 3] = b;
    out[t * 5 + 4] = warp_sums[0];
}

// Legal and CUDA-specific: the two halves of each warp exchange under disjoint masks; then a
// full-mask xor across 16-lane segments, where the upper half reads the earlier segment and
// the lower half, whose source is a later segment, reads its own value.
extern "C" __global__ void emu_check_disjoint_masks(int* out) {
    int t = threadIdx.x, lane = t & 31;
    unsigned int mask = lane < 16 ? 0x0000ffffu : 0xffff0000u;
    out[2 * t] = __shfl_xor_sync(mask, t, 1, 16);
    out[2 * t + 1] = __shfl_xor_sync(0xffffffffu, t, 16, 16);
}

// The tensor-core MMA with its fragments loaded element by element as the PTX ISA's tables for
// mma.m16n8k16 (.bf16) state: a (16 x 16, row-major) and b (16 x 8, stored [k][n]) in bf16, d
// (16 x 8, [row][col]) in f32. A test compares d with the product computed on the host; a
// launch of fewer than 32 threads leaves the warp incomplete.
extern "C" __global__ void emu_check_mma_layout(const bf16_t* a, const bf16_t* b, float* d) {
    int lane = threadIdx.x & 31, group = lane >> 2, tig = lane % 4;
    unsigned int ra[4] = {0u, 0u, 0u, 0u}, rb[2] = {0u, 0u};
    for (int i = 0; i < 8; i++) {
        int row = (i < 2 || (i >= 4 && i < 6)) ? group : group + 8;
        int col = tig * 2 + (i & 1) + (i >= 4 ? 8 : 0);
        ra[i / 2] |= (unsigned int)a[row * 16 + col] << (16 * (i & 1));
    }
    for (int i = 0; i < 4; i++) {
        int row = tig * 2 + (i & 1) + (i >= 2 ? 8 : 0);
        rb[i / 2] |= (unsigned int)b[row * 8 + group] << (16 * (i & 1));
    }
    float c[4] = {0.5f, 0.5f, 0.5f, 0.5f}, out[4];
    mma_bf16_16816(ra, rb, c, out);
    for (int i = 0; i < 4; i++) {
        int row = i < 2 ? group : group + 8;
        d[row * 8 + tig * 2 + (i & 1)] = out[i];
    }
}

// Half a warp at an MMA while the other half waits at a shuffle (`mma_first`: lanes 0-15 at the
// MMA, else at the shuffle).
extern "C" __global__ void emu_check_mma_divergent(int* out, int mma_first) {
    unsigned int a[4] = {0u, 0u, 0u, 0u}, b[2] = {0u, 0u};
    float c[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    if ((threadIdx.x < 16) == (mma_first != 0)) {
        mma_bf16_16816(a, b, c, c);
    } else {
        out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, (int)threadIdx.x, 1);
    }
}
