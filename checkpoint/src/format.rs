//! The safetensors container: an 8-byte little-endian header length, a JSON header
//! (`{"name": {"dtype", "shape", "data_offsets"}, "__metadata__": {..}}`), then the tensors'
//! bytes back to back. Shards and exports are plain safetensors files, so any safetensors
//! reader opens them; the header is padded with spaces to a multiple of 8 bytes so that the
//! data starts aligned.

use std::collections::BTreeMap;

use serde_json::{json, Map, Value};

use crate::dtype::Dtype;

/// Headers larger than this are refused when parsing (the safetensors limit).
pub(crate) const MAX_HEADER: u64 = 100_000_000;

/// One tensor as a header describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct HeaderTensor {
    pub(crate) name: String,
    pub(crate) dtype: Dtype,
    pub(crate) shape: Vec<u64>,
    /// Byte range relative to the start of the data section.
    pub(crate) data: (u64, u64),
}

/// A parsed header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Header {
    pub(crate) tensors: Vec<HeaderTensor>,
    pub(crate) metadata: BTreeMap<String, String>,
    /// Bytes before the data section (8 + JSON length).
    pub(crate) data_start: u64,
}

/// Builds the header bytes (length prefix included) for tensors laid out in the given order.
/// Returns the bytes and each tensor's absolute byte range in the file.
pub(crate) fn build_header(
    tensors: &[(&str, Dtype, &[u64])],
    metadata: &BTreeMap<String, String>,
) -> (Vec<u8>, Vec<(u64, u64)>) {
    let mut map = Map::new();
    if !metadata.is_empty() {
        map.insert("__metadata__".into(), json!(metadata));
    }
    let mut rel = Vec::with_capacity(tensors.len());
    let mut at = 0u64;
    for (name, dtype, shape) in tensors {
        let n = shape.iter().product::<u64>() * dtype.size();
        map.insert(
            (*name).to_string(),
            json!({"dtype": dtype.as_str(), "shape": shape, "data_offsets": [at, at + n]}),
        );
        rel.push((at, at + n));
        at += n;
    }
    let mut text = Value::Object(map).to_string().into_bytes();
    let pad = (8 - text.len() % 8) % 8;
    text.resize(text.len() + pad, b' ');
    let data_start = 8 + text.len() as u64;
    let mut out = Vec::with_capacity(data_start as usize);
    out.extend_from_slice(&(text.len() as u64).to_le_bytes());
    out.extend_from_slice(&text);
    let abs = rel
        .into_iter()
        .map(|(s, e)| (data_start + s, data_start + e))
        .collect();
    (out, abs)
}

/// Reads the length prefix: how many JSON bytes follow the first 8.
pub(crate) fn header_len(prefix: &[u8]) -> Result<u64, String> {
    let bytes: [u8; 8] = prefix
        .get(..8)
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| format!("file too short for a header ({} bytes)", prefix.len()))?;
    let n = u64::from_le_bytes(bytes);
    if n > MAX_HEADER {
        return Err(format!(
            "header length {n} is implausible (over {MAX_HEADER})"
        ));
    }
    Ok(n)
}

/// Parses the JSON header that follows the length prefix.
pub(crate) fn parse_header(json_bytes: &[u8]) -> Result<Header, String> {
    let v: Value =
        serde_json::from_slice(json_bytes).map_err(|e| format!("header is not JSON: {e}"))?;
    let Value::Object(map) = v else {
        return Err("header is not a JSON object".into());
    };
    let mut tensors = Vec::new();
    let mut metadata = BTreeMap::new();
    for (name, entry) in map {
        if name == "__metadata__" {
            metadata = serde_json::from_value(entry)
                .map_err(|e| format!("__metadata__ is not a string map: {e}"))?;
            continue;
        }
        let bad = |what: &str| format!("tensor {name}: {what}");
        let dtype: Dtype = entry
            .get("dtype")
            .and_then(Value::as_str)
            .ok_or_else(|| bad("no dtype"))?
            .parse()
            .map_err(|e: String| bad(&e))?;
        let shape: Vec<u64> = entry
            .get("shape")
            .cloned()
            .and_then(|s| serde_json::from_value(s).ok())
            .ok_or_else(|| bad("no shape"))?;
        let offs: [u64; 2] = entry
            .get("data_offsets")
            .cloned()
            .and_then(|s| serde_json::from_value(s).ok())
            .ok_or_else(|| bad("no data_offsets"))?;
        let numel = shape
            .iter()
            .try_fold(1u64, |a, &b| a.checked_mul(b))
            .ok_or_else(|| bad("shape overflows"))?;
        if offs[1] < offs[0] || numel.checked_mul(dtype.size()) != Some(offs[1] - offs[0]) {
            return Err(bad("data_offsets disagree with dtype and shape"));
        }
        tensors.push(HeaderTensor {
            name,
            dtype,
            shape,
            data: (offs[0], offs[1]),
        });
    }
    tensors.sort_by_key(|t| t.data);
    Ok(Header {
        tensors,
        metadata,
        data_start: 8 + json_bytes.len() as u64,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips_and_aligns() {
        let meta = BTreeMap::from([("k".to_string(), "v".to_string())]);
        let (bytes, ranges) = build_header(
            &[
                ("a", Dtype::F32, &[2, 3]),
                ("b", Dtype::U8, &[5]),
                ("s", Dtype::I64, &[]),
            ],
            &meta,
        );
        assert_eq!(bytes.len() % 8, 0);
        let n = header_len(&bytes).unwrap();
        let h = parse_header(&bytes[8..8 + n as usize]).unwrap();
        assert_eq!(h.metadata, meta);
        assert_eq!(h.data_start, bytes.len() as u64);
        assert_eq!(h.tensors.len(), 3);
        assert_eq!(h.tensors[0].name, "a");
        assert_eq!(h.tensors[0].data, (0, 24));
        assert_eq!(h.tensors[1].data, (24, 29));
        assert_eq!(h.tensors[2].shape, Vec::<u64>::new());
        assert_eq!(ranges[2], (h.data_start + 29, h.data_start + 37));
    }

    #[test]
    fn bad_headers_are_errors_not_panics() {
        assert!(header_len(&[1, 2]).is_err());
        assert!(header_len(&u64::MAX.to_le_bytes()).is_err());
        assert!(parse_header(b"[1]").is_err());
        assert!(
            parse_header(b"{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,4]}}")
                .is_err()
        );
        assert!(
            parse_header(b"{\"a\":{\"dtype\":\"C64\",\"shape\":[2],\"data_offsets\":[0,16]}}")
                .is_err()
        );
        assert!(parse_header(b"\xff").is_err());
    }
}
