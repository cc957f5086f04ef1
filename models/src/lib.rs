//! weaver's models: configs and flavors, the CoCa-shaped multimodal transformer (ViT image
//! encoder, unimodal and multimodal text layers, contrastive / captioning / matching
//! heads), the tokenizer and the synthetic image-caption dataset.

pub mod config;
pub mod device;
pub mod error;

pub use config::{Fusion, JobConfig, ModelConfig};
pub use error::ModelError;
