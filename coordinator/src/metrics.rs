//! The job's `metrics.jsonl` (DESIGN.md, "The CLI contract"): one JSON object a line,
//! appended as heartbeats bring them and flushed at once so that a person can `tail -f` it.

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::error::{CoordinatorError, Result};

/// The file name inside the run directory.
pub const METRICS_FILE: &str = "metrics.jsonl";

/// Appends lines to `<run_dir>/metrics.jsonl` and, with `train.tensorboard`, to a
/// TensorBoard event file beside it.
#[derive(Debug)]
pub(crate) struct MetricsFile {
    path: PathBuf,
    out: BufWriter<File>,
    tensorboard: Option<weaver_tensorboard::EventWriter>,
}

impl MetricsFile {
    pub(crate) fn open(run_dir: &Path, tensorboard: bool) -> Result<MetricsFile> {
        let io = |path: &Path, e: std::io::Error| CoordinatorError::Io {
            path: path.display().to_string(),
            message: e.to_string(),
        };
        std::fs::create_dir_all(run_dir).map_err(|e| io(run_dir, e))?;
        let path = run_dir.join(METRICS_FILE);
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| io(&path, e))?;
        let tensorboard = if tensorboard {
            Some(
                weaver_tensorboard::EventWriter::create(run_dir).map_err(|e| {
                    CoordinatorError::Io {
                        path: run_dir.display().to_string(),
                        message: e.to_string(),
                    }
                })?,
            )
        } else {
            None
        };
        Ok(MetricsFile {
            path,
            out: BufWriter::new(file),
            tensorboard,
        })
    }

    pub(crate) fn write(&mut self, lines: &[Value]) {
        let result = lines
            .iter()
            .try_for_each(|l| writeln!(self.out, "{l}"))
            .and_then(|()| self.out.flush());
        if let Err(e) = result {
            tracing::error!(path = %self.path.display(), "cannot write metrics: {e}");
        }
        if let Some(tb) = &mut self.tensorboard {
            if let Err(e) = lines.iter().try_for_each(|l| tb.write_line(l)) {
                tracing::error!("cannot write TensorBoard events: {e}");
            }
        }
    }
}
