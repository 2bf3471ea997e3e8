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

// Sum over the block, every thread getting the same result (warp trees, then the warps' sums
// in order: the same bits on every device). `scratch` holds 32 values.
template <typename T>
__device__ T block_total(T v, T* scratch) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = (blockDim.x + 31) >> 5;
    __syncthreads();  // every thread has read the previous call's sums
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    T total = 0;
    for (int w = 0; w < warps; w++) total += scratch[w];
    return total;
}

// Candidates for top-k and top-p are ordered by larger logit first (NaN as -inf, -0 as +0),
// then lower index. order_key is monotone in the logit, so that order is key descending, then
// index ascending: a prefix of it is a Cut.
__device__ __forceinline__ unsigned int order_key(float v) {
    if (v != v) v = -INFINITY;
    unsigned int b = __float_as_uint(v == 0.0f ? 0.0f : v);
    return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

// A prefix of the candidate order: entry i is in it when its key is above `key`, or equal to it
// with i <= `index`.
struct Cut {
    unsigned int key;
    int index;
};

__device__ __forceinline__ bool in_cut(unsigned int key, int i, Cut c) {
    return key > c.key || (key == c.key && i <= c.index);
}

// Entries of `within` whose key is at least k.
__device__ int count_from(const float* l, int vocab, unsigned int k, Cut within, int* scratch) {
    int n = 0;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
        unsigned int key = order_key(l[i]);
        n += in_cut(key, i, within) && key >= k;
    }
    return block_total(n, scratch);
}

// The index of the r-th (from 1) lowest-index entry of `within` whose key is k.
__device__ int nth_with_key(const float* l, int vocab, unsigned int k, int r, Cut within, int* scratch) {
    int lo = 0, hi = vocab - 1;
    while (lo < hi) {
        int mid = lo + (hi - lo) / 2;
        int n = 0;
        for (int i = threadIdx.x; i <= mid; i += blockDim.x) {
            unsigned int key = order_key(l[i]);
            n += key == k && in_cut(key, i, within);
        }
        if (block_total(n, scratch) >= r) hi = mid; else lo = mid + 1;
    }
    return lo;
}

// The first k candidates (0 < k < vocab).
__device__ Cut top_k_cut(const float* l, int vocab, int k, int* scratch) {
    const Cut all = {0u, 0x7fffffff};
    // The largest key with at least k entries at or above it: the k-th candidate's.
    unsigned long long lo = 0, hi = 0xffffffffull;
    while (lo < hi) {
        unsigned long long mid = (lo + hi + 1) >> 1;
        if (count_from(l, vocab, (unsigned int)mid, all, scratch) >= k) lo = mid; else hi = mid - 1;
    }
    unsigned int key = (unsigned int)lo;
    int above = key == 0xffffffffu ? 0 : count_from(l, vocab, key + 1, all, scratch);
    Cut c = {key, nth_with_key(l, vocab, key, k - above, all, scratch)};
    return c;
}

// Probability mass (unnormalised: exp((logit - max) / T) in double, NaN as 0) of the entries of
// `within` whose key is at least k.
__device__ double mass_from(const float* l, int vocab, unsigned int k, Cut within, double max_logit,
                            double inv_t, double* scratch) {
    double m = 0.0;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
        float v = l[i];
        unsigned int key = order_key(v);
        if (v == v && key >= k && in_cut(key, i, within)) m += exp(((double)v - max_logit) * inv_t);
    }
    return block_total(m, scratch);
}

// The shortest prefix of `within` whose probability is at least p of its whole (at least one
// candidate).
__device__ Cut top_p_cut(const float* l, int vocab, float t, float p, Cut within, int* iscratch,
                         double* dscratch, float* fscratch) {
    float mx = -INFINITY;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
        float v = l[i];
        if (v == v) mx = fmaxf(mx, v);
    }
    mx = block_max(mx, fscratch);
    if (mx == -INFINITY) return within;  // every logit -inf or NaN: nothing to weigh
    double inv_t = 1.0 / (double)t, m = (double)mx;
    double target = (double)p * mass_from(l, vocab, 0u, within, m, inv_t, dscratch);
    // The largest key whose entries at or above it hold the target: the last kept candidate's.
    unsigned long long lo = 0, hi = order_key(mx);
    while (lo < hi) {
        unsigned long long mid = (lo + hi + 1) >> 1;
        if (mass_from(l, vocab, (unsigned int)mid, within, m, inv_t, dscratch) >= target) lo = mid; else hi = mid - 1;
    }
    unsigned int key = (unsigned int)lo;
    double above = mass_from(l, vocab, key + 1, within, m, inv_t, dscratch);
    int ties = count_from(l, vocab, key, within, iscratch) - count_from(l, vocab, key + 1, within, iscratch);
    // Every tie has the same probability; take the fewest, lowest indices first, that reach it.
    double q = mass_from(l, vocab, key, within, m, inv_t, dscratch) - above;
    q = ties > 0 ? q / ties : 0.0;
    int r = 1;
    if (q > 0.0) {
        double need = ceil((target - above) / q);
        r = need < 1.0 ? 1 : (need > (double)ties ? ties : (int)need);
    }
    Cut c = {key, nth_with_key(l, vocab, key, r, within, iscratch)};
    return c;
}

// Temperature sampling by the Gumbel-max trick with a counter-based random stream:
// token = argmax(logits / T + Gumbel(seed, step, i)) over the row's candidates: the first top_k
// (0: all), then the shortest prefix of those holding top_p of their probability (1: all), in
// the order of order_key. Same seed and step, same token. Rows with temperature <= 0 are greedy.
// grid: rows; block: 1024.
extern "C" __global__ void gumbel_sample_rows(const float* __restrict__ logits, int vocab,
                                              const float* __restrict__ temperature,
                                              const int* __restrict__ top_k, const float* __restrict__ top_p,
                                              const unsigned long long* __restrict__ seeds,
                                              const unsigned long long* __restrict__ steps, int* __restrict__ out) {
    __shared__ int iscratch[32];
    __shared__ double dscratch[32];
    __shared__ float fscratch[32];
    const float* l = logits + (size_t)blockIdx.x * vocab;
    float t = temperature[blockIdx.x];
    unsigned long long key = seeds[blockIdx.x] * 0x9e3779b97f4a7c15ULL + steps[blockIdx.x];
    Cut keep = {0u, 0x7fffffff};
    if (t > 0.0f) {
        int k = top_k[blockIdx.x];
        if (k > 0 && k < vocab) keep = top_k_cut(l, vocab, k, iscratch);
        float p = top_p[blockIdx.x];
        if (p < 1.0f) keep = top_p_cut(l, vocab, t, p, keep, iscratch, dscratch, fscratch);
    }
    float bv = -INFINITY;
    int bi = 0x7fffffff;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
        float v = l[i];
        if (!in_cut(order_key(v), i, keep)) continue;
        if (v != v) v = -INFINITY;  // NaN never wins
        if (t > 0.0f) v = v / t + gumbel_noise(key, i);
        argmax_merge(bv, bi, v, i);
    }
    block_argmax_store(bv, bi, out + blockIdx.x);
}
