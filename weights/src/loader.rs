//! Entry point: turn a path into a [`LoadedModel`] (config, tensors by Hugging Face name,
//! tokenizer and chat template), whatever the format on disk.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use tokenizers::Tokenizer;

use crate::config::RopeScaling;
use crate::gguf::GgufFile;
use crate::{
    dummy, safetensors, tokenizer, Architecture, ChatTemplate, DType, ModelConfig, Result, Tensor,
    WeightsError,
};

/// How to obtain the weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LoadFormat {
    /// Read them from the files at the path.
    Auto,
    /// Random weights of the stored element type for the config at the path (`config.json`).
    Dummy(DType),
}

/// A model ready for the engine.
pub struct LoadedModel {
    /// A short display name (file or directory name).
    pub name: String,
    /// Shape and hyper-parameters.
    pub config: ModelConfig,
    /// Tensors by Hugging Face name, row-major.
    pub tensors: HashMap<String, Tensor>,
    /// The tokenizer, when the model ships one.
    pub tokenizer: Option<Tokenizer>,
    /// The chat template, when the model ships one.
    pub chat_template: Option<ChatTemplate>,
}

impl std::fmt::Debug for LoadedModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadedModel")
            .field("name", &self.name)
            .field("config", &self.config)
            .field("tensors", &self.tensors.len())
            .finish_non_exhaustive()
    }
}

/// Load the model at `path`: a `.gguf` file, or a Hugging Face directory
/// (`config.json`, `*.safetensors`, `tokenizer.json`).
pub fn load_model(path: &Path, format: LoadFormat) -> Result<LoadedModel> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.display().to_string());
    if !path.exists() {
        return Err(WeightsError::NotFound(path.to_path_buf()));
    }
    if path.is_file() {
        if let LoadFormat::Dummy(dtype) = format {
            let config = read_hf_config(path)?;
            let tensors = dummy::tensors(&config, dtype, 0);
            return Ok(LoadedModel {
                name,
                config,
                tensors,
                tokenizer: None,
                chat_template: None,
            });
        }
        return load_gguf(path, name);
    }
    let config_path = path.join("config.json");
    if !config_path.exists() {
        return Err(WeightsError::NotFound(path.to_path_buf()));
    }
    let config = read_hf_config(&config_path)?;
    let tensors = match format {
        LoadFormat::Auto => safetensors::read_dir(path)?,
        LoadFormat::Dummy(dtype) => dummy::tensors(&config, dtype, 0),
    };
    let tok_path = path.join("tokenizer.json");
    let tokenizer = if tok_path.exists() {
        let text =
            std::fs::read_to_string(&tok_path).map_err(|e| WeightsError::io(&tok_path, e))?;
        Some(tokenizer::from_json(&text)?)
    } else {
        None
    };
    let chat_template = hf_chat_template(path, tokenizer.as_ref(), &config)?;
    Ok(LoadedModel {
        name,
        config,
        tensors,
        tokenizer,
        chat_template,
    })
}

fn read_hf_config(path: &Path) -> Result<ModelConfig> {
    let text = std::fs::read_to_string(path).map_err(|e| WeightsError::io(path, e))?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| WeightsError::corrupt(path, format!("not JSON: {e}")))?;
    ModelConfig::from_hf_json(&v)
}

fn token_text(tok: Option<&Tokenizer>, id: Option<u32>) -> String {
    match (tok, id) {
        (Some(t), Some(id)) => t.id_to_token(id).unwrap_or_default(),
        _ => String::new(),
    }
}

/// Compile a chat template with the model's BOS and EOS texts.
fn template(source: &str, tok: Option<&Tokenizer>, cfg: &ModelConfig) -> Result<ChatTemplate> {
    let bos = token_text(tok, cfg.bos_token_id);
    let eos = token_text(tok, cfg.eos_token_ids.first().copied());
    ChatTemplate::new(source, &bos, &eos)
}

fn hf_chat_template(
    dir: &Path,
    tok: Option<&Tokenizer>,
    cfg: &ModelConfig,
) -> Result<Option<ChatTemplate>> {
    let p: PathBuf = dir.join("tokenizer_config.json");
    if !p.exists() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&p).map_err(|e| WeightsError::io(&p, e))?;
    let v: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| WeightsError::corrupt(&p, e.to_string()))?;
    let Some(source) = v.get("chat_template").and_then(|t| t.as_str()) else {
        return Ok(None);
    };
    Ok(Some(template(source, tok, cfg)?))
}

/// GGUF tensor name -> Hugging Face name.
fn hf_name(gguf_name: &str) -> Option<String> {
    let fixed = match gguf_name {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(f) = fixed {
        return Some(f.to_string());
    }
    let rest = gguf_name.strip_prefix("blk.")?;
    let (layer, leaf) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (base, kind) = leaf.rsplit_once('.')?;
    let hf = match base {
        "attn_norm" => "input_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf}.{kind}"))
}

fn gguf_config(g: &GgufFile) -> Result<ModelConfig> {
    let arch_name = g
        .get("general.architecture")
        .and_then(|v| v.as_str())
        .ok_or_else(|| WeightsError::InvalidConfig("GGUF has no general.architecture".into()))?
        .to_string();
    let architecture = Architecture::parse(&arch_name)?;
    let key = |k: &str| format!("{arch_name}.{k}");
    let req = |k: &str| -> Result<usize> {
        g.get(&key(k))
            .and_then(|v| v.as_u64())
            .map(|v| v as usize)
            .ok_or_else(|| {
                WeightsError::InvalidConfig(format!("GGUF metadata {} is missing", key(k)))
            })
    };
    let hidden_size = req("embedding_length")?;
    let num_heads = req("attention.head_count")?;
    let vocab_size = match g.get(&key("vocab_size")).and_then(|v| v.as_u64()) {
        Some(v) => v as usize,
        None => g
            .get("tokenizer.ggml.tokens")
            .and_then(|t| t.as_array())
            .map(|a| a.len())
            .ok_or_else(|| WeightsError::InvalidConfig("GGUF has no vocabulary size".into()))?,
    };
    let opt_u32 = |k: &str| g.get(k).and_then(|v| v.as_u64()).map(|v| v as u32);
    let mut eos_token_ids: Vec<u32> = opt_u32("tokenizer.ggml.eos_token_id").into_iter().collect();
    if let Some(eot) = opt_u32("tokenizer.ggml.eot_token_id") {
        if !eos_token_ids.contains(&eot) {
            eos_token_ids.push(eot);
        }
    }
    let cfg = ModelConfig {
        architecture,
        vocab_size,
        hidden_size,
        intermediate_size: req("feed_forward_length")?,
        num_layers: req("block_count")?,
        num_heads,
        num_kv_heads: req("attention.head_count_kv").unwrap_or(num_heads),
        head_dim: req("rope.dimension_count").unwrap_or(hidden_size / num_heads.max(1)),
        rope_theta: g
            .get(&key("rope.freq_base"))
            .and_then(|v| v.as_f64())
            .unwrap_or(10000.0) as f32,
        rope_scaling: RopeScaling::None,
        rms_norm_eps: g
            .get(&key("attention.layer_norm_rms_epsilon"))
            .and_then(|v| v.as_f64())
            .unwrap_or(1e-5) as f32,
        tie_word_embeddings: !g.tensors.iter().any(|t| t.name == "output.weight"),
        max_position_embeddings: req("context_length").unwrap_or(4096),
        bos_token_id: opt_u32("tokenizer.ggml.bos_token_id"),
        eos_token_ids,
    };
    cfg.validate()?;
    Ok(cfg)
}

fn load_gguf(path: &Path, name: String) -> Result<LoadedModel> {
    let g = GgufFile::open(path)?;
    let mut config = gguf_config(&g)?;
    let permuted = g.get("general.architecture").and_then(|v| v.as_str()) == Some("llama");
    let mut tensors = HashMap::new();
    for info in &g.tensors {
        if info.name == "rope_freqs.weight" {
            let t = g.read_tensor(info, info.name.clone())?;
            config.rope_scaling = RopeScaling::Factors(t.to_f32());
            continue;
        }
        let Some(hf) = hf_name(&info.name) else {
            tracing::debug!(tensor = %info.name, "ignoring unknown GGUF tensor");
            continue;
        };
        let mut t = g.read_tensor(info, hf.clone())?;
        if permuted && t.shape.len() == 2 {
            if hf.ends_with("q_proj.weight") {
                t.unpermute_rope_rows(config.num_heads)?;
            } else if hf.ends_with("k_proj.weight") {
                t.unpermute_rope_rows(config.num_kv_heads)?;
            }
        }
        tensors.insert(hf, t);
    }
    // A vocabulary convoy cannot rebuild (e.g. SentencePiece) leaves the model usable with
    // token ids; say so instead of refusing the weights.
    let tokenizer = match tokenizer::from_gguf(&g) {
        Ok(t) => Some(t),
        Err(e) => {
            tracing::warn!(error = %e, "no tokenizer: prompts must be given as token ids");
            None
        }
    };
    let chat_template = match g.get("tokenizer.chat_template").and_then(|v| v.as_str()) {
        Some(src) => Some(template(src, tokenizer.as_ref(), &config)?),
        None => None,
    };
    Ok(LoadedModel {
        name,
        config,
        tensors,
        tokenizer,
        chat_template,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gguf_names_map_to_hf_names() {
        assert_eq!(
            hf_name("blk.12.attn_q.weight").as_deref(),
            Some("model.layers.12.self_attn.q_proj.weight")
        );
        assert_eq!(
            hf_name("blk.0.attn_k.bias").as_deref(),
            Some("model.layers.0.self_attn.k_proj.bias")
        );
        assert_eq!(
            hf_name("token_embd.weight").as_deref(),
            Some("model.embed_tokens.weight")
        );
        assert_eq!(hf_name("blk.x.attn_q.weight"), None);
    }
}
