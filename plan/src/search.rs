//! The search behind `weaver plan`: every layout of a job on the given hardware that the
//! job's own validation accepts, with its memory per device and its step time, best first.
//!
//! Candidates: `tp` among the divisors of a node (tensor parallelism stays inside a node),
//! `pp` among the divisors of what remains, `dp` the rest; micro-batches among the divisors
//! of each data-parallel rank's batch (at most [`MAX_MICROBATCHES`]); the schedules
//! (interleaved with 2 or 4 chunks per rank); every recomputation mode, the sharded
//! optimizer (`dp > 1`) and sequence parallelism (`tp > 1`) where `features` has them.
//! Each candidate goes through [`JobConfig::from_file_config_with`] and
//! [`ParallelLayout::new`], the checks the trainer runs, so no rule is restated here.
//! A layout fits when its worst rank's modelled tensor memory is within the device's usable
//! memory ([`Hardware::usable_bytes`]); the fitting ones are ranked by step time, ties by
//! memory.

use weaver_config::config::{
    Features, JobConfig, ParallelSection, Recompute, Schedule as ScheduleName,
};
use weaver_config::layout::ParallelLayout;

use crate::error::PlanError;
use crate::hardware::{fmt_bytes, Hardware};
use crate::memory::{MemoryBreakdown, MemoryModel};
use crate::time::{step_time, StepTime};

/// Most micro-batches per step considered.
pub const MAX_MICROBATCHES: usize = 64;

/// One candidate layout with its figures.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The job with the layout's `[parallel]` keys set.
    pub job: JobConfig,
    /// Its checked layout.
    pub layout: ParallelLayout,
    /// The pipeline rank with the most memory.
    pub worst_rank: usize,
    /// That rank's memory.
    pub memory: MemoryBreakdown,
    /// The step.
    pub time: StepTime,
    /// Whether the trainer runs it today (every memory feature it uses is implemented).
    pub runnable: bool,
}

impl Plan {
    /// The layout's keys, for people and for `--set`.
    pub fn describe(&self) -> String {
        let p = &self.job.parallel;
        let schedule = match p.schedule {
            ScheduleName::Gpipe => "gpipe".to_string(),
            ScheduleName::OneFOneB => "1f1b".to_string(),
            ScheduleName::Interleaved => format!("interleaved×{}", p.virtual_stages),
        };
        format!(
            "dp={} pp={} tp={} mb={}×{} {} recompute={} shard_opt={} sp={}",
            p.dp,
            p.pp,
            p.tp,
            p.microbatches,
            self.job.micro_batch_size(),
            schedule,
            p.recompute.name(),
            p.shard_optimizer,
            p.sequence_parallel
        )
    }
}

/// What a search found: the plans that fit, best first, and the smallest that does not.
#[derive(Debug, Clone)]
pub struct Found {
    /// Plans within the usable memory, fastest first.
    pub fits: Vec<Plan>,
    /// Valid layouts examined.
    pub valid: usize,
    /// The valid layout with the least memory (whether it fits or not).
    pub smallest: Option<Plan>,
}

fn divisors(n: usize) -> Vec<usize> {
    (1..=n).filter(|d| n.is_multiple_of(*d)).collect()
}

/// Every layout of `job` on `hw` that validates, with `features` allowed.
pub fn search(job: &JobConfig, hw: &Hardware, features: Features) -> Result<Found, PlanError> {
    hw.validate()?;
    let n = hw.devices;
    let usable = hw.usable_bytes();
    let mut fits = Vec::new();
    let mut smallest: Option<Plan> = None;
    let mut valid = 0;
    let mut first_error: Option<String> = None;
    let layers = job.model.num_layers();
    for tp in divisors(hw.node_size().min(n)) {
        if !n.is_multiple_of(tp) {
            continue;
        }
        for pp in divisors(n / tp) {
            if pp > layers {
                continue;
            }
            let dp = n / (tp * pp);
            if !job.train.global_batch.is_multiple_of(dp) {
                continue;
            }
            let per_rank = job.train.global_batch / dp;
            for m in divisors(per_rank) {
                if m > MAX_MICROBATCHES {
                    continue;
                }
                let mut schedules = vec![(ScheduleName::OneFOneB, 1)];
                if pp > 1 {
                    schedules.push((ScheduleName::Gpipe, 1));
                    schedules.push((ScheduleName::Interleaved, 2));
                    schedules.push((ScheduleName::Interleaved, 4));
                }
                for (schedule, v) in schedules {
                    for recompute in Recompute::ALL {
                        if !features.recompute(recompute) {
                            continue;
                        }
                        for shard in [false, true] {
                            if shard && (dp == 1 || !features.shard_optimizer) {
                                continue;
                            }
                            for sp in [false, true] {
                                if sp && (tp == 1 || !features.sequence_parallel) {
                                    continue;
                                }
                                let parallel = ParallelSection {
                                    dp,
                                    pp,
                                    tp,
                                    microbatches: m,
                                    schedule,
                                    virtual_stages: v,
                                    recompute,
                                    shard_optimizer: shard,
                                    sequence_parallel: sp,
                                    ..job.parallel.clone()
                                };
                                match evaluate(job, parallel, hw, features) {
                                    Ok(plan) => {
                                        valid += 1;
                                        let smaller = smallest
                                            .as_ref()
                                            .is_none_or(|s| plan.memory.total() < s.memory.total());
                                        if smaller {
                                            smallest = Some(plan.clone());
                                        }
                                        if plan.memory.allocated() <= usable {
                                            fits.push(plan);
                                        }
                                    }
                                    Err(e) => {
                                        first_error.get_or_insert(e);
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
    }
    if valid == 0 {
        return Err(PlanError::NoLayout {
            devices: n,
            reason: first_error.unwrap_or_else(|| {
                format!(
                    "no (dp, pp, tp) splits {n} devices with tp inside a node of {} and dp dividing global_batch = {}",
                    hw.node_size(),
                    job.train.global_batch
                )
            }),
        });
    }
    fits.sort_by(|a, b| {
        a.time
            .total()
            .total_cmp(&b.time.total())
            .then(a.memory.total().cmp(&b.memory.total()))
    });
    Ok(Found {
        fits,
        valid,
        smallest,
    })
}

/// The plans that fit, best first, or why none does.
pub fn plan(job: &JobConfig, hw: &Hardware, features: Features) -> Result<Vec<Plan>, PlanError> {
    // A distillation teacher the planner cannot count is the job's error, not a layout's.
    crate::memory::teacher_model(job)?;
    let found = search(job, hw, features)?;
    if found.fits.is_empty() {
        let s = found.smallest.as_ref();
        let (smallest, layout) = s
            .map(|p| (p.memory.allocated(), p.describe()))
            .unwrap_or((0, String::new()));
        let usable = hw.usable_bytes();
        let advice = format!(
            "it needs {} more per device: more devices (parameters, gradients and optimizer state divide over pp × tp, and the optimizer over dp when sharded), devices with more memory, or a smaller train.global_batch",
            fmt_bytes(smallest.saturating_sub(usable))
        );
        return Err(PlanError::NothingFits {
            usable: fmt_bytes(usable),
            smallest: fmt_bytes(smallest),
            layout,
            advice,
        });
    }
    Ok(found.fits)
}

/// One candidate: validated as the trainer validates it, then modelled.
fn evaluate(
    job: &JobConfig,
    parallel: ParallelSection,
    hw: &Hardware,
    features: Features,
) -> Result<Plan, String> {
    let mut file = job.file.clone();
    file.parallel = parallel;
    // The data streams must split over dp; a planned job keeps the file's streams.
    let job = JobConfig::from_file_config_with(file, features).map_err(|e| e.to_string())?;
    let layout = ParallelLayout::new(&job, hw.devices).map_err(|e| e.to_string())?;
    let (worst_rank, memory, time) = {
        let model = MemoryModel::new(&job, &layout, hw.kind, hw.reserve_bytes)
            .map_err(|e| e.to_string())?;
        let (r, m) = model.worst();
        (r, m, step_time(&job, &layout, hw, |r| model.rank_params(r)))
    };
    let runnable = Features::TRAINER.missing(&job.parallel).is_none();
    Ok(Plan {
        job,
        layout,
        worst_rank,
        memory,
        time,
        runnable,
    })
}

/// Why `plans[0]` wins, in a paragraph: against the runner-up, and against the fastest
/// plan without the memory features it uses.
pub fn why(plans: &[Plan], hw: &Hardware) -> String {
    let Some(best) = plans.first() else {
        return String::new();
    };
    let t = best.time.total();
    let mut out = format!(
        "{} is fastest of the {} layouts that fit in {} per device: {:.3} s per step, {:.1} samples/s, at most {} on its pipeline rank {}.",
        best.describe(),
        plans.len(),
        fmt_bytes(hw.usable_bytes()),
        t,
        best.job.train.global_batch as f64 / t,
        fmt_bytes(best.memory.total()),
        best.worst_rank
    );
    if let Some(next) = plans.get(1) {
        let (name, diff) = largest_difference(&next.time, &best.time);
        if next.time.total() - t <= 1e-3 * t {
            out.push_str(&format!(
                " The runner-up, {}, ties within 0.1% ({:.3} s) and needs {} rather than {} (ties go to less memory).",
                next.describe(),
                next.time.total(),
                fmt_bytes(next.memory.total()),
                fmt_bytes(best.memory.total())
            ));
        } else {
            out.push_str(&format!(
                " The runner-up, {}, takes {:.3} s ({:+.1}%), mostly in {name} ({:+.3} s).",
                next.describe(),
                next.time.total(),
                100.0 * (next.time.total() / t - 1.0),
                diff
            ));
        }
    }
    let p = &best.job.parallel;
    if p.recompute != Recompute::None || p.shard_optimizer || p.sequence_parallel {
        match plans.iter().find(|q| {
            let qp = &q.job.parallel;
            qp.recompute == Recompute::None && !qp.shard_optimizer && !qp.sequence_parallel
        }) {
            Some(plain) => out.push_str(&format!(
                " Without the memory features the best is {} at {:.3} s.",
                plain.describe(),
                plain.time.total()
            )),
            None => out.push_str(" Nothing fits without the memory features it uses."),
        }
    }
    if !best.runnable {
        out.push_str(" The trainer does not implement all its memory features yet (issue 12); `weaver plan --runnable` shows the best plan it can run.");
    }
    out
}

/// The component where `worse` loses most to `better`.
fn largest_difference(worse: &StepTime, better: &StepTime) -> (&'static str, f64) {
    worse
        .parts()
        .iter()
        .zip(better.parts().iter())
        .map(|((name, w), (_, b))| (*name, w - b))
        .max_by(|a, b| a.1.total_cmp(&b.1))
        .unwrap_or(("compute", 0.0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hardware::DeviceKind;

    fn job(text: &str) -> JobConfig {
        JobConfig::parse_with(text, &[], Features::ALL).unwrap()
    }

    #[test]
    fn every_plan_passes_the_trainers_validation_and_fits() {
        let j = job("[model]\nflavor = \"small\"\n[train]\nglobal_batch = 32\n");
        let hw = Hardware::cpu(4, 4, 4 << 30);
        let found = search(&j, &hw, Features::ALL).unwrap();
        assert!(found.valid > 10, "{}", found.valid);
        assert!(!found.fits.is_empty());
        for p in &found.fits {
            let q = &p.job.parallel;
            assert_eq!(q.dp * q.pp * q.tp, 4);
            assert!(ParallelLayout::new(&p.job, 4).is_ok());
            assert!(p.memory.allocated() <= hw.usable_bytes());
            assert_eq!(p.job.train.global_batch % (q.dp * q.microbatches), 0);
            assert!(q.tp <= 4 && 4 % q.tp == 0);
        }
        // Best first.
        for w in found.fits.windows(2) {
            assert!(w[0].time.total() <= w[1].time.total());
        }
        // The small model has 8 heads per tower: tp = 3 never appears.
        let j = job("[model]\nflavor = \"small\"\n[train]\nglobal_batch = 36\n");
        let found = search(&j, &Hardware::cpu(3, 3, 4 << 30), Features::ALL).unwrap();
        assert!(found.fits.iter().all(|p| p.job.parallel.tp == 1));
    }

    #[test]
    fn trainer_features_only_when_asked() {
        let j = job("[model]\nflavor = \"small\"\n[train]\nglobal_batch = 16\n");
        let hw = Hardware::cpu(2, 2, 4 << 30);
        let plans = plan(&j, &hw, Features::TRAINER).unwrap();
        assert!(plans.iter().all(|p| p.runnable));
        // The trainer runs every feature the planner knows (issue 12): the same plans.
        let all = plan(&j, &hw, Features::ALL).unwrap();
        assert_eq!(Features::TRAINER, Features::ALL);
        assert_eq!(all.len(), plans.len());
        assert!(!why(&all, &hw).is_empty());
    }

    #[test]
    fn nothing_fits_says_the_smallest_and_what_would_help() {
        let j = job("[model]\nflavor = \"1b\"\n[train]\nglobal_batch = 8\n");
        let hw = Hardware {
            kind: DeviceKind::Cpu,
            ..Hardware::cpu(2, 2, 1 << 20)
        };
        let e = plan(&j, &hw, Features::ALL).unwrap_err();
        match &e {
            PlanError::NothingFits {
                smallest, advice, ..
            } => {
                assert!(!smallest.is_empty());
                assert!(advice.contains("more devices"), "{advice}");
            }
            other => panic!("{other:?}"),
        }
        // No valid layout at all: 7 devices cannot split the debug model's 4 heads, its 6
        // layers or a batch of 8.
        let j = job("[train]\nglobal_batch = 8\n");
        let e = plan(&j, &Hardware::cpu(7, 7, 1 << 40), Features::ALL).unwrap_err();
        assert!(matches!(e, PlanError::NoLayout { .. }), "{e}");
    }

    #[test]
    fn the_sharded_optimizer_cuts_optimizer_memory_by_dp() {
        let j = job("[model]\nflavor = \"small\"\n[train]\nglobal_batch = 64\ndtype = \"bf16\"\n");
        let hw = Hardware::h200(8, 8);
        let found = search(&j, &hw, Features::ALL).unwrap();
        let find = |shard: bool| {
            found
                .fits
                .iter()
                .find(|p| {
                    let q = &p.job.parallel;
                    q.dp == 8
                        && q.microbatches == 1
                        && q.recompute == Recompute::None
                        && q.shard_optimizer == shard
                })
                .cloned()
                .unwrap()
        };
        let (plain, sharded) = (find(false), find(true));
        assert!(
            sharded.memory.optimizer * 8 <= plain.memory.optimizer + 8 * 12,
            "{} vs {}",
            sharded.memory.optimizer,
            plain.memory.optimizer
        );
    }
}
