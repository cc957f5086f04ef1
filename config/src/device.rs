//! The `train.device` string, parsed without libtorch (the model crate maps it to a
//! `tch::Device`).

use crate::error::ConfigError;

/// A device named in the config.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceName {
    /// `cpu`.
    Cpu,
    /// `cuda` (index 0) or `cuda:K`.
    Cuda(usize),
}

impl DeviceName {
    /// Parses `cpu`, `cuda` or `cuda:K`.
    pub fn parse(s: &str) -> Result<DeviceName, ConfigError> {
        let bad = || ConfigError::BadConfig {
            key: "train.device".into(),
            message: format!("unknown device {s:?}; use cpu, cuda or cuda:K"),
        };
        match s {
            "cpu" => Ok(DeviceName::Cpu),
            "cuda" => Ok(DeviceName::Cuda(0)),
            _ => {
                let k = s.strip_prefix("cuda:").ok_or_else(bad)?;
                k.parse::<usize>().map(DeviceName::Cuda).map_err(|_| bad())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_three_forms_and_names_the_key() {
        assert_eq!(DeviceName::parse("cpu").unwrap(), DeviceName::Cpu);
        assert_eq!(DeviceName::parse("cuda").unwrap(), DeviceName::Cuda(0));
        assert_eq!(DeviceName::parse("cuda:3").unwrap(), DeviceName::Cuda(3));
        for bad in ["gpu", "cuda:", "cuda:x", "CPU"] {
            let e = DeviceName::parse(bad).unwrap_err();
            assert_eq!(
                e.to_string(),
                format!(
                    "bad config `train.device`: unknown device {bad:?}; use cpu, cuda or cuda:K"
                )
            );
        }
    }
}
