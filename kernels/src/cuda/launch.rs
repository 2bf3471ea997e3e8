//! One typed launch contract per kernel: its argument struct, the exact C type of every
//! parameter, its grid and block rule, and the checks that can be made on the host before a
//! launch (shapes, buffer sizes, block sizes that full-warp shuffles need). The emulated device
//! and a GPU are launched from the same contract, so the two cannot drift apart; the emulator
//! also checks each argument's size against the kernel's compiled signature.

use super::device::DeviceSlice;

/// Attention positions per partition (`PARTITION` in attention.cu).
pub const ATTENTION_PARTITION: usize = 256;
/// Largest head dimension the attention kernel takes (`MAX_HEAD_DIM` in attention.cu).
pub const ATTENTION_MAX_HEAD_DIM: usize = 256;
/// Query heads of one KV head that one attention block takes at most (`MAX_GROUP` in
/// attention.cu): every head of an MQA group of 32 reads each K row from one load.
pub const ATTENTION_MAX_GROUP: usize = 32;

/// Query heads per attention block for `group` query heads per KV head.
pub fn attention_chunk(group: usize) -> usize {
    group.clamp(1, ATTENTION_MAX_GROUP)
}

/// V rows an attention block stages in shared memory at a time (`VTILE` in attention.cu).
pub const ATTENTION_V_TILE: usize = 32;

/// Dynamic shared memory of an attention block taking `chunk` heads of `head_dim`: the
/// partition's row offsets, a tile of V rows (bf16), then the chunk's queries (its V sums
/// later), scores and softmax statistics.
pub fn attention_shared_bytes(chunk: usize, head_dim: usize) -> usize {
    ATTENTION_PARTITION * 8
        + ATTENTION_V_TILE * head_dim * 2
        + chunk * (head_dim + ATTENTION_PARTITION + 2) * 4
}

/// Largest head dimension the tensor-core attention kernel takes (`MAX_MMA_HEAD_DIM` in
/// attention_mma.cu: its output accumulators live in registers).
pub const ATTENTION_MMA_MAX_HEAD_DIM: usize = 128;
/// Matrix rows ((query row, head) pairs) of one tensor-core attention block (`TILE_ROWS`).
pub const ATTENTION_MMA_TILE_ROWS: usize = 64;
/// KV positions the tensor-core attention kernel stages per step (`KTILE`).
pub const ATTENTION_MMA_KV_TILE: usize = 32;

/// Whether the tensor-core attention kernel takes this head dimension: one the decode kernel
/// takes, a multiple of 16 (the MMA's k), at most [`ATTENTION_MMA_MAX_HEAD_DIM`].
pub fn attention_mma_head_dim_ok(head_dim: usize) -> bool {
    attention_head_dim_ok(head_dim)
        && head_dim.is_multiple_of(16)
        && head_dim <= ATTENTION_MMA_MAX_HEAD_DIM
}

/// Query rows of one tensor-core tile for `group` query heads per KV head: the block's matrix
/// rows over the heads of one chunk.
pub fn attention_mma_tile_tokens(group: usize) -> usize {
    ATTENTION_MMA_TILE_ROWS / attention_chunk(group)
}

/// Dynamic shared memory of a tensor-core attention block for `head_dim`: the KV tile's row
/// offsets, then bf16 rows of `head_dim + 8` (Q hi and lo for every matrix row, the K and V
/// tile).
pub fn attention_mma_shared_bytes(head_dim: usize) -> usize {
    ATTENTION_MMA_KV_TILE * 8
        + (2 * ATTENTION_MMA_TILE_ROWS + 2 * ATTENTION_MMA_KV_TILE) * (head_dim + 8) * 2
}

/// The attention work of a pass. The rows of each run (a sequence's rows of the pass) may go
/// to the tensor-core kernel as tiles; every other row gets one item of the decode kernel per
/// partition it reaches. Each row has one partials slot per partition, from its
/// `row_offset`: decode rows' slots are their items' indices (item `w` writes slot `w`), the
/// tiled rows' slots follow every item, idle ones included.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AttentionWork {
    /// `[items][2]`: (row, partition) for the decode kernel; (-1, -1) for idle items.
    pub items: Vec<i32>,
    /// Each row's first partials slot (its partitions follow it).
    pub row_offset: Vec<i32>,
    /// `[tiles][3]`: (first row, rows, partition) for the tensor-core kernel; (-1, 0, 0) for
    /// idle tiles.
    pub tiles: Vec<i32>,
    /// Partials slots in all.
    pub slots: usize,
}

impl AttentionWork {
    /// The work of rows at positions `row_pos` (-1: a padding row, no items), all on the
    /// decode kernel, padded with idle items to at least `min_items` (a graph's fixed grid).
    pub fn new(row_pos: &[i32], min_items: usize) -> AttentionWork {
        AttentionWork::tiled(row_pos, &[], 1, min_items, 0)
    }

    /// As [`AttentionWork::new`], but the rows of each run `(first row, rows)` in `runs` (rows
    /// of one sequence, in position order, not overlapping) go to the tensor-core kernel in
    /// tiles of at most `tile_tokens` rows, one tile per partition its last row reaches,
    /// padded with idle tiles to at least `min_tiles`.
    pub fn tiled(
        row_pos: &[i32],
        runs: &[(usize, usize)],
        tile_tokens: usize,
        min_items: usize,
        min_tiles: usize,
    ) -> AttentionWork {
        let parts = |row: usize| ((row_pos[row] + 1).max(0) as usize).div_ceil(ATTENTION_PARTITION);
        let mut tiled = vec![false; row_pos.len()];
        for &(first, rows) in runs {
            tiled[first..first + rows]
                .iter_mut()
                .for_each(|t| *t = true);
        }
        let mut items = Vec::new();
        let mut row_offset = vec![0i32; row_pos.len()];
        for row in (0..row_pos.len()).filter(|&r| !tiled[r]) {
            row_offset[row] = (items.len() / 2) as i32;
            for part in 0..parts(row) {
                items.extend([row as i32, part as i32]);
            }
        }
        let idle = min_items.saturating_sub(items.len() / 2);
        items.extend(std::iter::repeat_n(-1, 2 * idle));
        let mut slots = items.len() / 2;
        let mut tiles = Vec::new();
        let tile_tokens = tile_tokens.max(1);
        for &(first, rows) in runs {
            for (row, offset) in row_offset.iter_mut().enumerate().skip(first).take(rows) {
                *offset = slots as i32;
                slots += parts(row);
            }
            for start in (first..first + rows).step_by(tile_tokens) {
                let n = tile_tokens.min(first + rows - start);
                for part in 0..parts(start + n - 1) {
                    tiles.extend([start as i32, n as i32, part as i32]);
                }
            }
        }
        let idle = min_tiles.saturating_sub(tiles.len() / 3);
        tiles.extend([-1, 0, 0].repeat(idle));
        AttentionWork {
            items,
            row_offset,
            tiles,
            slots,
        }
    }

    /// Decode work items, idle ones included.
    pub fn len(&self) -> usize {
        self.items.len() / 2
    }

    /// Whether there is no decode item.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Prefill tiles.
    pub fn tile_count(&self) -> usize {
        self.tiles.len() / 3
    }
}

/// Whether the attention kernel takes this head dimension: a power of two from 8 to
/// [`ATTENTION_MAX_HEAD_DIM`] (`head_dim / 8` lanes read a row with 16-byte loads).
pub fn attention_head_dim_ok(head_dim: usize) -> bool {
    head_dim.is_power_of_two() && (8..=ATTENTION_MAX_HEAD_DIM).contains(&head_dim)
}

/// One kernel argument, as the C parameter it binds to.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum KernelArg {
    /// A device pointer (`T*`).
    Ptr(u64),
    /// `int`.
    I32(i32),
    /// `long long`.
    I64(i64),
    /// `unsigned long long`.
    U64(u64),
    /// `float`.
    F32(f32),
}

impl KernelArg {
    /// The argument's bytes, as `cuLaunchKernel` reads them through its `void*`.
    pub fn bytes(&self) -> ([u8; 8], usize) {
        let mut b = [0u8; 8];
        let n = match *self {
            KernelArg::Ptr(v) | KernelArg::U64(v) => {
                b.copy_from_slice(&v.to_ne_bytes());
                8
            }
            KernelArg::I64(v) => {
                b.copy_from_slice(&v.to_ne_bytes());
                8
            }
            KernelArg::I32(v) => {
                b[..4].copy_from_slice(&v.to_ne_bytes());
                4
            }
            KernelArg::F32(v) => {
                b[..4].copy_from_slice(&v.to_ne_bytes());
                4
            }
        };
        (b, n)
    }
}

/// Grid, block and dynamic shared memory of a launch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LaunchConfig {
    /// Blocks in x, y, z.
    pub grid: [u32; 3],
    /// Threads per block in x, y, z.
    pub block: [u32; 3],
    /// Dynamic shared memory per block, bytes.
    pub shared_bytes: u32,
}

impl LaunchConfig {
    /// A 1-D grid of `blocks` blocks of `threads` threads.
    pub fn linear(blocks: u32, threads: u32) -> LaunchConfig {
        LaunchConfig {
            grid: [blocks, 1, 1],
            block: [threads, 1, 1],
            shared_bytes: 0,
        }
    }
}

/// A kernel's launch contract.
pub trait KernelLaunch {
    /// The `extern "C"` name of the kernel.
    const NAME: &'static str;
    /// The launch configuration, or what breaks the contract.
    fn config(&self) -> Result<LaunchConfig, String>;
    /// The arguments in parameter order.
    fn args(&self) -> Vec<KernelArg>;
}

fn ptr(s: &DeviceSlice) -> KernelArg {
    KernelArg::Ptr(s.ptr)
}

/// Check that `slice` holds `count` values of `elem` bytes.
fn need(what: &str, slice: &DeviceSlice, count: Sz, elem: usize) -> Result<(), String> {
    let bytes = (count * elem).0;
    if bytes == usize::MAX {
        return Err(format!("{what}: size overflows"));
    }
    if slice.is_null() || slice.bytes < bytes {
        return Err(format!(
            "{what} holds {} bytes, the launch reads or writes {bytes}",
            slice.bytes
        ));
    }
    Ok(())
}

/// A size computed from a contract's fields, saturating instead of wrapping: a saturated size
/// is larger than any buffer, so a check against it refuses rather than passes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Sz(usize);

impl std::ops::Mul for Sz {
    type Output = Sz;
    fn mul(self, o: Sz) -> Sz {
        Sz(self.0.saturating_mul(o.0))
    }
}
impl std::ops::Mul<usize> for Sz {
    type Output = Sz;
    fn mul(self, o: usize) -> Sz {
        Sz(self.0.saturating_mul(o))
    }
}
impl std::ops::Mul<Sz> for usize {
    type Output = Sz;
    fn mul(self, o: Sz) -> Sz {
        Sz(self.saturating_mul(o.0))
    }
}
impl std::ops::Add for Sz {
    type Output = Sz;
    fn add(self, o: Sz) -> Sz {
        Sz(self.0.saturating_add(o.0))
    }
}
impl std::ops::Add<usize> for Sz {
    type Output = Sz;
    fn add(self, o: usize) -> Sz {
        Sz(self.0.saturating_add(o))
    }
}
impl std::ops::Add<Sz> for usize {
    type Output = Sz;
    fn add(self, o: Sz) -> Sz {
        Sz(self.saturating_add(o.0))
    }
}
impl std::ops::Sub<usize> for Sz {
    type Output = Sz;
    fn sub(self, o: usize) -> Sz {
        Sz(self.0.saturating_sub(o))
    }
}

fn positive(what: &str, v: i64) -> Result<(), String> {
    if v <= 0 || v > i32::MAX as i64 {
        return Err(format!("{what} is {v}, not in 1..=i32::MAX"));
    }
    Ok(())
}

/// A block size for kernels reducing with full-warp shuffles: a multiple of 32 up to 1024.
fn warp_multiple(what: &str, threads: u32) -> Result<(), String> {
    if threads == 0 || !threads.is_multiple_of(32) || threads > 1024 {
        return Err(format!(
            "{what} needs a block of a multiple of 32 threads up to 1024 (full-warp shuffles), not {threads}"
        ));
    }
    Ok(())
}

/// `out[t] = table[ids[t]]` (bf16 rows widened to f32).
///
/// Device data: every id below `vocab`.
pub struct EmbeddingBf16 {
    /// bf16 `[vocab][hidden]`.
    pub table: DeviceSlice,
    /// i32 `[tokens]`.
    pub ids: DeviceSlice,
    /// f32 `[tokens][hidden]`.
    pub out: DeviceSlice,
    /// Rows of `table`.
    pub vocab: usize,
    /// Row width.
    pub hidden: usize,
    /// Tokens.
    pub tokens: usize,
}

impl KernelLaunch for EmbeddingBf16 {
    const NAME: &'static str = "embedding_bf16";
    fn config(&self) -> Result<LaunchConfig, String> {
        positive("hidden", self.hidden as i64)?;
        positive("tokens", self.tokens as i64)?;
        need("table", &self.table, Sz(self.vocab) * Sz(self.hidden), 2)?;
        need("ids", &self.ids, Sz(self.tokens), 4)?;
        need("out", &self.out, Sz(self.tokens) * Sz(self.hidden), 4)?;
        Ok(LaunchConfig::linear(self.tokens as u32, 256))
    }
    fn args(&self) -> Vec<KernelArg> {
        vec![
            ptr(&self.table),
            ptr(&self.ids),
            ptr(&self.out),
            KernelArg::I32(self.hidden as i32),
        ]
    }
}

/// `residual += delta` (unless `delta` is null), then `out = rmsnorm(residual) * weight`.
pub struct FusedAddRmsnorm {
    /// f32 `[tokens][hidden]`, updated in place.
    pub residual: DeviceSlice,
    /// f32 `[tokens][hidden]` or [`DeviceSlice::NULL`].
    pub delta: DeviceSlice,
    /// bf16 `[hidden]`.
    pub weight: DeviceSlice,
    /// f32 `[tokens][hidden]`.
    pub out: DeviceSlice,
    /// Row width.
    pub hidden: usize,
    /// Tokens.
    pub tokens: usize,
    /// Added to the mean square.
    pub eps: f32,
}

impl KernelLaunch for FusedAddRmsnorm {
    const NAME: &'static str = "fused_add_rmsnorm";
    fn config(&self) -> Result<LaunchConfig, String> {
        positive("hidden", self.hidden as i64)?;
        positive("tokens", self.tokens as i64)?;
        need(
            "residual",
            &self.residual,
            Sz(self.tokens) * Sz(self.hidden),
            4,
        )?;
        if !self.delta.is_null() {
            need("delta", &self.delta, Sz(self.tokens) * Sz(self.hidden), 4)?;
        }
        need("weight", &self.weight, Sz(self.hidden), 2)?;
        need("out", &self.out, Sz(self.tokens) * Sz(self.hidden), 4)?;
        Ok(LaunchConfig::linear(self.tokens as u32, 256))
    }
    fn args(&self) -> Vec<KernelArg> {
        vec![
            ptr(&self.residual),
            ptr(&self.delta),
            ptr(&self.weight),
            ptr(&self.out),
            KernelArg::I32(self.hidden as i32),
            KernelArg::F32(self.eps),
        ]
    }
}

/// Half-split RoPE in place on the q and k heads of each token, from a host-computed table.
///
/// Device data: every position below `table_positions`.
pub struct RopeHalfSplit {
    /// f32 rows of `heads * dim` values, `q_stride` floats apart.
    pub q: DeviceSlice,
    /// f32 rows of `kv_heads * dim` values, `k_stride` floats apart.
    pub k: DeviceSlice,
    /// i32 `[tokens]`.
    pub positions: DeviceSlice,
    /// f32 `[table_positions][dim]`: cos for the first half, sin for the second.
    pub cos_sin: DeviceSlice,
    /// Rows of `cos_sin`.
    pub table_positions: usize,
    /// Query heads.
    pub heads: usize,
    /// KV heads.
    pub kv_heads: usize,
    /// Head dimension (even).
    pub dim: usize,
    /// Floats between consecutive q rows.
    pub q_stride: usize,
    /// Floats between consecutive k rows.
    pub k_stride: usize,
    /// Tokens.
    pub tokens: usize,
}

impl KernelLaunch for RopeHalfSplit {
    const NAME: &'static str = "rope_half_split";
    fn config(&self) -> Result<LaunchConfig, String> {
        positive("tokens", self.tokens as i64)?;
        positive("heads", self.heads as i64)?;
        if self.dim == 0 || !self.dim.is_multiple_of(2) {
            return Err(format!("head dimension {} is not even", self.dim));
        }
        if Sz(self.q_stride) < Sz(self.heads) * self.dim
            || Sz(self.k_stride) < Sz(self.kv_heads) * self.dim
        {
            return Err("a row stride is shorter than its row".into());
        }
        need(
            "q",
            &self.q,
            (Sz(self.tokens) - 1) * Sz(self.q_stride) + Sz(self.heads) * Sz(self.dim),
            4,
        )?;
        need(
            "k",
            &self.k,
            (Sz(self.tokens) - 1) * Sz(self.k_stride) + Sz(self.kv_heads) * Sz(self.dim),
            4,
        )?;
        need("positions", &self.positions, Sz(self.tokens), 4)?;
        need(
            "cos_sin",
            &self.cos_sin,
            Sz(self.table_positions) * Sz(self.dim),
            4,
        )?;
        Ok(LaunchConfig::linear(self.tokens as u32, 128))
    }
    fn args(&self) -> Vec<KernelArg> {
        vec![
            ptr(&self.q),
            ptr(&self.k),
            ptr(&self.positions),
            ptr(&self.cos_sin),
            KernelArg::I32(self.heads as i32),
            KernelArg::I32(self.kv_heads as i32),
            KernelArg::I32(self.dim as i32),
            KernelArg::I64(self.q_stride as i64),
            KernelArg::I64(self.k_stride as i64),
        ]
    }
}

/// Write each token's K and V rows (as bf16) to the cache slot `slot_mapping` names.
///
/// Device data: every slot is -1 or below `cache_slots`.
pub struct ReshapeAndCache {
    /// f32 rows of `kv_width` values, `k_stride` floats apart.
    pub k: DeviceSlice,
    /// f32 rows of `kv_width` values, `v_stride` floats apart.
    pub v: DeviceSlice,
    /// bf16 `[cache_slots][kv_width]`.
    pub k_cache: DeviceSlice,
    /// bf16 `[cache_slots][kv_width]`.
    pub v_cache: DeviceSlice,
    /// i32 `[tokens]`.
    pub slot_mapping: DeviceSlice,
    /// Slots in each cache (blocks x block size).
    pub cache_slots: usize,
    /// kv_heads x head_dim.
    pub kv_width: usize,
    /// Floats between consecutive k rows.
    pub k_stride: usize,
    /// Floats between consecutive v rows.
    pub v_stride: usize,
    /// Tokens.
    pub tokens: usize,
}

impl KernelLaunch for ReshapeAndCache {
    const NAME: &'static str = "reshape_and_cache";
    fn config(&self) -> Result<LaunchConfig, String> {
        positive("tokens", self.tokens as i64)?;
        positive("kv_width", self.kv_width as i64)?;
        if self.k_stride < self.kv_width || self.v_stride < self.kv_width {
            return Err("a row stride is shorter than its row".into());
        }
        need(
            "k",
            &self.k,
            (Sz(self.tokens) - 1) * Sz(self.k_stride) + Sz(self.kv_width),
            4,
        )?;
        need(
            "v",
            &self.v,
            (Sz(self.tokens) - 1) * Sz(self.v_stride) + Sz(self.kv_width),
            4,
        )?;
        need(
            "k_cache",
            &self.k_cache,
            Sz(self.cache_slots) * Sz(self.kv_width),
            2,
        )?;
        need(
            "v_cache",
            &self.v_cache,
            Sz(self.cache_slots) * Sz(self.kv_width),
            2,
        )?;
        need("slot_mapping", &self.slot_mapping, Sz(self.tokens), 4)?;
        Ok(LaunchConfig::linear(self.tokens as u32, 128))
    }
    fn args(&self) -> Vec<KernelArg> {
        vec![
            ptr(&self.k),
            ptr(&self.v),
            ptr(&self.k_cache),
            ptr(&self.v_cache),
            ptr(&self.slot_mapping),
            KernelArg::I32(self.kv_width as i32),
            KernelArg::I64(self.k_stride as i64),
            KernelArg::I64(self.v_stride as i64),
        ]
    }
}

/// `out[t][i] = silu(gate_up[t][i]) * gate_up[t][inter + i]`.
pub struct SiluMul {
    /// f32 `[tokens][2 * inter]`.
    pub gate_up: DeviceSlice,
    /// f32 `[tokens][inter]`.
    pub out: DeviceSlice,
    /// Intermediate width.
    pub inter: usize,
    /// Tokens.
    pub tokens: usize,
}

impl KernelLaunch for SiluMul {
    const NAME: &'static str = "silu_mul";
    fn config(&self) -> Result<LaunchConfig, String> {
        positive("tokens", self.tokens as i64)?;
        positive("inter", self.inter as i64)?;
        need(
            "gate_up",
            &self.gate_up,
            Sz(self.tokens) * 2 * Sz(self.inter),
            4,
        )?;
        need("out", &self.out, Sz(self.tokens) * Sz(self.inter), 4)?;
        Ok(LaunchConfig::linear(self.tokens as u32, 256))
    }
    fn args(&self) -> Vec<KernelArg> {
        vec![
            ptr(&self.gate_up),
            ptr(&self.out),
            KernelArg::I32(self.inter as i32),
        ]
    }
}

/// Copy the first `slots` slots of one block of every layer between two caches of the same
/// layout (swap in and out, copy-on-write of a partial block).
pub struct CopyBlocks {
    /// bf16, `layers` layers `layer_stride_src` values apart.
    pub src: DeviceSlice,
    /// bf16, `layers` layers `layer_stride_dst` values apart.
    pub dst: DeviceSlice,
    /// Layers.
    pub layers: usize,
    /// Values between layers of `src`.
    pub layer_stride_src: usize,
    /// Values between layers of `dst`.
    pub layer_stride_dst: usize,
    /// Block copied from.
    pub src_block: usize,
    /// Block copied to.
    pub dst_block: usize,
    /// Values per block (block size x kv_width).
    pub block_elems: usize,
    /// Values per slot (kv_width).
    pub slot_elems: usize,
    /// Slots copied, from the block's start.
    pub slots: usize,
}

impl KernelLaunch for CopyBlocks {
    const NAME: &'static str = "copy_blocks";
    fn config(&self) -> Result<LaunchConfig, String> {
        positive("layers", self.layers as i64)?;
        positive("block_elems", self.block_elems as i64)?;
        if Sz(self.slots) * self.slot_elems > Sz(self.block_elems) {
            return Err(format!(
                "{} slots of {} values exceed a block of {}",
                self.slots, self.slot_elems, self.block_elems
            ));
        }
        let end = |stride: Sz, block: Sz| {
            (Sz(self.layers) - 1) * stride + (block + 1) * Sz(self.block_elems)
        };
        need(
            "src",
            &self.src,
            end(Sz(self.layer_stride_src), Sz(self.src_block)),
            2,
        )?;
        need(
            "dst",
            &self.dst,
            end(Sz(self.layer_stride_dst), Sz(self.dst_block)),
            2,
        )?;
        Ok(LaunchConfig::linear(self.layers as u32, 256))
    }
    fn args(&self) -> Vec<KernelArg> {
        vec![
            ptr(&self.src),
            ptr(&self.dst),
            KernelArg::I64(self.layer_stride_src as i64),
            KernelArg::I64(self.layer_stride_dst as i64),
            KernelArg::I64(self.src_block as i64),
            KernelArg::I64(self.dst_block as i64),
            KernelArg::I32(self.block_elems as i32),
            KernelArg::I32(self.slot_elems as i32),
            KernelArg::I32(self.slots as i32),
        ]
    }
}

/// What both paged-attention kernels read: the queries (a view of the fused QKV rows), the
/// paged K/V cache of one layer, and where each row's context lies.
///
/// Device data: `row_seq` below `sequences`; `row_pos` -1 (padding) or a position whose
/// block-table entries are below `cache_blocks`.
#[derive(Clone, Copy, Debug)]
pub struct AttentionInputs {
    /// f32 rows of `heads * head_dim` values, `q_stride` floats apart.
    pub q: DeviceSlice,
    /// bf16 `[cache_blocks][block_size][kv_heads][head_dim]`.
    pub k_cache: DeviceSlice,
    /// Same layout as `k_cache`.
    pub v_cache: DeviceSlice,
    /// i32 `[sequences][max_blocks_per_seq]`.
    pub block_tables: DeviceSlice,
    /// i32 `[rows]`.
    pub row_seq: DeviceSlice,
    /// i32 `[rows]`.
    pub row_pos: DeviceSlice,
    /// Blocks in each cache.
    pub cache_blocks: usize,
    /// Columns of `block_tables`.
    pub max_blocks_per_seq: usize,
    /// Rows of `block_tables`.
    pub sequences: usize,
    /// Query rows.
    pub rows: usize,
    /// Query heads.
    pub heads: usize,
    /// KV heads.
    pub kv_heads: usize,
    /// Head dimension.
    pub head_dim: usize,
    /// Positions per cache block.
    pub block_size: usize,
    /// Softmax scale (1/sqrt(head_dim)).
    pub scale: f32,
    /// Floats between consecutive q rows.
    pub q_stride: usize,
}

impl AttentionInputs {
    /// The host-side checks both kernels share; `head_dim_ok` and `dims` say which head
    /// dimensions the kernel takes.
    fn check(&self, head_dim_ok: fn(usize) -> bool, dims: &str) -> Result<(), String> {
        positive("rows", self.rows as i64)?;
        positive("kv_heads", self.kv_heads as i64)?;
        positive("block_size", self.block_size as i64)?;
        if !self.heads.is_multiple_of(self.kv_heads) || self.heads == 0 {
            return Err(format!(
                "{} query heads do not divide into {} KV heads",
                self.heads, self.kv_heads
            ));
        }
        if !head_dim_ok(self.head_dim) {
            return Err(format!("head dimension {} is not {dims}", self.head_dim));
        }
        if Sz(self.q_stride) < Sz(self.heads) * self.head_dim {
            return Err("the q row stride is shorter than a row".into());
        }
        if !self.k_cache.ptr.is_multiple_of(16) || !self.v_cache.ptr.is_multiple_of(16) {
            return Err("the K and V caches must start 16-byte aligned (16-byte row loads)".into());
        }
        need(
            "q",
            &self.q,
            (Sz(self.rows) - 1) * Sz(self.q_stride) + Sz(self.heads) * Sz(self.head_dim),
            4,
        )?;
        let cache =
            Sz(self.cache_blocks) * Sz(self.block_size) * Sz(self.kv_heads) * Sz(self.head_dim);
        need("k_cache", &self.k_cache, cache, 2)?;
        need("v_cache", &self.v_cache, cache, 2)?;
        need(
            "block_tables",
            &self.block_tables,
            Sz(self.sequences) * Sz(self.max_blocks_per_seq),
            4,
        )?;
        need("row_seq", &self.row_seq, Sz(self.rows), 4)?;
        need("row_pos", &self.row_pos, Sz(self.rows), 4)
    }

    /// Bytes of partials for `slots` partition slots.
    fn partials(&self, slots: usize) -> Sz {
        Sz(slots) * Sz(self.heads) * (2 + Sz(self.head_dim))
    }

    /// The grid's y: KV heads x chunks of up to [`ATTENTION_MAX_GROUP`] query heads.
    fn head_blocks(&self) -> u32 {
        let group = self.heads / self.kv_heads;
        (self.kv_heads * group.div_ceil(attention_chunk(group))) as u32
    }

    /// The kernels' leading arguments, up to `row_pos`.
    fn leading_args(&self) -> [KernelArg; 7] {
        [
            ptr(&self.q),
            ptr(&self.k_cache),
            ptr(&self.v_cache),
            ptr(&self.block_tables),
            KernelArg::I32(self.max_blocks_per_seq as i32),
            ptr(&self.row_seq),
            ptr(&self.row_pos),
        ]
    }

    /// The kernels' trailing arguments, after the partials.
    fn trailing_args(&self) -> [KernelArg; 6] {
        [
            KernelArg::I32(self.heads as i32),
            KernelArg::I32(self.kv_heads as i32),
            KernelArg::I32(self.head_dim as i32),
            KernelArg::I32(self.block_size as i32),
            KernelArg::F32(self.scale),
            KernelArg::I64(self.q_stride as i64),
        ]
    }
}

/// The partition pass of paged attention on CUDA cores: for each query row, KV head and
/// partition of [`ATTENTION_PARTITION`] positions, the max, sum and unnormalised output of
/// every query head of the group.
///
/// Device data: as [`AttentionInputs`]; `work` as [`AttentionWork`] builds it for `row_pos`,
/// `items` long.
pub struct AttentionPartition {
    /// Queries, cache and rows.
    pub inputs: AttentionInputs,
    /// i32 `[items][2]`: (row, partition), row -1 for an idle item.
    pub work: DeviceSlice,
    /// f32 `[items][heads][2 + head_dim]`.
    pub partials: DeviceSlice,
    /// Work items (the grid's x).
    pub items: usize,
}

impl KernelLaunch for AttentionPartition {
    const NAME: &'static str = "attention_partition";
    fn config(&self) -> Result<LaunchConfig, String> {
        let a = &self.inputs;
        a.check(
            attention_head_dim_ok,
            &format!("a power of two from 8 to {ATTENTION_MAX_HEAD_DIM}"),
        )?;
        positive("items", self.items as i64)?;
        need("work", &self.work, Sz(self.items) * Sz(2), 4)?;
        need("partials", &self.partials, a.partials(self.items), 4)?;
        let chunk = attention_chunk(a.heads / a.kv_heads);
        Ok(LaunchConfig {
            grid: [self.items as u32, a.head_blocks(), 1],
            block: [128, 1, 1],
            shared_bytes: attention_shared_bytes(chunk, a.head_dim) as u32,
        })
    }
    fn args(&self) -> Vec<KernelArg> {
        let mut args = self.inputs.leading_args().to_vec();
        args.extend([ptr(&self.work), ptr(&self.partials)]);
        args.extend(self.inputs.trailing_args());
        args
    }
}

/// The partition pass of paged attention on tensor cores: for each tile of a sequence's rows
/// (a prefill chunk's, or a decode row alone), KV head and partition, the max, sum and
/// unnormalised output of every query head of the group and every row of the tile that
/// reaches the partition, into the rows' slots.
///
/// Device data: as [`AttentionInputs`]; `tiles`, `row_offset` and `slots` as
/// [`AttentionWork::tiled`] builds them for `row_pos`, with tiles of at most
/// [`attention_mma_tile_tokens`] rows.
pub struct AttentionMma {
    /// Queries, cache and rows.
    pub inputs: AttentionInputs,
    /// i32 `[rows]`: each row's first partials slot.
    pub row_offset: DeviceSlice,
    /// i32 `[tiles][3]`: (first row, rows, partition).
    pub tiles: DeviceSlice,
    /// f32 `[slots][heads][2 + head_dim]`.
    pub partials: DeviceSlice,
    /// Tiles (the grid's x).
    pub tile_count: usize,
    /// Partials slots.
    pub slots: usize,
}

impl KernelLaunch for AttentionMma {
    const NAME: &'static str = "attention_mma";
    fn config(&self) -> Result<LaunchConfig, String> {
        let a = &self.inputs;
        a.check(
            attention_mma_head_dim_ok,
            &format!("a power of two from 16 to {ATTENTION_MMA_MAX_HEAD_DIM}"),
        )?;
        positive("tiles", self.tile_count as i64)?;
        need("row_offset", &self.row_offset, Sz(a.rows), 4)?;
        need("tiles", &self.tiles, Sz(self.tile_count) * Sz(3), 4)?;
        need("partials", &self.partials, a.partials(self.slots), 4)?;
        Ok(LaunchConfig {
            grid: [self.tile_count as u32, a.head_blocks(), 1],
            block: [128, 1, 1],
            shared_bytes: attention_mma_shared_bytes(a.head_dim) as u32,
        })
    }
    fn args(&self) -> Vec<KernelArg> {
        let mut args = self.inputs.leading_args().to_vec();
        args.extend([ptr(&self.row_offset), ptr(&self.tiles), ptr(&self.partials)]);
        args.extend(self.inputs.trailing_args());
        args
    }
}

/// The combine pass: `out[row][head]` from the partitions, in partition order.
///
/// Device data: `row_pos` and `row_offset` as [`AttentionWork`] builds them (each row's
/// partitions lie inside the `items` items).
pub struct AttentionCombine {
    /// As written by [`AttentionPartition`] or [`AttentionMma`].
    pub partials: DeviceSlice,
    /// i32 `[rows]`.
    pub row_pos: DeviceSlice,
    /// i32 `[rows]`: each row's first partials slot.
    pub row_offset: DeviceSlice,
    /// Partials slots ([`AttentionWork::slots`]).
    pub items: usize,
    /// f32 `[rows][heads][head_dim]`.
    pub out: DeviceSlice,
    /// Query rows.
    pub rows: usize,
    /// Query heads.
    pub heads: usize,
    /// Head dimension.
    pub head_dim: usize,
}

impl KernelLaunch for AttentionCombine {
    const NAME: &'static str = "attention_combine";
    fn config(&self) -> Result<LaunchConfig, String> {
        positive("rows", self.rows as i64)?;
        positive("heads", self.heads as i64)?;
        positive("head_dim", self.head_dim as i64)?;
        need(
            "partials",
            &self.partials,
            Sz(self.items) * Sz(self.heads) * (2 + Sz(self.head_dim)),
            4,
        )?;
        need("row_pos", &self.row_pos, Sz(self.rows), 4)?;
        need("row_offset", &self.row_offset, Sz(self.rows), 4)?;
        need(
            "out",
            &self.out,
            Sz(self.rows) * Sz(self.heads) * Sz(self.head_dim),
            4,
        )?;
        Ok(LaunchConfig {
            grid: [self.rows as u32, self.heads as u32, 1],
            block: [128, 1, 1],
            shared_bytes: 0,
        })
    }
    fn args(&self) -> Vec<KernelArg> {
        vec![
            ptr(&self.partials),
            ptr(&self.row_pos),
            ptr(&self.row_offset),
            ptr(&self.out),
            KernelArg::I32(self.heads as i32),
            KernelArg::I32(self.head_dim as i32),
        ]
    }
}

/// `out[r] = argmax(logits[r])`, the lowest index on ties.
pub struct ArgmaxRows {
    /// f32 `[rows][vocab]`.
    pub logits: DeviceSlice,
    /// i32 `[rows]`.
    pub out: DeviceSlice,
    /// Row width.
    pub vocab: usize,
    /// Rows.
    pub rows: usize,
    /// Threads per block: a multiple of 32 up to 1024.
    pub threads: u32,
}

impl KernelLaunch for ArgmaxRows {
    const NAME: &'static str = "argmax_rows";
    fn config(&self) -> Result<LaunchConfig, String> {
        positive("rows", self.rows as i64)?;
        positive("vocab", self.vocab as i64)?;
        warp_multiple(Self::NAME, self.threads)?;
        need("logits", &self.logits, Sz(self.rows) * Sz(self.vocab), 4)?;
        need("out", &self.out, Sz(self.rows), 4)?;
        Ok(LaunchConfig::linear(self.rows as u32, self.threads))
    }
    fn args(&self) -> Vec<KernelArg> {
        vec![
            ptr(&self.logits),
            KernelArg::I32(self.vocab as i32),
            ptr(&self.out),
        ]
    }
}

/// Gumbel-max sampling per row: `argmax(logits / T + Gumbel(seed, step, i))` over the row's
/// top-k, then top-p, candidates; greedy where `T <= 0`.
pub struct GumbelSampleRows {
    /// f32 `[rows][vocab]`.
    pub logits: DeviceSlice,
    /// f32 `[rows]`; 0 or less: greedy.
    pub temperature: DeviceSlice,
    /// i32 `[rows]`: candidates by logit (0: every token).
    pub top_k: DeviceSlice,
    /// f32 `[rows]`: share of the candidates' probability kept (1: all).
    pub top_p: DeviceSlice,
    /// u64 `[rows]`.
    pub seeds: DeviceSlice,
    /// u64 `[rows]`.
    pub steps: DeviceSlice,
    /// i32 `[rows]`.
    pub out: DeviceSlice,
    /// Row width.
    pub vocab: usize,
    /// Rows.
    pub rows: usize,
    /// Threads per block: a multiple of 32 up to 1024.
    pub threads: u32,
}

impl KernelLaunch for GumbelSampleRows {
    const NAME: &'static str = "gumbel_sample_rows";
    fn config(&self) -> Result<LaunchConfig, String> {
        positive("rows", self.rows as i64)?;
        positive("vocab", self.vocab as i64)?;
        warp_multiple(Self::NAME, self.threads)?;
        need("logits", &self.logits, Sz(self.rows) * Sz(self.vocab), 4)?;
        need("temperature", &self.temperature, Sz(self.rows), 4)?;
        need("top_k", &self.top_k, Sz(self.rows), 4)?;
        need("top_p", &self.top_p, Sz(self.rows), 4)?;
        need("seeds", &self.seeds, Sz(self.rows), 8)?;
        need("steps", &self.steps, Sz(self.rows), 8)?;
        need("out", &self.out, Sz(self.rows), 4)?;
        Ok(LaunchConfig::linear(self.rows as u32, self.threads))
    }
    fn args(&self) -> Vec<KernelArg> {
        vec![
            ptr(&self.logits),
            KernelArg::I32(self.vocab as i32),
            ptr(&self.temperature),
            ptr(&self.top_k),
            ptr(&self.top_p),
            ptr(&self.seeds),
            ptr(&self.steps),
            ptr(&self.out),
        ]
    }
}

/// `y = bf16(x)` over `n` values: activations for a bf16 GEMM.
pub struct CastBf16 {
    /// f32 `[n]`.
    pub x: DeviceSlice,
    /// bf16 `[n]`.
    pub y: DeviceSlice,
    /// Values.
    pub n: usize,
}

impl KernelLaunch for CastBf16 {
    const NAME: &'static str = "cast_bf16";
    fn config(&self) -> Result<LaunchConfig, String> {
        positive("n", self.n as i64)?;
        need("x", &self.x, Sz(self.n), 4)?;
        need("y", &self.y, Sz(self.n), 2)?;
        Ok(LaunchConfig::linear(
            self.n.div_ceil(256).min(4096) as u32,
            256,
        ))
    }
    fn args(&self) -> Vec<KernelArg> {
        vec![ptr(&self.x), ptr(&self.y), KernelArg::I64(self.n as i64)]
    }
}

/// `dst[r] = src[rows[r]]` for rows of `width` floats.
///
/// Device data: every row index below `src_rows`.
pub struct GatherRows {
    /// f32 `[src_rows][width]`.
    pub src: DeviceSlice,
    /// i32 `[rows]`.
    pub rows: DeviceSlice,
    /// f32 `[rows][width]`.
    pub dst: DeviceSlice,
    /// Rows of `src`.
    pub src_rows: usize,
    /// Rows gathered.
    pub count: usize,
    /// Row width.
    pub width: usize,
}

impl KernelLaunch for GatherRows {
    const NAME: &'static str = "gather_rows";
    fn config(&self) -> Result<LaunchConfig, String> {
        positive("count", self.count as i64)?;
        positive("width", self.width as i64)?;
        need("src", &self.src, Sz(self.src_rows) * Sz(self.width), 4)?;
        need("rows", &self.rows, Sz(self.count), 4)?;
        need("dst", &self.dst, Sz(self.count) * Sz(self.width), 4)?;
        Ok(LaunchConfig::linear(self.count as u32, 256))
    }
    fn args(&self) -> Vec<KernelArg> {
        vec![
            ptr(&self.src),
            ptr(&self.rows),
            ptr(&self.dst),
            KernelArg::I32(self.width as i32),
        ]
    }
}

/// `x[t] += delta[t]` for rows of `width` floats.
pub struct AddRows {
    /// f32 `[tokens][width]`, updated in place.
    pub x: DeviceSlice,
    /// f32 `[tokens][width]`.
    pub delta: DeviceSlice,
    /// Row width.
    pub width: usize,
    /// Rows.
    pub tokens: usize,
}

impl KernelLaunch for AddRows {
    const NAME: &'static str = "add_rows";
    fn config(&self) -> Result<LaunchConfig, String> {
        positive("tokens", self.tokens as i64)?;
        positive("width", self.width as i64)?;
        need("x", &self.x, Sz(self.tokens) * Sz(self.width), 4)?;
        need("delta", &self.delta, Sz(self.tokens) * Sz(self.width), 4)?;
        Ok(LaunchConfig::linear(self.tokens as u32, 256))
    }
    fn args(&self) -> Vec<KernelArg> {
        vec![
            ptr(&self.x),
            ptr(&self.delta),
            KernelArg::I32(self.width as i32),
        ]
    }
}

/// `x[t] += bias` for rows of `width` floats.
pub struct AddBiasRows {
    /// f32 `[tokens][width]`, updated in place.
    pub x: DeviceSlice,
    /// f32 `[width]`.
    pub bias: DeviceSlice,
    /// Row width.
    pub width: usize,
    /// Rows.
    pub tokens: usize,
}

impl KernelLaunch for AddBiasRows {
    const NAME: &'static str = "add_bias_rows";
    fn config(&self) -> Result<LaunchConfig, String> {
        positive("tokens", self.tokens as i64)?;
        positive("width", self.width as i64)?;
        need("x", &self.x, Sz(self.tokens) * Sz(self.width), 4)?;
        need("bias", &self.bias, Sz(self.width), 4)?;
        Ok(LaunchConfig::linear(self.tokens as u32, 256))
    }
    fn args(&self) -> Vec<KernelArg> {
        vec![
            ptr(&self.x),
            ptr(&self.bias),
            KernelArg::I32(self.width as i32),
        ]
    }
}

/// Copy the first slots of blocks between two caches of the same layout, for a list of copies
/// and every layer, in one launch with 16-byte loads.
///
/// Device data: `list` holds `copies` triples (source block, destination block, slots) with
/// blocks below `src_blocks` and `dst_blocks` and slots at most `block_elems / slot_elems`; no
/// destination is another triple's source or destination.
pub struct CopyBlockList {
    /// bf16, `layers` layers `layer_stride_src` values apart, 16-byte aligned.
    pub src: DeviceSlice,
    /// bf16, `layers` layers `layer_stride_dst` values apart, 16-byte aligned.
    pub dst: DeviceSlice,
    /// i32 `[copies][3]`.
    pub list: DeviceSlice,
    /// Copies in the list.
    pub copies: usize,
    /// Layers.
    pub layers: usize,
    /// Blocks per layer of `src`.
    pub src_blocks: usize,
    /// Blocks per layer of `dst`.
    pub dst_blocks: usize,
    /// Values per block (block size x kv_width), a multiple of 8.
    pub block_elems: usize,
    /// Values per slot (kv_width), a multiple of 8.
    pub slot_elems: usize,
}

impl KernelLaunch for CopyBlockList {
    const NAME: &'static str = "copy_block_list";
    fn config(&self) -> Result<LaunchConfig, String> {
        positive("copies", self.copies as i64)?;
        positive("layers", self.layers as i64)?;
        positive("block_elems", self.block_elems as i64)?;
        if !self.slot_elems.is_multiple_of(8) || !self.block_elems.is_multiple_of(8) {
            return Err(
                "slots and blocks must be whole 16-byte chunks (multiples of 8 values)".into(),
            );
        }
        if !self.src.ptr.is_multiple_of(16) || !self.dst.ptr.is_multiple_of(16) {
            return Err("the caches must start 16-byte aligned".into());
        }
        need(
            "src",
            &self.src,
            Sz(self.layers) * Sz(self.src_blocks) * Sz(self.block_elems),
            2,
        )?;
        need(
            "dst",
            &self.dst,
            Sz(self.layers) * Sz(self.dst_blocks) * Sz(self.block_elems),
            2,
        )?;
        need("list", &self.list, Sz(self.copies) * 3, 4)?;
        Ok(LaunchConfig {
            grid: [self.copies as u32, self.layers as u32, 1],
            block: [128, 1, 1],
            shared_bytes: 0,
        })
    }
    fn args(&self) -> Vec<KernelArg> {
        vec![
            ptr(&self.src),
            ptr(&self.dst),
            ptr(&self.list),
            KernelArg::I64((self.src_blocks * self.block_elems) as i64),
            KernelArg::I64((self.dst_blocks * self.block_elems) as i64),
            KernelArg::I32(self.block_elems as i32),
            KernelArg::I32(self.slot_elems as i32),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::{attention_chunk, attention_shared_bytes, AttentionWork, ATTENTION_PARTITION};

    #[test]
    fn attention_blocks_take_whole_mqa_groups_within_every_cards_shared_memory() {
        // (group, head dim) -> (heads per block, dynamic shared bytes): SmolLM2, Llama-3-8B
        // GQA, MQA 32 at head dims 128 and 256, and a group of 64 split in two.
        for (group, hd, chunk, bytes) in [
            (3, 64, 3, 10_008),
            (4, 128, 4, 16_416),
            (32, 128, 32, 59_648),
            (32, 256, 32, 84_224),
            (64, 128, 32, 59_648),
        ] {
            assert_eq!(attention_chunk(group), chunk);
            assert_eq!(attention_shared_bytes(chunk, hd), bytes);
            // Every CUDA card from sm_80 lets a kernel opt in to 99 KB or more.
            assert!(bytes <= 99 * 1024);
        }
    }

    #[test]
    fn attention_work_lists_only_the_partitions_each_row_reaches() {
        // Positions 0, 255, 256 and -1 (padding): 1, 1, 2 and 0 partitions.
        let w = AttentionWork::new(&[0, 255, 256, -1], 0);
        assert_eq!(w.items, [0, 0, 1, 0, 2, 0, 2, 1]);
        assert_eq!(w.row_offset, [0, 1, 2, 4]);
        // Padded with idle items to a graph's fixed grid.
        let w = AttentionWork::new(&[0, 255], 5);
        assert_eq!(w.len(), 5);
        assert_eq!(&w.items[4..], [-1; 6]);
        // A decode batch of 255 rows at 1k and one at 8k: 1,052 items where a dense
        // rows x longest-context grid has 8,192.
        let mut pos = vec![1023; 255];
        pos.push(8191);
        let w = AttentionWork::new(&pos, 0);
        assert_eq!(w.len(), 255 * 4 + 8192 / ATTENTION_PARTITION);
    }
}
