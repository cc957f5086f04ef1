//! Operating a job through the `weaver` binary: a new run refuses a checkpoint URL that
//! another run's committed checkpoints hold (train and launch), malformed cloud URLs are
//! refused instead of becoming local folders, `--metrics-listen` serves Prometheus metrics
//! that the official Python client parses while a real job runs, and `train.tensorboard`
//! writes event files that TensorBoard's own reader loads.

mod common;

use common::{free_port, job_config, metrics, python, run, stderr, weaver};
use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Runs `script` with the venv's python (argv[1..] = `args`); returns its stdout as JSON.
fn python_json(script: &str, args: &[&str]) -> serde_json::Value {
    let out = Command::new(python())
        .arg("-c")
        .arg(script)
        .args(args)
        .output()
        .expect("cannot run the venv's python");
    assert!(
        out.status.success(),
        "python failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "python printed no JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

const SMALL_JOB: &str = "[model]\nflavor = \"debug\"\n\
    [train]\nglobal_batch = 8\nwarmup_steps = 1\n\
    [eval]\npool = 10\n";

#[test]
fn a_new_run_refuses_a_taken_checkpoint_url_and_resume_continues() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = dir.path().join("ckpt");
    let cfg = job_config(
        dir.path(),
        &format!(
            "{SMALL_JOB}[checkpoint]\nurl = \"{}\"\nevery = 2\n",
            ckpt.display()
        ),
    );
    let first = dir.path().join("run1");
    let out = run(
        &[
            "train",
            "--config",
            &cfg,
            "--run-dir",
            first.to_str().unwrap(),
            "--set",
            "train.steps=2",
        ],
        dir.path(),
    );
    assert!(out.status.success(), "{}", stderr(&out));

    // A second, new run on the same URL stops before it builds a model or writes anything.
    let second = dir.path().join("run2");
    let out = run(
        &[
            "train",
            "--config",
            &cfg,
            "--run-dir",
            second.to_str().unwrap(),
            "--set",
            "train.steps=4",
        ],
        dir.path(),
    );
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains(&ckpt.display().to_string()), "{err}");
    assert!(err.contains("step 2"), "{err}");
    assert!(err.contains("--resume latest"), "{err}");
    assert!(err.contains("checkpoint.url"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(!second.join("metrics.jsonl").exists());

    // The way on that the message names: resume it.
    let out = run(
        &[
            "train",
            "--config",
            &cfg,
            "--run-dir",
            first.to_str().unwrap(),
            "--set",
            "train.steps=4",
            "--resume",
            "latest",
        ],
        dir.path(),
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let steps: Vec<u64> = metrics(&first)
        .iter()
        .filter(|l| l.get("loss").is_some())
        .filter_map(|l| l["step"].as_u64())
        .collect();
    assert_eq!(steps, [1, 2, 3, 4]);
}

#[test]
fn malformed_cloud_urls_are_refused_and_never_become_folders() {
    let dir = tempfile::tempdir().unwrap();
    for url in ["s3://", "s3:/bucket/run", "s3:bucket", "gs://", "az:/x"] {
        let cfg = job_config(
            dir.path(),
            &format!("{SMALL_JOB}[checkpoint]\nurl = \"{url}\"\n"),
        );
        let out = run(
            &["train", "--config", &cfg, "--set", "train.steps=1"],
            dir.path(),
        );
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(1), "{url}: {err}");
        assert!(err.contains("malformed"), "{url}: {err}");
        assert!(err.contains("://BUCKET/PREFIX"), "{url}: {err}");
        assert!(!err.contains("panicked"), "{url}: {err}");
    }
    let left: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(':'))
        .collect();
    assert!(left.is_empty(), "folders named after a scheme: {left:?}");
}

/// `GET path` over HTTP/1.1: (status code, body), or `None` while nothing listens.
fn http_get(addr: &str, path: &str) -> Option<(u16, String)> {
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let (head, body) = text.split_once("\r\n\r\n")?;
    let code = head.split_whitespace().nth(1)?.parse().ok()?;
    Some((code, body.to_string()))
}

/// Parses an exposition with `prometheus_client.parser.text_string_to_metric_families` and
/// returns `{sample name: [[labels, value], ...]}`; the client's stricter OpenMetrics parser
/// must accept the text too (it is served as OpenMetrics).
const PARSE_PROMETHEUS: &str = r#"
import json, sys
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.openmetrics import parser as openmetrics
text = open(sys.argv[1]).read()
list(openmetrics.text_string_to_metric_families(text))
out = {}
for family in text_string_to_metric_families(text):
    for s in family.samples:
        out.setdefault(s.name, []).append([s.labels, s.value])
print(json.dumps(out))
"#;

fn sample(parsed: &serde_json::Value, name: &str, labels: &[(&str, &str)]) -> f64 {
    let samples = parsed[name]
        .as_array()
        .unwrap_or_else(|| panic!("no sample {name} in {parsed}"));
    samples
        .iter()
        .find(|s| labels.iter().all(|(k, v)| s[0][*k].as_str() == Some(*v)))
        .and_then(|s| s[1].as_f64())
        .unwrap_or_else(|| panic!("no {name}{labels:?} in {samples:?}"))
}

/// Reads event files in `run_dir` with TensorBoard's `EventAccumulator`; returns
/// `{tag: [[step, value], ...]}` of the scalars.
const READ_TENSORBOARD: &str = r#"
import json, sys
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
acc = EventAccumulator(sys.argv[1], size_guidance={"scalars": 0})
acc.Reload()
print(json.dumps({t: [[e.step, e.value] for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}))
"#;

#[test]
fn launch_serves_prometheus_metrics_writes_tensorboard_and_refuses_a_taken_url() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = dir.path().join("ckpt");
    let cfg = job_config(
        dir.path(),
        &format!(
            "{SMALL_JOB}[parallel]\ndp = 2\n[checkpoint]\nurl = \"{}\"\nevery = 2\n",
            ckpt.display()
        ),
    );
    let run_dir = dir.path().join("run");
    let addr = format!("127.0.0.1:{}", free_port());
    let steps = 30;
    let mut child = weaver()
        .args([
            "launch",
            "--config",
            &cfg,
            "--nproc",
            "2",
            "--run-dir",
            run_dir.to_str().unwrap(),
            "--metrics-listen",
            &addr,
            "--set",
            &format!("train.steps={steps}"),
            "--set",
            "train.tensorboard=true",
            // Steps slow enough that a scrape every 50 ms sees the job running past step 3
            // on an idle machine too (at global_batch = 8 the 30 steps could end between
            // two scrapes).
            "--set",
            "train.global_batch=64",
        ])
        .current_dir(dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut err_pipe = child.stderr.take().unwrap();
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err_pipe.read_to_string(&mut s);
        s
    });

    // Scrape while the job runs until a step past the first checkpoint is exported.
    let start = Instant::now();
    let mut scraped = None;
    while scraped.is_none() {
        if let Ok(Some(status)) = child.try_wait() {
            panic!(
                "the job ended ({status}) before a scrape saw step 3: {}",
                err_reader.join().unwrap()
            );
        }
        assert!(
            start.elapsed() < Duration::from_secs(300),
            "no scrape with step >= 3 within 300 s"
        );
        if let Some((200, body)) = http_get(&addr, "/metrics") {
            let at_step = body
                .lines()
                .find_map(|l| l.strip_prefix("weaver_step "))
                .and_then(|v| v.trim().parse::<f64>().ok())
                .unwrap_or(0.0);
            if at_step >= 3.0 && (at_step as u64) < steps {
                scraped = Some(body);
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let scraped = scraped.unwrap();
    let (code, _) = http_get(&addr, "/nothing").expect("the endpoint answers");
    assert_eq!(code, 404);

    let status = child.wait().unwrap();
    let log = err_reader.join().unwrap();
    assert!(status.success(), "{log}");

    let file = dir.path().join("scrape.txt");
    std::fs::write(&file, &scraped).unwrap();
    let p = python_json(PARSE_PROMETHEUS, &[file.to_str().unwrap()]);
    let step = sample(&p, "weaver_step", &[]);
    assert!(step >= 3.0 && step < steps as f64, "{step}");
    assert_eq!(sample(&p, "weaver_total_steps", &[]), steps as f64);
    assert_eq!(sample(&p, "weaver_workers_registered", &[]), 2.0);
    assert_eq!(sample(&p, "weaver_workers_alive", &[]), 2.0);
    assert_eq!(sample(&p, "weaver_workers_expected", &[]), 2.0);
    assert_eq!(sample(&p, "weaver_workers_spare", &[]), 0.0);
    assert_eq!(sample(&p, "weaver_generation", &[]), 1.0);
    assert_eq!(sample(&p, "weaver_restarts_total", &[]), 0.0);
    assert_eq!(sample(&p, "weaver_job_phase", &[("phase", "running")]), 1.0);
    assert_eq!(sample(&p, "weaver_job_phase", &[("phase", "failed")]), 0.0);
    // The losses and the optimizer's values are the job's, as metrics.jsonl has them.
    let lines = metrics(&run_dir);
    let at = |s: u64| {
        lines
            .iter()
            .find(|l| l.get("loss").is_some() && l["step"].as_u64() == Some(s))
            .unwrap_or_else(|| panic!("no step {s} in metrics.jsonl"))
            .clone()
    };
    let line = at(step as u64);
    for (term, key) in [("total", "loss"), ("itc", "itc"), ("caption", "caption")] {
        let want = line[key].as_f64().unwrap();
        assert_eq!(sample(&p, "weaver_loss", &[("term", term)]), want, "{term}");
    }
    assert_eq!(
        sample(&p, "weaver_learning_rate", &[]),
        line["lr"].as_f64().unwrap()
    );
    assert_eq!(
        sample(&p, "weaver_grad_norm", &[]),
        line["grad_norm"].as_f64().unwrap()
    );
    assert!(sample(&p, "weaver_tokens_per_second", &[]) > 0.0);
    assert_eq!(
        sample(&p, "weaver_step_time_seconds_count", &[]),
        step,
        "one observation per step"
    );
    assert!(sample(&p, "weaver_step_time_seconds_sum", &[]) > 0.0);
    // At least the step-2 checkpoint was committed before the scrape's step 3 was reported?
    // Not necessarily (the commit runs beside training); its metrics exist either way.
    let committed = sample(&p, "weaver_checkpoints_committed_total", &[]);
    if committed >= 1.0 {
        assert!(sample(&p, "weaver_checkpoint_size_bytes", &[]) > 0.0);
        assert!(sample(&p, "weaver_checkpoint_step", &[]) >= 2.0);
        assert!(sample(&p, "weaver_checkpoint_upload_seconds", &[]) > 0.0);
    }
    assert_eq!(
        sample(&p, "weaver_checkpoint_commit_failures_total", &[]),
        0.0
    );

    // TensorBoard: the coordinator's event file holds every step's loss, as metrics.jsonl.
    let tb = python_json(READ_TENSORBOARD, &[run_dir.to_str().unwrap()]);
    let loss = tb["train/loss"].as_array().expect("train/loss scalars");
    assert_eq!(loss.len(), steps as usize, "{tb}");
    for (i, e) in loss.iter().enumerate() {
        let s = i as u64 + 1;
        assert_eq!(e[0].as_u64(), Some(s));
        let want = at(s)["loss"].as_f64().unwrap() as f32;
        assert_eq!(e[1].as_f64().unwrap() as f32, want, "step {s}");
    }
    assert!(tb["train/lr"]
        .as_array()
        .is_some_and(|a| a.len() == steps as usize));
    assert!(
        tb["eval/i2t_r1"].as_array().is_some_and(|a| !a.is_empty()),
        "{tb}"
    );

    // A new job on the same checkpoint URL is refused before any worker starts.
    let out = run(
        &[
            "launch",
            "--config",
            &cfg,
            "--nproc",
            "2",
            "--run-dir",
            dir.path().join("run2").to_str().unwrap(),
        ],
        dir.path(),
    );
    let err = stderr(&out);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains(&ckpt.display().to_string()), "{err}");
    assert!(err.contains(&format!("step {steps}")), "{err}");
    assert!(err.contains("--resume latest"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(!dir.path().join("run2/metrics.jsonl").exists());
}

#[test]
fn train_writes_tensorboard_events_that_tensorboard_reads_and_plot_draws_the_run() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = job_config(dir.path(), SMALL_JOB);
    let run_dir = dir.path().join("run");
    let out = run(
        &[
            "train",
            "--config",
            &cfg,
            "--run-dir",
            run_dir.to_str().unwrap(),
            "--set",
            "train.steps=3",
            "--set",
            "train.eval_every=3",
            "--set",
            "train.tensorboard=true",
        ],
        dir.path(),
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let tb = python_json(READ_TENSORBOARD, &[run_dir.to_str().unwrap()]);
    let lines = metrics(&run_dir);
    for key in ["loss", "lr", "grad_norm", "tokens_per_s"] {
        let series = tb[format!("train/{key}")]
            .as_array()
            .unwrap_or_else(|| panic!("no train/{key} in {tb}"));
        let want: Vec<(u64, f32)> = lines
            .iter()
            .filter(|l| l.get("loss").is_some())
            .map(|l| (l["step"].as_u64().unwrap(), l[key].as_f64().unwrap() as f32))
            .collect();
        let got: Vec<(u64, f32)> = series
            .iter()
            .map(|e| (e[0].as_u64().unwrap(), e[1].as_f64().unwrap() as f32))
            .collect();
        assert_eq!(got, want, "{key}");
    }
    let r1 = tb["eval/i2t_r1"].as_array().expect("eval/i2t_r1");
    assert_eq!(r1.len(), 1);
    assert_eq!(r1[0][0].as_u64(), Some(3));

    // `weaver plot` draws the run into a PNG (the picture itself is checked in weaver-plot).
    let png = dir.path().join("run.png");
    let out = run(
        &[
            "plot",
            run_dir.to_str().unwrap(),
            "--out",
            png.to_str().unwrap(),
        ],
        dir.path(),
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.starts_with(png.to_str().unwrap()), "{said}");
    assert!(said.contains("3 steps, 1 evaluations"), "{said}");
    let bytes = std::fs::read(&png).unwrap();
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
    // IHDR: width and height, big-endian.
    let be = |at: usize| u32::from_be_bytes(bytes[at..at + 4].try_into().unwrap());
    assert_eq!((be(16), be(20)), (1600, 1200));
    // A run directory without metrics is refused by name.
    let out = run(&["plot", dir.path().to_str().unwrap()], dir.path());
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("metrics.jsonl"), "{}", stderr(&out));
}
