//! The `weaver ckpt` subcommands as library functions: each takes a URL, prints a
//! human-readable report to a writer and returns the data (the binary maps them onto clap
//! subcommands and exit codes). They block, so call them from synchronous code.
//!
//! ```text
//! weaver ckpt ls URL                        -> cli::ls(url, &mut stdout)
//! weaver ckpt inspect URL[/step-N]          -> cli::inspect(url, &mut stdout)
//! weaver ckpt verify URL[/step-N]           -> cli::verify(url, &mut stdout)   (exit 1 unless report.is_ok())
//! weaver ckpt export URL[/step-N] OUT.safetensors -> cli::export(url, out, keep, &mut stdout)
//! ```
//! A URL without `/step-N` means the newest complete checkpoint under it.

use std::io::Write;
use std::path::Path;

use crate::commit::{list, ListedStep, StepState};
use crate::error::{CheckpointError, Result};
use crate::export::ExportReport;
use crate::manifest::Manifest;
use crate::reader::{resolve, Checkpoint, VerifyReport};
use crate::runtime::block_on;
use crate::store::CkptStore;

fn out_err(source: std::io::Error) -> CheckpointError {
    CheckpointError::Io {
        path: "output".into(),
        source,
    }
}

/// Human-readable byte count.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// `weaver ckpt ls URL`: every step directory with its state.
pub fn ls(url: &str, w: &mut dyn Write) -> Result<Vec<ListedStep>> {
    let store = CkptStore::open(url)?;
    let steps = block_on(list(&store))?;
    writeln!(w, "{}", store.url()).map_err(out_err)?;
    writeln!(
        w,
        "{:>10}  {:<11}  {:>6}  {:>7}  {:>10}  layout",
        "step", "state", "shards", "tensors", "size"
    )
    .map_err(out_err)?;
    for s in &steps {
        let mark = if s.latest { "  <- latest" } else { "" };
        match &s.state {
            StepState::Committed {
                shards,
                tensors,
                bytes,
                layout,
            } => writeln!(
                w,
                "{:>10}  {:<11}  {shards:>6}  {tensors:>7}  {:>10}  dp={} pp={} tp={}{mark}",
                s.step,
                "committed",
                human_bytes(*bytes),
                layout.dp,
                layout.pp,
                layout.tp
            ),
            StepState::Uncommitted => writeln!(
                w,
                "{:>10}  {:<11}  {:>6}  {:>7}  {:>10}  (no manifest: in progress or abandoned){mark}",
                s.step, "uncommitted", "-", "-", "-"
            ),
            StepState::Broken { reason } => writeln!(
                w,
                "{:>10}  {:<11}  {reason}{mark}",
                s.step, "BROKEN"
            ),
        }
        .map_err(out_err)?;
    }
    if steps.is_empty() {
        writeln!(w, "(no checkpoints)").map_err(out_err)?;
    }
    Ok(steps)
}

/// `weaver ckpt inspect URL/step-N`: layout, shards and every tensor with its pieces.
pub fn inspect(url: &str, w: &mut dyn Write) -> Result<Manifest> {
    let (store, selector) = resolve(url)?;
    let ckpt = block_on(Checkpoint::open(&store, selector))?;
    let m = ckpt.manifest();
    let l = &m.layout;
    writeln!(w, "checkpoint {}", ckpt.url()).map_err(out_err)?;
    writeln!(w, "step       {}", m.step).map_err(out_err)?;
    writeln!(w, "format     {}", m.format).map_err(out_err)?;
    writeln!(w, "layout     dp={} pp={} tp={}", l.dp, l.pp, l.tp).map_err(out_err)?;
    if !l.extra.is_null() {
        writeln!(w, "extra      {}", l.extra).map_err(out_err)?;
    }
    writeln!(
        w,
        "size       {} in {} shards, {} tensors",
        human_bytes(m.total_bytes()),
        m.shards.len(),
        m.tensors.len()
    )
    .map_err(out_err)?;
    writeln!(w, "\nshards:").map_err(out_err)?;
    for s in &m.shards {
        writeln!(
            w,
            "  rank {:>5}  {}  {}",
            s.rank,
            s.file,
            human_bytes(s.size)
        )
        .map_err(out_err)?;
    }
    writeln!(w, "\ntensors:").map_err(out_err)?;
    let width = m.tensors.keys().map(String::len).max().unwrap_or(4);
    for (name, t) in &m.tensors {
        writeln!(
            w,
            "  {name:<width$}  {:<7} {:<20} {:>10}  {} piece(s)",
            t.dtype.as_str(),
            format!("{:?}", t.shape),
            human_bytes(t.nbytes()),
            t.pieces.len()
        )
        .map_err(out_err)?;
        for p in &t.pieces {
            writeln!(
                w,
                "  {:width$}    {:?} in {} bytes {}..{} crc32c {:08x}",
                "",
                p.slice.ranges(),
                p.file,
                p.bytes[0],
                p.bytes[1],
                p.crc32c
            )
            .map_err(out_err)?;
        }
    }
    Ok(m.clone())
}

/// `weaver ckpt verify URL/step-N`: reads every byte; the report lists every problem.
/// Returns `Ok` with problems listed (exit non-zero unless `is_ok()`), `Err` when the
/// checkpoint cannot even be opened.
pub fn verify(url: &str, w: &mut dyn Write) -> Result<VerifyReport> {
    let (store, selector) = resolve(url)?;
    let ckpt = block_on(Checkpoint::open(&store, selector))?;
    let report = block_on(async { Ok(ckpt.verify().await) })?;
    for p in &report.problems {
        writeln!(w, "PROBLEM: {p}").map_err(out_err)?;
    }
    writeln!(
        w,
        "{}: step {}, {} objects, {} tensors, {} checked: {}",
        ckpt.url(),
        report.step,
        report.objects,
        report.tensors,
        human_bytes(report.bytes),
        if report.is_ok() {
            "OK".to_string()
        } else {
            format!("{} problem(s)", report.problems.len())
        }
    )
    .map_err(out_err)?;
    Ok(report)
}

/// `weaver ckpt export URL/step-N OUT.safetensors`: the tensors `keep` accepts, whole.
pub fn export(
    url: &str,
    out: &Path,
    keep: &(dyn Fn(&str) -> bool + Sync),
    w: &mut dyn Write,
) -> Result<ExportReport> {
    let (store, selector) = resolve(url)?;
    let ckpt = block_on(Checkpoint::open(&store, selector))?;
    let report = block_on(crate::export::export(&ckpt, out, keep))?;
    writeln!(
        w,
        "exported step {} ({} tensors, {}) to {}",
        ckpt.step(),
        report.tensors,
        human_bytes(report.bytes),
        out.display()
    )
    .map_err(out_err)?;
    Ok(report)
}
