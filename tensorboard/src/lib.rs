//! weaver-tensorboard: TensorBoard event files from weaver's metrics lines, with no
//! TensorFlow and no Python.
//!
//! An event file is a TFRecord stream (each record: the length as a little-endian `u64`,
//! the masked CRC-32C of those 8 bytes, the data, the masked CRC-32C of the data) of
//! `tensorflow.Event` protos: first one carrying `file_version = "brain.Event:2"`, then one
//! per step carrying a `Summary` of `simple_value` scalars, which TensorBoard's
//! `EventAccumulator` shows as scalars. The protos are the few fields of TensorFlow's
//! `event.proto` and `summary.proto` that scalars use, with their field numbers.
//!
//! [`EventWriter::write_line`] takes a `metrics.jsonl` line (a JSON object with `step`):
//! every other numeric field becomes a scalar tagged `train/<key>`, or `eval/<key>` on an
//! evaluation line (`"eval": true`).

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

/// What can go wrong writing event files.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum TensorBoardError {
    /// The event file cannot be created or written (the run directory, a full disk).
    #[error("{path}: {source}")]
    Io {
        /// The event file.
        path: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

/// `tensorflow.Event`, the fields scalars need.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Event {
    /// Seconds since the epoch.
    #[prost(double, tag = "1")]
    pub wall_time: f64,
    /// The training step.
    #[prost(int64, tag = "2")]
    pub step: i64,
    /// What the event carries.
    #[prost(oneof = "What", tags = "3, 5")]
    pub what: Option<What>,
}

/// `Event.what`.
#[derive(Clone, PartialEq, prost::Oneof)]
pub enum What {
    /// The first event of a file: `brain.Event:2`.
    #[prost(string, tag = "3")]
    FileVersion(String),
    /// Values at this step.
    #[prost(message, tag = "5")]
    Summary(Summary),
}

/// `tensorflow.Summary`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Summary {
    /// The values.
    #[prost(message, repeated, tag = "1")]
    pub value: Vec<SummaryValue>,
}

/// `tensorflow.Summary.Value` with a `simple_value` (a scalar).
#[derive(Clone, PartialEq, prost::Message)]
pub struct SummaryValue {
    /// The series' name.
    #[prost(string, tag = "1")]
    pub tag: String,
    /// The scalar.
    #[prost(float, optional, tag = "2")]
    pub simple_value: Option<f32>,
}

/// TFRecord's checksum: CRC-32C, rotated right by 15 bits, plus a constant (so that a CRC of
/// data holding CRCs is not trivially related to them).
pub fn masked_crc32c(data: &[u8]) -> u32 {
    let crc = crc32c::crc32c(data);
    crc.rotate_right(15).wrapping_add(0xa282_ead8)
}

/// One TFRecord record holding `data`.
pub fn record(data: &[u8]) -> Vec<u8> {
    let len = (data.len() as u64).to_le_bytes();
    let mut out = Vec::with_capacity(data.len() + 16);
    out.extend_from_slice(&len);
    out.extend_from_slice(&masked_crc32c(&len).to_le_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(&masked_crc32c(data).to_le_bytes());
    out
}

/// Appends events to one new event file in a directory.
#[derive(Debug)]
pub struct EventWriter {
    path: PathBuf,
    out: BufWriter<File>,
}

impl EventWriter {
    /// Creates `dir/events.out.tfevents.<unix seconds>.<host>.<pid>` (a new file for each
    /// process: a resumed run adds one, and TensorBoard reads them in order) and writes the
    /// file-version event.
    pub fn create(dir: &Path) -> Result<EventWriter, TensorBoardError> {
        let io = |path: &Path, source| TensorBoardError::Io {
            path: path.display().to_string(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .ok()
            .filter(|h| !h.is_empty() && !h.contains('/'))
            .unwrap_or_else(|| "localhost".into());
        let secs = wall_time() as u64;
        let path = dir.join(format!(
            "events.out.tfevents.{secs}.{host}.{}",
            std::process::id()
        ));
        let file = File::options()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| io(&path, e))?;
        let mut w = EventWriter {
            path,
            out: BufWriter::new(file),
        };
        w.write_event(&Event {
            wall_time: wall_time(),
            step: 0,
            what: Some(What::FileVersion("brain.Event:2".into())),
        })?;
        Ok(w)
    }

    /// The event file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes scalars `(tag, value)` at `step`, as one event, and flushes.
    pub fn scalars(&mut self, step: u64, values: &[(String, f64)]) -> Result<(), TensorBoardError> {
        if values.is_empty() {
            return Ok(());
        }
        self.write_event(&Event {
            wall_time: wall_time(),
            step: step as i64,
            what: Some(What::Summary(Summary {
                value: values
                    .iter()
                    .map(|(tag, v)| SummaryValue {
                        tag: tag.clone(),
                        simple_value: Some(*v as f32),
                    })
                    .collect(),
            })),
        })
    }

    /// Writes a `metrics.jsonl` line (see the crate docs); lines without a `step` (the
    /// final `{"done": true, ...}`) are skipped.
    pub fn write_line(&mut self, line: &serde_json::Value) -> Result<(), TensorBoardError> {
        let Some(obj) = line.as_object() else {
            return Ok(());
        };
        let Some(step) = obj.get("step").and_then(|s| s.as_u64()) else {
            return Ok(());
        };
        if obj
            .get("done")
            .is_some_and(|d| d == &serde_json::Value::Bool(true))
        {
            return Ok(());
        }
        let eval = obj.get("eval") == Some(&serde_json::Value::Bool(true));
        let group = if eval { "eval" } else { "train" };
        // Numbers, and arrays of numbers (one per rank, e.g. peak_mem_bytes_ranks) as one
        // scalar per index: `train/peak_mem_bytes_ranks/3`.
        let mut values: Vec<(String, f64)> = Vec::new();
        for (k, v) in obj
            .iter()
            .filter(|(k, _)| !matches!(k.as_str(), "step" | "eval" | "rank"))
        {
            if let Some(x) = v.as_f64() {
                values.push((format!("{group}/{k}"), x));
            } else if let Some(items) = v.as_array() {
                for (i, x) in items.iter().enumerate() {
                    if let Some(x) = x.as_f64() {
                        values.push((format!("{group}/{k}/{i}"), x));
                    }
                }
            }
        }
        self.scalars(step, &values)
    }

    fn write_event(&mut self, e: &Event) -> Result<(), TensorBoardError> {
        let data = prost::Message::encode_to_vec(e);
        self.out
            .write_all(&record(&data))
            .and_then(|()| self.out.flush())
            .map_err(|source| TensorBoardError::Io {
                path: self.path.display().to_string(),
                source,
            })
    }
}

fn wall_time() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    /// TFRecord's reference values: the masked CRC of empty data, and of the 8-byte
    /// little-endian length 0 (TensorFlow's `record_writer` framing of an empty record).
    #[test]
    fn masked_crc_matches_tensorflow() {
        // crc32c("") = 0, so the mask alone: 0 rotated, plus the constant.
        assert_eq!(masked_crc32c(b""), 0xa282_ead8);
        // crc32c("123456789") = 0xe3069283 (the CRC-32C check value).
        let crc: u32 = 0xe306_9283;
        assert_eq!(
            masked_crc32c(b"123456789"),
            crc.rotate_right(15).wrapping_add(0xa282_ead8)
        );
        let r = record(b"abc");
        assert_eq!(r.len(), 8 + 4 + 3 + 4);
        assert_eq!(&r[..8], &3u64.to_le_bytes());
        assert_eq!(&r[12..15], b"abc");
    }

    #[test]
    fn lines_become_scalar_events() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = EventWriter::create(dir.path()).unwrap();
        w.write_line(
            &serde_json::json!({"step": 3, "loss": 1.5, "lr": 0.001, "rank": 0, "generation": 1,
                "peak_mem_bytes_ranks": [10, 20]}),
        )
        .unwrap();
        w.write_line(&serde_json::json!({"eval": true, "step": 3, "i2t_r1": 0.25}))
            .unwrap();
        w.write_line(&serde_json::json!({"done": true, "step": 3}))
            .unwrap();
        let bytes = std::fs::read(w.path()).unwrap();
        let mut events = Vec::new();
        let mut at = 0;
        while at < bytes.len() {
            let len = u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap()) as usize;
            let data = &bytes[at + 12..at + 12 + len];
            let crc = u32::from_le_bytes(bytes[at + 12 + len..at + 16 + len].try_into().unwrap());
            assert_eq!(crc, masked_crc32c(data));
            events.push(Event::decode(data).unwrap());
            at += 16 + len;
        }
        assert_eq!(events.len(), 3);
        assert_eq!(
            events[0].what,
            Some(What::FileVersion("brain.Event:2".into()))
        );
        let Some(What::Summary(s)) = &events[1].what else {
            panic!("{:?}", events[1])
        };
        let mut tags: Vec<&str> = s.value.iter().map(|v| v.tag.as_str()).collect();
        tags.sort_unstable();
        assert_eq!(
            tags,
            [
                "train/generation",
                "train/loss",
                "train/lr",
                "train/peak_mem_bytes_ranks/0",
                "train/peak_mem_bytes_ranks/1"
            ]
        );
        assert_eq!(events[1].step, 3);
        let Some(What::Summary(s)) = &events[2].what else {
            panic!("{:?}", events[2])
        };
        assert_eq!(s.value[0].tag, "eval/i2t_r1");
        assert_eq!(s.value[0].simple_value, Some(0.25));
    }
}
