//! weaver's models: configs and flavors, the CoCa-shaped multimodal transformer (ViT image
//! encoder, unimodal and multimodal text layers, contrastive / captioning / matching
//! heads), the tokenizer and the synthetic image-caption dataset.

pub mod config;
pub mod data;
pub mod device;
pub mod error;
pub mod model;
pub mod nn;
pub mod tokenizer;

pub use config::{Fusion, JobConfig, ModelConfig};
pub use error::ModelError;
pub use model::{Acts, LossWeights, Losses, Model};
