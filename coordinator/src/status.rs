//! What `weaver status --coordinator URL` prints: the job's phase and progress, then one
//! row per worker (host, rank, coordinates, last step, last heartbeat).

use std::fmt::Write;

use crate::job::phase_name;
use crate::pb;

/// Renders a status reply as the operator's table.
pub fn render_status(s: &pb::StatusResponse) -> String {
    let phase = pb::Phase::try_from(s.phase).unwrap_or(pb::Phase::Unspecified);
    let mut out = String::new();
    let dims = s
        .dims
        .map(|d| format!("dp={} pp={} tp={}", d.dp, d.pp, d.tp))
        .unwrap_or_default();
    let _ = writeln!(
        out,
        "job: {}  generation {} (restarts {})  layout {dims}  elapsed {:.0} s",
        phase_name(phase),
        s.generation,
        s.restarts,
        s.elapsed_ms as f64 / 1e3
    );
    let step = if s.step < 0 {
        "-".to_string()
    } else {
        s.step.to_string()
    };
    let _ = write!(out, "step {step}/{}", s.total_steps);
    if let Some(l) = s.loss {
        let _ = write!(out, "  loss {l:.4}");
    }
    if let Some(t) = s.tokens_per_s {
        let _ = write!(out, "  {t:.0} tokens/s");
    }
    out.push('\n');
    if !s.resume_from.is_empty() {
        let _ = writeln!(
            out,
            "resume point: {} (step {})",
            s.resume_from, s.resume_step
        );
    }
    if !s.message.is_empty() {
        let _ = writeln!(out, "{}", s.message);
    }
    let _ = writeln!(
        out,
        "workers: {} of {} expected",
        s.workers.len(),
        s.expected_workers
    );
    let header = [
        "HOST",
        "LOCAL",
        "RANK",
        "(DP,PP,TP)",
        "DEVICE",
        "PID",
        "STEP",
        "HEARTBEAT",
        "STATE",
    ];
    let mut rows: Vec<[String; 9]> = vec![header.map(String::from)];
    for w in &s.workers {
        rows.push([
            w.host.clone(),
            w.local_rank.to_string(),
            if w.rank < 0 {
                "-".into()
            } else {
                w.rank.to_string()
            },
            w.coord
                .map_or("-".into(), |c| format!("({},{},{})", c.dp, c.pp, c.tp)),
            w.device.clone(),
            w.pid.to_string(),
            if w.last_step < 0 {
                "-".into()
            } else {
                w.last_step.to_string()
            },
            format!("{:.1} s ago", w.heartbeat_age_ms as f64 / 1e3),
            if w.done {
                "done".into()
            } else if w.rank < 0 && matches!(phase, pb::Phase::Planning | pb::Phase::Running) {
                // Registered but not part of the running generation: an elastic job's spare.
                "spare".into()
            } else if w.rank < 0 {
                "registered".into()
            } else {
                "assigned".into()
            },
        ]);
    }
    let widths: Vec<usize> = (0..9)
        .map(|i| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0))
        .collect();
    for r in &rows {
        let line: Vec<String> = r
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        let _ = writeln!(out, "{}", line.join("  ").trim_end());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_a_row_per_worker() {
        let s = pb::StatusResponse {
            phase: pb::Phase::Running as i32,
            generation: 2,
            restarts: 1,
            expected_workers: 2,
            total_steps: 100,
            step: 42,
            loss: Some(1.25),
            dims: Some(pb::Dims {
                dp: 2,
                pp: 1,
                tp: 1,
            }),
            workers: vec![
                pb::WorkerStatus {
                    host: "node-a".into(),
                    rank: 0,
                    coord: Some(pb::Coord {
                        dp: 0,
                        pp: 0,
                        tp: 0,
                    }),
                    last_step: 42,
                    heartbeat_age_ms: 300,
                    device: "cpu".into(),
                    ..Default::default()
                },
                pb::WorkerStatus {
                    host: "node-b".into(),
                    rank: -1,
                    last_step: -1,
                    ..Default::default()
                },
            ],
            ..Default::default()
        };
        let t = render_status(&s);
        assert!(t.contains("job: running  generation 2"), "{t}");
        assert!(t.contains("step 42/100  loss 1.2500"), "{t}");
        assert!(
            t.lines().any(|l| l.starts_with("node-a")
                && l.contains("(0,0,0)")
                && l.contains("0.3 s ago")),
            "{t}"
        );
        assert!(
            t.lines()
                .any(|l| l.starts_with("node-b") && l.contains("spare")),
            "{t}"
        );
        let gathering = render_status(&pb::StatusResponse {
            phase: pb::Phase::Gathering as i32,
            ..s
        });
        assert!(
            gathering
                .lines()
                .any(|l| l.starts_with("node-b") && l.contains("registered")),
            "{gathering}"
        );
    }
}
