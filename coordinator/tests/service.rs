//! The coordinator over real gRPC on 127.0.0.1: simulated workers are real clients
//! (`WorkerSession`s on plain threads, or the raw async client), the server is the real
//! one on a port bound by the test. No test sleeps for readiness: the listener is bound
//! before the server starts, and workers connect lazily.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Result;
use tokio::net::TcpListener;
use weaver_config::store::StoreError;
use weaver_config::JobConfig;
use weaver_coordinator::pb;
use weaver_coordinator::*;

/// A coordinator serving on its own runtime; dropping it stops the server.
struct Server {
    url: String,
    token: JobToken,
    coordinator: Coordinator,
    rt: tokio::runtime::Runtime,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    done: Option<tokio::task::JoinHandle<Result<JobOutcome, CoordinatorError>>>,
}

impl Server {
    fn start(options: CoordinatorOptions) -> Server {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let listener = rt.block_on(TcpListener::bind("127.0.0.1:0")).unwrap();
        let scheme = if options.tls.is_some() {
            "https://localhost"
        } else {
            "http://127.0.0.1"
        };
        let url = format!("{scheme}:{}", listener.local_addr().unwrap().port());
        let token = options.token.clone();
        let coordinator = Coordinator::new(options).unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let c = coordinator.clone();
        let done = rt.spawn(async move {
            c.serve(listener, async {
                let _ = stopped.await;
            })
            .await
        });
        Server {
            url,
            token,
            coordinator,
            rt,
            stop: Some(stop),
            done: Some(done),
        }
    }

    /// Waits for `serve` to return (the job ended and the server drained).
    fn join(&mut self, within: Duration) -> JobOutcome {
        let done = self.done.take().unwrap();
        self.rt
            .block_on(async { tokio::time::timeout(within, done).await })
            .expect("the coordinator did not finish in time")
            .unwrap()
            .unwrap()
    }

    fn session(&self) -> WorkerSession {
        let mut o = SessionOptions::new(&self.url, self.token.clone());
        o.connect_timeout = Duration::from_secs(10);
        WorkerSession::connect(o).unwrap()
    }

    fn client(&self, token: &JobToken) -> CoordinatorClient {
        let _g = self.rt.enter();
        CoordinatorClient::connect_lazy(&self.url, token, None).unwrap()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

fn config(dp: usize, pp: usize, tp: usize, steps: u64) -> JobConfig {
    JobConfig::parse(
        "",
        &[
            format!("parallel.dp={dp}"),
            format!("parallel.pp={pp}"),
            format!("parallel.tp={tp}"),
            "train.global_batch=64".into(),
            format!("train.steps={steps}"),
        ],
    )
    .unwrap()
}

fn fast_policy() -> Policy {
    Policy {
        heartbeat_interval: Duration::from_millis(100),
        heartbeat_timeout: Duration::from_millis(400),
        gather_timeout: Duration::from_secs(20),
        regather_timeout: Duration::from_secs(20),
        max_restarts: 2,
        elastic_min_dp: None,
    }
}

fn options(config: JobConfig) -> CoordinatorOptions {
    let mut o = CoordinatorOptions::new(config, JobToken::generate().unwrap());
    o.policy = fast_policy();
    o.linger = Duration::from_millis(500);
    o
}

type Commit = (u64, serde_json::Value, Vec<Vec<u8>>);

#[derive(Debug, Default)]
struct Commits(Mutex<Vec<Commit>>);

impl CheckpointCommitter for Commits {
    fn commit(
        &self,
        step: u64,
        layout: &serde_json::Value,
        reports: Vec<Vec<u8>>,
    ) -> Result<String, String> {
        self.0.lock().unwrap().push((step, layout.clone(), reports));
        Ok(format!("file:///tmp/ckpt/step-{step}"))
    }
}

/// Eight workers on two hosts, dp = pp = tp = 2: layout, rendezvous through the store,
/// metrics, checkpoint commit, completion and `metrics.jsonl`.
#[test]
fn eight_workers_on_two_hosts_train_to_completion() {
    let dir = tempfile::tempdir().unwrap();
    let mut o = options(config(2, 2, 2, 5));
    o.run_dir = Some(dir.path().to_path_buf());
    let commits = Arc::new(Commits::default());
    o.committer = Some(commits.clone());
    let mut server = Server::start(o);
    let url = server.url.clone();
    let token = server.token.clone();
    let workers: Vec<_> = (0..8)
        .map(|i| {
            let (url, token) = (url.clone(), token.clone());
            std::thread::spawn(move || -> Result<(&'static str, Assignment)> {
                let mut o = SessionOptions::new(&url, token);
                o.connect_timeout = Duration::from_secs(10);
                let s = WorkerSession::connect(o)?;
                // Hosts interleave in registration order; placement must still group them.
                let host = if i % 2 == 0 { "node-b" } else { "node-a" };
                s.register(WorkerInfo::cpu(host, i / 2))?;
                let a = s.wait_assignment(Duration::from_secs(20))?;
                let store = s.store();
                store.set(
                    &format!("addr/{}", a.rank),
                    format!("{host}:{}", 7000 + a.rank).as_bytes(),
                )?;
                for r in 0..a.world_size {
                    let v = store.get(&format!("addr/{r}"), Duration::from_secs(10))?;
                    assert!(String::from_utf8(v)?.ends_with(&format!(":{}", 7000 + r)));
                }
                assert_eq!(store.add("arrived", 1).map(|n| n >= 1), Ok(true));
                for step in 1..=5 {
                    s.report_step(StepMetrics {
                        step,
                        loss: (a.rank == 0).then_some(10.0 / step as f64),
                        lr: Some(1e-3),
                        grad_norm: Some(1.0),
                        tokens_per_s: Some(1000.0),
                        ..Default::default()
                    });
                }
                s.report_shard(5, format!("{{\"rank\": {}}}", a.rank).into_bytes(), false)?;
                let mut summary = serde_json::Map::new();
                summary.insert("final_loss".into(), serde_json::json!(2.0));
                s.report_done(
                    5,
                    if a.rank == 0 {
                        summary
                    } else {
                        Default::default()
                    },
                )?;
                Ok((host, a))
            })
        })
        .collect();
    let placed: Vec<(&str, Assignment)> = workers
        .into_iter()
        .map(|h| h.join().unwrap().unwrap())
        .collect();
    let outcome = server.join(Duration::from_secs(20));
    assert_eq!(
        outcome,
        JobOutcome::Completed {
            step: 5,
            generation: 1
        }
    );

    let host_of: BTreeMap<usize, &str> = placed.iter().map(|(h, a)| (a.rank, *h)).collect();
    assert_eq!(host_of.len(), 8);
    for (_, a) in &placed {
        assert_eq!(a.world_size, 8);
        assert_eq!(a.dims.world_size(), 8);
        assert_eq!(a.stages.len(), 2);
        assert_eq!(a.kv_prefix, "g1/");
        assert_eq!(a.local_world_size, 4);
        // Every TP group on one host, and node-a (sorted first) holds ranks 0-3.
        let hosts: Vec<&str> = a.tp_group.iter().map(|r| host_of[r]).collect();
        assert!(hosts.iter().all(|h| *h == hosts[0]), "{a:?}");
        assert_eq!(
            host_of[&a.rank],
            if a.rank < 4 { "node-a" } else { "node-b" }
        );
        assert!(a.config().unwrap().parallel.tp == 2);
    }
    let commits = commits.0.lock().unwrap();
    assert_eq!(commits.len(), 1);
    assert_eq!(commits[0].0, 5);
    assert_eq!(commits[0].2.len(), 8);
    assert_eq!(commits[0].2[3], b"{\"rank\": 3}");

    let text = std::fs::read_to_string(dir.path().join(METRICS_FILE)).unwrap();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 6, "{text}");
    for (i, l) in lines[..5].iter().enumerate() {
        assert_eq!(l["step"], serde_json::json!(i + 1));
        assert!(
            l["loss"].is_f64()
                && l["lr"].is_f64()
                && l["grad_norm"].is_f64()
                && l["tokens_per_s"].is_f64()
        );
    }
    assert_eq!(lines[5]["done"], serde_json::json!(true));
    assert_eq!(lines[5]["step"], serde_json::json!(5));
    assert_eq!(lines[5]["final_loss"], serde_json::json!(2.0));
}

#[test]
fn rendezvous_wait_times_out_promptly() {
    let server = Server::start(options(config(1, 1, 1, 5)));
    let s = server.session();
    s.register(WorkerInfo::cpu("h", 0)).unwrap();
    s.wait_assignment(Duration::from_secs(10)).unwrap();
    let store = s.store();
    let t = Instant::now();
    let e = store
        .get("never-set", Duration::from_millis(300))
        .unwrap_err();
    let took = t.elapsed();
    assert!(
        matches!(&e, StoreError::Timeout { key, .. } if key == "g1/never-set"),
        "{e}"
    );
    assert!(
        took >= Duration::from_millis(300) && took < Duration::from_secs(2),
        "{took:?}"
    );
}

#[test]
fn calls_without_the_job_token_are_refused() {
    let server = Server::start(options(config(1, 1, 1, 5)));
    let info = WorkerInfo::cpu("h", 0).clone();
    let wrong = server.client(&JobToken::generate().unwrap());
    let e = server
        .rt
        .block_on(wrong.register(pb::WorkerInfo {
            host: info.host.clone(),
            instance: "x".into(),
            ..Default::default()
        }))
        .unwrap_err();
    assert!(
        matches!(&e, CoordinatorError::Unauthenticated(m) if m.contains("wrong job token")),
        "{e}"
    );

    // No token at all: a bare generated client.
    let url = server.url.clone();
    let e = server
        .rt
        .block_on(async move {
            let mut raw = pb::coordinator_client::CoordinatorClient::connect(url).await?;
            anyhow::Ok(raw.status(pb::StatusRequest {}).await)
        })
        .unwrap()
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated);
    assert!(e.message().contains("no job token"), "{}", e.message());

    // Health needs no token; the right token works.
    let url = server.url.clone();
    let health = server
        .rt
        .block_on(async move {
            let channel = tonic::transport::Endpoint::from_shared(url)?
                .connect()
                .await?;
            let mut h = tonic_health::pb::health_client::HealthClient::new(channel);
            anyhow::Ok(
                h.check(tonic_health::pb::HealthCheckRequest {
                    service: "weaver.v1.Coordinator".into(),
                })
                .await?
                .into_inner()
                .status,
            )
        })
        .unwrap();
    assert_eq!(
        health,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
    let right = server.client(&server.token);
    assert!(server.rt.block_on(right.status()).is_ok());
}

#[test]
fn registering_twice() {
    let server = Server::start(options(config(2, 1, 1, 5)));
    let client = server.client(&server.token);
    let info = |instance: &str| pb::WorkerInfo {
        host: "h".into(),
        local_rank: 0,
        device_kind: "cpu".into(),
        device: "cpu".into(),
        instance: instance.into(),
        pid: 1,
        ..Default::default()
    };
    let first = server.rt.block_on(client.register(info("a"))).unwrap();
    // The same process retrying: the same registration.
    let again = server.rt.block_on(client.register(info("a"))).unwrap();
    assert_eq!(first.worker_id, again.worker_id);
    // Another process claiming the slot: refused, with the reason.
    let e = server.rt.block_on(client.register(info("b"))).unwrap_err();
    match e {
        CoordinatorError::AlreadyRegistered(m) => {
            assert!(
                m.contains("host h local rank 0 is already registered"),
                "{m}"
            )
        }
        other => panic!("{other:?}"),
    }
}

/// The SIGKILL case without a launcher: a worker stops beating mid-run. The survivors get
/// `Abort` well within the heartbeat timeout plus a margin, a rendezvous wait of the old
/// generation ends at once, and everyone (with a replacement) runs generation 2 from the
/// committed checkpoint.
#[test]
fn a_silent_worker_starts_a_new_generation_and_survivors_abort_promptly() {
    let mut o = options(config(4, 1, 1, 100));
    let commits = Arc::new(Commits::default());
    o.committer = Some(commits.clone());
    let server = Server::start(o);
    let client = server.client(&server.token);

    // The doomed worker: a raw client that registers and fetches its assignment, then
    // never beats again (as if SIGKILLed).
    let doomed = server
        .rt
        .block_on(client.register(pb::WorkerInfo {
            host: "h".into(),
            local_rank: 3,
            device_kind: "cpu".into(),
            device: "cpu".into(),
            instance: "doomed".into(),
            pid: 9,
            ..Default::default()
        }))
        .unwrap();
    let sessions: Vec<Arc<WorkerSession>> = (0..3).map(|_| Arc::new(server.session())).collect();
    let aborted: Arc<Mutex<Vec<Instant>>> = Arc::default();
    let threads: Vec<_> = sessions
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let s = s.clone();
            let aborted = aborted.clone();
            std::thread::spawn(move || {
                s.on_event(move |e| {
                    if matches!(e, ControlEvent::Abort { generation: 2, .. }) {
                        aborted.lock().unwrap().push(Instant::now());
                    }
                });
                s.register(WorkerInfo::cpu("h", i as u32)).unwrap();
                let a = s.wait_assignment(Duration::from_secs(10)).unwrap();
                s.report_shard(1, b"{}".to_vec(), false).unwrap();
                // Blocks on a key nobody sets: the abort must end the wait.
                let t = Instant::now();
                let e = s.store().get("never", Duration::from_secs(60)).unwrap_err();
                assert!(
                    matches!(e, StoreError::Refused(ref m) if m.contains("aborted")),
                    "{e}"
                );
                assert!(t.elapsed() < Duration::from_secs(5));
                a
            })
        })
        .collect();
    let a = server
        .rt
        .block_on(client.get_assignment(doomed.worker_id, Duration::from_secs(10)))
        .unwrap();
    server
        .rt
        .block_on(client.report_shard(doomed.worker_id, 1, b"{}".to_vec(), false))
        .unwrap();
    let last_sign_of_life = Instant::now();
    assert_eq!(a.generation, 1);
    let first: Vec<Assignment> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    assert!(first
        .iter()
        .all(|a| a.generation == 1 && a.resume_from.is_none()));

    let aborted = aborted.lock().unwrap().clone();
    assert_eq!(aborted.len(), 3, "every survivor got Abort");
    let timeout = fast_policy().heartbeat_timeout;
    for t in &aborted {
        let after = t.duration_since(last_sign_of_life);
        assert!(
            after < timeout + Duration::from_millis(600),
            "abort after {after:?}"
        );
    }
    let status = server.coordinator.status();
    assert_eq!(status.generation, 2);
    assert!(
        status.message.contains("worker h/3") && status.message.contains("missed heartbeats"),
        "{}",
        status.message
    );
    // The old registration is stale.
    let e = server
        .rt
        .block_on(client.get_assignment(doomed.worker_id, Duration::from_secs(1)))
        .unwrap_err();
    assert!(matches!(e, CoordinatorError::StaleWorker(_)), "{e}");

    // Survivors re-register through wait_assignment; a replacement joins.
    let replacement = server.session();
    replacement.register(WorkerInfo::cpu("h", 3)).unwrap();
    let again: Vec<Assignment> = std::thread::scope(|scope| {
        let hs: Vec<_> = sessions
            .iter()
            .chain(std::iter::once(&Arc::new(replacement)))
            .map(|s| {
                let s = s.clone();
                scope.spawn(move || s.wait_assignment(Duration::from_secs(10)).unwrap())
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for a in &again {
        assert_eq!(a.generation, 2);
        assert_eq!(a.kv_prefix, "g2/");
        assert_eq!(a.resume_from.as_deref(), Some("file:///tmp/ckpt/step-1"));
        assert_eq!(a.resume_step, 1);
    }
    assert_eq!(commits.0.lock().unwrap().len(), 1);
}

/// A collective error reported by one worker starts a new generation too.
#[test]
fn a_reported_collective_error_starts_a_new_generation() {
    let server = Server::start(options(config(2, 1, 1, 100)));
    let sessions: Vec<WorkerSession> = (0..2).map(|_| server.session()).collect();
    let events: Vec<_> = sessions.iter().map(|s| s.events()).collect();
    std::thread::scope(|scope| {
        for (i, s) in sessions.iter().enumerate() {
            scope.spawn(move || {
                s.register(WorkerInfo::cpu("h", i as u32)).unwrap();
                s.wait_assignment(Duration::from_secs(10)).unwrap();
            });
        }
    });
    sessions[0]
        .report_error("all_reduce: peer rank 1 closed the connection", true)
        .unwrap();
    for rx in &events {
        let e = rx.recv_timeout(Duration::from_secs(2)).unwrap();
        assert!(
            matches!(&e, ControlEvent::Abort { generation: 2, reason } if reason.contains("peer rank 1 closed")),
            "{e:?}"
        );
    }
}

#[test]
fn a_coordinator_that_never_gets_its_workers_fails_clearly() {
    let mut o = options(config(4, 1, 1, 5));
    o.policy.gather_timeout = Duration::from_millis(600);
    let mut server = Server::start(o);
    let sessions: Vec<WorkerSession> = (0..2).map(|_| server.session()).collect();
    let errors: Vec<CoordinatorError> = std::thread::scope(|scope| {
        let hs: Vec<_> = sessions
            .iter()
            .enumerate()
            .map(|(i, s)| {
                scope.spawn(move || {
                    s.register(WorkerInfo::cpu("node-a", i as u32)).unwrap();
                    s.wait_assignment(Duration::from_secs(30)).unwrap_err()
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for e in &errors {
        assert!(e.is_terminal(), "{e}");
    }
    let outcome = server.join(Duration::from_secs(10));
    let JobOutcome::Failed { reason } = outcome else {
        panic!("{outcome:?}")
    };
    assert!(
        reason.starts_with("expected 4 workers (dp × pp × tp = dp=4 pp=1 tp=1), 2 registered within 0.6 s: node-a (local ranks 0, 1)"),
        "{reason}"
    );
    assert!(sessions.iter().all(|s| s.stopped()));
}

#[test]
fn status_save_and_shutdown_from_an_operator() {
    let mut server = Server::start(options(config(2, 1, 1, 1000)));
    let sessions: Vec<WorkerSession> = (0..2).map(|_| server.session()).collect();
    let events: Vec<_> = sessions.iter().map(|s| s.events()).collect();
    std::thread::scope(|scope| {
        for (i, s) in sessions.iter().enumerate() {
            scope.spawn(move || {
                s.register(WorkerInfo::cpu("h", i as u32)).unwrap();
                s.wait_assignment(Duration::from_secs(10)).unwrap();
                s.report_step(StepMetrics {
                    step: 7,
                    loss: (i == 0).then_some(1.5),
                    ..Default::default()
                });
                s.flush().unwrap();
            });
        }
    });
    let operator = server.client(&server.token);
    let status = server.rt.block_on(operator.status()).unwrap();
    assert_eq!(status.phase, pb::Phase::Running as i32);
    assert_eq!(status.step, 7);
    let table = render_status(&status);
    assert!(
        table.contains("job: running") && table.contains("step 7/1000  loss 1.5000"),
        "{table}"
    );
    assert_eq!(
        table.lines().filter(|l| l.starts_with("h ")).count(),
        2,
        "{table}"
    );

    let step = server.rt.block_on(operator.save_checkpoint()).unwrap();
    assert!(step > 7, "{step}");
    for rx in &events {
        assert_eq!(
            rx.recv_timeout(Duration::from_secs(2)).unwrap(),
            ControlEvent::SaveAt { step, stop: false }
        );
    }
    server
        .rt
        .block_on(operator.shutdown("maintenance"))
        .unwrap();
    for rx in &events {
        let e = rx.recv_timeout(Duration::from_secs(2)).unwrap();
        assert!(
            matches!(&e, ControlEvent::Stop { success: false, reason } if reason.contains("maintenance")),
            "{e:?}"
        );
    }
    let outcome = server.join(Duration::from_secs(10));
    assert!(
        matches!(outcome, JobOutcome::Failed { ref reason } if reason.contains("shut down by operator"))
    );
}

#[test]
fn tls_with_a_self_signed_certificate() {
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let mut o = options(config(1, 1, 1, 5));
    o.tls = Some(TlsIdentity {
        cert_pem: cert.cert.pem().into_bytes(),
        key_pem: cert.signing_key.serialize_pem().into_bytes(),
    });
    let server = Server::start(o);
    let mut so = SessionOptions::new(&server.url, server.token.clone());
    so.tls = Some(ClientTls {
        ca_pem: cert.cert.pem().into_bytes(),
        domain: Some("localhost".into()),
    });
    let s = WorkerSession::connect(so).unwrap();
    let reg = s.register(WorkerInfo::cpu("h", 0)).unwrap();
    assert_eq!(reg.generation, 1);
    assert_eq!(s.wait_assignment(Duration::from_secs(5)).unwrap().rank, 0);

    // Plain text against the TLS port fails (and quickly).
    let plain = server.url.replace("https://localhost", "http://127.0.0.1");
    let c = {
        let _g = server.rt.enter();
        CoordinatorClient::connect_lazy(&plain, &server.token, None).unwrap()
    };
    let r = server
        .rt
        .block_on(async { tokio::time::timeout(Duration::from_secs(5), c.status()).await })
        .unwrap();
    assert!(r.is_err());
}
