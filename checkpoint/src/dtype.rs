//! Element types a checkpoint can hold: the safetensors dtype names, their sizes, and the
//! mapping to and from tch's `Kind`.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use tch::Kind;

/// A tensor element type, spelled as safetensors spells it (`"F32"`, `"BF16"`, …).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Dtype {
    /// `bool`, one byte.
    #[serde(rename = "BOOL")]
    Bool,
    /// `u8`.
    #[serde(rename = "U8")]
    U8,
    /// `i8`.
    #[serde(rename = "I8")]
    I8,
    /// `i16`.
    #[serde(rename = "I16")]
    I16,
    /// `i32`.
    #[serde(rename = "I32")]
    I32,
    /// `i64`.
    #[serde(rename = "I64")]
    I64,
    /// IEEE half.
    #[serde(rename = "F16")]
    F16,
    /// bfloat16.
    #[serde(rename = "BF16")]
    BF16,
    /// `f32`.
    #[serde(rename = "F32")]
    F32,
    /// `f64`.
    #[serde(rename = "F64")]
    F64,
    /// float8 e5m2.
    #[serde(rename = "F8_E5M2")]
    F8E5M2,
    /// float8 e4m3fn.
    #[serde(rename = "F8_E4M3")]
    F8E4M3,
}

impl Dtype {
    /// Every supported dtype.
    pub const ALL: [Dtype; 12] = [
        Dtype::Bool,
        Dtype::U8,
        Dtype::I8,
        Dtype::I16,
        Dtype::I32,
        Dtype::I64,
        Dtype::F16,
        Dtype::BF16,
        Dtype::F32,
        Dtype::F64,
        Dtype::F8E5M2,
        Dtype::F8E4M3,
    ];

    /// Bytes per element.
    pub fn size(self) -> u64 {
        match self {
            Dtype::Bool | Dtype::U8 | Dtype::I8 | Dtype::F8E5M2 | Dtype::F8E4M3 => 1,
            Dtype::I16 | Dtype::F16 | Dtype::BF16 => 2,
            Dtype::I32 | Dtype::F32 => 4,
            Dtype::I64 | Dtype::F64 => 8,
        }
    }

    /// The safetensors name.
    pub fn as_str(self) -> &'static str {
        match self {
            Dtype::Bool => "BOOL",
            Dtype::U8 => "U8",
            Dtype::I8 => "I8",
            Dtype::I16 => "I16",
            Dtype::I32 => "I32",
            Dtype::I64 => "I64",
            Dtype::F16 => "F16",
            Dtype::BF16 => "BF16",
            Dtype::F32 => "F32",
            Dtype::F64 => "F64",
            Dtype::F8E5M2 => "F8_E5M2",
            Dtype::F8E4M3 => "F8_E4M3",
        }
    }

    /// The tch kind.
    pub fn kind(self) -> Kind {
        match self {
            Dtype::Bool => Kind::Bool,
            Dtype::U8 => Kind::Uint8,
            Dtype::I8 => Kind::Int8,
            Dtype::I16 => Kind::Int16,
            Dtype::I32 => Kind::Int,
            Dtype::I64 => Kind::Int64,
            Dtype::F16 => Kind::Half,
            Dtype::BF16 => Kind::BFloat16,
            Dtype::F32 => Kind::Float,
            Dtype::F64 => Kind::Double,
            Dtype::F8E5M2 => Kind::Float8e5m2,
            Dtype::F8E4M3 => Kind::Float8e4m3fn,
        }
    }

    /// The dtype of a tch kind; `None` for kinds safetensors cannot hold (complex,
    /// quantized, the fnuz float8 variants).
    pub fn from_kind(kind: Kind) -> Option<Dtype> {
        Some(match kind {
            Kind::Bool => Dtype::Bool,
            Kind::Uint8 => Dtype::U8,
            Kind::Int8 => Dtype::I8,
            Kind::Int16 => Dtype::I16,
            Kind::Int => Dtype::I32,
            Kind::Int64 => Dtype::I64,
            Kind::Half => Dtype::F16,
            Kind::BFloat16 => Dtype::BF16,
            Kind::Float => Dtype::F32,
            Kind::Double => Dtype::F64,
            Kind::Float8e5m2 => Dtype::F8E5M2,
            Kind::Float8e4m3fn => Dtype::F8E4M3,
            _ => return None,
        })
    }
}

impl fmt::Display for Dtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Dtype {
    type Err = String;

    fn from_str(s: &str) -> Result<Dtype, String> {
        Dtype::ALL
            .into_iter()
            .find(|d| d.as_str() == s)
            .ok_or_else(|| format!("unsupported dtype {s:?}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_kinds_and_sizes_agree() {
        for d in Dtype::ALL {
            assert_eq!(d.as_str().parse::<Dtype>(), Ok(d));
            assert_eq!(Dtype::from_kind(d.kind()), Some(d));
            assert_eq!(d.size() as usize, d.kind().elt_size_in_bytes());
            let json = serde_json::to_string(&d).unwrap();
            assert_eq!(json, format!("\"{}\"", d.as_str()));
        }
        assert_eq!(Dtype::from_kind(Kind::ComplexFloat), None);
    }
}
