//! The parallel layout a job asks for, validated once against the model and the process
//! count: the mesh ([`ParallelDims`]), the schedule family and its chunks, and the layer
//! ranges of every virtual stage (cut by [`partition`] on the layers' FLOP costs).
//!
//! One function decides whether a layout is possible, so that what the trainer builds, what
//! the coordinator assigns and what the planner (`weaver plan`, `layout = "auto"`) proposes
//! can never disagree. The job-level rules (global batch ÷ (dp × micro-batches), data
//! streams ÷ dp, …) are [`JobConfig::from_file_config`]'s; this adds the ones that need the
//! world size and the model's layers.

use std::ops::Range;

use crate::config::{JobConfig, Schedule as ScheduleName};
use crate::mesh::{LayoutError, ParallelDims};
use crate::pp::{check_shape, partition, ScheduleKind};

/// A checked layout: everything downstream trusts it.
#[derive(Debug, Clone, PartialEq)]
pub struct ParallelLayout {
    /// Mesh sizes.
    pub dims: ParallelDims,
    /// Layers of each virtual stage (`pp · chunks` of them; stage `s` on pipeline rank
    /// `s mod pp`, as its chunk `s / pp`).
    pub stages: Vec<Range<usize>>,
    /// The schedule family.
    pub kind: ScheduleKind,
    /// Chunks per pipeline rank.
    pub chunks: usize,
}

impl ParallelLayout {
    /// Validates `job`'s `[parallel]` for `world` processes and cuts the model into stages.
    pub fn new(job: &JobConfig, world: usize) -> Result<ParallelLayout, LayoutError> {
        let p = &job.parallel;
        let limits = job.model.limits();
        let dims = ParallelDims::new(p.dp, p.pp, p.tp, world, &limits)?;
        let (kind, chunks) = schedule_kind(p.schedule, p.virtual_stages);
        if kind != ScheduleKind::Interleaved && p.virtual_stages != 1 {
            return Err(LayoutError(format!(
                "parallel.virtual_stages = {} needs parallel.schedule = \"interleaved\"",
                p.virtual_stages
            )));
        }
        // Interleaving needs the micro-batches in groups of pp, ...
        check_shape(kind, p.pp, p.microbatches, chunks).map_err(|e| LayoutError(e.0))?;
        let costs = job
            .model
            .layer_costs(job.train.itm_weight > 0.0, p.vision_block_cost);
        let stages = partition(&costs, p.pp * chunks).map_err(|e| LayoutError(e.0))?;
        Ok(ParallelLayout {
            dims,
            stages,
            kind,
            chunks,
        })
    }

    /// The layer ranges of pipeline rank `pp`'s chunks, in chunk order.
    pub fn rank_stages(&self, pp: usize) -> Vec<Range<usize>> {
        (0..self.chunks)
            .map(|c| self.stages[c * self.dims.pp + pp].clone())
            .collect()
    }
}

/// The schedule family of a config's `parallel.schedule`, and its chunks per rank.
pub fn schedule_kind(schedule: ScheduleName, virtual_stages: usize) -> (ScheduleKind, usize) {
    match schedule {
        ScheduleName::Gpipe => (ScheduleKind::GPipe, 1),
        ScheduleName::OneFOneB => (ScheduleKind::OneFOneB, 1),
        ScheduleName::Interleaved => (ScheduleKind::Interleaved, virtual_stages),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(sets: &[&str]) -> JobConfig {
        let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
        JobConfig::parse("[train]\nglobal_batch = 48\n", &sets).unwrap()
    }

    #[test]
    fn checks_the_mesh_the_schedule_and_the_layers() {
        let l = ParallelLayout::new(&job(&["parallel.pp=2", "parallel.tp=2"]), 4).unwrap();
        assert_eq!(l.stages.len(), 2);
        assert_eq!(l.stages[0].start, 0);
        assert_eq!(l.stages[1].end, 6);
        assert_eq!(l.rank_stages(1), vec![l.stages[1].clone()]);
        // World size.
        assert!(ParallelLayout::new(&job(&["parallel.pp=2"]), 4).is_err());
        // Heads ÷ tp (debug: 4 heads).
        assert!(ParallelLayout::new(&job(&["parallel.tp=3"]), 3).is_err());
        // Layers ≥ stages × chunks.
        let e = ParallelLayout::new(
            &job(&[
                "parallel.pp=2",
                "parallel.schedule=\"interleaved\"",
                "parallel.virtual_stages=4",
                "parallel.microbatches=2",
            ]),
            2,
        )
        .unwrap_err();
        assert!(e.0.contains("6 layers"), "{e}");
        // Interleaving's micro-batches in groups of pp.
        let e = ParallelLayout::new(
            &job(&[
                "parallel.pp=2",
                "parallel.schedule=\"interleaved\"",
                "parallel.virtual_stages=2",
                "parallel.microbatches=3",
            ]),
            2,
        );
        assert!(e.is_err());
        // virtual_stages only with interleaving.
        assert!(ParallelLayout::new(&job(&["parallel.virtual_stages=2"]), 1).is_err());
        let l = ParallelLayout::new(
            &job(&[
                "parallel.pp=2",
                "parallel.schedule=\"interleaved\"",
                "parallel.virtual_stages=3",
                "parallel.microbatches=2",
            ]),
            2,
        )
        .unwrap();
        assert_eq!(l.stages.len(), 6);
        assert_eq!(l.rank_stages(0), vec![0..1, 2..3, 4..5]);
    }
}
