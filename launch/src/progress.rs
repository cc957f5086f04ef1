//! The launcher's progress bar (STYLE.md rule 12): step/total, loss, throughput, phase and
//! generation, refreshed from the coordinator's state four times a second — only when
//! stderr is a terminal, unless asked otherwise.

use std::io::IsTerminal;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};
use weaver_coordinator::job::phase_name;
use weaver_coordinator::pb::Phase;
use weaver_coordinator::Coordinator;

/// When to draw the bar.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProgressMode {
    /// When stderr is a terminal.
    Auto,
    /// Always (drawn to stderr).
    Always,
    /// Never.
    Never,
}

/// Starts the bar and its refresh task; `None` when no bar is drawn.
pub(crate) fn start(coordinator: &Coordinator, mode: ProgressMode) -> Option<ProgressBar> {
    let draw = match mode {
        ProgressMode::Auto => std::io::stderr().is_terminal(),
        ProgressMode::Always => true,
        ProgressMode::Never => false,
    };
    if !draw {
        return None;
    }
    let total = coordinator.status().total_steps;
    let style = ProgressStyle::with_template(
        "{spinner:.green} step {pos}/{len} [{bar:30.cyan/blue}] {msg}  {elapsed_precise} (eta {eta})",
    )
    .unwrap_or_else(|_| ProgressStyle::default_bar())
    .progress_chars("=> ");
    let bar = ProgressBar::new(total).with_style(style);
    let b = bar.clone();
    let c = coordinator.clone();
    tokio::spawn(async move {
        let mut every = tokio::time::interval(Duration::from_millis(250));
        loop {
            every.tick().await;
            let s = c.status();
            if s.step >= 0 {
                b.set_position(s.step as u64);
            }
            b.set_message(message(&s));
            if b.is_finished() || c.outcome().is_some() {
                return;
            }
        }
    });
    Some(bar)
}

/// "loss 2.3140 · 12.3k tok/s · running gen 1 · 8/8 workers".
pub(crate) fn message(s: &weaver_coordinator::pb::StatusResponse) -> String {
    let mut parts = Vec::new();
    if let Some(l) = s.loss {
        parts.push(format!("loss {l:.4}"));
    }
    if let Some(t) = s.tokens_per_s {
        parts.push(if t >= 1e4 {
            format!("{:.1}k tok/s", t / 1e3)
        } else {
            format!("{t:.0} tok/s")
        });
    }
    let phase = Phase::try_from(s.phase).unwrap_or(Phase::Unspecified);
    parts.push(format!("{} gen {}", phase_name(phase), s.generation));
    parts.push(format!(
        "{}/{} workers",
        s.workers.len(),
        s.expected_workers
    ));
    parts.join(" · ")
}
