//! The compute device, chosen once at startup (`--device`): one `match` turns it into the
//! runner the engine thread drives.
//!
//! - `cpu`: the CPU backend.
//! - `cuda-emulated`: the CUDA backend on the emulated device, which runs convoy's `.cu`
//!   kernels on the CPU with CUDA's thread semantics and checks (a verification and debugging
//!   mode: exact about behaviour, slow).
//! - `cuda`: the CUDA backend on a GPU, through the driver (cudarc: driver, NVRTC, cuBLAS,
//!   loaded at run time); without a driver, the libraries or a GPU, one clear line.
//! - `auto`: `cuda` when a driver, the libraries and a GPU are present, else `cpu`.

use crate::backend::cuda::{CudaBackend, GraphPolicy, KvBlocks};
use crate::backend::BackendError;
use crate::generate::GeneratorConfig;
use crate::model::llama::LlamaModel;
use crate::runner::{CpuRunner, ModelRunner, Runner};
use convoy_kernels::cuda::device::DeviceLayer;
use convoy_kernels::cuda::driver::CudaDriverDevice;
use convoy_kernels::cuda::emulator::EmulatedDevice;

/// Where the model runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Device {
    /// The CPU backend.
    Cpu,
    /// The CUDA backend on the emulated device.
    CudaEmulated,
    /// The CUDA backend on a GPU.
    Cuda,
}

/// A `--device` value that names no device.
#[derive(Debug, thiserror::Error)]
#[error("--device must be cpu, cuda, cuda-emulated, sim or auto, got {given:?}")]
pub struct UnknownDevice {
    /// What was given.
    pub given: String,
}

impl Device {
    /// Parse a `--device` value (`sim` is the server's and is not a compute device); `auto`
    /// probes for a GPU.
    pub fn parse(s: &str) -> Result<Device, UnknownDevice> {
        match s {
            "cpu" => Ok(Device::Cpu),
            "auto" if convoy_kernels::cuda::driver::gpu_present() => Ok(Device::Cuda),
            "auto" => Ok(Device::Cpu),
            "cuda-emulated" => Ok(Device::CudaEmulated),
            "cuda" => Ok(Device::Cuda),
            other => Err(UnknownDevice {
                given: other.to_string(),
            }),
        }
    }

    /// The name `--device` takes.
    pub fn as_str(self) -> &'static str {
        match self {
            Device::Cpu => "cpu",
            Device::CudaEmulated => "cuda-emulated",
            Device::Cuda => "cuda",
        }
    }

    /// Whether this device runs the CUDA backend.
    pub fn is_cuda(self) -> bool {
        matches!(self, Device::CudaEmulated | Device::Cuda)
    }

    /// Bytes one KV block of `block_size` tokens takes on this device's backend, for a
    /// model of `config` whose CPU cache holds `cpu_elem_bytes` bytes per value.
    pub fn kv_block_bytes(
        self,
        config: &convoy_weights::ModelConfig,
        block_size: usize,
        cpu_elem_bytes: usize,
    ) -> usize {
        match self {
            Device::Cpu => {
                2 * config.num_layers
                    * block_size
                    * config.num_kv_heads
                    * config.head_dim
                    * cpu_elem_bytes
            }
            Device::CudaEmulated | Device::Cuda => {
                crate::backend::cuda::kv_block_bytes(config, block_size)
            }
        }
    }

    /// The runner for `model` on this device, with the KV storage and workspace `cfg` asks
    /// for; a device that cannot run the model says why here, before any step.
    pub fn runner<'m>(
        self,
        model: &'m LlamaModel,
        cfg: &GeneratorConfig,
    ) -> Result<Box<dyn ModelRunner + 'm>, BackendError> {
        self.runner_from(WeightSource::Model(model), cfg)
    }

    /// The runner for the weights `source` gives on this device (see [`Device::runner`]).
    pub fn runner_from<'m>(
        self,
        source: WeightSource<'m>,
        cfg: &GeneratorConfig,
    ) -> Result<Box<dyn ModelRunner + 'm>, BackendError> {
        match (self, source) {
            (Device::Cpu, WeightSource::Model(model)) => Ok(Box::new(CpuRunner::new(
                model,
                cfg.num_blocks,
                cfg.num_host_blocks,
                cfg.block_size,
            ))),
            (Device::Cpu, WeightSource::Tensors { .. }) => Err(cpu_takes_a_host_model()),
            (Device::CudaEmulated, source) => Ok(Box::new(Runner::with_backend(cuda_backend(
                EmulatedDevice::new(),
                source,
                cfg,
            )?))),
            (Device::Cuda, source) => {
                let gpu = CudaDriverDevice::open(0).map_err(|e| BackendError::Unsupported {
                    backend: "cuda",
                    reason: e.to_string(),
                })?;
                Ok(Box::new(Runner::with_backend(cuda_backend(
                    gpu, source, cfg,
                )?)))
            }
        }
    }
}

/// The CPU backend's refusal of loaded tensors.
pub(crate) fn cpu_takes_a_host_model() -> BackendError {
    BackendError::Unsupported {
        backend: "cpu",
        reason: "the CPU backend computes from a host model, not from loaded tensors".into(),
    }
}

/// Where a runner's weights come from.
pub enum WeightSource<'m> {
    /// A host model, borrowed (the CPU backend computes from it; the CUDA backend rounds its
    /// rows to bf16).
    Model(&'m LlamaModel),
    /// Loaded tensors, consumed one at a time by the CUDA backend's upload.
    Tensors {
        /// Shape and hyper-parameters.
        config: convoy_weights::ModelConfig,
        /// Tensors by Hugging Face name.
        tensors: std::collections::HashMap<String, convoy_weights::Tensor>,
    },
}

/// The CUDA backend on `device` as `cfg` asks for it.
fn cuda_backend<D: DeviceLayer>(
    device: D,
    source: WeightSource<'_>,
    cfg: &GeneratorConfig,
) -> Result<CudaBackend<D>, BackendError> {
    let (blocks, host, bs, tokens) = (
        kv_blocks(cfg),
        cfg.num_host_blocks,
        cfg.block_size,
        cfg.max_batched_tokens,
    );
    let mut backend = match source {
        WeightSource::Model(model) => {
            CudaBackend::with_kv(device, model, blocks, host, bs, tokens)?
        }
        WeightSource::Tensors { config, tensors } => {
            CudaBackend::from_tensors(device, config, tensors, blocks, host, bs, tokens)?
        }
    };
    if cfg.enforce_eager {
        backend.set_graph_policy(GraphPolicy::eager())?;
    }
    // Graphs only save launch time: if recording them fails, say so and decode eagerly.
    match backend.record_decode_graphs() {
        Ok(graphs) => tracing::info!(graphs, "decode graphs recorded"),
        Err(error) => {
            tracing::warn!(%error, "recording CUDA graphs failed; decode runs eagerly");
            backend.set_graph_policy(GraphPolicy::eager())?;
        }
    }
    Ok(backend)
}

fn kv_blocks(cfg: &GeneratorConfig) -> KvBlocks {
    match cfg.gpu_memory_utilization {
        Some(share) => KvBlocks::MemoryShare(share),
        None => KvBlocks::Count(cfg.num_blocks),
    }
}
