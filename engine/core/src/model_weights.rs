//! A loaded model's weights in the form its device takes them.
//!
//! The CPU backend computes from a host [`LlamaModel`] (f32 or quantised rows). The CUDA backend
//! uploads the loaded tensors one at a time as bf16 and never builds the host model: for
//! Llama-3-8B that model is 32 GB of f32 on the host and minutes of conversion before the first
//! byte reaches the GPU.
//!
//! Invariant: tensors are uploaded at most once. Building a CUDA runner from
//! [`ModelWeights::Tensors`] consumes them and leaves [`ModelWeights::Uploaded`] (even when the
//! upload fails), which refuses a second runner with a typed error instead of uploading an
//! empty model; a device that cannot take tensors at all is refused before they are taken.

use std::collections::HashMap;

use convoy_weights::{ModelConfig, Tensor};

use crate::backend::BackendError;
use crate::device::{cpu_takes_a_host_model, Device, WeightSource};
use crate::generate::GeneratorConfig;
use crate::model::llama::LlamaModel;
use crate::runner::ModelRunner;

/// A model's weights, held as its device computes from them.
pub enum ModelWeights {
    /// A host model, for the CPU backend (and tools that compute on the host).
    Host(LlamaModel),
    /// Tensors as loaded, not yet uploaded to a device.
    Tensors {
        /// Shape and hyper-parameters.
        config: ModelConfig,
        /// Tensors by Hugging Face name.
        tensors: HashMap<String, Tensor>,
    },
    /// Tensors already handed to a device's runner.
    Uploaded {
        /// Shape and hyper-parameters.
        config: ModelConfig,
    },
}

impl ModelWeights {
    /// The model's shape and hyper-parameters.
    pub fn config(&self) -> &ModelConfig {
        match self {
            ModelWeights::Host(model) => &model.config,
            ModelWeights::Tensors { config, .. } | ModelWeights::Uploaded { config } => config,
        }
    }

    /// The host model, when the weights are held as one.
    pub fn host_model(&self) -> Option<&LlamaModel> {
        match self {
            ModelWeights::Host(model) => Some(model),
            _ => None,
        }
    }

    /// The host model, mutably (precision and KV dtype are set on it).
    pub fn host_model_mut(&mut self) -> Option<&mut LlamaModel> {
        match self {
            ModelWeights::Host(model) => Some(model),
            _ => None,
        }
    }

    /// The runner for these weights on `device`, with the KV storage and workspace `cfg` asks
    /// for. Loaded tensors are consumed by the upload (see the module's invariant).
    pub fn runner<'m>(
        &'m mut self,
        device: Device,
        cfg: &GeneratorConfig,
    ) -> Result<Box<dyn ModelRunner + 'm>, BackendError> {
        match self {
            ModelWeights::Host(model) => device.runner(model, cfg),
            ModelWeights::Tensors { .. } if !device.is_cuda() => Err(cpu_takes_a_host_model()),
            ModelWeights::Tensors { config, tensors } => {
                let source = WeightSource::Tensors {
                    config: config.clone(),
                    tensors: std::mem::take(tensors),
                };
                *self = ModelWeights::Uploaded {
                    config: config.clone(),
                };
                device.runner_from(source, cfg)
            }
            ModelWeights::Uploaded { .. } => Err(BackendError::OutOfOrder {
                backend: device.as_str(),
                what: "a runner from weights an earlier upload consumed (whether or not it \
                       succeeded); load the model again for another",
            }),
        }
    }
}
