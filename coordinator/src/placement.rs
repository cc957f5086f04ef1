//! Placement: which registered worker becomes which global rank.
//!
//! Ranks are row-major over (dp, pp, tp) with tp innermost (see `weaver_config::mesh`),
//! so handing out ranks in (host, local rank) order keeps each TP group — the chattiest —
//! inside one host, pipeline neighbours next, and data-parallel replicas farthest apart.
//! That only works when every host contributes whole TP groups; placement checks this and
//! everything else that would make the job impossible, and says what to change.

use std::collections::BTreeMap;

use crate::pb::WorkerInfo;

/// A worker that may be placed.
#[derive(Debug, Clone)]
pub(crate) struct Candidate<'a> {
    pub(crate) id: u64,
    pub(crate) info: &'a WorkerInfo,
}

/// The chosen workers, by rank, and those left out (only when more came than needed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Placement {
    pub(crate) by_rank: Vec<u64>,
    pub(crate) unused: Vec<u64>,
}

/// Places `world = groups * tp` ranks on `workers`. `nccl` adds NCCL's constraints (CUDA
/// devices, one rank per GPU).
pub(crate) fn place(
    workers: &[Candidate<'_>],
    world: usize,
    tp: usize,
    nccl: bool,
) -> Result<Placement, String> {
    if workers.len() < world {
        return Err(format!(
            "the layout needs {world} workers but only {} registered",
            workers.len()
        ));
    }
    // One device kind per job: mixed CPU/GPU ranks would run at the slowest one's pace and
    // cannot share a backend.
    let mut kinds: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for w in workers {
        let hosts = kinds.entry(w.info.device_kind.as_str()).or_default();
        if !hosts.contains(&w.info.host.as_str()) {
            hosts.push(w.info.host.as_str());
        }
    }
    if kinds.len() > 1 {
        let parts: Vec<String> = kinds
            .iter()
            .map(|(k, hosts)| {
                let n = workers.iter().filter(|w| w.info.device_kind == *k).count();
                format!("{n} on {k:?} (hosts {})", hosts.join(", "))
            })
            .collect();
        return Err(format!(
            "mixed device kinds: {}; a job runs on one kind of device",
            parts.join(", ")
        ));
    }
    if nccl {
        if let Some(w) = workers.iter().find(|w| w.info.device_kind != "cuda") {
            return Err(format!(
                "backend nccl needs CUDA devices but host {} reports {:?}; use backend = \"tcp\" on CPUs",
                w.info.host, w.info.device_kind
            ));
        }
        let mut seen: BTreeMap<(&str, &str), u32> = BTreeMap::new();
        for w in workers {
            if let Some(other) = seen.insert((&w.info.host, &w.info.device), w.info.local_rank) {
                return Err(format!(
                    "host {} has local ranks {other} and {} on {}: NCCL refuses two ranks on one GPU \
                     (give each worker its own --device cuda:K, or use backend = \"tcp\")",
                    w.info.host, w.info.local_rank, w.info.device
                ));
            }
        }
    }
    let mut hosts: BTreeMap<&str, Vec<&Candidate<'_>>> = BTreeMap::new();
    for w in workers {
        hosts.entry(w.info.host.as_str()).or_default().push(w);
    }
    let mut by_rank = Vec::with_capacity(world);
    let mut unused = Vec::new();
    for list in hosts.values_mut() {
        list.sort_by_key(|w| (w.info.local_rank, w.id));
        let whole = list.len() / tp * tp;
        for (i, w) in list.iter().enumerate() {
            if i < whole && by_rank.len() < world {
                by_rank.push(w.id);
            } else {
                unused.push(w.id);
            }
        }
    }
    if by_rank.len() < world {
        let counts: Vec<String> = hosts
            .iter()
            .map(|(h, l)| format!("{h}: {}", l.len()))
            .collect();
        return Err(format!(
            "tp = {tp} needs each host's workers in multiples of {tp} (a TP group stays inside one \
             host), which leaves {} usable workers of the {world} needed (workers per host: {}); \
             start whole TP groups on each host or lower tp",
            by_rank.len(),
            counts.join(", ")
        ));
    }
    Ok(Placement { by_rank, unused })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn info(host: &str, local_rank: u32, kind: &str) -> WorkerInfo {
        WorkerInfo {
            host: host.into(),
            local_rank,
            device_kind: kind.into(),
            device: if kind == "cuda" {
                format!("cuda:{local_rank}")
            } else {
                "cpu".into()
            },
            ..Default::default()
        }
    }

    fn cands(infos: &[WorkerInfo]) -> Vec<Candidate<'_>> {
        infos
            .iter()
            .enumerate()
            .map(|(i, info)| Candidate { id: i as u64, info })
            .collect()
    }

    #[test]
    fn tp_groups_stay_on_one_host_whatever_the_registration_order() {
        // Registration interleaves two hosts; ranks still come host by host.
        let infos: Vec<WorkerInfo> = (0..8)
            .map(|i| info(if i % 2 == 0 { "b" } else { "a" }, i / 2, "cpu"))
            .collect();
        let p = place(&cands(&infos), 8, 2, false).unwrap();
        let hosts: Vec<&str> = p
            .by_rank
            .iter()
            .map(|&id| infos[id as usize].host.as_str())
            .collect();
        assert_eq!(hosts, ["a", "a", "a", "a", "b", "b", "b", "b"]);
        assert!(p.unused.is_empty());
    }

    #[test]
    fn refuses_impossible_requests_with_the_reason() {
        let mixed = vec![info("a", 0, "cpu"), info("a", 1, "cuda")];
        let e = place(&cands(&mixed), 2, 1, false).unwrap_err();
        assert!(e.contains("mixed device kinds"), "{e}");

        let odd = vec![
            info("a", 0, "cpu"),
            info("a", 1, "cpu"),
            info("a", 2, "cpu"),
            info("b", 0, "cpu"),
        ];
        let e = place(&cands(&odd), 4, 2, false).unwrap_err();
        assert!(e.contains("multiples of 2") && e.contains("b: 1"), "{e}");

        let cpu = vec![info("a", 0, "cpu")];
        let e = place(&cands(&cpu), 1, 1, true).unwrap_err();
        assert!(e.contains("nccl needs CUDA"), "{e}");

        let mut same_gpu = vec![info("a", 0, "cuda"), info("a", 1, "cuda")];
        same_gpu[1].device = "cuda:0".into();
        let e = place(&cands(&same_gpu), 2, 1, true).unwrap_err();
        assert!(e.contains("two ranks on one GPU"), "{e}");

        let e = place(&cands(&cpu), 2, 1, false).unwrap_err();
        assert!(e.contains("needs 2 workers"), "{e}");
    }

    proptest! {
        #[test]
        fn every_tp_group_is_on_one_host(
            per_host in proptest::collection::vec(1usize..5, 1..5),
            tp in 1usize..4,
        ) {
            let mut infos = Vec::new();
            for (h, &n) in per_host.iter().enumerate() {
                for l in 0..n * tp {
                    infos.push(info(&format!("h{h}"), l as u32, "cpu"));
                }
            }
            let world = infos.len();
            let p = place(&cands(&infos), world, tp, false).unwrap();
            prop_assert_eq!(p.by_rank.len(), world);
            let mut seen = p.by_rank.clone();
            seen.sort();
            seen.dedup();
            prop_assert_eq!(seen.len(), world);
            for group in p.by_rank.chunks(tp) {
                let h = &infos[group[0] as usize].host;
                prop_assert!(group.iter().all(|&id| &infos[id as usize].host == h));
            }
        }
    }
}
