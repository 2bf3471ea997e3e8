// Per-token layers of the decoder. Activations are f32, weights and the KV cache bf16.

// out[t, :] = table[ids[t], :]. grid: tokens; block: any.
extern "C" __global__ void embedding_bf16(const bf16_t* __restrict__ table, const int* __restrict__ ids,
                                          float* __restrict__ out, int hidden) {
    const bf16_t* row = table + (size_t)ids[blockIdx.x] * hidden;
    float* o = out + (size_t)blockIdx.x * hidden;
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) o[i] = bf16_to_f32(row[i]);
}

// residual[t] += delta[t] (when delta is not null), then out[t] = rmsnorm(residual[t]) * w.
// grid: tokens; block: 256.
extern "C" __global__ void fused_add_rmsnorm(float* __restrict__ residual, const float* __restrict__ delta,
                                             const bf16_t* __restrict__ weight, float* __restrict__ out,
                                             int hidden, float eps) {
    __shared__ float scratch[32];
    float* r = residual + (size_t)blockIdx.x * hidden;
    const float* d = delta ? delta + (size_t)blockIdx.x * hidden : 0;
    float ss = 0.0f;
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
        float v = r[i] + (d ? d[i] : 0.0f);
        r[i] = v;
        ss += v * v;
    }
    float inv = rsqrtf(block_sum(ss, scratch) / hidden + eps);
    float* o = out + (size_t)blockIdx.x * hidden;
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) o[i] = bf16_to_f32(weight[i]) * (r[i] * inv);
}

// Half-split RoPE in place on q [tokens][heads][dim] and k [tokens][kv_heads][dim], whose rows
// start q_stride and k_stride floats apart (so q and k may be views of one fused QKV row).
// cos_sin: [positions][dim] floats, each row cos(pos * inv_freq[i]) for i < dim/2 then
// sin(pos * inv_freq[i]), computed on the host with the CPU backend's arithmetic (Llama-3
// scaling applied).
// Position -1 marks a padding row, left as it is. grid: tokens; block: any.
extern "C" __global__ void rope_half_split(float* __restrict__ q, float* __restrict__ k, const int* __restrict__ positions,
                                           const float* __restrict__ cos_sin, int heads, int kv_heads, int dim,
                                           long long q_stride, long long k_stride) {
    int t = blockIdx.x, half = dim / 2;
    if (positions[t] < 0) return;  // a padding row
    const float* cs = cos_sin + (size_t)positions[t] * dim;
    int pairs = (heads + kv_heads) * half;
    for (int p = threadIdx.x; p < pairs; p += blockDim.x) {
        int head = p / half, i = p % half;
        float* x = head < heads ? q + t * q_stride + (size_t)head * dim : k + t * k_stride + (size_t)(head - heads) * dim;
        float c = cs[i], s = cs[half + i];
        float x1 = x[i], x2 = x[i + half];
        x[i] = x1 * c - x2 * s;
        x[i + half] = x2 * c + x1 * s;
    }
}

// Write each token's K and V rows to its cache slot; slot -1 (padding) writes nothing.
// k and v rows start k_stride and v_stride floats apart (views of a fused QKV row).
// Cache layout: [blocks][block_size][kv_heads][head_dim], so a slot is kv_width values.
// grid: tokens; block: any.
extern "C" __global__ void reshape_and_cache(const float* __restrict__ k, const float* __restrict__ v,
                                             bf16_t* __restrict__ k_cache, bf16_t* __restrict__ v_cache,
                                             const int* __restrict__ slot_mapping, int kv_width,
                                             long long k_stride, long long v_stride) {
    long long slot = slot_mapping[blockIdx.x];
    if (slot < 0) return;
    for (int i = threadIdx.x; i < kv_width; i += blockDim.x) {
        k_cache[slot * kv_width + i] = f32_to_bf16(k[blockIdx.x * k_stride + i]);
        v_cache[slot * kv_width + i] = f32_to_bf16(v[blockIdx.x * v_stride + i]);
    }
}

// out[t, i] = silu(gate_up[t, i]) * gate_up[t, inter + i]. grid: tokens; block: any.
extern "C" __global__ void silu_mul(const float* __restrict__ gate_up, float* __restrict__ out, int inter) {
    const float* g = gate_up + (size_t)blockIdx.x * 2 * inter;
    for (int i = threadIdx.x; i < inter; i += blockDim.x) {
        float x = g[i];
        out[(size_t)blockIdx.x * inter + i] = x / (1.0f + __expf(-x)) * g[inter + i];
    }
}

// Copy the first `slots` slots of a block between tiers (swap in/out, partial prefix copy).
// grid: layers; block: any. Both caches have the same layout; block_elems = block_size*kv_width.
extern "C" __global__ void copy_blocks(const bf16_t* __restrict__ src, bf16_t* __restrict__ dst, long long layer_stride_src,
                                       long long layer_stride_dst, long long src_block, long long dst_block,
                                       int block_elems, int slot_elems, int slots) {
    const bf16_t* s = src + blockIdx.x * layer_stride_src + src_block * block_elems;
    bf16_t* d = dst + blockIdx.x * layer_stride_dst + dst_block * block_elems;
    for (int i = threadIdx.x; i < slots * slot_elems; i += blockDim.x) d[i] = s[i];
}

// y[i] = bf16(x[i]) for i < n: activations for a bf16 GEMM. grid: any; block: any.
extern "C" __global__ void cast_bf16(const float* __restrict__ x, bf16_t* __restrict__ y, long long n) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
        y[i] = f32_to_bf16(x[i]);
}

// dst[r] = src[rows[r]] (rows of `width` floats): the rows whose logits are wanted.
// grid: rows; block: any.
extern "C" __global__ void gather_rows(const float* __restrict__ src, const int* __restrict__ rows,
                                       float* __restrict__ dst, int width) {
    const float* s = src + (size_t)rows[blockIdx.x] * width;
    float* d = dst + (size_t)blockIdx.x * width;
    for (int i = threadIdx.x; i < width; i += blockDim.x) d[i] = s[i];
}

// x[t] += delta[t] (rows of `width` floats). grid: tokens; block: any.
extern "C" __global__ void add_rows(float* __restrict__ x, const float* __restrict__ delta, int width) {
    float* r = x + (size_t)blockIdx.x * width;
    const float* d = delta + (size_t)blockIdx.x * width;
    for (int i = threadIdx.x; i < width; i += blockDim.x) r[i] += d[i];
}

// x[t] += bias (a row of `width` floats, Qwen2's QKV bias). grid: tokens; block: any.
extern "C" __global__ void add_bias_rows(float* __restrict__ x, const float* __restrict__ bias, int width) {
    float* r = x + (size_t)blockIdx.x * width;
    for (int i = threadIdx.x; i < width; i += blockDim.x) r[i] += bias[i];
}

// Copy the first `slots` slots of blocks between two caches of the same layout, for a list of
// copies and every layer in one launch: list[3c] source block, list[3c + 1] destination block,
// list[3c + 2] slots. 16 bytes per load and store (slot_elems and block_elems are multiples of
// 8, the bases 16-byte aligned: the launch contract checks). No destination of the list is
// another copy's source or destination (the caller splits the list where one would be).
// grid: (copies, layers); block: any.
extern "C" __global__ void copy_block_list(const bf16_t* __restrict__ src, bf16_t* __restrict__ dst,
                                           const int* __restrict__ list, long long layer_stride_src,
                                           long long layer_stride_dst, int block_elems, int slot_elems) {
    int c = blockIdx.x;
    long long layer = blockIdx.y;
    long long sb = list[3 * c], db = list[3 * c + 1];
    int chunks = list[3 * c + 2] * slot_elems / 8;
    const uint4* s = (const uint4*)(src + layer * layer_stride_src + sb * block_elems);
    uint4* d = (uint4*)(dst + layer * layer_stride_dst + db * block_elems);
    for (int i = threadIdx.x; i < chunks; i += blockDim.x) d[i] = s[i];
}
