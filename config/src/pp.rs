//! Pipeline parallelism as data: the partition of layers into stages, and the schedules
//! (GPipe, 1F1B, interleaved 1F1B) as per-rank action lists.
//!
//! A model of `L` layers is cut into `p · v` contiguous *virtual stages* (`v` chunks per
//! pipeline rank; `v = 1` except for the interleaved schedule). Virtual stage `s` lives on
//! rank `s mod p` as its chunk `s / p` (Megatron-LM's interleaving, Narayanan et al. 2021).
//! Between virtual stages `s` and `s + 1` lies *boundary* `s`: activations cross it
//! forward, gradients backward.
//!
//! A schedule is a list of [`Action`]s per rank: computations, and batches of
//! point-to-point operations posted together (NCCL groups; `batch_isend_irecv`). Each
//! computation is preceded by the receive of its input and followed by the send of its
//! output; the sends after one computation and the receives before the next share a batch,
//! which is what keeps neighbouring ranks from waiting on each other. [`simulate`] runs a
//! schedule under rendezvous semantics (a send completes only when its receive is posted)
//! and reports deadlocks, unmatched transfers and missing work; the property tests run it
//! over a range of shapes.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::ops::Range;

/// Why a pipeline plan is impossible.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid pipeline plan: {0}")]
pub struct PlanError(pub String);

/// The schedule families.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ScheduleKind {
    /// All forwards, then all backwards (Huang et al. 2019).
    GPipe,
    /// One forward, one backward in the steady state (PipeDream-flush, Narayanan et al.
    /// 2021).
    OneFOneB,
    /// 1F1B over `v` chunks per rank (Megatron-LM's interleaved schedule).
    Interleaved,
}

/// What crosses a boundary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Payload {
    /// Activations, forward.
    Act,
    /// Gradients of the activations, backward.
    Grad,
}

/// One point-to-point transfer as seen by one side.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Transfer {
    /// `true` to send, `false` to receive.
    pub send: bool,
    /// The other pipeline rank.
    pub peer: usize,
    /// Activations or gradients.
    pub payload: Payload,
    /// The micro-batch.
    pub mb: usize,
    /// The boundary crossed (between virtual stages `boundary` and `boundary + 1`).
    pub boundary: usize,
}

/// One step of a rank's schedule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Forward of micro-batch `mb` through local chunk `chunk`.
    Forward {
        /// Micro-batch.
        mb: usize,
        /// Local chunk (virtual stage `chunk · p + rank`).
        chunk: usize,
    },
    /// Backward of micro-batch `mb` through local chunk `chunk`.
    Backward {
        /// Micro-batch.
        mb: usize,
        /// Local chunk.
        chunk: usize,
    },
    /// Transfers posted together; the action ends when all have completed.
    Comm(Vec<Transfer>),
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Action::Forward { mb, chunk } => write!(f, "F{mb}.{chunk}"),
            Action::Backward { mb, chunk } => write!(f, "B{mb}.{chunk}"),
            Action::Comm(ts) => {
                write!(f, "[")?;
                for (i, t) in ts.iter().enumerate() {
                    if i > 0 {
                        write!(f, " ")?;
                    }
                    let dir = if t.send { "send" } else { "recv" };
                    write!(f, "{dir}:{:?}{}@{}→{}", t.payload, t.mb, t.boundary, t.peer)?;
                }
                write!(f, "]")
            }
        }
    }
}

/// A whole plan: shape and every rank's actions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Schedule {
    /// The family.
    pub kind: ScheduleKind,
    /// Pipeline ranks.
    pub stages: usize,
    /// Micro-batches per step.
    pub microbatches: usize,
    /// Chunks per rank.
    pub chunks: usize,
    /// Forwards only (evaluation): no backward, no gradient transfers.
    pub forward_only: bool,
    /// `actions[rank]`.
    pub actions: Vec<Vec<Action>>,
}

impl Schedule {
    /// Builds the schedule of `kind` for `stages` ranks, `microbatches` micro-batches and
    /// `chunks` model chunks per rank (1 unless interleaved).
    pub fn new(
        kind: ScheduleKind,
        stages: usize,
        microbatches: usize,
        chunks: usize,
    ) -> Result<Schedule, PlanError> {
        let (p, m, v) = (stages, microbatches, chunks);
        check_shape(kind, p, m, v)?;
        let actions = (0..p).map(|r| rank_actions(kind, p, m, v, r)).collect();
        Ok(Schedule {
            kind,
            stages: p,
            microbatches: m,
            chunks: v,
            forward_only: false,
            actions,
        })
    }

    /// Forwards only, for evaluation: every micro-batch through every virtual stage with the
    /// same transfer batching as training, on `stages` ranks with `chunks` chunks each.
    /// Micro-batches go in groups of `stages` through the chunks, as the interleaved
    /// schedule runs them, when `microbatches` divides into such groups; otherwise (and with
    /// one chunk) one after another, which with several chunks lets one micro-batch at a
    /// time circle the ring.
    pub fn forward_only(
        stages: usize,
        microbatches: usize,
        chunks: usize,
    ) -> Result<Schedule, PlanError> {
        let (p, m, v) = (stages, microbatches, chunks);
        if p == 0 || m == 0 || v == 0 {
            return Err(PlanError(
                "stages, micro-batches and chunks must each be at least 1".into(),
            ));
        }
        let grouped = v > 1 && m % p == 0;
        let order: Vec<(usize, usize)> = if grouped {
            compute_order(ScheduleKind::Interleaved, p, m, v, true)
        } else {
            (0..m).flat_map(|mb| (0..v).map(move |c| (mb, c))).collect()
        };
        let actions = (0..p)
            .map(|r| {
                let units = order
                    .iter()
                    .map(|&(mb, chunk)| vec![Action::Forward { mb, chunk }])
                    .collect();
                with_transfers(units, p, v, r)
            })
            .collect();
        Ok(Schedule {
            kind: if v > 1 {
                ScheduleKind::Interleaved
            } else {
                ScheduleKind::GPipe
            },
            stages: p,
            microbatches: m,
            chunks: v,
            forward_only: true,
            actions,
        })
    }

    /// The virtual stage of `chunk` on `rank`.
    pub fn virtual_stage(&self, rank: usize, chunk: usize) -> usize {
        chunk * self.stages + rank
    }

    /// Total virtual stages.
    pub fn virtual_stages(&self) -> usize {
        self.stages * self.chunks
    }

    /// The ideal bubble fraction of this shape: `(p − 1) / (m + p − 1)`, divided by `v` for
    /// the interleaved schedule (equal-cost stages, free communication).
    pub fn theoretical_bubble(&self) -> f64 {
        let (p, m, v) = (
            self.stages as f64,
            self.microbatches as f64,
            self.chunks as f64,
        );
        // Narayanan et al. 2021: bubble time / ideal time = (p − 1) / (v · m); as a fraction
        // of the total time that is (p − 1) / (v · m + p − 1).
        (p - 1.0) / (v * m + p - 1.0)
    }
}

/// The order in which a rank runs forwards (and, chunk order reversed, backwards).
fn compute_order(
    kind: ScheduleKind,
    p: usize,
    m: usize,
    v: usize,
    forward: bool,
) -> Vec<(usize, usize)> {
    match kind {
        ScheduleKind::Interleaved if v > 1 => {
            let mut out = Vec::with_capacity(m * v);
            for g in 0..m / p {
                for c in 0..v {
                    let chunk = if forward { c } else { v - 1 - c };
                    for i in 0..p {
                        out.push((g * p + i, chunk));
                    }
                }
            }
            out
        }
        _ => (0..m).map(|mb| (mb, 0)).collect(),
    }
}

/// Forwards before the first backward on `rank`.
fn warmup(kind: ScheduleKind, p: usize, m: usize, v: usize, rank: usize) -> usize {
    match kind {
        ScheduleKind::GPipe => m * v,
        ScheduleKind::OneFOneB => (p - rank - 1).min(m),
        ScheduleKind::Interleaved => {
            if v == 1 {
                (p - rank - 1).min(m)
            } else {
                ((p - rank - 1) * 2 + (v - 1) * p).min(m * v)
            }
        }
    }
}

fn rank_actions(kind: ScheduleKind, p: usize, m: usize, v: usize, rank: usize) -> Vec<Action> {
    let fwd = compute_order(kind, p, m, v, true);
    let bwd = compute_order(kind, p, m, v, false);
    let w = warmup(kind, p, m, v, rank);
    // Computations in *units*: one forward per warmup unit, one backward per cooldown unit;
    // in the steady state, one computation per unit (Megatron-LM's 1F1B: a forward waits
    // only for its own input), except with interleaved chunks, where a forward and a
    // backward form one unit whose inputs are both received beforehand (Megatron-LM's
    // interleaved schedule: with separate units the chunk-to-chunk transfers deadlock).
    let paired = kind == ScheduleKind::Interleaved && v > 1;
    let mut units: Vec<Vec<Action>> = Vec::with_capacity(2 * fwd.len());
    let (mut f, mut b) = (0, 0);
    while f < w {
        units.push(vec![Action::Forward {
            mb: fwd[f].0,
            chunk: fwd[f].1,
        }]);
        f += 1;
    }
    while f < fwd.len() {
        let fa = Action::Forward {
            mb: fwd[f].0,
            chunk: fwd[f].1,
        };
        let ba = Action::Backward {
            mb: bwd[b].0,
            chunk: bwd[b].1,
        };
        if paired {
            units.push(vec![fa, ba]);
        } else {
            units.push(vec![fa]);
            units.push(vec![ba]);
        }
        f += 1;
        b += 1;
    }
    while b < bwd.len() {
        units.push(vec![Action::Backward {
            mb: bwd[b].0,
            chunk: bwd[b].1,
        }]);
        b += 1;
    }
    with_transfers(units, p, v, rank)
}

/// Interleaves the computation `units` of `rank` with their transfers: before each unit,
/// one batch holding the sends of the unit before and the receives of this one.
fn with_transfers(units: Vec<Vec<Action>>, p: usize, v: usize, rank: usize) -> Vec<Action> {
    let last_vs = p * v - 1;
    let next = (rank + 1) % p;
    let prev = (rank + p - 1) % p;
    // The receives a computation needs and the sends it produces.
    let io = |a: &Action| -> (Vec<Transfer>, Vec<Transfer>) {
        let (mut recv, mut send) = (Vec::new(), Vec::new());
        match *a {
            Action::Forward { mb, chunk } => {
                let vs = chunk * p + rank;
                if vs > 0 {
                    recv.push(Transfer {
                        send: false,
                        peer: prev,
                        payload: Payload::Act,
                        mb,
                        boundary: vs - 1,
                    });
                }
                if vs < last_vs {
                    send.push(Transfer {
                        send: true,
                        peer: next,
                        payload: Payload::Act,
                        mb,
                        boundary: vs,
                    });
                }
            }
            Action::Backward { mb, chunk } => {
                let vs = chunk * p + rank;
                if vs < last_vs {
                    recv.push(Transfer {
                        send: false,
                        peer: next,
                        payload: Payload::Grad,
                        mb,
                        boundary: vs,
                    });
                }
                if vs > 0 {
                    send.push(Transfer {
                        send: true,
                        peer: prev,
                        payload: Payload::Grad,
                        mb,
                        boundary: vs - 1,
                    });
                }
            }
            Action::Comm(_) => {}
        }
        (recv, send)
    };
    // Between two units, one batch: the sends of the first and the receives of the
    // second, all posted together.
    let mut out = Vec::new();
    let mut pending_sends: Vec<Transfer> = Vec::new();
    for unit in units {
        let mut batch = std::mem::take(&mut pending_sends);
        for a in &unit {
            let (recv, send) = io(a);
            batch.extend(recv);
            pending_sends.extend(send);
        }
        if !batch.is_empty() {
            out.push(Action::Comm(batch));
        }
        out.extend(unit);
    }
    if !pending_sends.is_empty() {
        out.push(Action::Comm(pending_sends));
    }
    out
}

/// What [`simulate`] found wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScheduleFault {
    /// No rank can make progress.
    #[error("deadlock: ranks stuck at {0:?}")]
    Deadlock(Vec<(usize, String)>),
    /// A send met a receive expecting something else.
    #[error("mismatched transfer on {from}→{to}: sent {sent:?}, expected {expected:?}")]
    Mismatch {
        /// Sender.
        from: usize,
        /// Receiver.
        to: usize,
        /// What was sent.
        sent: (Payload, usize, usize),
        /// What the receiver expected.
        expected: (Payload, usize, usize),
    },
    /// Work missing, repeated, or out of order.
    #[error("rank {rank}: {message}")]
    Work {
        /// The rank.
        rank: usize,
        /// What is wrong.
        message: String,
    },
}

/// Outcome of a simulation: per rank, the time step at which each action ran.
#[derive(Debug, Clone)]
pub struct Trace {
    /// `(rank, action index)` in completion order.
    pub order: Vec<(usize, usize)>,
}

/// Runs `s` under rendezvous semantics: a send and its receive complete together, only
/// when both sides have posted them, in order per directed channel; a batch ends when all
/// its transfers have. Checks that every micro-batch runs forward then backward exactly
/// once per virtual stage, and that every transfer meets its counterpart.
pub fn simulate(s: &Schedule) -> Result<Trace, ScheduleFault> {
    let p = s.stages;
    let mut pc = vec![0usize; p];
    // Transfers already matched in each rank's current batch.
    let mut done_in_batch: Vec<Vec<bool>> = vec![Vec::new(); p];
    let mut order = Vec::new();
    loop {
        let mut progressed = false;
        // Computations always complete.
        for r in 0..p {
            while let Some(a) = s.actions[r].get(pc[r]) {
                if matches!(a, Action::Comm(_)) {
                    break;
                }
                order.push((r, pc[r]));
                pc[r] += 1;
                progressed = true;
            }
            if let Some(Action::Comm(ts)) = s.actions[r].get(pc[r]) {
                if done_in_batch[r].len() != ts.len() {
                    done_in_batch[r] = vec![false; ts.len()];
                }
            }
        }
        // Match the first open send of each channel with the first open receive.
        for from in 0..p {
            let Some(Action::Comm(sends)) = s.actions[from].get(pc[from]) else {
                continue;
            };
            for to in 0..p {
                let Some(si) = (0..sends.len())
                    .find(|&i| !done_in_batch[from][i] && sends[i].send && sends[i].peer == to)
                else {
                    continue;
                };
                let Some(Action::Comm(recvs)) = s.actions[to].get(pc[to]) else {
                    continue;
                };
                let Some(ri) = (0..recvs.len())
                    .find(|&i| !done_in_batch[to][i] && !recvs[i].send && recvs[i].peer == from)
                else {
                    continue;
                };
                let (a, b) = (sends[si], recvs[ri]);
                if (a.payload, a.mb, a.boundary) != (b.payload, b.mb, b.boundary) {
                    return Err(ScheduleFault::Mismatch {
                        from,
                        to,
                        sent: (a.payload, a.mb, a.boundary),
                        expected: (b.payload, b.mb, b.boundary),
                    });
                }
                done_in_batch[from][si] = true;
                done_in_batch[to][ri] = true;
                progressed = true;
            }
        }
        for r in 0..p {
            if let Some(Action::Comm(ts)) = s.actions[r].get(pc[r]) {
                if done_in_batch[r].len() == ts.len() && done_in_batch[r].iter().all(|&d| d) {
                    order.push((r, pc[r]));
                    pc[r] += 1;
                    done_in_batch[r].clear();
                    progressed = true;
                }
            }
        }
        if (0..p).all(|r| pc[r] == s.actions[r].len()) {
            break;
        }
        if !progressed {
            let stuck = (0..p)
                .filter(|&r| pc[r] < s.actions[r].len())
                .map(|r| (r, s.actions[r][pc[r]].to_string()))
                .collect();
            return Err(ScheduleFault::Deadlock(stuck));
        }
    }
    check_work(s)?;
    Ok(Trace { order })
}

fn check_work(s: &Schedule) -> Result<(), ScheduleFault> {
    for (r, acts) in s.actions.iter().enumerate() {
        let mut fwd: HashMap<(usize, usize), usize> = HashMap::new();
        let mut bwd: HashMap<(usize, usize), usize> = HashMap::new();
        for (i, a) in acts.iter().enumerate() {
            match *a {
                Action::Forward { mb, chunk } => {
                    if fwd.insert((mb, chunk), i).is_some() {
                        return Err(ScheduleFault::Work {
                            rank: r,
                            message: format!("F{mb}.{chunk} twice"),
                        });
                    }
                }
                Action::Backward { mb, chunk } => {
                    if !fwd.contains_key(&(mb, chunk)) {
                        return Err(ScheduleFault::Work {
                            rank: r,
                            message: format!("B{mb}.{chunk} before its forward"),
                        });
                    }
                    if bwd.insert((mb, chunk), i).is_some() {
                        return Err(ScheduleFault::Work {
                            rank: r,
                            message: format!("B{mb}.{chunk} twice"),
                        });
                    }
                }
                Action::Comm(_) => {}
            }
        }
        let want = s.microbatches * s.chunks;
        let want_bwd = if s.forward_only { 0 } else { want };
        if fwd.len() != want || bwd.len() != want_bwd {
            return Err(ScheduleFault::Work {
                rank: r,
                message: format!(
                    "{} forwards and {} backwards, expected {want} and {want_bwd}",
                    fwd.len(),
                    bwd.len()
                ),
            });
        }
    }
    Ok(())
}

/// Largest number of forwards whose activations a rank holds at once (memory pressure).
pub fn peak_in_flight(s: &Schedule, rank: usize) -> usize {
    let (mut live, mut peak) = (0usize, 0usize);
    for a in &s.actions[rank] {
        match a {
            Action::Forward { .. } => {
                live += 1;
                peak = peak.max(live);
            }
            Action::Backward { .. } => live -= 1,
            Action::Comm(_) => {}
        }
    }
    peak
}

/// Whether a schedule of `kind` exists for `stages` ranks, `microbatches` micro-batches and
/// `chunks` chunks per rank, without building it ([`Schedule::new`] checks the same).
pub fn check_shape(
    kind: ScheduleKind,
    stages: usize,
    microbatches: usize,
    chunks: usize,
) -> Result<(), PlanError> {
    let (p, m, v) = (stages, microbatches, chunks);
    if p == 0 || m == 0 || v == 0 {
        return Err(PlanError(
            "stages, micro-batches and chunks must each be at least 1".into(),
        ));
    }
    match kind {
        ScheduleKind::GPipe | ScheduleKind::OneFOneB if v != 1 => Err(PlanError(format!(
            "virtual_stages = {v} needs schedule = \"interleaved\"; {kind:?} runs one chunk per rank"
        ))),
        ScheduleKind::Interleaved if v > 1 && p == 1 => Err(PlanError(
            "the interleaved schedule needs pp ≥ 2 when virtual_stages > 1".into(),
        )),
        ScheduleKind::Interleaved if v > 1 && m % p != 0 => Err(PlanError(format!(
            "the interleaved schedule runs micro-batches in groups of pp = {p}; microbatches = {m} is not a multiple"
        ))),
        _ => Ok(()),
    }
}

/// Cuts layers with costs `costs` into `parts` contiguous non-empty ranges minimising the
/// most expensive part (exact, by dynamic programming over prefix sums).
pub fn partition(costs: &[f64], parts: usize) -> Result<Vec<Range<usize>>, PlanError> {
    let n = costs.len();
    if parts == 0 || parts > n {
        return Err(PlanError(format!(
            "cannot cut {n} layers into {parts} stages; use at most {n} pipeline stages × virtual stages"
        )));
    }
    let prefix: Vec<f64> = std::iter::once(0.0)
        .chain(costs.iter().scan(0.0, |acc, c| {
            *acc += c;
            Some(*acc)
        }))
        .collect();
    let cost = |a: usize, b: usize| prefix[b] - prefix[a];
    // best[k][i]: the least max-part cost of cutting the first i layers into k parts.
    let inf = f64::INFINITY;
    let mut best = vec![vec![inf; n + 1]; parts + 1];
    let mut cut = vec![vec![0usize; n + 1]; parts + 1];
    best[0][0] = 0.0;
    for k in 1..=parts {
        for i in k..=n {
            for j in (k - 1)..i {
                let c = best[k - 1][j].max(cost(j, i));
                // Ties go to the later cut, so earlier stages (which also hold embeddings)
                // are not the heavier ones.
                if c < best[k][i] - 1e-12 || (c <= best[k][i] + 1e-12 && j > cut[k][i]) {
                    best[k][i] = c;
                    cut[k][i] = j;
                }
            }
        }
    }
    let mut ranges = Vec::with_capacity(parts);
    let mut end = n;
    for k in (1..=parts).rev() {
        let start = cut[k][end];
        ranges.push(start..end);
        end = start;
    }
    ranges.reverse();
    Ok(ranges)
}

/// Per-rank busy and idle time when every forward costs `f` and every backward `b` time
/// units and transfers are free: replays the schedule's dependencies.
pub fn ideal_timeline(
    s: &Schedule,
    f: f64,
    b: f64,
) -> Result<BTreeMap<usize, (f64, f64)>, ScheduleFault> {
    simulate(s)?;
    let p = s.stages;
    // Time at which (payload, mb, boundary) becomes available to its receiver.
    let mut ready: HashMap<(Payload, usize, usize), f64> = HashMap::new();
    let mut clock = vec![0.0f64; p];
    let mut busy = vec![0.0f64; p];
    let mut pc = vec![0usize; p];
    // Replay in rounds until everything ran (dependencies were proven satisfiable).
    while (0..p).any(|r| pc[r] < s.actions[r].len()) {
        let mut progressed = false;
        for r in 0..p {
            while let Some(a) = s.actions[r].get(pc[r]) {
                match a {
                    Action::Comm(ts) => {
                        let mut t = clock[r];
                        let mut ok = true;
                        for x in ts.iter().filter(|x| !x.send) {
                            match ready.get(&(x.payload, x.mb, x.boundary)) {
                                Some(&at) => t = t.max(at),
                                None => ok = false,
                            }
                        }
                        if !ok {
                            break;
                        }
                        clock[r] = t;
                    }
                    Action::Forward { mb, chunk } | Action::Backward { mb, chunk } => {
                        let is_f = matches!(a, Action::Forward { .. });
                        clock[r] += if is_f { f } else { b };
                        busy[r] += if is_f { f } else { b };
                        let vs = s.virtual_stage(r, *chunk);
                        if is_f && vs + 1 < s.virtual_stages() {
                            ready.insert((Payload::Act, *mb, vs), clock[r]);
                        }
                        if !is_f && vs > 0 {
                            ready.insert((Payload::Grad, *mb, vs - 1), clock[r]);
                        }
                    }
                }
                pc[r] += 1;
                progressed = true;
            }
        }
        if !progressed {
            break;
        }
    }
    let end = clock.iter().cloned().fold(0.0, f64::max);
    Ok((0..p).map(|r| (r, (busy[r], end - busy[r]))).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn one_f_one_b_on_four_stages_looks_like_megatron() {
        let s = Schedule::new(ScheduleKind::OneFOneB, 4, 8, 1).unwrap();
        let computes: Vec<String> = s.actions[0]
            .iter()
            .filter(|a| !matches!(a, Action::Comm(_)))
            .map(|a| a.to_string())
            .collect();
        assert_eq!(
            &computes[..6],
            &["F0.0", "F1.0", "F2.0", "F3.0", "B0.0", "F4.0"]
        );
        let last: Vec<String> = s.actions[3]
            .iter()
            .filter(|a| !matches!(a, Action::Comm(_)))
            .map(|a| a.to_string())
            .collect();
        assert_eq!(&last[..4], &["F0.0", "B0.0", "F1.0", "B1.0"]);
        assert_eq!(peak_in_flight(&s, 0), 4);
        assert_eq!(peak_in_flight(&s, 3), 1);
        let g = Schedule::new(ScheduleKind::GPipe, 4, 8, 1).unwrap();
        assert_eq!(peak_in_flight(&g, 0), 8);
    }

    #[test]
    fn ideal_bubble_matches_theory() {
        for (kind, v) in [
            (ScheduleKind::GPipe, 1),
            (ScheduleKind::OneFOneB, 1),
            (ScheduleKind::Interleaved, 2),
        ] {
            let s = Schedule::new(kind, 4, 8, v).unwrap();
            // Chunks of an interleaved rank are 1/v of a stage.
            let unit = 1.0 / v as f64;
            let t = ideal_timeline(&s, unit, 2.0 * unit).unwrap();
            let (busy, idle) = t[&0];
            let bubble = idle / (busy + idle);
            let theory = s.theoretical_bubble();
            assert!(
                (bubble - theory).abs() < 0.02,
                "{kind:?}: {bubble} vs {theory}"
            );
        }
    }

    #[test]
    fn bad_shapes_are_refused() {
        assert!(Schedule::new(ScheduleKind::OneFOneB, 2, 4, 2).is_err());
        assert!(Schedule::new(ScheduleKind::Interleaved, 4, 6, 2).is_err());
        assert!(Schedule::new(ScheduleKind::Interleaved, 1, 4, 2).is_err());
        assert!(partition(&[1.0; 3], 4).is_err());
    }

    #[test]
    fn partition_balances_costs() {
        let r = partition(&[4.0, 4.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0], 2).unwrap();
        assert_eq!(r, vec![0..2, 2..8]);
        let r = partition(&[1.0; 6], 3).unwrap();
        assert_eq!(r, vec![0..2, 2..4, 4..6]);
    }

    proptest! {
        #[test]
        fn schedules_complete_without_deadlock(
            p in 1usize..7, groups in 1usize..4, extra in 0usize..5, v in 1usize..4, kind in 0u8..3
        ) {
            let kind = [ScheduleKind::GPipe, ScheduleKind::OneFOneB, ScheduleKind::Interleaved][kind as usize];
            let (m, v) = match kind {
                ScheduleKind::Interleaved if p > 1 => (groups * p, v),
                _ => (groups + extra, 1),
            };
            let s = Schedule::new(kind, p, m, v).unwrap();
            let trace = simulate(&s);
            prop_assert!(trace.is_ok(), "{kind:?} p={p} m={m} v={v}: {:?}", trace.err());
            // Every send has its receive: counts per (payload, mb, boundary) agree.
            let mut sends = HashMap::new();
            let mut recvs = HashMap::new();
            for acts in &s.actions {
                for a in acts {
                    if let Action::Comm(ts) = a {
                        for t in ts {
                            let m = if t.send { &mut sends } else { &mut recvs };
                            *m.entry((t.payload, t.mb, t.boundary)).or_insert(0) += 1;
                        }
                    }
                }
            }
            prop_assert_eq!(&sends, &recvs);
            prop_assert_eq!(sends.len(), 2 * m * (p * v - 1));
        }

        #[test]
        fn forward_only_schedules_complete_without_deadlock(
            p in 1usize..6, m in 1usize..10, v in 1usize..4
        ) {
            let s = Schedule::forward_only(p, m, v).unwrap();
            let trace = simulate(&s);
            prop_assert!(trace.is_ok(), "p={p} m={m} v={v}: {:?}", trace.err());
            for acts in &s.actions {
                for a in acts {
                    prop_assert!(!matches!(a, Action::Backward { .. }), "a backward in a forward-only schedule");
                    if let Action::Comm(ts) = a {
                        prop_assert!(ts.iter().all(|t| t.payload == Payload::Act), "a gradient transfer");
                    }
                }
            }
        }

        #[test]
        fn partition_is_contiguous_nonempty_and_optimal_vs_even(
            costs in proptest::collection::vec(0.1f64..10.0, 1..24), parts in 1usize..8
        ) {
            prop_assume!(parts <= costs.len());
            let r = partition(&costs, parts).unwrap();
            prop_assert_eq!(r.len(), parts);
            prop_assert_eq!(r[0].start, 0);
            prop_assert_eq!(r[parts - 1].end, costs.len());
            for w in r.windows(2) {
                prop_assert_eq!(w[0].end, w[1].start);
            }
            prop_assert!(r.iter().all(|x| !x.is_empty()));
            let max = |rs: &[Range<usize>]| rs.iter().map(|x| costs[x.clone()].iter().sum::<f64>()).fold(0.0, f64::max);
            // No worse than the even split by layer count.
            let n = costs.len();
            let even: Vec<Range<usize>> = (0..parts).map(|k| k * n / parts..(k + 1) * n / parts).collect();
            if even.iter().all(|x| !x.is_empty()) {
                prop_assert!(max(&r) <= max(&even) + 1e-9);
            }
        }
    }
}
