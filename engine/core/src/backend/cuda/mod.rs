//! The CUDA backend: convoy's CUDA kernels and cuBLAS's GEMM contract over a
//! [`DeviceLayer`], so the same code (weight upload, KV layout, step metadata, launch
//! configuration, block copies) drives a GPU and the emulated device
//! (`--device cuda-emulated`).
//!
//! Layout (docs/kv_cache.md): weights bf16, row-major `[out][in]` (QKV and gate/up fused);
//! norms bf16, the Qwen2 QKV bias f32; activations f32, cast to bf16 in a staging buffer before
//! each GEMM (f32 accumulation). K and V: one bf16 buffer each for all layers,
//! `[layers][blocks][block_size][kv_heads][head_dim]`, the host tier the same with its own block
//! count, in pinned host memory the device maps (`DeviceLayer::alloc_host`); the copies of a step are one `copy_block_list` launch per K and V for each run of
//! copies between the same two tiers (16-byte loads, every layer). RoPE reads a
//! cos/sin table of every position, computed on the host exactly as the CPU backend computes
//! its rows (float32 angle, float32 cos and sin: transformers' arithmetic).
//!
//! Streams: the forward pass runs on the compute stream; copies that touch the host tier run on
//! the copy stream, after an event of the compute work before them, and the compute stream
//! waits for them before its next pass (or its next copy), so no block is read before its copy
//! lands nor overwritten before its copy has read it. Decode passes run as CUDA graphs
//! ([`graphs`]).
//!
//! Invariants: the workspace is allocated once for `max_batched_tokens` tokens (fixed
//! addresses) and grows only for a longer pass (the cache verifier's recomputation); step
//! metadata is uploaded once per pass in [`Backend::begin_step`]; every launch goes through its
//! kernel's contract, and the indices held in device memory (token ids, positions, slots,
//! block tables, logit rows) are checked on the host before they are uploaded, which is what
//! makes the launches sound.

mod graphs;
mod weights;
use graphs::{DecodeGraphs, Layout};
pub use graphs::{GraphPolicy, GraphStats, DEFAULT_MAX_GRAPH_CONTEXT, DEFAULT_MAX_GRAPH_ROWS};
use weights::DeviceWeights;
pub use weights::{check_tensors, WeightError};

use convoy_kernels::cuda::device::{
    self, as_bytes_mut, DeviceError, DeviceLayer, DeviceMemory, DeviceSlice, Stream,
};
use convoy_kernels::cuda::gemm::GemmBf16;
use convoy_kernels::cuda::launch::{self as l, ATTENTION_MAX_HEAD_DIM, ATTENTION_PARTITION};
use convoy_scheduler::{BlockCopy, Loc};
use convoy_weights::ModelConfig;

use super::{rope_row, Act, Backend, BackendError, RowDraw, Rows, Weight};
use crate::forward_batch::ForwardBatch;
use crate::model::llama::LlamaModel;

/// Per-pass data on the device (indices, sampling parameters), with room for `capacity`
/// bytes; it grows when a pass needs more.
struct Meta<B> {
    buf: B,
    capacity: usize,
}

/// The CUDA backend.
pub struct CudaBackend<D: DeviceLayer> {
    device: D,
    config: ModelConfig,
    block_size: usize,
    num_blocks: usize,
    num_host_blocks: usize,
    weights: DeviceWeights<D::Buffer>,
    /// `[table_positions][head_dim]`: cos then sin per position.
    cos_sin: D::Buffer,
    table_positions: usize,
    k_cache: D::Buffer,
    v_cache: D::Buffer,
    host_k: Option<D::Buffer>,
    host_v: Option<D::Buffer>,
    /// f32 activations, indexed by `Act as usize`.
    acts: Vec<D::Buffer>,
    /// bf16 copy of a GEMM's input.
    staging: D::Buffer,
    /// Attention partials.
    partials: D::Buffer,
    token_capacity: usize,
    row_capacity: usize,
    partial_capacity: usize,
    ids: Meta<D::Buffer>,
    positions: Meta<D::Buffer>,
    slots: Meta<D::Buffer>,
    row_seq: Meta<D::Buffer>,
    tables: Meta<D::Buffer>,
    logit_rows: Meta<D::Buffer>,
    attn_work: Meta<D::Buffer>,
    attn_row_offset: Meta<D::Buffer>,
    attn_tiles: Meta<D::Buffer>,
    draw_temps: Meta<D::Buffer>,
    draw_top_k: Meta<D::Buffer>,
    draw_top_p: Meta<D::Buffer>,
    draw_seeds: Meta<D::Buffer>,
    draw_steps: Meta<D::Buffer>,
    draw_out: Meta<D::Buffer>,
    copy_list: Meta<D::Buffer>,
    /// Copy-stream work the compute stream has not waited for yet.
    copies_in_flight: Option<D::Event>,
    graphs: DecodeGraphs<D::Graph>,
    // The pass in progress: its tokens and logits rows as run (a graph's bucket, padding
    // included), the logits rows asked for, its graph bucket.
    tokens: usize,
    rows: usize,
    pass_rows: usize,
    pass_bucket: Option<usize>,
    /// Rows of the draws uploaded for the next pass, until they are launched.
    staged_draws: Option<usize>,
    /// Rows of the device draw launched for this pass, until its ids are read.
    pending_draws: Option<usize>,
    seqs: usize,
    max_blocks: usize,
    attention_items: usize,
    /// Prefill tiles of the pass on the tensor-core kernel, and the partials slots of all rows.
    attention_tiles: usize,
    attention_slots: usize,
    /// Whether attention runs on the tensor-core kernel (the device has tensor cores and the
    /// kernel takes the head dimension); else on the decode kernel.
    tensor_core_attention: bool,
}

fn dev_err(backend: &'static str) -> impl Fn(DeviceError) -> BackendError {
    move |source| BackendError::Device { backend, source }
}

/// Bytes one KV block takes on this backend (K and V, every layer, bf16).
pub fn kv_block_bytes(config: &ModelConfig, block_size: usize) -> usize {
    2 * config.num_layers * kv_layer_bytes(config, block_size, 1)
}

/// Bytes of one layer's K (or V) over `blocks` blocks: bf16
/// `[blocks][block_size][kv_heads][head_dim]`.
fn kv_layer_bytes(config: &ModelConfig, block_size: usize, blocks: usize) -> usize {
    blocks * block_size * config.num_kv_heads * config.head_dim * 2
}

/// Widths of a token's query heads and of its K (or V) heads, in values.
fn qkv_widths(config: &ModelConfig) -> (usize, usize) {
    let hd = config.head_dim;
    (config.num_heads * hd, config.num_kv_heads * hd)
}

/// How many KV blocks a backend allocates.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum KvBlocks {
    /// Exactly this many (`--kv-cache-memory`).
    Count(usize),
    /// As many as fit this share of the device's memory once the weights and the workspace are
    /// in (`--gpu-memory-utilization`, as vLLM's).
    MemoryShare(f64),
}

/// KV blocks of `block_bytes` that fit `share` of a device's `total` memory when `free` bytes
/// are free now (the weights already loaded) and `reserve` more are kept for the workspace.
pub fn blocks_for_share(
    free: usize,
    total: usize,
    share: f64,
    reserve: usize,
    block_bytes: usize,
) -> Result<usize, String> {
    if !(share > 0.0 && share <= 1.0) {
        return Err(format!(
            "--gpu-memory-utilization must be in (0, 1], got {share}"
        ));
    }
    let used = total.saturating_sub(free);
    let budget = (share * total as f64) as usize;
    let blocks = budget.saturating_sub(used).saturating_sub(reserve) / block_bytes.max(1);
    if blocks == 0 {
        return Err(format!(
            "--gpu-memory-utilization {share}: of {total} bytes, {used} are in use (weights, other processes) and \
             {reserve} are kept for the workspace; no KV block of {block_bytes} bytes fits"
        ));
    }
    Ok(blocks)
}

/// Bytes of the workspace for `tokens` tokens and logit rows (activations, GEMM staging), the
/// attention partials of `tokens` rows at up to 8,192 tokens of context, and 64 MiB of step
/// metadata. (A pass of many rows over a longer context allocates more partials than this
/// keeps back; docs/cuda.md.)
fn workspace_bytes(c: &ModelConfig, tokens: usize) -> usize {
    let (h, hd) = (c.hidden_size, c.head_dim);
    let (qd, kvd, inter) = (c.num_heads * hd, c.num_kv_heads * hd, c.intermediate_size);
    let per_token = 3 * h + (qd + 2 * kvd) + qd + 3 * inter + 2 * h + c.vocab_size;
    let partitions = c
        .max_position_embeddings
        .min(8192)
        .div_ceil(ATTENTION_PARTITION);
    let partials = c.num_heads * partitions * (2 + hd) * 4;
    tokens * (per_token * 4 + h.max(qd).max(inter) * 2 + partials) + (64 << 20)
}

/// Check that the CUDA backend can run a model of `config`; the reason when it cannot.
pub fn supports(config: &ModelConfig) -> Result<(), String> {
    let (heads, kv_heads, hd) = (config.num_heads, config.num_kv_heads, config.head_dim);
    if kv_heads == 0 || heads % kv_heads != 0 {
        return Err(format!(
            "{heads} query heads do not divide into {kv_heads} KV heads"
        ));
    }
    if !convoy_kernels::cuda::launch::attention_head_dim_ok(hd) {
        return Err(format!(
            "head dimension {hd} is not a power of two from 8 to {ATTENTION_MAX_HEAD_DIM}"
        ));
    }
    let widest = [
        config.hidden_size,
        heads * hd,
        2 * config.intermediate_size,
        config.vocab_size,
    ];
    if widest.iter().any(|&w| w > i32::MAX as usize) {
        return Err("a dimension exceeds the kernels' 32-bit sizes".into());
    }
    Ok(())
}

impl<D: DeviceLayer> CudaBackend<D> {
    /// Upload `model`'s weights (bf16; quantised GGUF blocks are dequantised here) and allocate
    /// `num_blocks` KV blocks of `block_size` tokens, `num_host_blocks` in the host tier, and a
    /// workspace for `max_batched_tokens` tokens.
    pub fn new(
        device: D,
        model: &LlamaModel,
        num_blocks: usize,
        num_host_blocks: usize,
        block_size: usize,
        max_batched_tokens: usize,
    ) -> Result<CudaBackend<D>, BackendError> {
        Self::with_kv(
            device,
            model,
            KvBlocks::Count(num_blocks),
            num_host_blocks,
            block_size,
            max_batched_tokens,
        )
    }

    /// As [`CudaBackend::new`], with the device KV blocks given as a count or as a share of the
    /// device's memory (sized once the weights are in).
    pub fn with_kv(
        device: D,
        model: &LlamaModel,
        kv: KvBlocks,
        num_host_blocks: usize,
        block_size: usize,
        max_batched_tokens: usize,
    ) -> Result<CudaBackend<D>, BackendError> {
        let e = dev_err(device.name());
        Self::build(
            device,
            model.config.clone(),
            |d| DeviceWeights::from_model(d, model).map_err(&e),
            kv,
            num_host_blocks,
            block_size,
            max_batched_tokens,
        )
    }

    /// As [`CudaBackend::with_kv`], uploading loaded tensors straight (consumed one by one):
    /// bf16 as it is, other types rounded to bf16 one tensor at a time, so the model is never
    /// held in f32 on the host.
    pub fn from_tensors(
        device: D,
        config: ModelConfig,
        tensors: std::collections::HashMap<String, convoy_weights::Tensor>,
        kv: KvBlocks,
        num_host_blocks: usize,
        block_size: usize,
        max_batched_tokens: usize,
    ) -> Result<CudaBackend<D>, BackendError> {
        let name = device.name();
        let cfg = config.clone();
        Self::build(
            device,
            config,
            move |d| {
                DeviceWeights::from_tensors(d, &cfg, tensors).map_err(|e| match e {
                    WeightError::Device(source) => BackendError::Device {
                        backend: name,
                        source,
                    },
                    other => BackendError::Unsupported {
                        backend: name,
                        reason: other.to_string(),
                    },
                })
            },
            kv,
            num_host_blocks,
            block_size,
            max_batched_tokens,
        )
    }

    /// Check that the model is supported, upload its weights with `upload`, and allocate the
    /// KV cache and the workspace.
    fn build(
        device: D,
        cfg: ModelConfig,
        upload: impl FnOnce(&D) -> Result<DeviceWeights<D::Buffer>, BackendError>,
        kv: KvBlocks,
        num_host_blocks: usize,
        block_size: usize,
        max_batched_tokens: usize,
    ) -> Result<CudaBackend<D>, BackendError> {
        let name = device.name();
        supports(&cfg).map_err(|reason| BackendError::Unsupported {
            backend: name,
            reason,
        })?;
        if block_size == 0 || kv == KvBlocks::Count(0) {
            return Err(BackendError::Unsupported {
                backend: name,
                reason: "a KV cache needs at least one block of at least one token".into(),
            });
        }
        let e = dev_err(name);
        let d = &device;
        let weights = upload(d)?;
        // RoPE rows exactly as the CPU backend computes them.
        let table_positions = cfg.max_position_embeddings.max(1);
        let hd = cfg.head_dim;
        let half = hd / 2;
        let mut table = vec![0f32; table_positions * hd];
        for (p, row) in table.chunks_exact_mut(hd).enumerate() {
            let (cos, sin) = row.split_at_mut(half);
            rope_row(p as u32, &weights.inv_freq, cos, sin);
        }
        let cos_sin = d.upload(&table).map_err(&e)?;
        let per_tier = |blocks: usize| cfg.num_layers * kv_layer_bytes(&cfg, block_size, blocks);
        let num_blocks = match kv {
            KvBlocks::Count(n) => n,
            KvBlocks::MemoryShare(share) => {
                let (free, total) = d.memory_info().ok_or_else(|| BackendError::Unsupported {
                    backend: name,
                    reason: "--gpu-memory-utilization needs a GPU's memory to share out; give --kv-cache-memory".into(),
                })?;
                let reserve = workspace_bytes(&cfg, max_batched_tokens.max(1));
                blocks_for_share(free, total, share, reserve, 2 * per_tier(1)).map_err(
                    |reason| BackendError::Unsupported {
                        backend: name,
                        reason,
                    },
                )?
            }
        };
        if num_blocks.saturating_mul(block_size) > i32::MAX as usize
            || num_host_blocks.saturating_mul(block_size) > i32::MAX as usize
        {
            return Err(BackendError::Unsupported {
                backend: name,
                reason: "more KV slots than the kernels' 32-bit slot indices reach".into(),
            });
        }
        let k_cache = d.alloc(per_tier(num_blocks)).map_err(&e)?;
        let v_cache = d.alloc(per_tier(num_blocks)).map_err(&e)?;
        let (host_k, host_v) = if num_host_blocks > 0 {
            (
                Some(d.alloc_host(per_tier(num_host_blocks)).map_err(&e)?),
                Some(d.alloc_host(per_tier(num_host_blocks)).map_err(&e)?),
            )
        } else {
            (None, None)
        };
        let meta = |n: usize| -> Result<Meta<D::Buffer>, BackendError> {
            Ok(Meta {
                buf: d.alloc(n.max(1) * 8).map_err(&e)?,
                capacity: n.max(1) * 8,
            })
        };
        let tokens = max_batched_tokens.max(1);
        let mut backend = CudaBackend {
            ids: meta(tokens)?,
            positions: meta(tokens)?,
            slots: meta(tokens)?,
            row_seq: meta(tokens)?,
            tables: meta(tokens)?,
            logit_rows: meta(tokens)?,
            attn_work: meta(tokens)?,
            attn_row_offset: meta(tokens)?,
            attn_tiles: meta(tokens)?,
            draw_temps: meta(tokens)?,
            draw_top_k: meta(tokens)?,
            draw_top_p: meta(tokens)?,
            draw_seeds: meta(tokens)?,
            draw_steps: meta(tokens)?,
            draw_out: meta(tokens)?,
            copy_list: meta(tokens)?,
            copies_in_flight: None,
            graphs: DecodeGraphs::new(GraphPolicy::eager()),
            acts: Vec::new(),
            staging: d.alloc(4).map_err(&e)?,
            partials: d.alloc(4).map_err(&e)?,
            token_capacity: 0,
            row_capacity: 0,
            partial_capacity: 0,
            device,
            config: cfg,
            block_size,
            num_blocks,
            num_host_blocks,
            weights,
            cos_sin,
            table_positions,
            k_cache,
            v_cache,
            host_k,
            host_v,
            tokens: 0,
            rows: 0,
            pass_rows: 0,
            pass_bucket: None,
            staged_draws: None,
            pending_draws: None,
            seqs: 0,
            max_blocks: 0,
            attention_items: 0,
            attention_tiles: 0,
            attention_slots: 0,
            tensor_core_attention: false,
        };
        backend.tensor_core_attention =
            backend.device.tensor_cores() && l::attention_mma_head_dim_ok(backend.config.head_dim);
        backend.reserve(tokens, tokens)?;
        let policy = GraphPolicy::new(
            DEFAULT_MAX_GRAPH_ROWS.min(tokens),
            DEFAULT_MAX_GRAPH_CONTEXT.min(table_positions),
        );
        backend.set_graph_policy(policy)?;
        Ok(backend)
    }

    /// Which decode passes run as CUDA graphs ([`GraphPolicy::eager`]: none). Allocates what
    /// the largest bucket needs now, so graphs keep their addresses (or, for none, frees it);
    /// drops every graph.
    pub fn set_graph_policy(&mut self, policy: GraphPolicy) -> Result<(), BackendError> {
        let rows = policy.max_rows();
        if rows > 0 {
            let c = &self.config;
            let blocks = policy.table_blocks(self.block_size);
            let items = policy.attention_items(rows);
            let partials = items * c.num_heads * (2 + c.head_dim);
            self.reserve(rows, rows)?;
            let e = self.err();
            // Decode items or tensor-core tiles: one per (row, partition) either way.
            for (meta, bytes) in [
                (&mut self.tables, rows * blocks * 4),
                (&mut self.attn_work, items * 8),
                (&mut self.attn_tiles, items * 12),
            ] {
                if meta.capacity < bytes {
                    *meta = Meta {
                        buf: self.device.alloc(bytes).map_err(&e)?,
                        capacity: bytes,
                    };
                }
            }
            if partials > self.partial_capacity {
                self.partials = self.device.alloc(partials * 4).map_err(&e)?;
                self.partial_capacity = partials;
            }
        } else {
            // No graphs: give back what the largest bucket kept (passes grow these as needed).
            let e = self.err();
            let small = self.token_capacity.max(1) * 8;
            for meta in [&mut self.tables, &mut self.attn_work, &mut self.attn_tiles] {
                *meta = Meta {
                    buf: self.device.alloc(small).map_err(&e)?,
                    capacity: small,
                };
            }
            self.partials = self.device.alloc(4).map_err(&e)?;
            self.partial_capacity = 0;
        }
        self.graphs = DecodeGraphs::new(policy);
        Ok(())
    }

    /// Record the graph of every decode bucket now, before serving (as vLLM and nano-vllm
    /// capture theirs), so no decode step pays a recording. Each is captured from a pass of
    /// its shape (one-token sequences at position 0 in block 0, free at startup); capturing
    /// runs nothing. A graph whose buffers later move (a longer pass grew the workspace) is
    /// recorded again on its bucket's next pass. Returns the graphs recorded.
    pub fn record_decode_graphs(&mut self) -> Result<usize, BackendError> {
        let buckets = self.graphs.policy.buckets().to_vec();
        let mut recorded = 0;
        for rows in buckets {
            let mut batch = ForwardBatch::default();
            for _ in 0..rows {
                batch.push_seq(&[0], 0, &[0], self.block_size, true);
            }
            self.begin_step(&batch)?;
            let Some(bucket) = self.pass_bucket else {
                continue;
            };
            let layout = self.layout();
            let e = self.err();
            self.device.begin_capture().map_err(&e)?;
            let captured = super::forward::layers(self, &batch);
            let graph = self.device.end_capture().map_err(&e);
            captured?;
            self.graphs.insert(bucket, layout, graph?);
            recorded += 1;
        }
        // No pass is begun: the next step starts from its own begin_step.
        self.tokens = 0;
        self.rows = 0;
        self.pass_rows = 0;
        self.pass_bucket = None;
        Ok(recorded)
    }

    /// How often decode passes were recorded and replayed as graphs.
    pub fn graph_stats(&self) -> GraphStats {
        self.graphs.stats()
    }

    /// Where every buffer a graph may name lies now.
    fn layout(&self) -> Layout {
        let metas = [
            &self.ids,
            &self.positions,
            &self.slots,
            &self.row_seq,
            &self.tables,
            &self.logit_rows,
            &self.attn_work,
            &self.attn_row_offset,
            &self.attn_tiles,
        ];
        self.acts
            .iter()
            .chain([&self.staging, &self.partials])
            .chain(metas.into_iter().map(|m| &m.buf))
            .flat_map(|b| {
                let s = b.slice();
                [s.ptr, s.bytes as u64]
            })
            .collect()
    }

    /// The graph bucket of a pass: a decode pass (one row per sequence, in order, the logits of
    /// every row) whose contexts and block tables fit the policy's graphed context.
    fn decode_bucket(
        &self,
        batch: &ForwardBatch,
        max_ctx: usize,
        max_blocks: usize,
    ) -> Option<usize> {
        let n = batch.num_tokens();
        let decode = n > 0
            && batch.seqs.len() == n
            && batch
                .seqs
                .iter()
                .enumerate()
                .all(|(i, s)| s.num_queries == 1 && s.query_start == i)
            && batch.logits_rows.len() == n
            && batch.logits_rows.iter().enumerate().all(|(i, &r)| r == i);
        let policy = &self.graphs.policy;
        if !decode || max_blocks > policy.table_blocks(self.block_size) {
            return None;
        }
        policy.bucket(n, max_ctx)
    }

    /// Make the compute stream wait for copy-stream work issued so far.
    fn wait_for_copies(&mut self) -> Result<(), BackendError> {
        if let Some(event) = self.copies_in_flight.take() {
            self.device
                .wait(Stream::Compute, &event)
                .map_err(self.err())?;
        }
        Ok(())
    }

    /// The device layer.
    pub fn device(&self) -> &D {
        &self.device
    }

    /// Device KV blocks allocated.
    pub fn num_blocks(&self) -> usize {
        self.num_blocks
    }

    fn err(&self) -> impl Fn(DeviceError) -> BackendError {
        dev_err(self.device.name())
    }

    /// Make room for `tokens` tokens and `rows` logit rows in the workspace.
    fn reserve(&mut self, tokens: usize, rows: usize) -> Result<(), BackendError> {
        if tokens <= self.token_capacity && rows <= self.row_capacity {
            return Ok(());
        }
        let tokens = tokens.max(self.token_capacity);
        let rows = rows.max(self.row_capacity);
        let c = &self.config;
        let (h, qd, inter) = (c.hidden_size, c.num_heads * c.head_dim, c.intermediate_size);
        let e = self.err();
        let mut acts = Vec::with_capacity(Act::ALL.len());
        for a in Act::ALL {
            let (r, width) = a.shape(c);
            let n = width * if r == Rows::Batch { tokens } else { rows };
            acts.push(self.device.alloc(n * 4).map_err(&e)?);
        }
        self.acts = acts;
        self.staging = self
            .device
            .alloc(tokens * h.max(qd).max(inter) * 2)
            .map_err(&e)?;
        self.token_capacity = tokens;
        self.row_capacity = rows;
        Ok(())
    }

    fn act(&self, a: Act) -> DeviceSlice {
        self.acts[a as usize].slice()
    }

    /// A view `offset_floats` into activation `a`.
    fn act_at(&self, a: Act, offset_floats: usize) -> DeviceSlice {
        let s = self.act(a);
        DeviceSlice {
            ptr: s.ptr + (offset_floats * 4) as u64,
            bytes: s.bytes.saturating_sub(offset_floats * 4),
        }
    }

    /// Layer `layer`'s part of a whole-cache buffer.
    fn layer_view(&self, buf: &D::Buffer, blocks: usize, layer: usize) -> DeviceSlice {
        let per_layer = kv_layer_bytes(&self.config, self.block_size, blocks);
        let s = buf.slice();
        DeviceSlice {
            ptr: s.ptr + (layer * per_layer) as u64,
            bytes: per_layer,
        }
    }

    fn check_layer(&self, layer: usize) -> Result<(), BackendError> {
        if layer >= self.config.num_layers {
            return Err(bad_batch(
                self.device.name(),
                format!("layer {layer} of a {}-layer model", self.config.num_layers),
            ));
        }
        Ok(())
    }

    fn rows_of(&self, rows: Rows) -> usize {
        match rows {
            Rows::Batch => self.tokens,
            Rows::Logits => self.rows,
        }
    }

    fn weight(&self, w: Weight) -> (&D::Buffer, usize, usize) {
        let c = &self.config;
        let (h, inter) = (c.hidden_size, c.intermediate_size);
        let (qd, kvd) = qkv_widths(c);
        match w {
            Weight::LmHead => (
                self.weights.lm_head.as_ref().unwrap_or(&self.weights.embed),
                c.vocab_size,
                h,
            ),
            Weight::Qkv(l) => (&self.weights.layers[l].qkv, qd + 2 * kvd, h),
            Weight::O(l) => (&self.weights.layers[l].o, h, qd),
            Weight::GateUp(l) => (&self.weights.layers[l].gate_up, 2 * inter, h),
            Weight::Down(l) => (&self.weights.layers[l].down, h, inter),
            Weight::FinalNorm => (&self.weights.final_norm, 1, h),
            Weight::AttnNorm(l) => (&self.weights.layers[l].attn_norm, 1, h),
            Weight::FfnNorm(l) => (&self.weights.layers[l].ffn_norm, 1, h),
            Weight::QkvBias(l) => (
                self.weights.layers[l]
                    .qkv_bias
                    .as_ref()
                    .expect("a QKV bias"),
                1,
                qd + 2 * kvd,
            ),
        }
    }

    /// Write `values` into a metadata buffer, growing it when needed.
    fn put<T: device::DeviceScalar>(
        device: &D,
        meta: &mut Meta<D::Buffer>,
        values: &[T],
    ) -> Result<(), DeviceError> {
        let bytes = std::mem::size_of_val(values);
        if bytes > meta.capacity {
            meta.buf = device.alloc(bytes)?;
            meta.capacity = bytes;
        }
        device.write(&mut meta.buf, 0, device::as_bytes(values))
    }

    /// Launch a kernel through its contract.
    fn launch<K: l::KernelLaunch>(&self, k: &K) -> Result<(), BackendError> {
        // SAFETY: every slice in a contract built by this backend names its own live
        // allocations (weights, caches, workspace, metadata) with their true sizes, and the
        // indices those kernels read from device memory were checked in `begin_step` (token
        // ids below the vocabulary, positions below the RoPE table, slots and block-table
        // entries below the cache's blocks, logit rows below the pass's tokens).
        unsafe { device::launch(&self.device, k) }.map_err(self.err())
    }

    /// A tier's K or V buffer and its blocks per layer.
    fn tier(&self, host: bool, k: bool) -> Result<(&D::Buffer, usize), BackendError> {
        if !host {
            return Ok((
                if k { &self.k_cache } else { &self.v_cache },
                self.num_blocks,
            ));
        }
        let buf = if k {
            self.host_k.as_ref()
        } else {
            self.host_v.as_ref()
        };
        let buf = buf.ok_or_else(|| BackendError::Unsupported {
            backend: self.device.name(),
            reason: "a copy names the host tier, which has no blocks".into(),
        })?;
        Ok((buf, self.num_host_blocks))
    }

    /// Check `copies` and write them as one list (`[src, dst, slots]` each) for every run.
    fn upload_copy_list(&mut self, copies: &[BlockCopy]) -> Result<(), BackendError> {
        let mut list = Vec::with_capacity(copies.len() * 3);
        for c in copies {
            let (_, src_blocks) = self.tier(matches!(c.src, Loc::Host(_)), true)?;
            let (_, dst_blocks) = self.tier(matches!(c.dst, Loc::Host(_)), true)?;
            let (Loc::Device(s) | Loc::Host(s)) = c.src;
            let (Loc::Device(d) | Loc::Host(d)) = c.dst;
            if s as usize >= src_blocks || d as usize >= dst_blocks || c.num_slots > self.block_size
            {
                return Err(bad_batch(
                    self.device.name(),
                    format!(
                        "block copy {:?} -> {:?} of {} slots is out of range",
                        c.src, c.dst, c.num_slots
                    ),
                ));
            }
            list.extend([s as i32, d as i32, c.num_slots as i32]);
        }
        Self::put(&self.device, &mut self.copy_list, &list).map_err(self.err())
    }

    /// One launch per K and V on `stream` for copies `first..first + count` of the uploaded
    /// list: copies between the same two tiers, none touching a block an earlier one of the
    /// run writes.
    fn copy_run(
        &mut self,
        stream: Stream,
        tiers: (bool, bool),
        first: usize,
        count: usize,
    ) -> Result<(), BackendError> {
        let (src_host, dst_host) = tiers;
        let (src_blocks, dst_blocks) = (self.tier(src_host, true)?.1, self.tier(dst_host, true)?.1);
        let list = self.copy_list.buf.slice();
        let list = DeviceSlice {
            ptr: list.ptr + (first * 12) as u64,
            bytes: list.bytes.saturating_sub(first * 12),
        };
        let c = &self.config;
        let kv_width = c.num_kv_heads * c.head_dim;
        for k in [true, false] {
            let (src, _) = self.tier(src_host, k)?;
            let (dst, _) = self.tier(dst_host, k)?;
            let launch = l::CopyBlockList {
                src: src.slice(),
                dst: dst.slice(),
                list,
                copies: count,
                layers: c.num_layers,
                src_blocks,
                dst_blocks,
                block_elems: self.block_size * kv_width,
                slot_elems: kv_width,
            };
            // SAFETY: the tiers are this backend's live K/V buffers and the list its own
            // metadata buffer; every block index in the list was checked against its tier in
            // `upload_copy_list`.
            unsafe { device::launch_on(&self.device, stream, &launch) }.map_err(self.err())?;
        }
        Ok(())
    }
}

fn bad_batch(backend: &'static str, reason: String) -> BackendError {
    BackendError::Unsupported { backend, reason }
}

impl<D: DeviceLayer> Backend for CudaBackend<D> {
    fn name(&self) -> &'static str {
        self.device.name()
    }

    fn computes_apart(&self) -> bool {
        self.device.runs_apart()
    }

    fn config(&self) -> &ModelConfig {
        &self.config
    }

    fn block_size(&self) -> usize {
        self.block_size
    }

    fn kv_blocks(&self) -> Option<usize> {
        Some(self.num_blocks)
    }

    fn apply_copies(&mut self, copies: &[BlockCopy]) -> Result<(), BackendError> {
        // In order, as runs of copies between the same two tiers that one launch may run in
        // parallel: a run ends where a copy would read or write a block an earlier copy of the
        // run writes, or write one it reads. Runs touching the host tier go to the copy stream,
        // ordered against the compute stream by events both ways.
        let copies: Vec<BlockCopy> = copies.iter().copied().filter(|c| c.num_slots > 0).collect();
        if copies.is_empty() {
            return Ok(());
        }
        // The list buffer is rewritten below: earlier copy work that reads it must be done.
        self.wait_for_copies()?;
        self.upload_copy_list(&copies)?;
        let tiers = |c: &BlockCopy| (matches!(c.src, Loc::Host(_)), matches!(c.dst, Loc::Host(_)));
        let key = |l: Loc| match l {
            Loc::Device(b) => (false, b),
            Loc::Host(b) => (true, b),
        };
        let e = self.err();
        // Whether the copy stream is ordered after the compute work issued so far.
        let mut copy_after_compute = false;
        let mut start = 0;
        while start < copies.len() {
            let mut written = std::collections::HashSet::new();
            let mut read = std::collections::HashSet::new();
            let mut end = start;
            while end < copies.len() {
                let c = &copies[end];
                if tiers(c) != tiers(&copies[start])
                    || written.contains(&key(c.src))
                    || written.contains(&key(c.dst))
                    || read.contains(&key(c.dst))
                {
                    break;
                }
                written.insert(key(c.dst));
                read.insert(key(c.src));
                end += 1;
            }
            let run_tiers = tiers(&copies[start]);
            if run_tiers.0 || run_tiers.1 {
                if !copy_after_compute {
                    // After the compute work that wrote the blocks it reads or reads the ones
                    // it writes (the last pass, device-to-device runs before it).
                    let computed = self.device.record(Stream::Compute).map_err(&e)?;
                    self.device.wait(Stream::Copy, &computed).map_err(&e)?;
                    copy_after_compute = true;
                }
                self.copy_run(Stream::Copy, run_tiers, start, end - start)?;
                self.copies_in_flight = Some(self.device.record(Stream::Copy).map_err(&e)?);
            } else {
                self.wait_for_copies()?;
                self.copy_run(Stream::Compute, run_tiers, start, end - start)?;
                copy_after_compute = false;
            }
            start = end;
        }
        Ok(())
    }

    fn begin_step(&mut self, batch: &ForwardBatch) -> Result<(), BackendError> {
        let name = self.device.name();
        // Until this pass's metadata is all in place, every operation is a no-op: a caller that
        // goes on after a failed begin_step launches nothing over half-written metadata.
        self.tokens = 0;
        self.rows = 0;
        self.pass_rows = 0;
        self.pass_bucket = None;
        self.pending_draws = None;
        let n = batch.num_tokens();
        let m = batch.logits_rows.len();
        let (vocab, heads, head_dim) = (
            self.config.vocab_size,
            self.config.num_heads,
            self.config.head_dim,
        );
        // The indices the kernels will read from device memory, checked here: one position and
        // one slot per token, every row in exactly one sequence, inside its context.
        if batch.positions.len() != n || batch.slot_mapping.len() != n {
            return Err(bad_batch(
                name,
                format!(
                    "{} positions and {} slots for {n} tokens",
                    batch.positions.len(),
                    batch.slot_mapping.len()
                ),
            ));
        }
        if batch.input_ids.iter().any(|&t| t as usize >= vocab) {
            return Err(bad_batch(
                name,
                "a token id is outside the vocabulary".into(),
            ));
        }
        if batch
            .positions
            .iter()
            .any(|&p| p as usize >= self.table_positions)
        {
            return Err(bad_batch(
                name,
                format!(
                    "a position is past the model's {} positions",
                    self.table_positions
                ),
            ));
        }
        let cache_slots = self.num_blocks * self.block_size;
        if batch
            .slot_mapping
            .iter()
            .any(|&s| s as usize >= cache_slots)
        {
            return Err(bad_batch(name, "a slot is outside the KV cache".into()));
        }
        if batch.logits_rows.iter().any(|&r| r >= n) {
            return Err(bad_batch(name, "a logits row is outside the batch".into()));
        }
        let mut row_seq = vec![-1i32; n];
        let mut max_blocks = 1;
        let mut max_ctx = 1;
        for (i, s) in batch.seqs.iter().enumerate() {
            let end = s.query_start.checked_add(s.num_queries);
            if s.block_table.iter().any(|&b| b as usize >= self.num_blocks)
                || s.block_table.len().saturating_mul(self.block_size) < s.context_len
                || end.is_none_or(|e| e > n)
                || s.num_queries > s.context_len
            {
                return Err(bad_batch(
                    name,
                    format!("sequence {i} of the batch is inconsistent"),
                ));
            }
            for (r, owner) in row_seq[s.query_start..s.query_start + s.num_queries]
                .iter_mut()
                .enumerate()
            {
                if *owner >= 0 {
                    return Err(bad_batch(
                        name,
                        format!("row {} belongs to two sequences", s.query_start + r),
                    ));
                }
                *owner = i as i32;
            }
            // A sequence's rows are the last positions of its context, in order (what the
            // attention tiles assume: a tile's last row reaches furthest).
            let first_pos = s.context_len.checked_sub(s.num_queries);
            for (i, r) in (s.query_start..s.query_start + s.num_queries).enumerate() {
                if first_pos.map(|p| p + i) != Some(batch.positions[r] as usize) {
                    return Err(bad_batch(
                        name,
                        format!(
                            "row {r} is not position {} of its sequence's last {} rows",
                            i, s.num_queries
                        ),
                    ));
                }
            }
            max_blocks = max_blocks.max(s.block_table.len());
            max_ctx = max_ctx.max(s.context_len);
        }
        if let Some(r) = row_seq.iter().position(|&o| o < 0) {
            return Err(bad_batch(name, format!("row {r} belongs to no sequence")));
        }
        // A graphed decode pass runs its bucket's fixed shape, the rows beyond the batch padded.
        let bucket = self.decode_bucket(batch, max_ctx, max_blocks);
        // A graph's attention grid is fixed too: as many items as its rows can reach.
        let (tokens, rows, seqs, max_blocks, min_items) = match bucket {
            Some(b) => {
                let policy = &self.graphs.policy;
                (
                    b,
                    b,
                    b,
                    policy.table_blocks(self.block_size),
                    policy.attention_items(b),
                )
            }
            None => (n, m, batch.seqs.len().max(1), max_blocks, 0),
        };
        let mut tables = vec![-1i32; seqs * max_blocks];
        for (i, s) in batch.seqs.iter().enumerate() {
            for (j, &b) in s.block_table.iter().enumerate() {
                tables[i * max_blocks + j] = b as i32;
            }
        }
        // Padding rows: token 0, position -1 (no RoPE, no attention), slot -1 (no K/V write).
        let padded = |v: &[u32], fill: i32| -> Vec<i32> {
            v.iter()
                .map(|&x| x as i32)
                .chain(std::iter::repeat(fill))
                .take(tokens)
                .collect()
        };
        row_seq.resize(tokens, 0);
        let logit_rows: Vec<i32> = batch
            .logits_rows
            .iter()
            .map(|&r| r as i32)
            .chain(m as i32..rows as i32)
            .collect();
        self.reserve(tokens, rows)?;
        let e = self.err();
        let d = &self.device;
        Self::put(d, &mut self.ids, &padded(&batch.input_ids, 0)).map_err(&e)?;
        let positions = padded(&batch.positions, -1);
        Self::put(d, &mut self.positions, &positions).map_err(&e)?;
        Self::put(d, &mut self.slots, &padded(&batch.slot_mapping, -1)).map_err(&e)?;
        Self::put(d, &mut self.row_seq, &row_seq).map_err(&e)?;
        Self::put(d, &mut self.tables, &tables).map_err(&e)?;
        Self::put(d, &mut self.logit_rows, &logit_rows).map_err(&e)?;
        // On tensor cores every row of every sequence, a prefill chunk's and a decode row
        // alike: one attention kernel computes every position, and a row's result depends on
        // no other row of its tile or batch, so KV a decode step wrote is what a recomputation
        // of the same prompt writes (bitwise on the emulator; docs/cuda.md says what a GPU
        // adds). Padding rows (a graph's) belong to no sequence and get no work.
        let (runs, min_items, min_tiles): (Vec<(usize, usize)>, _, _) =
            if self.tensor_core_attention {
                let runs = batch.seqs.iter().map(|s| (s.query_start, s.num_queries));
                (runs.collect(), 0, min_items)
            } else {
                (Vec::new(), min_items, 0)
            };
        let tile_tokens = l::attention_mma_tile_tokens(heads / self.config.num_kv_heads);
        let work = l::AttentionWork::tiled(&positions, &runs, tile_tokens, min_items, min_tiles);
        Self::put(d, &mut self.attn_work, &work.items).map_err(&e)?;
        Self::put(d, &mut self.attn_row_offset, &work.row_offset).map_err(&e)?;
        if work.tile_count() > 0 {
            Self::put(d, &mut self.attn_tiles, &work.tiles).map_err(&e)?;
        }
        let partials = work.slots * heads * (2 + head_dim);
        if partials > self.partial_capacity {
            self.partials = self.device.alloc(partials * 4).map_err(&e)?;
            self.partial_capacity = partials;
        }
        self.tokens = tokens;
        self.rows = rows;
        self.pass_rows = m;
        self.pass_bucket = bucket;
        self.seqs = seqs;
        self.max_blocks = max_blocks;
        self.attention_items = work.len();
        self.attention_tiles = work.tile_count();
        self.attention_slots = work.slots;
        Ok(())
    }

    fn run_pass(
        &mut self,
        pass: &mut dyn FnMut(&mut Self) -> Result<(), BackendError>,
    ) -> Result<(), BackendError> {
        // Swapped-in blocks must have landed, and swapped-out ones been read, before the pass
        // touches the cache.
        self.wait_for_copies()?;
        let Some(bucket) = self.pass_bucket else {
            return pass(self);
        };
        let e = self.err();
        let layout = self.layout();
        if let Some(graph) = self.graphs.get(bucket, &layout) {
            // SAFETY: the graph was recorded under this layout: every buffer it names is the
            // live allocation it was recorded with (weights, caches and the cos/sin table never
            // move), and the indices it reads were checked in this pass's `begin_step`.
            unsafe { self.device.replay(graph) }.map_err(&e)?;
            self.graphs.count_replay();
            return Ok(());
        }
        // This shape's first pass runs eagerly (it computes this step), then is recorded
        // (capturing runs nothing) for the next passes of its bucket. Graphs only save launch
        // time: if recording fails, say so and run every later pass eagerly.
        pass(self)?;
        let graph = self.device.begin_capture().map_err(&e).and_then(|()| {
            let recorded = pass(self);
            let graph = self.device.end_capture().map_err(&e);
            recorded.and(graph)
        });
        match graph {
            Ok(graph) => self.graphs.insert(bucket, layout, graph),
            Err(error) => {
                tracing::warn!(%error, bucket, "recording a CUDA graph failed; decode runs eagerly");
                self.graphs = DecodeGraphs::new(GraphPolicy::eager());
            }
        }
        Ok(())
    }

    fn embed(&mut self, _batch: &ForwardBatch, out: Act) -> Result<(), BackendError> {
        if self.tokens == 0 {
            return Ok(());
        }
        self.launch(&l::EmbeddingBf16 {
            table: self.weights.embed.slice(),
            ids: self.ids.buf.slice(),
            out: self.act(out),
            vocab: self.config.vocab_size,
            hidden: self.config.hidden_size,
            tokens: self.tokens,
        })
    }

    fn rms_norm(&mut self, x: Act, w: Weight, out: Act, rows: Rows) -> Result<(), BackendError> {
        let n = self.rows_of(rows);
        if n == 0 {
            return Ok(());
        }
        self.launch(&l::FusedAddRmsnorm {
            residual: self.act(x),
            delta: DeviceSlice::NULL,
            weight: self.weight(w).0.slice(),
            out: self.act(out),
            hidden: self.config.hidden_size,
            tokens: n,
            eps: self.config.rms_norm_eps,
        })
    }

    fn add_rms_norm(
        &mut self,
        residual: Act,
        delta: Act,
        w: Weight,
        out: Act,
    ) -> Result<(), BackendError> {
        if self.tokens == 0 {
            return Ok(());
        }
        self.launch(&l::FusedAddRmsnorm {
            residual: self.act(residual),
            delta: self.act(delta),
            weight: self.weight(w).0.slice(),
            out: self.act(out),
            hidden: self.config.hidden_size,
            tokens: self.tokens,
            eps: self.config.rms_norm_eps,
        })
    }

    fn add(&mut self, residual: Act, delta: Act) -> Result<(), BackendError> {
        if self.tokens == 0 {
            return Ok(());
        }
        self.launch(&l::AddRows {
            x: self.act(residual),
            delta: self.act(delta),
            width: self.config.hidden_size,
            tokens: self.tokens,
        })
    }

    fn linear(&mut self, x: Act, w: Weight, out: Act, rows: Rows) -> Result<(), BackendError> {
        let n = self.rows_of(rows);
        if n == 0 {
            return Ok(());
        }
        let (weight, out_dim, in_dim) = self.weight(w);
        let weight = weight.slice();
        self.launch(&l::CastBf16 {
            x: self.act(x),
            y: self.staging.slice(),
            n: n * in_dim,
        })?;
        let gemm = GemmBf16::linear(
            self.staging.slice(),
            weight,
            self.act(out),
            n,
            in_dim,
            out_dim,
        );
        // SAFETY: the staging buffer, the weight and the output activation are live
        // allocations of this device; `gemm_bf16` checks their sizes against the dimensions.
        unsafe { self.device.gemm_bf16(&gemm) }.map_err(self.err())
    }

    fn add_bias(&mut self, x: Act, bias: Weight) -> Result<(), BackendError> {
        if self.tokens == 0 {
            return Ok(());
        }
        let (b, _, width) = self.weight(bias);
        self.launch(&l::AddBiasRows {
            x: self.act(x),
            bias: b.slice(),
            width,
            tokens: self.tokens,
        })
    }

    fn rope(&mut self, _batch: &ForwardBatch, qkv: Act) -> Result<(), BackendError> {
        if self.tokens == 0 {
            return Ok(());
        }
        let c = &self.config;
        let hd = c.head_dim;
        let (qd, kvd) = qkv_widths(c);
        let width = qd + 2 * kvd;
        self.launch(&l::RopeHalfSplit {
            q: self.act(qkv),
            k: self.act_at(qkv, qd),
            positions: self.positions.buf.slice(),
            cos_sin: self.cos_sin.slice(),
            table_positions: self.table_positions,
            heads: c.num_heads,
            kv_heads: c.num_kv_heads,
            dim: hd,
            q_stride: width,
            k_stride: width,
            tokens: self.tokens,
        })
    }

    fn write_kv(
        &mut self,
        _batch: &ForwardBatch,
        layer: usize,
        qkv: Act,
    ) -> Result<(), BackendError> {
        if self.tokens == 0 {
            return Ok(());
        }
        self.check_layer(layer)?;
        let c = &self.config;
        let (qd, kvd) = qkv_widths(c);
        let width = qd + 2 * kvd;
        self.launch(&l::ReshapeAndCache {
            k: self.act_at(qkv, qd),
            v: self.act_at(qkv, qd + kvd),
            k_cache: self.layer_view(&self.k_cache, self.num_blocks, layer),
            v_cache: self.layer_view(&self.v_cache, self.num_blocks, layer),
            slot_mapping: self.slots.buf.slice(),
            cache_slots: self.num_blocks * self.block_size,
            kv_width: kvd,
            k_stride: width,
            v_stride: width,
            tokens: self.tokens,
        })
    }

    fn attention(
        &mut self,
        _batch: &ForwardBatch,
        layer: usize,
        qkv: Act,
        out: Act,
    ) -> Result<(), BackendError> {
        if self.tokens == 0 {
            return Ok(());
        }
        self.check_layer(layer)?;
        let c = &self.config;
        let hd = c.head_dim;
        let (qd, kvd) = qkv_widths(c);
        let inputs = l::AttentionInputs {
            q: self.act(qkv),
            k_cache: self.layer_view(&self.k_cache, self.num_blocks, layer),
            v_cache: self.layer_view(&self.v_cache, self.num_blocks, layer),
            block_tables: self.tables.buf.slice(),
            row_seq: self.row_seq.buf.slice(),
            row_pos: self.positions.buf.slice(),
            cache_blocks: self.num_blocks,
            max_blocks_per_seq: self.max_blocks,
            sequences: self.seqs,
            rows: self.tokens,
            heads: c.num_heads,
            kv_heads: c.num_kv_heads,
            head_dim: hd,
            block_size: self.block_size,
            scale: 1.0 / (hd as f32).sqrt(),
            q_stride: qd + 2 * kvd,
        };
        if self.attention_items > 0 {
            self.launch(&l::AttentionPartition {
                inputs,
                work: self.attn_work.buf.slice(),
                partials: self.partials.slice(),
                items: self.attention_items,
            })?;
        }
        if self.attention_tiles > 0 {
            self.launch(&l::AttentionMma {
                inputs,
                row_offset: self.attn_row_offset.buf.slice(),
                tiles: self.attn_tiles.buf.slice(),
                partials: self.partials.slice(),
                tile_count: self.attention_tiles,
                slots: self.attention_slots,
            })?;
        }
        // Every row gets its output: a padding row (no partition) zeros.
        self.launch(&l::AttentionCombine {
            partials: self.partials.slice(),
            row_pos: self.positions.buf.slice(),
            row_offset: self.attn_row_offset.buf.slice(),
            items: self.attention_slots,
            out: self.act(out),
            rows: self.tokens,
            heads: c.num_heads,
            head_dim: hd,
        })
    }

    fn silu_mul(&mut self, gate_up: Act, out: Act) -> Result<(), BackendError> {
        if self.tokens == 0 {
            return Ok(());
        }
        self.launch(&l::SiluMul {
            gate_up: self.act(gate_up),
            out: self.act(out),
            inter: self.config.intermediate_size,
            tokens: self.tokens,
        })
    }

    fn gather_logit_rows(
        &mut self,
        _batch: &ForwardBatch,
        x: Act,
        out: Act,
    ) -> Result<(), BackendError> {
        if self.rows == 0 {
            return Ok(());
        }
        self.launch(&l::GatherRows {
            src: self.act(x),
            rows: self.logit_rows.buf.slice(),
            dst: self.act(out),
            src_rows: self.tokens,
            count: self.rows,
            width: self.config.hidden_size,
        })
    }

    fn stage_draws(&mut self, draws: &[RowDraw]) -> Result<bool, BackendError> {
        // The row count is checked against the pass at launch (the buffers grow to fit).
        self.staged_draws = None;
        if !draws.is_empty() {
            let e = self.err();
            let temps: Vec<f32> = draws.iter().map(|d| d.temperature).collect();
            let top_k: Vec<i32> = draws
                .iter()
                .map(|d| d.top_k.min(i32::MAX as u32) as i32)
                .collect();
            let top_p: Vec<f32> = draws.iter().map(|d| d.top_p).collect();
            let seeds: Vec<u64> = draws.iter().map(|d| d.seed).collect();
            let steps: Vec<u64> = draws.iter().map(|d| d.step).collect();
            let d = &self.device;
            Self::put(d, &mut self.draw_temps, &temps).map_err(&e)?;
            Self::put(d, &mut self.draw_top_k, &top_k).map_err(&e)?;
            Self::put(d, &mut self.draw_top_p, &top_p).map_err(&e)?;
            Self::put(d, &mut self.draw_seeds, &seeds).map_err(&e)?;
            Self::put(d, &mut self.draw_steps, &steps).map_err(&e)?;
            Self::put(d, &mut self.draw_out, &vec![0i32; draws.len()]).map_err(&e)?;
        }
        self.staged_draws = Some(draws.len());
        Ok(true)
    }

    fn launch_sample_rows(&mut self) -> Result<(), BackendError> {
        let rows = self.staged_draws.take().ok_or(BackendError::OutOfOrder {
            backend: self.device.name(),
            what: "a draw launched without draws staged before the pass",
        })?;
        if rows != self.pass_rows || self.pass_rows > self.row_capacity {
            return Err(bad_batch(
                self.device.name(),
                format!("{rows} draws for {} logits rows", self.pass_rows),
            ));
        }
        self.pending_draws = Some(rows);
        if rows == 0 {
            return Ok(());
        }
        self.launch(&l::GumbelSampleRows {
            logits: self.act(Act::Logits),
            temperature: self.draw_temps.buf.slice(),
            top_k: self.draw_top_k.buf.slice(),
            top_p: self.draw_top_p.buf.slice(),
            seeds: self.draw_seeds.buf.slice(),
            steps: self.draw_steps.buf.slice(),
            out: self.draw_out.buf.slice(),
            vocab: self.config.vocab_size,
            rows,
            threads: 1024,
        })
    }

    fn sampled_ids(&mut self, ids: &mut Vec<u32>) -> Result<(), BackendError> {
        let rows = self.pending_draws.take().ok_or(BackendError::OutOfOrder {
            backend: self.device.name(),
            what: "token ids asked for before a draw was launched",
        })?;
        // The kernel writes token ids as non-negative i32: the same bits as u32.
        ids.clear();
        ids.resize(rows, 0);
        if rows == 0 {
            return Ok(());
        }
        self.device
            .read(
                &self.draw_out.buf,
                0,
                device::as_bytes_mut(ids.as_mut_slice()),
            )
            .map_err(self.err())
    }

    fn read_logits(&mut self, logits: &mut Vec<f32>) -> Result<(), BackendError> {
        let len = self.pass_rows * self.config.vocab_size;
        logits.resize(len, 0.0);
        // The pass is over when this returns, logits or not (a step of prompt chunks that
        // sample nothing still ends here, and the next step's uploads then wait for nothing).
        self.device.synchronize().map_err(self.err())?;
        if len == 0 {
            return Ok(());
        }
        self.device
            .read(
                &self.acts[Act::Logits as usize],
                0,
                as_bytes_mut(&mut logits[..len]),
            )
            .map_err(self.err())
    }
}

#[cfg(test)]
mod tests {
    use super::blocks_for_share;

    #[test]
    fn a_memory_share_leaves_the_weights_and_the_workspace_their_room() {
        let gib = 1usize << 30;
        // 80 GiB card, 17 GiB in use after the weights, 1 GiB of workspace, 0.9 of the card:
        // 72 - 17 - 1 = 54 GiB of blocks of 2 MiB.
        assert_eq!(
            blocks_for_share(63 * gib, 80 * gib, 0.9, gib, 2 << 20),
            Ok(54 * 512)
        );
        let err = blocks_for_share(10 * gib, 80 * gib, 0.5, gib, 2 << 20).unwrap_err();
        assert!(
            err.contains("no KV block") && err.contains("are in use"),
            "{err}"
        );
        assert!(blocks_for_share(gib, gib, 1.5, 0, 1).is_err());
        assert!(blocks_for_share(gib, gib, 0.0, 0, 1).is_err());
    }
}
