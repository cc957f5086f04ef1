//! weaver's models: configs and flavors, the CoCa-shaped multimodal transformer (ViT image
//! encoder, unimodal and multimodal text layers, contrastive / captioning / matching
//! heads), the tokenizer and the synthetic image-caption dataset.

pub mod data;
pub mod device;
pub mod error;
pub mod lora;
pub mod model;
pub mod nn;
pub mod objectives;
pub mod quant;
pub mod tokenizer;

pub use config::{Fusion, JobConfig, ModelConfig};
pub use error::ModelError;
pub use model::{decode, Acts, LossWeights, Losses, Model};
/// The job configuration, from the serde-only `weaver-config` crate (where it lives since
/// the control plane stopped linking libtorch); `weaver_models::config::…` keeps working.
pub use weaver_config::config;
pub use weaver_config::ConfigError;
