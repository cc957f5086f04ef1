//! A child process the benches talk to over pipes (the PyTorch side, kept waiting on its
//! stdin between rounds): its stdout read line by line on a thread as the lines come, its
//! stderr collected on another for the error message. Shared by model_bench and
//! infer_bench (`#[path]`-included; not an example of its own).

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::thread::JoinHandle;

use anyhow::Context;

/// A spawned child with piped stdin, stdout and stderr.
pub(crate) struct Piped {
    pub(crate) child: Child,
    pub(crate) stdin: Option<ChildStdin>,
    /// Its stdout's lines, as they come.
    pub(crate) lines: mpsc::Receiver<String>,
    /// Everything it wrote on stderr, once it closed.
    pub(crate) errors: JoinHandle<String>,
}

/// Spawns `cmd` with its three streams piped (`what` names it in the error).
pub(crate) fn spawn(cmd: &mut Command, what: &str) -> anyhow::Result<Piped> {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot run {what}"))?;
    let (tx, lines) = mpsc::channel::<String>();
    let stdout = child.stdout.take().context("no stdout pipe")?;
    // The reader thread ends by itself when the child's stdout closes.
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut stderr = child.stderr.take().context("no stderr pipe")?;
    let errors = std::thread::spawn(move || {
        let mut buf = String::new();
        let _ = stderr.read_to_string(&mut buf);
        buf
    });
    Ok(Piped {
        stdin: child.stdin.take(),
        child,
        lines,
        errors,
    })
}
