//! Choosing a layout from the workers that registered: `parallel.layout = "auto"` (the
//! coordinator calls [`choose`] once its workers have gathered, with the device kind and
//! memory each reported at registration, and makes the choice the job's effective config;
//! see `weaver_coordinator::job`).
//!
//! The hosts' devices make the [`Hardware`]: devices in all, a node the greatest common
//! divisor of the hosts' device counts (ranks are laid out host by host, so a tensor-parallel
//! group of that size never spans hosts), each device the smallest memory reported. Only
//! layouts the trainer runs ([`Features::TRAINER`]) are chosen. When re-planning an elastic
//! job the current micro-batch is kept if any fitting layout has it (the losses then match
//! the unshrunk job's), as the hand-written elastic rule does.

use weaver_config::config::Features;
use weaver_config::JobConfig;

use crate::error::PlanError;
use crate::hardware::{DeviceKind, Hardware};
use crate::search::{plan, why, Plan};

/// What one registered host offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Host {
    /// GPUs, or CPU worker processes.
    pub kind: DeviceKind,
    /// Devices (ranks) on the host.
    pub devices: usize,
    /// Memory of one device in bytes (CPU: the host's memory divided among its processes).
    pub memory_bytes: u64,
}

/// The chosen layout and why.
#[derive(Debug, Clone)]
pub struct Choice {
    /// The plan, its job config carrying the chosen `[parallel]` keys.
    pub plan: Plan,
    /// For the log: why this one.
    pub reasons: String,
}

/// The hardware `hosts` make up.
pub fn hardware(hosts: &[Host]) -> Result<Hardware, PlanError> {
    let Some(first) = hosts.first() else {
        return Err(PlanError::BadHardware("no workers registered".into()));
    };
    if hosts.iter().any(|h| h.kind != first.kind) {
        return Err(PlanError::BadHardware(
            "GPU and CPU workers registered together; one job runs on one kind".into(),
        ));
    }
    if hosts.iter().any(|h| h.devices == 0 || h.memory_bytes == 0) {
        return Err(PlanError::BadHardware(
            "a worker host reported no devices or no memory".into(),
        ));
    }
    let devices = hosts.iter().map(|h| h.devices).sum();
    let per_node = hosts.iter().map(|h| h.devices).fold(0, gcd);
    let memory = hosts.iter().map(|h| h.memory_bytes).min().unwrap_or(0);
    let mut hw = match first.kind {
        DeviceKind::Gpu => Hardware::h200(devices, per_node),
        DeviceKind::Cpu => Hardware::cpu(devices, per_node, memory),
    };
    hw.memory_bytes = memory;
    hw.validate()?;
    Ok(hw)
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// The best layout the trainer runs for `job` on `hosts`; `keep_micro_batch`: the current
/// micro-batch size of an elastic job being re-planned.
pub fn choose(
    job: &JobConfig,
    hosts: &[Host],
    keep_micro_batch: Option<usize>,
) -> Result<Choice, PlanError> {
    let hw = hardware(hosts)?;
    let plans = plan(job, &hw, Features::TRAINER)?;
    let kept: Vec<Plan> = match keep_micro_batch {
        Some(mbs) => plans
            .iter()
            .filter(|p| p.job.micro_batch_size() == mbs)
            .cloned()
            .collect(),
        None => Vec::new(),
    };
    let (pool, note) = match keep_micro_batch {
        Some(mbs) if !kept.is_empty() => (
            kept,
            format!(" The micro-batch of {mbs} samples is kept (so are the losses)."),
        ),
        Some(mbs) => (
            plans,
            format!(" No fitting layout keeps the micro-batch of {mbs} samples; it changes."),
        ),
        None => (plans, String::new()),
    };
    let reasons = format!("{}{note}", why(&pool, &hw));
    let plan = pool.into_iter().next().ok_or(PlanError::NoLayout {
        devices: hw.devices,
        reason: "no layout fits".into(),
    })?;
    Ok(Choice { plan, reasons })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job() -> JobConfig {
        JobConfig::parse(
            "[model]\nflavor = \"small\"\n[train]\nglobal_batch = 32\n",
            &[],
        )
        .unwrap()
    }

    fn cpu(devices: usize) -> Host {
        Host {
            kind: DeviceKind::Cpu,
            devices,
            memory_bytes: 2 << 30,
        }
    }

    #[test]
    fn hosts_make_nodes_that_tensor_parallelism_cannot_leave() {
        let hw = hardware(&[cpu(4), cpu(2), cpu(4)]).unwrap();
        assert_eq!((hw.devices, hw.per_node), (10, 2));
        let mut small = cpu(4);
        small.memory_bytes = 1 << 30;
        assert_eq!(hardware(&[cpu(4), small]).unwrap().memory_bytes, 1 << 30);
        assert!(hardware(&[]).is_err());
        let gpu = Host {
            kind: DeviceKind::Gpu,
            devices: 8,
            memory_bytes: 140 << 30,
        };
        assert!(hardware(&[gpu, cpu(4)]).is_err());
        let c = choose(&job(), &[cpu(2), cpu(2)], None).unwrap();
        let p = &c.plan.job.parallel;
        assert_eq!(p.dp * p.pp * p.tp, 4);
        assert!(p.tp <= 2, "{p:?}");
        assert!(c.plan.runnable);
        assert!(c.reasons.contains("is fastest"), "{}", c.reasons);
    }

    #[test]
    fn re_planning_keeps_the_micro_batch_when_it_can() {
        // Four processes: dp·microbatches of the chosen layout may differ, the micro-batch
        // of 4 samples stays.
        let c = choose(&job(), &[cpu(4)], Some(4)).unwrap();
        assert_eq!(c.plan.job.micro_batch_size(), 4);
        assert!(c.reasons.contains("is kept"), "{}", c.reasons);
        // A micro-batch no layout can keep (32 samples do not split into micro-batches of
        // 5): the best layout is chosen anyway, and the log says the micro-batch changes.
        let c = choose(&job(), &[cpu(3)], Some(5)).unwrap();
        assert!(c.reasons.contains("changes"), "{}", c.reasons);
    }
}
