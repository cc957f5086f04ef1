//! weaver-compress: making a trained model smaller, and loading any checkpoint to run it.
//!
//! | module | owns |
//! |---|---|
//! | [`load`] | one loader for plain, quantized and pruned checkpoints (any TP part, any layers) |
//! | [`quantize`](mod@quantize) | `weaver ckpt quantize`: int8 weights (+ scales), calibration |
//!
//! The int8 arithmetic itself is model code ([`weaver_models::quant`]), and caption decoding
//! with a key/value cache is [`weaver_models::decode`]; this crate works on checkpoints.

pub mod error;
pub mod load;
pub mod quantize;

pub use error::{CompressError, Result};
pub use load::{load, load_checkpoint, LoadOptions, Loaded, QuantInfo, Scheme};
pub use quantize::{quantize, quantize_with, HeldoutShards, QuantizeOptions, QuantizeReport};
