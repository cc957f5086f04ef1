//! Device and dtype selection from the config's strings.

use tch::{Device, Kind};
use weaver_config::device::DeviceName;

use crate::error::ModelError;

/// Parses `cpu`, `cuda` or `cuda:K` (the parsing is `weaver_config`'s [`DeviceName`]).
pub fn parse_device(s: &str) -> Result<Device, ModelError> {
    Ok(match DeviceName::parse(s)? {
        DeviceName::Cpu => Device::Cpu,
        DeviceName::Cuda(k) => Device::Cuda(k),
    })
}

/// Checks that a parsed device exists on this machine.
pub fn check_device(device: Device) -> Result<(), ModelError> {
    if let Device::Cuda(k) = device {
        let n = tch::Cuda::device_count() as usize;
        if k >= n {
            return Err(ModelError::BadConfig {
                key: "train.device".into(),
                message: if n == 0 {
                    "cuda requested but libtorch sees no CUDA device; use device = \"cpu\"".into()
                } else {
                    format!("cuda:{k} requested but only {n} CUDA device(s) exist")
                },
            });
        }
    }
    Ok(())
}

/// The compute dtype: `auto` is bf16 on CUDA and f32 on CPU.
pub fn compute_kind(dtype: &str, device: Device) -> Result<Kind, ModelError> {
    match (dtype, device) {
        ("f32", _) => Ok(Kind::Float),
        ("bf16", _) => Ok(Kind::BFloat16),
        ("auto", Device::Cpu) => Ok(Kind::Float),
        ("auto", _) => Ok(Kind::BFloat16),
        _ => Err(ModelError::BadConfig {
            key: "train.dtype".into(),
            message: format!("unknown dtype {dtype:?}; use auto, f32 or bf16"),
        }),
    }
}
