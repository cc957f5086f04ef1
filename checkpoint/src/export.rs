//! Export: one consolidated safetensors file holding every (or every selected) global
//! tensor whole, under its saved name, readable by `safetensors.torch.load_file`. Tensors are
//! assembled one at a time (memory: the largest tensor), each read with checksum checks, and
//! the file is written to `OUT.partial`, fsync'd and renamed into place.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::{CheckpointError, Result};
use crate::format::build_header;
use crate::reader::{Checkpoint, SliceRequest};
use crate::slice::Slice;

/// What [`export`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportReport {
    /// The file.
    pub path: PathBuf,
    /// Tensors written.
    pub tensors: usize,
    /// Size of the file.
    pub bytes: u64,
}

/// Writes the tensors of `ckpt` whose names `keep` accepts (`|_| true` for everything:
/// parameters, optimizer state and the small state tensors alike) to the local file `out`.
/// The file's `__metadata__` holds `format: pt`, `weaver.step` and `weaver.source`.
pub async fn export(
    ckpt: &Checkpoint,
    out: &Path,
    keep: &(dyn Fn(&str) -> bool + Sync),
) -> Result<ExportReport> {
    let names: Vec<&String> = ckpt.manifest().tensors.keys().filter(|n| keep(n)).collect();
    let entries: Vec<(&str, crate::dtype::Dtype, &[u64])> = names
        .iter()
        .map(|n| {
            let t = &ckpt.manifest().tensors[*n];
            (n.as_str(), t.dtype, t.shape.as_slice())
        })
        .collect();
    let metadata = BTreeMap::from([
        ("format".to_string(), "pt".to_string()),
        ("weaver.step".to_string(), ckpt.step().to_string()),
        ("weaver.source".to_string(), ckpt.url()),
    ]);
    let (header, ranges) = build_header(&entries, &metadata);
    let io = |path: &Path| {
        let path = path.display().to_string();
        move |source| CheckpointError::Io { path, source }
    };
    let mut partial = out.as_os_str().to_owned();
    partial.push(".partial");
    let partial = PathBuf::from(partial);
    let mut file = std::io::BufWriter::with_capacity(
        8 << 20,
        std::fs::File::create(&partial).map_err(io(&partial))?,
    );
    file.write_all(&header).map_err(io(&partial))?;
    for (name, range) in names.iter().zip(&ranges) {
        let t = &ckpt.manifest().tensors[*name];
        let out = crate::reader::Out::Bytes(vec![0u8; (range.1 - range.0) as usize]);
        let mut outs = ckpt
            .read_owned(
                &[SliceRequest::new(
                    name.as_str(),
                    Slice::full(&t.shape).ranges(),
                )],
                vec![out],
            )
            .await?;
        let Some(crate::reader::Out::Bytes(buf)) = outs.pop() else {
            return Err(CheckpointError::UnknownTensor {
                object: ckpt.url(),
                tensor: name.to_string(),
            });
        };
        file.write_all(&buf).map_err(io(&partial))?;
    }
    let file = file.into_inner().map_err(|e| CheckpointError::Io {
        path: partial.display().to_string(),
        source: e.into_error(),
    })?;
    file.sync_all().map_err(io(&partial))?;
    drop(file);
    std::fs::rename(&partial, out).map_err(io(out))?;
    let bytes = ranges.last().map_or(header.len() as u64, |r| r.1);
    Ok(ExportReport {
        path: out.to_path_buf(),
        tensors: names.len(),
        bytes,
    })
}
