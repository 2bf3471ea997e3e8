// Paged attention. K/V cache: bf16 [blocks][block_size][kv_heads][head_dim]. q: f32 rows of
// [heads][head_dim], q_stride floats apart. Each work item is (query token or sequence, KV head, partition of
// PARTITION positions): the K and V rows of that KV head are read once for all GROUP query heads
// that share it, up to MAX_GROUP at a time (the MQA/GQA advantage). Partials (max, sum, unnormalised output) are combined
// in partition order by attention_combine, so results do not depend on the batch.

#define PARTITION 256
#define MAX_GROUP 16
#define MAX_HEAD_DIM 256

// grid: (query rows, kv_heads, max partitions); block: 128.
// q row r starts at q + r * q_stride (a view of the fused QKV row).
// row_seq[r]: sequence of query row r; row_pos[r]: its position (it attends to 0..=pos).
// partials: [rows][heads][max_partitions][2 + head_dim].
extern "C" __global__ void attention_partition(const float* __restrict__ q, const bf16_t* __restrict__ k_cache,
                                               const bf16_t* __restrict__ v_cache, const int* __restrict__ block_tables,
                                               int max_blocks_per_seq, const int* __restrict__ row_seq,
                                               const int* __restrict__ row_pos, float* __restrict__ partials,
                                               int heads, int kv_heads, int head_dim, int block_size,
                                               int max_partitions, float scale, long long q_stride) {
    __shared__ float qs[MAX_GROUP * MAX_HEAD_DIM];
    __shared__ float scores[MAX_GROUP * PARTITION];
    __shared__ float scratch[32];
    int row = blockIdx.x, kvh = blockIdx.y, part = blockIdx.z;
    int group = heads / kv_heads;
    int ctx = row_pos[row] + 1;
    int p0 = part * PARTITION;
    if (p0 >= ctx) return;
    int p1 = min(ctx, p0 + PARTITION), n = p1 - p0;
    const int* table = block_tables + (size_t)row_seq[row] * max_blocks_per_seq;
    int kv_width = kv_heads * head_dim;
    // The group's query heads in chunks of MAX_GROUP (all of them at once up to 16; MQA with
    // 32 heads per KV head reads the partition's K and V rows twice).
    for (int g0 = 0; g0 < group; g0 += MAX_GROUP) {
        int gn = min(MAX_GROUP, group - g0);
        for (int i = threadIdx.x; i < gn * head_dim; i += blockDim.x)
            qs[i] = q[row * q_stride + (size_t)(kvh * group + g0) * head_dim + i];
        __syncthreads();
        // Scores: one position per thread, every query head of the chunk.
        for (int j = threadIdx.x; j < n; j += blockDim.x) {
            int pos = p0 + j;
            size_t slot = (size_t)table[pos / block_size] * block_size + pos % block_size;
            const bf16_t* kr = k_cache + slot * kv_width + kvh * head_dim;
            for (int g = 0; g < gn; g++) {
                float s = 0.0f;
                for (int d = 0; d < head_dim; d++) s += qs[g * head_dim + d] * bf16_to_f32(kr[d]);
                scores[g * PARTITION + j] = s * scale;
            }
        }
        __syncthreads();
        for (int g = 0; g < gn; g++) {
            float m = -INFINITY;
            for (int j = threadIdx.x; j < n; j += blockDim.x) m = fmaxf(m, scores[g * PARTITION + j]);
            m = block_max(m, scratch);
            float l = 0.0f;
            for (int j = threadIdx.x; j < n; j += blockDim.x) {
                float e = __expf(scores[g * PARTITION + j] - m);
                scores[g * PARTITION + j] = e;
                l += e;
            }
            l = block_sum(l, scratch);
            int head = kvh * group + g0 + g;
            float* out = partials + (((size_t)row * heads + head) * max_partitions + part) * (2 + head_dim);
            if (threadIdx.x == 0) {
                out[0] = m;
                out[1] = l;
            }
            // Unnormalised weighted sum of V: one output dimension per thread.
            for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
                float acc = 0.0f;
                for (int j = 0; j < n; j++) {
                    int pos = p0 + j;
                    size_t slot = (size_t)table[pos / block_size] * block_size + pos % block_size;
                    acc += scores[g * PARTITION + j] * bf16_to_f32(v_cache[slot * kv_width + kvh * head_dim + d]);
                }
                out[2 + d] = acc;
            }
            __syncthreads();
        }
    }
}

// out[row][head] = combination of the partitions. grid: (rows, heads); block: any.
extern "C" __global__ void attention_combine(const float* __restrict__ partials, const int* __restrict__ row_pos,
                                             float* __restrict__ out, int heads, int head_dim, int max_partitions) {
    int row = blockIdx.x, head = blockIdx.y;
    int parts = (row_pos[row] + PARTITION) / PARTITION;
    const float* p = partials + ((size_t)row * heads + head) * max_partitions * (2 + head_dim);
    float m = -INFINITY;
    for (int i = 0; i < parts; i++) m = fmaxf(m, p[i * (2 + head_dim)]);
    float l = 0.0f;
    for (int i = 0; i < parts; i++) l += __expf(p[i * (2 + head_dim)] - m) * p[i * (2 + head_dim) + 1];
    for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
        float acc = 0.0f;
        for (int i = 0; i < parts; i++) acc += __expf(p[i * (2 + head_dim)] - m) / l * p[i * (2 + head_dim) + 2 + d];
        out[((size_t)row * heads + head) * head_dim + d] = acc;
    }
}
