// Sampling on the device, so only token ids cross to the host.

__device__ __forceinline__ void argmax_merge(float& bv, int& bi, float ov, int oi) {
    if (ov > bv || (ov == bv && oi < bi)) { bv = ov; bi = oi; }
}

// Reduce each thread's (value, index) candidate over the block; thread 0 writes the index of
// the largest value (lowest index on ties) to `out`.
__device__ void block_argmax_store(float bv, int bi, int* out) {
    __shared__ float best_v[32];
    __shared__ int best_i[32];
    for (int o = 16; o > 0; o >>= 1) argmax_merge(bv, bi, __shfl_xor_sync(0xffffffffu, bv, o), __shfl_xor_sync(0xffffffffu, bi, o));
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) { best_v[warp] = bv; best_i[warp] = bi; }
    __syncthreads();
    if (warp == 0) {
        int warps = (blockDim.x + 31) >> 5;
        bv = lane < warps ? best_v[lane] : -INFINITY;
        bi = lane < warps ? best_i[lane] : 0x7fffffff;
        for (int o = 16; o > 0; o >>= 1) argmax_merge(bv, bi, __shfl_xor_sync(0xffffffffu, bv, o), __shfl_xor_sync(0xffffffffu, bi, o));
        if (lane == 0) *out = bi;
    }
}

// out[r] = argmax(logits[r]), lowest index on ties. grid: rows; block: 1024.
extern "C" __global__ void argmax_rows(const float* __restrict__ logits, int vocab, int* __restrict__ out) {
    const float* l = logits + (size_t)blockIdx.x * vocab;
    float bv = -INFINITY;
    int bi = 0x7fffffff;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
        float v = l[i];
        if (v != v) v = -INFINITY;  // NaN never wins; an all-NaN row gives token 0, as on the CPU
        argmax_merge(bv, bi, v, i);
    }
    block_argmax_store(bv, bi, out + blockIdx.x);
}

__device__ __forceinline__ unsigned long long mix64(unsigned long long x) {
    x ^= x >> 33; x *= 0xff51afd7ed558ccdULL; x ^= x >> 33; x *= 0xc4ceb9fe1a85ec53ULL; x ^= x >> 33;
    return x;
}

// Gumbel noise for vocabulary entry i under `key`: u uniform in (0, 1) from 53 random bits
// (never 0 or 1, so the noise is always finite), -log(-log(u)) in double.
__device__ __forceinline__ float gumbel_noise(unsigned long long key, int i) {
    double u = ((double)(mix64(key ^ ((unsigned long long)i << 20)) >> 11) + 0.5) * (1.0 / 9007199254740992.0);
    return (float)(-log(-log(u)));
}

// Temperature sampling by the Gumbel-max trick with a counter-based random stream:
// token = argmax(logits / T + Gumbel(seed, step, i)). Same seed and step, same token.
// Rows with temperature <= 0 are greedy. grid: rows; block: 1024.
extern "C" __global__ void gumbel_sample_rows(const float* __restrict__ logits, int vocab,
                                              const float* __restrict__ temperature,
                                              const unsigned long long* __restrict__ seeds,
                                              const unsigned long long* __restrict__ steps, int* __restrict__ out) {
    const float* l = logits + (size_t)blockIdx.x * vocab;
    float t = temperature[blockIdx.x];
    unsigned long long key = seeds[blockIdx.x] * 0x9e3779b97f4a7c15ULL + steps[blockIdx.x];
    float bv = -INFINITY;
    int bi = 0x7fffffff;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
        float v = l[i];
        if (v != v) v = -INFINITY;  // NaN never wins
        if (t > 0.0f) v = v / t + gumbel_noise(key, i);
        argmax_merge(bv, bi, v, i);
    }
    block_argmax_store(bv, bi, out + blockIdx.x);
}
