// Paged attention. K/V cache: bf16 [blocks][block_size][kv_heads][head_dim]. q: f32 rows of
// [heads][head_dim], q_stride floats apart. The work is a flat list of (query row, partition of
// PARTITION positions) items, only the partitions each row reaches, so a short row next to a
// long one costs its own partitions; each block takes one item, one KV head and one chunk of up
// to MAX_GROUP of its query heads: the K and V rows of that KV head are read from memory once for
// the chunk's heads (the MQA/GQA advantage). Partials (max, sum, unnormalised output) are
// combined in partition order by attention_combine, so results do not depend on the batch.

#define PARTITION 256
#define MAX_GROUP 32
#define VTILE 32  // V rows staged in shared memory at a time
#define MAX_HEAD_DIM 256  // head_dim / 8 lanes read a row: at most a warp

// Eight bf16 values from 16 aligned bytes, widened to f32.
__device__ __forceinline__ void load8_bf16(const bf16_t* p, float* out) {
    uint4 u = *(const uint4*)p;
    out[0] = __uint_as_float(u.x << 16);
    out[1] = __uint_as_float(u.x & 0xffff0000u);
    out[2] = __uint_as_float(u.y << 16);
    out[3] = __uint_as_float(u.y & 0xffff0000u);
    out[4] = __uint_as_float(u.z << 16);
    out[5] = __uint_as_float(u.z & 0xffff0000u);
    out[6] = __uint_as_float(u.w << 16);
    out[7] = __uint_as_float(u.w & 0xffff0000u);
}

// grid: (work items, kv_heads x chunks), a chunk being min(group, MAX_GROUP) query heads;
// block: 128 (a multiple of 32). Dynamic shared memory, as the launch contract sizes it:
// row_base[PARTITION] (long long), vtile[VTILE][head_dim] (bf16), then floats
// qs[chunk][head_dim] (the V sums once the scores are done), scores[chunk][PARTITION],
// stat_m[chunk], stat_l[chunk]; above 48 KB (a chunk of 32 heads of 128) it needs the kernel's
// opt-in attribute, which the driver layer sets when it loads the kernels.
// work: [items][2] (row, partition); row -1 is an idle item (a graph's padding).
// head_dim: a power of two from 8 to 256, so head_dim / 8 lanes read one K or V row with
// 16-byte loads (a coalesced row) and reduce with shuffles of that width.
// q row r starts at q + r * q_stride (a view of the fused QKV row).
// row_seq[r]: sequence of query row r; row_pos[r]: its position (it attends to 0..=pos; -1 is
// a padding row, which writes nothing).
// partials: [items][heads][2 + head_dim], item w's at w.
//
// Per chunk of up to MAX_GROUP query heads: (1) each K row of the partition is read once, and
// its dot products with every head of the chunk reduced across the row's lanes; (2) each
// warp takes whole heads for the softmax statistics (warp reductions, no block barrier per
// head); (3) V a tile of VTILE positions at a time: the block reads each V row once into shared
// memory (16-byte loads), then each thread owns one head and 8 dimensions and accumulates from
// the tile, positions in order.
extern "C" __global__ void attention_partition(const float* __restrict__ q, const bf16_t* __restrict__ k_cache,
                                               const bf16_t* __restrict__ v_cache, const int* __restrict__ block_tables,
                                               int max_blocks_per_seq, const int* __restrict__ row_seq,
                                               const int* __restrict__ row_pos, const int* __restrict__ work,
                                               float* __restrict__ partials, int heads, int kv_heads, int head_dim,
                                               int block_size, float scale, long long q_stride) {
    DYNAMIC_SHARED(long long, row_base);
    int group = heads / kv_heads, chunk = min(group, MAX_GROUP), chunks = (group + chunk - 1) / chunk;
    bf16_t* vtile = (bf16_t*)(row_base + PARTITION);
    float* qs = (float*)(vtile + VTILE * head_dim);
    float* scores = qs + chunk * head_dim;
    float* stat_m = scores + chunk * PARTITION;
    float* stat_l = stat_m + chunk;
    int w = blockIdx.x, row = work[2 * w], part = work[2 * w + 1];
    if (row < 0) return;
    int kvh = blockIdx.y / chunks, g0 = (blockIdx.y % chunks) * chunk;
    int ctx = row_pos[row] + 1;
    int p0 = part * PARTITION;
    if (p0 >= ctx) return;
    int n = min(ctx, p0 + PARTITION) - p0;
    const int* table = block_tables + (size_t)row_seq[row] * max_blocks_per_seq;
    long long kv_width = (long long)kv_heads * head_dim;
    // Where each position's row of this KV head starts, once per partition.
    for (int j = threadIdx.x; j < n; j += blockDim.x) {
        int pos = p0 + j;
        long long slot = (long long)table[pos / block_size] * block_size + pos % block_size;
        row_base[j] = slot * kv_width + (long long)kvh * head_dim;
    }
    int lanes = head_dim >> 3;               // lanes per row
    int sub = threadIdx.x & (lanes - 1);     // this lane's 8 values of the row
    int in_flight = blockDim.x / lanes;      // rows read at once
    int warps = blockDim.x >> 5, lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    {
        int gn = min(chunk, group - g0);
        for (int i = threadIdx.x; i < gn * head_dim; i += blockDim.x)
            qs[i] = q[row * q_stride + (size_t)(kvh * group + g0) * head_dim + i];
        __syncthreads();
        // (1) Scores: each K row once for every head of the chunk.
        for (int j0 = 0; j0 < n; j0 += in_flight) {
            int j = j0 + threadIdx.x / lanes;
            float k8[8];
            if (j < n) {
                load8_bf16(k_cache + row_base[j] + sub * 8, k8);
            } else {
                for (int e = 0; e < 8; e++) k8[e] = 0.0f;
            }
            for (int g = 0; g < gn; g++) {
                const float* qg = qs + g * head_dim + sub * 8;
                float s = 0.0f;
                for (int e = 0; e < 8; e++) s += qg[e] * k8[e];
                for (int o = lanes >> 1; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o, lanes);
                if (sub == 0 && j < n) scores[g * PARTITION + j] = s * scale;
            }
        }
        __syncthreads();
        // (2) Softmax statistics: a warp per head.
        for (int g = warp; g < gn; g += warps) {
            float m = -INFINITY;
            for (int j = lane; j < n; j += 32) m = fmaxf(m, scores[g * PARTITION + j]);
            m = warp_max(m);
            float l = 0.0f;
            for (int j = lane; j < n; j += 32) {
                float e = __expf(scores[g * PARTITION + j] - m);
                scores[g * PARTITION + j] = e;
                l += e;
            }
            l = warp_sum(l);
            if (lane == 0) {
                stat_m[g] = m;
                stat_l[g] = l;
            }
        }
        __syncthreads();
        // (3) Unnormalised weighted sum of V: each V row of a tile read once into shared memory,
        // then a thread per (head, 8 dimensions) adds the tile's positions in order; the sums
        // stay in shared memory between tiles, where the queries were.
        float* vacc = qs;
        for (int i = threadIdx.x; i < gn * head_dim; i += blockDim.x) vacc[i] = 0.0f;
        for (int t0 = 0; t0 < n; t0 += VTILE) {
            int tn = min(VTILE, n - t0);
            __syncthreads();  // the sums are zero, or the previous tile is consumed
            for (int i = threadIdx.x; i < tn * lanes; i += blockDim.x) {
                int j = i / lanes, cc = i & (lanes - 1);
                *(uint4*)(vtile + j * head_dim + cc * 8) = *(const uint4*)(v_cache + row_base[t0 + j] + cc * 8);
            }
            __syncthreads();
            for (int item = threadIdx.x; item < gn * lanes; item += blockDim.x) {
                int g = item / lanes, c = item & (lanes - 1);
                float* a = vacc + g * head_dim + c * 8;
                float acc[8];
                for (int e = 0; e < 8; e++) acc[e] = a[e];
                for (int j = 0; j < tn; j++) {
                    float p = scores[g * PARTITION + t0 + j];
                    float v8[8];
                    load8_bf16(vtile + j * head_dim + c * 8, v8);
                    for (int e = 0; e < 8; e++) acc[e] += p * v8[e];
                }
                for (int e = 0; e < 8; e++) a[e] = acc[e];
            }
        }
        __syncthreads();
        for (int item = threadIdx.x; item < gn * lanes; item += blockDim.x) {
            int g = item / lanes, c = item & (lanes - 1);
            int head = kvh * group + g0 + g;
            float* out = partials + ((size_t)w * heads + head) * (2 + head_dim);
            if (c == 0) {
                out[0] = stat_m[g];
                out[1] = stat_l[g];
            }
            for (int e = 0; e < 8; e++) out[2 + c * 8 + e] = vacc[g * head_dim + c * 8 + e];
        }
        __syncthreads();
    }
}

// out[row][head] = combination of the row's partitions, which are work items row_offset[row]
// onwards. grid: (rows, heads); block: any.
extern "C" __global__ void attention_combine(const float* __restrict__ partials, const int* __restrict__ row_pos,
                                             const int* __restrict__ row_offset, float* __restrict__ out, int heads,
                                             int head_dim) {
    int row = blockIdx.x, head = blockIdx.y;
    int parts = (row_pos[row] + PARTITION) / PARTITION;
    size_t stride = (size_t)heads * (2 + head_dim);
    const float* p = partials + ((size_t)row_offset[row] * heads + head) * (2 + head_dim);
    float m = -INFINITY;
    for (int i = 0; i < parts; i++) m = fmaxf(m, p[i * stride]);
    float l = 0.0f;
    for (int i = 0; i < parts; i++) l += __expf(p[i * stride] - m) * p[i * stride + 1];
    for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
        float acc = 0.0f;
        for (int i = 0; i < parts; i++) acc += __expf(p[i * stride] - m) / l * p[i * stride + 2 + d];
        out[((size_t)row * heads + head) * head_dim + d] = acc;
    }
}
