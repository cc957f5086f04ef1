//! Requests that reach a running trainer from outside the step loop (SIGTERM, `weaver ckpt
//! save`, the coordinator's `SaveAt` and `Stop`), and how the ranks agree on them.
//!
//! Ranks see a request at different moments, yet must all checkpoint or stop after the same
//! step. They agree at *agreement steps* — the logged steps (`train.log_every`) and the last
//! one — where the step's losses are read back anyway: each rank contributes the earliest
//! step it was asked to save at and to stop at (a SIGTERM or `Stop` asks for "now"), riding
//! on the same collective and the same host read as the losses, so an unlogged step pays no
//! host sync for control. Every rank then holds the same agreed steps and acts on them
//! without talking again: a request for a step still ahead happens exactly at that step; a
//! request for "now" or a passed step happens at the agreement step.
//!
//! The price is latency: with `log_every = N`, a SIGTERM is acted on within N steps (after
//! the next logged step), and a save the coordinator schedules fewer than N steps ahead
//! lands on the next logged step instead. `log_every = 1` (the default) agrees after every
//! step, as before.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// Requests to a running trainer; shared with signal handlers and the coordinator's event
/// thread (every method takes `&self`).
#[derive(Debug)]
pub struct Control {
    save_at: AtomicU64,
    stop: AtomicBool,
    stop_at: AtomicU64,
    stopped_at: AtomicU64,
}

impl Default for Control {
    fn default() -> Self {
        Control {
            save_at: AtomicU64::new(u64::MAX),
            stop: AtomicBool::new(false),
            stop_at: AtomicU64::new(u64::MAX),
            stopped_at: AtomicU64::new(u64::MAX),
        }
    }
}

impl Control {
    /// Checkpoint at the end of the first step numbered `step` or later.
    pub fn request_save_at(&self, step: u64) {
        self.save_at.fetch_min(step, Ordering::SeqCst);
    }

    /// Checkpoint (when a checkpoint URL is set) and stop as soon as the ranks agree:
    /// preemption.
    pub fn request_stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
    }

    /// Checkpoint and stop at the end of the first step numbered `step` or later.
    pub fn request_stop_at(&self, step: u64) {
        self.request_save_at(step);
        self.stop_at.fetch_min(step, Ordering::SeqCst);
    }

    /// The step the trainer stopped at (with a checkpoint, when checkpoints are on).
    pub fn stopped_at(&self) -> Option<u64> {
        Some(self.stopped_at.load(Ordering::SeqCst)).filter(|&s| s != u64::MAX)
    }

    /// Whether a stop was requested.
    pub fn stop_requested(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    pub(crate) fn mark_stopped(&self, step: u64) {
        self.stopped_at.store(step, Ordering::SeqCst);
    }

    /// This rank's wishes as `[save at, stop at]` (a stop "now" is step 0; none is
    /// infinity), in the f64s the agreement collective carries (steps below 2^53 are exact).
    pub(crate) fn wishes(&self) -> [f64; 2] {
        let step = |v: u64| {
            if v == u64::MAX {
                f64::INFINITY
            } else {
                v as f64
            }
        };
        let stop = if self.stop_requested() {
            0.0
        } else {
            step(self.stop_at.load(Ordering::SeqCst))
        };
        [step(self.save_at.load(Ordering::SeqCst)), stop]
    }

    /// A checkpoint was taken after `step`: requests for it or an earlier step are met.
    pub(crate) fn saved(&self, step: u64) {
        let _ = self
            .save_at
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |v| {
                (v <= step).then_some(u64::MAX)
            });
    }
}

/// The agreed steps every rank holds after the agreement collectives (identical on all).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub(crate) struct Agreed {
    save_at: Option<u64>,
    stop_at: Option<u64>,
}

impl Agreed {
    /// Folds in the minimum over ranks of their [`Control::wishes`] at an agreement step.
    pub(crate) fn update(&mut self, mins: [f64; 2]) {
        let fold = |cur: Option<u64>, v: f64| -> Option<u64> {
            if v.is_finite() {
                let v = v.max(0.0) as u64;
                Some(cur.map_or(v, |c| c.min(v)))
            } else {
                cur
            }
        };
        self.save_at = fold(self.save_at, mins[0]);
        self.stop_at = fold(self.stop_at, mins[1]);
    }

    /// What is due after step `step`: (checkpoint, stop). A due checkpoint is consumed.
    pub(crate) fn due(&mut self, step: u64) -> (bool, bool) {
        let save = self.save_at.is_some_and(|s| s <= step);
        if save {
            self.save_at = None;
        }
        (save, self.stop_at.is_some_and(|s| s <= step))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn future_requests_happen_exactly_and_past_ones_at_once() {
        let c = Control::default();
        assert_eq!(c.wishes(), [f64::INFINITY, f64::INFINITY]);
        c.request_save_at(7);
        let mut a = Agreed::default();
        a.update(c.wishes());
        assert_eq!(a.due(5), (false, false));
        assert_eq!(a.due(7), (true, false));
        c.saved(7);
        assert_eq!(a.due(8), (false, false), "a checkpoint is taken once");
        a.update(c.wishes());
        assert_eq!(
            a.due(9),
            (false, false),
            "a met request is not agreed again"
        );
        c.request_stop();
        a.update(c.wishes());
        assert_eq!(a.due(10), (false, true));
    }

    #[test]
    fn stop_at_also_saves() {
        let c = Control::default();
        c.request_stop_at(12);
        let mut a = Agreed::default();
        a.update(c.wishes());
        assert_eq!(a.due(11), (false, false));
        assert_eq!(a.due(12), (true, true));
    }
}
