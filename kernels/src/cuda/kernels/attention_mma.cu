// Paged attention on tensor cores (flash-attention style) for every row of a pass on devices
// that have them (sm_80 and later), prefill chunks and decode rows alike, writing the same
// partials as attention.cu's kernel (the fallback) so attention_combine finishes both.
//
// A work tile is up to 64 / chunk consecutive query rows of one sequence (a prefill chunk's, or
// one decode row) and one partition of PARTITION positions; a block takes one KV head and one
// chunk of up to MAX_GROUP of its query heads, so its 64 matrix rows are (row, head) pairs,
// row-major, and every head of the chunk reads each K and V row of the partition once (the
// MQA/GQA advantage). Per KV tile of KTILE positions: S = Q K^T and O += P V on tensor cores
// (mma.sync m16n8k16, bf16 in, f32 accumulate), with the online softmax's running max, sum
// and rescaling per matrix row. A warp whose 16 rows are all unused skips the MMAs.
//
// Numerics: Q and P enter the tensor cores as bf16 pairs (hi + lo: 16 bits of mantissa), K and
// V as stored (bf16, exact), so scores and sums carry ~2^-17 relative error, as close to the f32
// reference as the CUDA-core kernel. Partitions and KV tiles sit at absolute positions, and each
// element of S and O depends on its own row only (the quad reductions stay inside a row), so a
// row's result is the same whatever else its tile, batch or chunking holds: a position's KV is
// computed the same way by a decode step and by a recomputation of the prompt.

#define PARTITION 256      // launch.rs: ATTENTION_PARTITION (attention.cu's partitions)
#define MAX_GROUP 32       // launch.rs: ATTENTION_MAX_GROUP
#define TILE_ROWS 64       // matrix rows of a block: 4 warps of 16
#define KTILE 32           // KV positions per step
#define MAX_MMA_HEAD_DIM 128  // launch.rs: ATTENTION_MMA_MAX_HEAD_DIM

// Two f32 values as a register of two bf16 (the first in the low half), and what rounding left.
__device__ __forceinline__ unsigned int pack_bf16x2(float x, float y, unsigned int* rest) {
    bf16_t hx = f32_to_bf16(x), hy = f32_to_bf16(y);
    bf16_t lx = f32_to_bf16(x - bf16_to_f32(hx)), ly = f32_to_bf16(y - bf16_to_f32(hy));
    *rest = (unsigned int)lx | ((unsigned int)ly << 16);
    return (unsigned int)hx | ((unsigned int)hy << 16);
}

__device__ __forceinline__ unsigned int load_bf16x2(const bf16_t* p) { return *(const unsigned int*)p; }

// grid: (tiles, kv_heads x chunks); block: 128 threads (4 warps). Dynamic shared memory, as the
// launch contract sizes it: kv_base[KTILE] (long long), then bf16 q_hi[TILE_ROWS][ld],
// q_lo[TILE_ROWS][ld], k_tile[KTILE][ld], v_tile[KTILE][ld], ld = head_dim + 8.
// tiles: [tiles][3] (first row, rows, partition); the rows are consecutive rows of one
// sequence in position order, at most TILE_ROWS / chunk of them.
// head_dim: a multiple of 16 from 16 to MAX_MMA_HEAD_DIM.
// q row r starts at q + r * q_stride (a view of the fused QKV row).
// row_offset[r]: the first partials slot of row r; its partition p is slot row_offset[r] + p.
// partials: [slots][heads][2 + head_dim]: max, sum, unnormalised output, as attention.cu.
extern "C" __global__ void attention_mma(const float* __restrict__ q, const bf16_t* __restrict__ k_cache,
                                                 const bf16_t* __restrict__ v_cache,
                                                 const int* __restrict__ block_tables, int max_blocks_per_seq,
                                                 const int* __restrict__ row_seq, const int* __restrict__ row_pos,
                                                 const int* __restrict__ row_offset, const int* __restrict__ tiles,
                                                 float* __restrict__ partials, int heads, int kv_heads, int head_dim,
                                                 int block_size, float scale, long long q_stride) {
    DYNAMIC_SHARED(long long, kv_base);
    int ld = head_dim + 8;  // 16 bytes of padding per row: fragment loads spread over the banks
    bf16_t* q_hi = (bf16_t*)(kv_base + KTILE);
    bf16_t* q_lo = q_hi + TILE_ROWS * ld;
    bf16_t* k_tile = q_lo + TILE_ROWS * ld;
    bf16_t* v_tile = k_tile + KTILE * ld;
    int group = heads / kv_heads, chunk = min(group, MAX_GROUP), chunks = (group + chunk - 1) / chunk;
    int r0 = tiles[3 * blockIdx.x], nr = tiles[3 * blockIdx.x + 1], part = tiles[3 * blockIdx.x + 2];
    if (r0 < 0) return;  // an idle tile (a graph's padding): the whole block leaves
    int kvh = blockIdx.y / chunks, g0 = (blockIdx.y % chunks) * chunk;
    int gn = min(chunk, group - g0);
    int used = nr * gn;  // matrix rows m = token * gn + head
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, gid = lane >> 2, tig = lane & 3;
    // A warp whose 16 matrix rows are all unused (a decode row of a small group) only helps
    // stage the tiles: the condition is the same for the whole warp.
    bool computes = warp * 16 < used;
    const int* table = block_tables + (size_t)row_seq[r0] * max_blocks_per_seq;
    long long kv_width = (long long)kv_heads * head_dim;

    // Q as bf16 hi + lo, zero in unused matrix rows.
    for (int i = threadIdx.x; i < TILE_ROWS * head_dim; i += blockDim.x) {
        int m = i / head_dim, d = i - m * head_dim;
        float v = 0.0f;
        if (m < used) {
            int tok = m / gn, g = m - tok * gn;
            v = q[(long long)(r0 + tok) * q_stride + (long long)(kvh * group + g0 + g) * head_dim + d];
        }
        bf16_t hi = f32_to_bf16(v);
        q_hi[m * ld + d] = hi;
        q_lo[m * ld + d] = f32_to_bf16(v - bf16_to_f32(hi));
    }
    // This lane's two matrix rows (fragment rows gid and gid + 8 of its warp's 16) and the last
    // position each attends to (-1: an unused row, which attends to nothing).
    int mrow[2] = {warp * 16 + gid, warp * 16 + gid + 8};
    int limit[2];
#pragma unroll
    for (int r = 0; r < 2; r++) limit[r] = mrow[r] < used ? row_pos[r0 + mrow[r] / gn] : -1;
    float run_max[2] = {-INFINITY, -INFINITY}, run_sum[2] = {0.0f, 0.0f};
    // The output accumulators, 8 dimensions per n-block. Loops over them run to the constant
    // bound, unrolled, and skip blocks past head_dim: the array stays in registers.
    float o[MAX_MMA_HEAD_DIM / 8][4];
    int dim_blocks = head_dim >> 3;
#pragma unroll
    for (int j = 0; j < MAX_MMA_HEAD_DIM / 8; j++)
        for (int e = 0; e < 4; e++) o[j][e] = 0.0f;

    int p0 = part * PARTITION;
    int p_end = min(row_pos[r0 + nr - 1] + 1, p0 + PARTITION);  // the tile's last row reaches furthest
    int lanes_per_row = head_dim >> 3;
    for (int k0 = p0; k0 < p_end; k0 += KTILE) {
        int kn = min(KTILE, p_end - k0);
        __syncthreads();  // Q is staged, or the previous tile is consumed
        for (int j = threadIdx.x; j < KTILE; j += blockDim.x) {
            int pos = k0 + j;
            kv_base[j] = j < kn ? ((long long)table[pos / block_size] * block_size + pos % block_size) * kv_width +
                                      (long long)kvh * head_dim
                                : -1;
        }
        __syncthreads();
        // K and V rows of the tile, 16 bytes at a time; zero past the end.
        for (int i = threadIdx.x; i < KTILE * lanes_per_row; i += blockDim.x) {
            int j = i / lanes_per_row, c = i - j * lanes_per_row;
            uint4 kz = {0u, 0u, 0u, 0u}, vz = {0u, 0u, 0u, 0u};
            if (j < kn) {
                kz = *(const uint4*)(k_cache + kv_base[j] + c * 8);
                vz = *(const uint4*)(v_cache + kv_base[j] + c * 8);
            }
            *(uint4*)(k_tile + j * ld + c * 8) = kz;
            *(uint4*)(v_tile + j * ld + c * 8) = vz;
        }
        __syncthreads();
        if (!computes) continue;
        // S = Q K^T: 16 rows x KTILE columns per warp, in n-blocks of 8 positions.
        float s[KTILE / 8][4];
#pragma unroll
        for (int nb = 0; nb < KTILE / 8; nb++)
            for (int e = 0; e < 4; e++) s[nb][e] = 0.0f;
        for (int kk = 0; kk < head_dim; kk += 16) {
            const bf16_t* qa = q_hi + mrow[0] * ld + kk + 2 * tig;
            const bf16_t* qb = q_hi + mrow[1] * ld + kk + 2 * tig;
            unsigned int a_hi[4] = {load_bf16x2(qa), load_bf16x2(qb), load_bf16x2(qa + 8), load_bf16x2(qb + 8)};
            qa += TILE_ROWS * ld;
            qb += TILE_ROWS * ld;
            unsigned int a_lo[4] = {load_bf16x2(qa), load_bf16x2(qb), load_bf16x2(qa + 8), load_bf16x2(qb + 8)};
#pragma unroll
            for (int nb = 0; nb < KTILE / 8; nb++) {
                const bf16_t* kr = k_tile + (nb * 8 + gid) * ld + kk + 2 * tig;
                unsigned int b[2] = {load_bf16x2(kr), load_bf16x2(kr + 8)};
                mma_bf16_16816(a_hi, b, s[nb], s[nb]);
                mma_bf16_16816(a_lo, b, s[nb], s[nb]);
            }
        }
        // Scale and mask (causal, and the tile's end); the tile's max per row, over the quad of
        // lanes that holds the row.
        float tile_max[2] = {-INFINITY, -INFINITY};
#pragma unroll
        for (int nb = 0; nb < KTILE / 8; nb++) {
            for (int e = 0; e < 4; e++) {
                int r = e >> 1, pos = k0 + nb * 8 + 2 * tig + (e & 1);
                float v = (pos <= limit[r] && pos < k0 + kn) ? s[nb][e] * scale : -INFINITY;
                s[nb][e] = v;
                tile_max[r] = fmaxf(tile_max[r], v);
            }
        }
        float ref[2];
#pragma unroll
        for (int r = 0; r < 2; r++) {
            tile_max[r] = fmaxf(tile_max[r], __shfl_xor_sync(0xffffffffu, tile_max[r], 1));
            tile_max[r] = fmaxf(tile_max[r], __shfl_xor_sync(0xffffffffu, tile_max[r], 2));
            float m_new = fmaxf(run_max[r], tile_max[r]);
            // A row with nothing to attend to so far keeps zero sums (exp(-inf) = 0, no NaN).
            ref[r] = m_new == -INFINITY ? 0.0f : m_new;
            float alpha = __expf(run_max[r] - ref[r]);
            run_max[r] = m_new;
            run_sum[r] *= alpha;
#pragma unroll
            for (int j = 0; j < MAX_MMA_HEAD_DIM / 8; j++) {
                if (j < dim_blocks) {
                    o[j][2 * r] *= alpha;
                    o[j][2 * r + 1] *= alpha;
                }
            }
        }
        float tile_sum[2] = {0.0f, 0.0f};
#pragma unroll
        for (int nb = 0; nb < KTILE / 8; nb++) {
            for (int e = 0; e < 4; e++) {
                float p = __expf(s[nb][e] - ref[e >> 1]);
                s[nb][e] = p;
                tile_sum[e >> 1] += p;
            }
        }
        for (int r = 0; r < 2; r++) {
            tile_sum[r] += __shfl_xor_sync(0xffffffffu, tile_sum[r], 1);
            tile_sum[r] += __shfl_xor_sync(0xffffffffu, tile_sum[r], 2);
            run_sum[r] += tile_sum[r];
        }
        // O += P V, 16 positions per step: P's accumulator layout is the A fragment's (two
        // n-blocks of 8 positions side by side), V's rows the B fragment's k.
#pragma unroll
        for (int ks = 0; ks < KTILE / 16; ks++) {
            unsigned int p_hi[4], p_lo[4];
            p_hi[0] = pack_bf16x2(s[2 * ks][0], s[2 * ks][1], &p_lo[0]);
            p_hi[1] = pack_bf16x2(s[2 * ks][2], s[2 * ks][3], &p_lo[1]);
            p_hi[2] = pack_bf16x2(s[2 * ks + 1][0], s[2 * ks + 1][1], &p_lo[2]);
            p_hi[3] = pack_bf16x2(s[2 * ks + 1][2], s[2 * ks + 1][3], &p_lo[3]);
            const bf16_t* vr = v_tile + (ks * 16 + 2 * tig) * ld + gid;
#pragma unroll
            for (int j = 0; j < MAX_MMA_HEAD_DIM / 8; j++) {
                if (j >= dim_blocks) continue;
                const bf16_t* v = vr + j * 8;
                unsigned int b[2] = {(unsigned int)v[0] | ((unsigned int)v[ld] << 16),
                                     (unsigned int)v[8 * ld] | ((unsigned int)v[9 * ld] << 16)};
                mma_bf16_16816(p_hi, b, o[j], o[j]);
                mma_bf16_16816(p_lo, b, o[j], o[j]);
            }
        }
    }
    // Partials of the rows that reach this partition (a row earlier in the tile may not).
#pragma unroll
    for (int r = 0; r < 2; r++) {
        if (limit[r] < p0) continue;
        int tok = mrow[r] / gn, g = mrow[r] - tok * gn;
        int row = r0 + tok, head = kvh * group + g0 + g;
        float* out = partials + ((size_t)(row_offset[row] + part) * heads + head) * (2 + head_dim);
        if (tig == 0) {
            out[0] = run_max[r];
            out[1] = run_sum[r];
        }
#pragma unroll
        for (int j = 0; j < MAX_MMA_HEAD_DIM / 8; j++) {
            if (j < dim_blocks) {
                out[2 + j * 8 + 2 * tig] = o[j][2 * r];
                out[2 + j * 8 + 2 * tig + 1] = o[j][2 * r + 1];
            }
        }
    }
}
