//! `weaver infer` end to end: a 2-worker job (under a local coordinator) writes what one
//! process writes, and a process killed after some input shards were committed resumes
//! without recomputing them and ends with the uninterrupted run's outputs, byte for byte.

mod common;

use common::{ok, worker_pids};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Output, Stdio};
use std::time::{Duration, Instant};

fn weaver(args: &[&str], cwd: &Path) -> Output {
    common::run(args, cwd)
}

/// A `debug` model trained 2 steps: its checkpoint root.
fn trained(dir: &Path) -> String {
    let cfg = dir.join("job.toml");
    std::fs::write(
        &cfg,
        "[model]\nflavor = \"debug\"\npatch_size = 8\n[train]\nsteps = 2\nglobal_batch = 8\nwarmup_steps = 1\nthreads = 1\n",
    )
    .unwrap();
    let ck = dir.join("ck").display().to_string();
    ok(&weaver(
        &[
            "train",
            "--config",
            cfg.to_str().unwrap(),
            "--run-dir",
            dir.join("run").to_str().unwrap(),
            "--set",
            &format!("checkpoint.url=\"{ck}\""),
        ],
        dir,
    ));
    ck
}

/// Every file under `dir` except the progress markers, by relative name.
fn outputs(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        // A put cut short by the kill can leave the local store's staging file (`NAME#N`):
        // not an output.
        .filter(|p| p.is_file() && !p.to_string_lossy().contains('#'))
        .map(|p| {
            (
                p.file_name().unwrap().to_string_lossy().into_owned(),
                std::fs::read(&p).unwrap(),
            )
        })
        .collect()
}

/// The `weaver infer` arguments of the kill tests: beam-search captions (`beam` beams) of
/// `shards` synthetic shards of `shard_size` samples, one thread, written to `out`.
fn caption_args(
    ck: &str,
    out: &Path,
    shards: usize,
    shard_size: usize,
    beam: usize,
) -> Vec<String> {
    [
        "infer",
        "--checkpoint",
        ck,
        "--data",
        "synthetic",
        "--task",
        "caption",
        "--beam",
        &beam.to_string(),
        "--out",
        out.to_str().unwrap(),
        "--set",
        &format!("infer.synthetic_shards={shards}"),
        "--set",
        &format!("infer.shard_size={shard_size}"),
        "--set",
        "train.threads=1",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// Runs `weaver` with `args` in `cwd`, which must succeed: its stdout.
fn weaver_ok(args: &[String], cwd: &Path) -> String {
    ok(&weaver(
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
        cwd,
    ))
}

/// The uninterrupted single-process run a kill test compares with: `args` of its output
/// directory (`dir/reference`), which it returns.
fn reference_run(dir: &Path, args: impl Fn(&Path) -> Vec<String>) -> PathBuf {
    let reference = dir.join("reference");
    weaver_ok(&args(&reference), dir);
    reference
}

/// `weaver` with `args`, started with its output discarded (to be killed).
fn spawn_quiet(args: &[String]) -> Child {
    common::weaver()
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

fn markers(dir: &Path) -> BTreeMap<String, String> {
    let Ok(rd) = std::fs::read_dir(dir.join("_progress")) else {
        return BTreeMap::new();
    };
    rd.map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .map(|p| {
            (
                p.file_name().unwrap().to_string_lossy().into_owned(),
                std::fs::read_to_string(&p).unwrap_or_default(),
            )
        })
        .collect()
}

#[test]
fn a_two_worker_job_writes_what_one_process_writes() {
    let dir = tempfile::tempdir().unwrap();
    let ck = trained(dir.path());
    let common = [
        "infer",
        "--checkpoint",
        &ck,
        "--data",
        "synthetic",
        "--task",
        "embed",
        "--set",
        "infer.synthetic_shards=5",
        "--set",
        "infer.shard_size=6",
    ];
    let one = dir.path().join("one");
    let mut args = common.to_vec();
    args.extend(["--out", one.to_str().unwrap()]);
    ok(&weaver(&args, dir.path()));
    let two = dir.path().join("two");
    let run_dir = dir.path().join("job");
    let mut args = common.to_vec();
    args.extend([
        "--out",
        two.to_str().unwrap(),
        "--nproc",
        "2",
        "--run-dir",
        run_dir.to_str().unwrap(),
    ]);
    ok(&weaver(&args, dir.path()));
    let (a, b) = (outputs(&one), outputs(&two));
    assert_eq!(a.len(), 6, "{:?}", a.keys());
    assert_eq!(a, b, "the 2-worker job's outputs differ from one process's");
    // Both workers computed shards: the markers name ranks 0 and 1.
    let ranks: std::collections::BTreeSet<u64> = markers(&two)
        .values()
        .map(|m| {
            serde_json::from_str::<serde_json::Value>(m).unwrap()["rank"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert_eq!(ranks.into_iter().collect::<Vec<_>>(), vec![0, 1]);
    let metrics = std::fs::read_to_string(run_dir.join("metrics.jsonl")).unwrap();
    assert!(metrics.contains("\"done\":true"), "{metrics}");
}

#[test]
fn a_killed_run_resumes_without_redoing_committed_shards() {
    let dir = tempfile::tempdir().unwrap();
    let ck = trained(dir.path());
    let shards = 10;
    let args = |out: &Path| caption_args(&ck, out, shards, 48, 4);
    let reference = reference_run(dir.path(), args);

    // Killed (SIGKILL) once three shards are committed.
    let out = dir.path().join("out");
    let mut child = spawn_quiet(&args(&out));
    let deadline = Instant::now() + Duration::from_secs(120);
    while markers(&out).len() < 3 {
        assert!(
            Instant::now() < deadline,
            "no three shards committed in 120 s"
        );
        assert!(
            child.try_wait().unwrap().is_none(),
            "weaver infer ended before it was killed"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let before = markers(&out);
    assert!(
        before.len() < shards,
        "every shard was committed before the kill: the test did not interrupt anything"
    );

    // Run again: the committed shards are skipped (their markers untouched), the rest
    // computed, and the outputs equal the uninterrupted run's.
    let again = weaver_ok(&args(&out), dir.path());
    let lines: Vec<serde_json::Value> = again
        .lines()
        .filter(|l| l.contains("infer_shard"))
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), shards);
    for l in &lines {
        let name = format!("{}.json", l["infer_shard"].as_str().unwrap());
        assert_eq!(
            l["skipped"].as_bool().unwrap(),
            before.contains_key(&name),
            "{l}: skipped must mean committed before the kill"
        );
    }
    let after = markers(&out);
    assert_eq!(after.len(), shards);
    for (name, m) in &before {
        assert_eq!(&after[name], m, "the marker of {name} was rewritten");
    }
    assert_eq!(
        outputs(&out),
        outputs(&reference),
        "resumed outputs differ from the uninterrupted run's"
    );
}

/// A data-parallel job of two worker processes under the coordinator, one worker killed
/// (SIGKILL) once a shard is committed: the job finishes (a new generation) with the
/// uninterrupted run's outputs, byte for byte, and no shard committed before the kill is
/// computed again.
#[test]
fn a_killed_worker_of_a_two_worker_job_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let ck = trained(dir.path());
    let shards = 10;
    let args = |out: &Path| caption_args(&ck, out, shards, 32, 3);
    let reference = reference_run(dir.path(), args);

    let out = dir.path().join("out");
    let run_dir = dir.path().join("job");
    let mut a = args(&out);
    a.extend([
        "--nproc".into(),
        "2".into(),
        "--run-dir".into(),
        run_dir.display().to_string(),
    ]);
    let mut child = spawn_quiet(&a);
    let deadline = Instant::now() + Duration::from_secs(180);
    while markers(&out).is_empty() {
        assert!(Instant::now() < deadline, "no shard committed in 180 s");
        assert!(
            child.try_wait().unwrap().is_none(),
            "weaver infer ended before a worker was killed"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let workers = worker_pids(child.id());
    assert_eq!(workers.len(), 2, "two workers run under the launcher");
    // SIGKILL: no chance to finish the shard under way or to say goodbye.
    // SAFETY: kill(2) on a process this test's child started.
    assert_eq!(unsafe { libc::kill(workers[1] as i32, libc::SIGKILL) }, 0);
    let before = markers(&out);
    let killed = std::time::SystemTime::now();
    assert!(
        before.len() < shards,
        "every shard was committed before the kill: the test did not interrupt anything"
    );
    let limit = Instant::now() + Duration::from_secs(400);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > limit {
            let _ = child.kill();
            panic!("the job did not end within 400 s of the kill");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(
        status.success(),
        "the job must survive a lost worker: {status}"
    );

    let metrics: Vec<serde_json::Value> = std::fs::read_to_string(run_dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let last = metrics.last().unwrap();
    assert_eq!(last["done"], true, "{last}");
    // The lost worker ended the first generation: the job finished in a later one.
    assert!(last["restarts"].as_u64().unwrap_or(0) >= 1, "{last}");
    assert!(last["generation"].as_u64().unwrap_or(0) >= 2, "{last}");
    // The coordinator's metrics.jsonl has the workers' per-shard lines: every shard is
    // there, computed (`skipped: false`) at most once over both generations; a shard whose
    // line the killed worker did not get to send shows up as skipped in the next one.
    let mut computed = std::collections::BTreeMap::<String, usize>::new();
    let mut seen = std::collections::BTreeSet::<String>::new();
    for m in &metrics {
        if let Some(name) = m["infer_shard"].as_str() {
            seen.insert(name.to_string());
            if m["skipped"] == false {
                *computed.entry(name.to_string()).or_default() += 1;
            }
        }
    }
    assert_eq!(
        seen.len(),
        shards,
        "every shard has a line in metrics.jsonl: {seen:?}"
    );
    assert!(
        computed.values().all(|&n| n == 1),
        "a shard computed twice: {computed:?}"
    );
    // A shard committed before the kill is never computed again (a later generation finds
    // its marker): its output object is the one written before the kill (a recomputed
    // shard's output is written again, as a new file), and its marker is the one written
    // then.
    for name in before.keys() {
        let output = out.join(name.replace(".json", ".jsonl"));
        let written = std::fs::metadata(&output).unwrap().modified().unwrap();
        assert!(
            written <= killed,
            "{} was written again after the kill",
            output.display()
        );
    }
    let after = markers(&out);
    assert_eq!(after.len(), shards);
    for (name, m) in &before {
        assert_eq!(&after[name], m, "the marker of {name} was rewritten");
    }
    assert_eq!(
        outputs(&out),
        outputs(&reference),
        "the outputs after the kill differ from the uninterrupted run's"
    );
}
