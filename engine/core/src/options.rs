//! Command-line options shared by the `convoy` subcommands, and the rules that turn them into a
//! loaded model and a sized KV cache.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use convoy_kernels::Precision;
use convoy_weights::{load_model, DType, LoadFormat};

use crate::device::Device;
use crate::model::llama::LlamaModel;
use crate::model_weights::ModelWeights;
use crate::tokenizer::TextCodec;

/// Where the default model lives, relative to a convoy checkout (see
/// [`default_model_candidates`]).
pub const DEFAULT_MODEL: &str = "models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";

/// Where the default model is looked for, in order: `$CONVOY_MODELS_DIR/smollm2/...` when set,
/// the working directory, then the checkout the running binary was built in (the binary lives
/// in `<checkout>/target/<profile>/`), so `convoy` finds it from any directory.
pub fn default_model_candidates() -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Some(dir) = std::env::var_os("CONVOY_MODELS_DIR") {
        let rel = Path::new(DEFAULT_MODEL)
            .strip_prefix("models")
            .unwrap_or(Path::new(DEFAULT_MODEL));
        out.push(PathBuf::from(dir).join(rel));
    }
    out.push(PathBuf::from(DEFAULT_MODEL));
    if let Ok(exe) = std::env::current_exe() {
        // <checkout>/target/<profile>/convoy (or .../deps/<test binary>).
        for up in exe.ancestors().skip(1).take(4) {
            if up.file_name().is_some_and(|n| n == "target") {
                if let Some(checkout) = up.parent() {
                    out.push(checkout.join(DEFAULT_MODEL));
                }
                break;
            }
        }
    }
    out.dedup();
    out
}

/// The model to load: `--model` when given (see [`resolve_model_arg`]), else the first of
/// [`default_model_candidates`] that exists, or an error naming every path tried.
pub fn find_model(model: Option<&Path>) -> Result<PathBuf> {
    if let Some(p) = model {
        return resolve_model_arg(p);
    }
    let tried = default_model_candidates();
    match tried.iter().find(|p| p.is_file()) {
        Some(p) => Ok(p.clone()),
        None => bail!(
            "no --model given and the default model is not in any of: {} (run \
             scripts/fetch_models.sh in the convoy checkout, set CONVOY_MODELS_DIR to the \
             models/ directory it fills, or give --model)",
            tried
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// A `--model` argument as a path to load: a file, a Hugging Face directory (with
/// `config.json`), or a directory holding exactly one `.gguf` file.
pub fn resolve_model_arg(p: &Path) -> Result<PathBuf> {
    if !p.is_dir() || p.join("config.json").exists() {
        return Ok(p.to_path_buf());
    }
    let mut ggufs: Vec<PathBuf> = std::fs::read_dir(p)
        .with_context(|| format!("--model {}", p.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|f| {
            f.extension()
                .is_some_and(|x| x.eq_ignore_ascii_case("gguf"))
                && f.is_file()
        })
        .collect();
    ggufs.sort();
    match ggufs.len() {
        1 => Ok(ggufs.remove(0)),
        0 => bail!(
            "--model {} is a directory with no config.json and no .gguf file",
            p.display()
        ),
        n => bail!(
            "--model {} holds {n} .gguf files: name one ({})",
            p.display(),
            ggufs
                .iter()
                .filter_map(|f| f.file_name().map(|n| n.to_string_lossy().into_owned()))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// Options for loading and running a model.
#[derive(clap::Args, Clone, Debug)]
pub struct ModelArgs {
    /// A .gguf file or a Hugging Face directory (config.json, *.safetensors, tokenizer.json).
    /// Defaults to the SmolLM2 GGUF under models/ (fetch it with scripts/fetch_models.sh).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// `auto` reads the weights; `dummy` makes random ones for the config at --model.
    #[arg(long, default_value = "auto")]
    pub load_format: String,
    /// Element type of dummy weights: f32, f16, bf16, q8_0, q4_0 or q4_1.
    #[arg(long, default_value = "q4_1")]
    pub dummy_dtype: String,
    /// cpu, cuda (a GPU through the driver), cuda-emulated (the CUDA backend on an emulated
    /// GPU: convoy's CUDA kernels run on the CPU, slow, for verification and debugging;
    /// docs/cuda.md), auto (cuda when a driver and a GPU are present, else cpu), or sim
    /// (`convoy serve` only: a simulated GPU paced by a device profile, no model computed;
    /// see docs/simulation.md).
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// Compute threads (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Memory for the KV cache, e.g. 512MiB or 2GiB.
    #[arg(long, default_value = "512MiB")]
    pub kv_cache_memory: String,
    /// Tokens per KV block (default: sized for the model, see docs/kv_cache.md).
    #[arg(long)]
    pub block_size: Option<usize>,
    /// With --device cuda: size the KV cache as this share of the GPU's memory once the weights
    /// and workspace are in (0..=1, as vLLM's); replaces --kv-cache-memory.
    #[arg(long)]
    pub gpu_memory_utilization: Option<f64>,
    /// With a CUDA device: run every pass eagerly, recording no CUDA graphs for decode
    /// passes (as vLLM's flag).
    #[arg(long)]
    pub enforce_eager: bool,
    /// Memory for the host-RAM second tier of the KV cache (0 disables it).
    #[arg(long, default_value = "2GiB")]
    pub host_cache_memory: String,
    /// Do not share prompt prefixes through the KV cache.
    #[arg(long)]
    pub no_prefix_caching: bool,
    /// Share of cache-hit prefills to recompute without the cache and compare (0..=1).
    #[arg(long, default_value_t = 0.0)]
    pub verify_cache: f64,
    /// A Jinja chat template file to use instead of the model's own.
    #[arg(long)]
    pub chat_template: Option<PathBuf>,
    /// Arithmetic of the matrix multiplies: `exact` (float32 activations; matches transformers
    /// up to summation order) or `fast` (8-bit activations, integer dot products; measured
    /// error, see docs/benchmarks.md).
    #[arg(long, default_value = "exact")]
    pub precision: String,
    /// Element type of the KV cache: `f32` (K/V exactly as computed), `f16` (half the memory
    /// and half the bytes attention reads, each value rounded to 11 significant bits) or
    /// `fp8_e4m3` (a quarter, each value rounded to 4 significant bits, at most 448; measured
    /// error, see docs/kv_cache.md).
    #[arg(long, default_value = "f32")]
    pub kv_cache_dtype: String,
}

/// Parse a byte size such as `512MiB`, `2GiB`, `100MB` or `4096` (units as in the `bytesize`
/// crate: KB/MB/GB are powers of 1000, KiB/MiB/GiB of 1024, case-insensitive).
pub fn parse_bytes(s: &str) -> Result<usize> {
    let size: bytesize::ByteSize = match s.trim().parse() {
        Ok(size) => size,
        Err(why) => bail!("bad size {s:?}: {why} (use e.g. 4096, 100MB, 512MiB or 2GiB)"),
    };
    usize::try_from(size.as_u64()).with_context(|| format!("size {s:?} is too large"))
}

/// Default tokens per block: the power of two that makes one layer's K+V block about 16 KiB,
/// clamped to 16..=256 (see docs/kv_cache.md).
pub fn default_block_size(kv_bytes_per_token_per_layer: usize) -> usize {
    let target = 16 * 1024 / kv_bytes_per_token_per_layer.max(1);
    target.next_power_of_two().clamp(16, 256)
}

/// A model ready to run, with its text codec and cache geometry.
pub struct Loaded {
    /// The model's weights: a host model for the CPU, loaded tensors for a CUDA device.
    pub weights: ModelWeights,
    /// Tokenizer and template.
    pub codec: TextCodec,
    /// KV blocks that fit the memory budget.
    pub num_blocks: usize,
    /// Host-tier blocks that fit its budget.
    pub num_host_blocks: usize,
    /// Tokens per block.
    pub block_size: usize,
    /// Prefix caching on.
    pub enable_prefix_caching: bool,
    /// Share of cache-hit prefills to verify.
    pub verify_fraction: f64,
    /// The model's name, part of every cache key.
    pub model_id: String,
    /// Where the model runs.
    pub device: Device,
    /// The share of the GPU's memory the KV cache takes, when it is sized that way.
    pub gpu_memory_utilization: Option<f64>,
    /// No CUDA graphs.
    pub enforce_eager: bool,
}

impl Loaded {
    /// The host model, for commands that compute on the CPU; an error naming the device when
    /// the weights were loaded for a CUDA device instead.
    pub fn host_model(&self) -> Result<&LlamaModel> {
        let device = self.device.as_str();
        self.weights.host_model().with_context(|| {
            format!("this command computes on the CPU; --device {device} loads no host model")
        })
    }

    /// As [`Loaded::host_model`], mutably.
    pub fn host_model_mut(&mut self) -> Result<&mut LlamaModel> {
        let device = self.device.as_str();
        self.weights.host_model_mut().with_context(|| {
            format!("this command computes on the CPU; --device {device} loads no host model")
        })
    }

    /// The generator configuration these options describe.
    pub fn generator_config(&self) -> crate::GeneratorConfig {
        let mut cfg = crate::GeneratorConfig::new(self.num_blocks, self.block_size);
        cfg.num_host_blocks = self.num_host_blocks;
        cfg.enable_prefix_caching = self.enable_prefix_caching;
        cfg.verify_fraction = self.verify_fraction;
        cfg.model_id = self.model_id.clone();
        cfg.gpu_memory_utilization = self.gpu_memory_utilization;
        cfg.enforce_eager = self.enforce_eager;
        cfg
    }
}

impl ModelArgs {
    /// These arguments for a command that computes on the CPU: `--device auto` (the default)
    /// becomes `cpu`, so a GPU on the machine does not take the model away from the host; a
    /// device named explicitly is kept (and such a command then says it needs the CPU).
    pub fn on_cpu(mut self) -> ModelArgs {
        if self.device == "auto" {
            self.device = "cpu".into();
        }
        self
    }

    /// The model path: --model, else the default SmolLM2 file.
    pub fn model_path(&self) -> Result<PathBuf> {
        find_model(self.model.as_deref())
    }

    /// Set up threads, check the device, load the model and size the KV cache.
    pub fn load(&self) -> Result<Loaded> {
        let device = match self.device.as_str() {
            "sim" => bail!(
                "--device sim (a simulated GPU, no model computed) runs only under `convoy serve`"
            ),
            other => Device::parse(other)?,
        };
        if device == Device::Cuda {
            if let Err(why) = convoy_kernels::cuda::driver::probe(0) {
                bail!(
                    "--device cuda: {why}; --device cuda-emulated runs the CUDA backend on the CPU"
                );
            }
        }
        let precision = Precision::parse(&self.precision).with_context(|| {
            format!(
                "--precision must be exact or fast, got {:?}",
                self.precision
            )
        })?;
        if let Some(t) = self.threads {
            // Takes effect only before the first parallel loop; later calls keep the first size.
            convoy_kernels::cpu::pool::set_num_threads(t.max(1));
        }
        let format = match self.load_format.as_str() {
            "auto" => LoadFormat::Auto,
            "dummy" => LoadFormat::Dummy(match self.dummy_dtype.as_str() {
                "f32" => DType::F32,
                "f16" => DType::F16,
                "bf16" => DType::BF16,
                "q8_0" => DType::Q8_0,
                "q4_0" => DType::Q4_0,
                "q4_1" => DType::Q4_1,
                other => {
                    bail!("--dummy-dtype {other:?} is not one of f32, f16, bf16, q8_0, q4_0, q4_1")
                }
            }),
            other => bail!("--load-format must be auto or dummy, got {other:?}"),
        };
        let path = self.model_path()?;
        let mut loaded = load_model(&path, format)?;
        let model_id = loaded.name.clone();
        let mut codec = TextCodec::take_from(&mut loaded);
        if let Some(file) = &self.chat_template {
            let source = std::fs::read_to_string(file)
                .with_context(|| format!("reading --chat-template {}", file.display()))?;
            codec
                .set_chat_template(&source)
                .with_context(|| format!("--chat-template {}", file.display()))?;
        }
        let kv_cache_dtype = crate::kv_cache::KvCacheDtype::parse(&self.kv_cache_dtype)
            .context("--kv-cache-dtype")?;
        let config = loaded.config.clone();
        let cfg = &config;
        if device.is_cuda() {
            if precision != Precision::Exact {
                bail!("--precision fast is the CPU backend's; the CUDA backend computes bf16 GEMMs with f32 accumulation");
            }
            if kv_cache_dtype != crate::kv_cache::KvCacheDtype::F32 {
                bail!("--kv-cache-dtype is the CPU backend's; the CUDA backend keeps K/V in bf16");
            }
            if let Err(reason) = crate::backend::cuda::supports(cfg) {
                bail!(
                    "--device {}: the CUDA backend cannot run this model: {reason}",
                    device.as_str()
                );
            }
        }
        if self.enforce_eager && !device.is_cuda() {
            bail!(
                "--enforce-eager turns off the CUDA backend's graphs; --device {} records none",
                device.as_str()
            );
        }
        if let Some(share) = self.gpu_memory_utilization {
            if device != Device::Cuda {
                bail!(
                    "--gpu-memory-utilization shares out a GPU's memory and applies to --device cuda; \
                     --device {} sizes the KV cache with --kv-cache-memory",
                    device.as_str()
                );
            }
            if !(share > 0.0 && share <= 1.0) {
                bail!("--gpu-memory-utilization must be in (0, 1], got {share}");
            }
        }
        let elem_bytes = if device.is_cuda() { 2 } else { 4 };
        let block_size = match self.block_size {
            Some(0) => bail!("--block-size must be at least 1"),
            Some(b) => b,
            None => default_block_size(cfg.kv_bytes_per_token_per_layer(elem_bytes)),
        };
        let budget = parse_bytes(&self.kv_cache_memory)?;
        let per_block = device.kv_block_bytes(cfg, block_size, kv_cache_dtype.bytes());
        let num_blocks = budget / per_block;
        if num_blocks == 0 {
            bail!(
                "--kv-cache-memory {} holds no block of {per_block} bytes",
                self.kv_cache_memory
            );
        }
        let num_host_blocks = parse_bytes(&self.host_cache_memory)? / per_block;
        if !(0.0..=1.0).contains(&self.verify_cache) {
            bail!(
                "--verify-cache must be between 0 and 1, got {}",
                self.verify_cache
            );
        }
        // The CUDA backend uploads the loaded tensors one at a time; only the CPU backend
        // needs the host model (f32 or quantised rows).
        let weights = if device.is_cuda() {
            crate::backend::cuda::check_tensors(&loaded.config, &loaded.tensors).with_context(
                || {
                    format!(
                        "{} cannot run on --device {}",
                        path.display(),
                        device.as_str()
                    )
                },
            )?;
            ModelWeights::Tensors {
                config: loaded.config,
                tensors: loaded.tensors,
            }
        } else {
            let mut model = LlamaModel::new(loaded)?;
            model.set_precision(precision);
            model.set_kv_cache_dtype(kv_cache_dtype);
            ModelWeights::Host(model)
        };
        tracing::info!(
            model = %path.display(),
            device = device.as_str(),
            precision = precision.as_str(),
            kv_cache_dtype = kv_cache_dtype.as_str(),
            kernels = ?convoy_kernels::active_kernel_path(),
            threads = convoy_kernels::cpu::pool::num_threads(),
            kv_blocks = num_blocks,
            block_size,
            "model loaded"
        );
        Ok(Loaded {
            weights,
            codec,
            num_blocks,
            num_host_blocks,
            block_size,
            enable_prefix_caching: !self.no_prefix_caching,
            verify_fraction: self.verify_cache,
            model_id,
            device,
            gpu_memory_utilization: self.gpu_memory_utilization,
            enforce_eager: self.enforce_eager,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_bytes("512MiB").unwrap(), 512 << 20);
        assert_eq!(parse_bytes("2GiB").unwrap(), 2 << 30);
        assert_eq!(parse_bytes("100MB").unwrap(), 100_000_000);
        assert!(parse_bytes("12 parsecs").is_err());
        assert_eq!(parse_bytes("4096").unwrap(), 4096);
        assert_eq!(parse_bytes(" 2 GiB ").unwrap(), 2 << 30);
        assert_eq!(parse_bytes("8mib").unwrap(), 8 << 20);
        assert_eq!(parse_bytes("1.5KiB").unwrap(), 1536);
        for bad in ["", "MiB", "-1GiB", "1.2.3MB", "12 parsecs"] {
            let msg = parse_bytes(bad).unwrap_err().to_string();
            assert!(msg.starts_with(&format!("bad size {bad:?}")), "{msg}");
        }
    }

    /// `--device cuda-emulated` loads the tensors for the upload and never builds the host
    /// model; the tensors make one runner, and a second one is refused rather than uploading
    /// nothing.
    #[test]
    fn a_cuda_device_loads_tensors_not_a_host_model() {
        use crate::backend::BackendError;
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            model: ModelArgs,
        }
        let glassllm = concat!(env!("CARGO_MANIFEST_DIR"), "/../../models/glassllm");
        let args = |device: &str| {
            Cli::try_parse_from(["convoy", "--model", glassllm, "--device", device])
                .unwrap()
                .model
        };
        let mut loaded = args("cuda-emulated").load().unwrap();
        assert!(loaded.weights.host_model().is_none());
        assert_eq!(
            loaded.host_model().err().unwrap().to_string(),
            "this command computes on the CPU; --device cuda-emulated loads no host model"
        );
        let cfg = loaded.generator_config();
        let config = loaded.weights.config().clone();
        assert!(loaded
            .weights
            .runner(loaded.device, &cfg)
            .is_ok_and(|r| r.vocab_size() == config.vocab_size));
        assert_eq!(loaded.weights.config(), &config);
        let again = loaded.weights.runner(loaded.device, &cfg).err().unwrap();
        assert!(matches!(again, BackendError::OutOfOrder { .. }), "{again}");
        let cpu = args("cpu").load().unwrap();
        assert!(cpu.host_model().is_ok());
    }

    #[test]
    fn block_size_rule() {
        // SmolLM2: 3 KV heads x 64 x 2 x 4 bytes = 1536 B per token per layer -> 16 tokens.
        assert_eq!(default_block_size(1536), 16);
        // MQA, head 128, f32: 1024 B -> 16; bf16: 512 B -> 32.
        assert_eq!(default_block_size(512), 32);
        assert_eq!(default_block_size(8), 256);
    }
}
