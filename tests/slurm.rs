//! A real SLURM cluster on loopback (Debian's slurm-wlm 22.05 and munge, installed by
//! scripts/install-slurm.sh): munged with its own key and socket, slurmctld, and two
//! slurmd daemons, one per node, `n1` and `n2`, both on this machine (distinct `Port`s,
//! `NodeAddr=127.0.0.1`), all children of this test. No cgroups: `proctrack/linuxproc`,
//! `task/none`, `select/cons_tres`.
//!
//! Through the real `launch/scripts/slurm.sbatch` (two nodes, one CPU worker per node, tcp
//! backend, the coordinator on the first node):
//!  1. a job runs to completion and exports its final weights;
//!  2. a second job with the same config is preempted with `scancel --signal=TERM --batch`
//!     (what `#SBATCH --signal=B:TERM@N` sends; the script forwards it to the tasks with
//!     `scancel --signal=TERM`, the other way to warn a job) after its first committed
//!     checkpoint, commits a newer checkpoint at the signal (no work lost), is resubmitted
//!     with `--resume latest`, and ends with the same final weights as the first, bit for
//!     bit.
//!
//! Without the SLURM or MUNGE binaries the test fails, saying how to install them.

mod common;

use common::free_ports;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const STEPS: u64 = 20;
const NODES: [&str; 2] = ["n1", "n2"];

/// A SLURM or MUNGE program: on PATH, or in /usr/sbin (daemons) or /usr/bin.
fn tool(name: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/usr/bin".into()])
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "`{name}` is not installed: the SLURM test needs Debian's slurm-wlm and munge \
                 packages; install them with scripts/install-slurm.sh (as root; \
                 scripts/test.sh does)"
            )
        })
}

fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| format!("(unreadable: {e})"));
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Runs a SLURM client command against the cluster of `conf`; its stdout (failures: "").
fn slurm(conf: &Path, cmd: &str, args: &[&str]) -> String {
    let out = Command::new(tool(cmd))
        .args(args)
        .env("SLURM_CONF", conf)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd}: {e}"));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `JobState` and `ExitCode` of a job, from `scontrol show job`.
fn job_state(conf: &Path, id: &str) -> (String, String) {
    let out = slurm(conf, "scontrol", &["show", "job", "-o", id]);
    let field = |key: &str| {
        out.split_whitespace()
            .find_map(|f| f.strip_prefix(key))
            .unwrap_or("")
            .to_string()
    };
    (field("JobState="), field("ExitCode="))
}

/// The cluster: its directory, daemons and jobs. Dropping it cancels the jobs and stops the
/// daemons; when the test is failing, it first prints every log.
struct Cluster {
    dir: PathBuf,
    conf: PathBuf,
    daemons: Vec<(String, Child)>,
    logs: Vec<PathBuf>,
}

impl Cluster {
    fn start(dir: &Path) -> Cluster {
        let user = String::from_utf8(
            Command::new("id")
                .arg("-un")
                .output()
                .expect("cannot run id")
                .stdout,
        )
        .unwrap()
        .trim()
        .to_string();
        let (munged, slurmctld, slurmd) = (tool("munged"), tool("slurmctld"), tool("slurmd"));
        let munge = dir.join("munge");
        std::fs::create_dir_all(&munge).unwrap();
        let log = dir.join("log");
        std::fs::create_dir_all(&log).unwrap();
        for n in NODES {
            std::fs::create_dir_all(dir.join("spool").join(n)).unwrap();
        }
        std::fs::create_dir_all(dir.join("state")).unwrap();

        let mut cluster = Cluster {
            dir: dir.to_path_buf(),
            conf: dir.join("slurm.conf"),
            daemons: Vec::new(),
            logs: vec![
                munge.join("munged.log"),
                log.join("slurmctld.log"),
                log.join("slurmctld.out"),
            ],
        };
        for n in NODES {
            cluster.logs.push(log.join(format!("slurmd-{n}.log")));
            cluster.logs.push(log.join(format!("slurmd-{n}.out")));
        }

        // MUNGE: a fresh key (mode 0400) and a socket of our own. `-f`: run even though the
        // temporary directory's permissions are not what munged wants for /etc/munge.
        let key = munge.join("munge.key");
        let mut bytes = vec![0u8; 1024];
        use std::io::Read;
        std::fs::File::open("/dev/urandom")
            .unwrap()
            .read_exact(&mut bytes)
            .unwrap();
        std::fs::write(&key, &bytes).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o400)).unwrap();
        let socket = munge.join("munge.socket");
        let child = Command::new(&munged)
            .arg("-F")
            .arg("-f")
            .arg(format!("--socket={}", socket.display()))
            .arg(format!("--key-file={}", key.display()))
            .arg(format!("--pid-file={}", munge.join("munged.pid").display()))
            .arg(format!("--log-file={}", munge.join("munged.log").display()))
            .arg(format!(
                "--seed-file={}",
                munge.join("munged.seed").display()
            ))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(munge.join("munged.log.err")).unwrap())
            .spawn()
            .expect("cannot start munged");
        cluster.logs.push(munge.join("munged.log.err"));
        cluster.daemons.push(("munged".into(), child));
        cluster.wait("munged's socket", Duration::from_secs(15), || {
            socket.exists()
        });

        // slurm.conf: loopback ports picked free, state and spool in the temporary directory.
        let ports = free_ports(1 + NODES.len());
        let d = dir.display();
        let mut conf = format!(
            "ClusterName=weavertest\n\
             SlurmctldHost=localhost\n\
             SlurmctldPort={ctld}\n\
             SlurmUser={user}\n\
             SlurmdUser={user}\n\
             AuthType=auth/munge\n\
             AuthInfo=socket={sock}\n\
             CredType=cred/munge\n\
             StateSaveLocation={d}/state\n\
             SlurmdSpoolDir={d}/spool/%n\n\
             SlurmctldPidFile={d}/slurmctld.pid\n\
             SlurmdPidFile={d}/slurmd-%n.pid\n\
             SlurmctldLogFile={d}/log/slurmctld.log\n\
             SlurmdLogFile={d}/log/slurmd-%n.log\n\
             ProctrackType=proctrack/linuxproc\n\
             TaskPlugin=task/none\n\
             JobAcctGatherType=jobacct_gather/none\n\
             AccountingStorageType=accounting_storage/none\n\
             JobCompType=jobcomp/none\n\
             SchedulerType=sched/builtin\n\
             SelectType=select/cons_tres\n\
             SelectTypeParameters=CR_CPU\n\
             MpiDefault=none\n\
             SwitchType=switch/none\n\
             MailProg=/bin/true\n\
             ReturnToService=2\n\
             KillWait=5\n\
             SlurmdParameters=config_overrides\n",
            ctld = ports[0],
            sock = socket.display(),
        );
        for (n, port) in NODES.iter().zip(&ports[1..]) {
            conf += &format!(
                "NodeName={n} NodeHostname=localhost NodeAddr=127.0.0.1 Port={port} CPUs=2 State=UNKNOWN\n"
            );
        }
        conf += "PartitionName=debug Nodes=ALL Default=YES MaxTime=10 State=UP OverSubscribe=YES\n";
        std::fs::write(&cluster.conf, conf).unwrap();

        let child = Command::new(&slurmctld)
            .arg("-D")
            .arg("-f")
            .arg(&cluster.conf)
            .env("SLURM_CONF", &cluster.conf)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log.join("slurmctld.out")).unwrap())
            .spawn()
            .expect("cannot start slurmctld");
        cluster.daemons.push(("slurmctld".into(), child));
        for n in NODES {
            let child = Command::new(&slurmd)
                .arg("-D")
                .arg("-N")
                .arg(n)
                .arg("-f")
                .arg(&cluster.conf)
                .env("SLURM_CONF", &cluster.conf)
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(log.join(format!("slurmd-{n}.out"))).unwrap())
                .spawn()
                .expect("cannot start slurmd");
            cluster.daemons.push((format!("slurmd {n}"), child));
        }
        let conf = cluster.conf.clone();
        let nodes_idle = || {
            let out = slurm(&conf, "sinfo", &["-h", "-N", "-o", "%N %T"]);
            let idle = out.lines().filter(|l| l.ends_with(" idle")).count();
            idle == NODES.len()
        };
        cluster.wait(
            "both nodes idle in sinfo",
            Duration::from_secs(30),
            nodes_idle,
        );
        cluster
    }

    /// Runs a SLURM client command against this cluster; its stdout (failures: "").
    fn slurm(&self, cmd: &str, args: &[&str]) -> String {
        slurm(&self.conf, cmd, args)
    }

    /// Polls `ready` until it holds, failing (with every log) after `limit` or when a
    /// daemon has died.
    fn wait(&mut self, what: &str, limit: Duration, mut ready: impl FnMut() -> bool) {
        let start = Instant::now();
        while !ready() {
            for (name, child) in &mut self.daemons {
                if let Ok(Some(status)) = child.try_wait() {
                    panic!("{name} exited ({status}) while waiting for {what}");
                }
            }
            assert!(start.elapsed() < limit, "no {what} within {limit:?}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Submits `launch/scripts/slurm.sbatch CONFIG ARGS` on both nodes, one CPU worker
    /// per node; returns the job id. Its output is `<dir>/<name>.out`.
    fn submit(&mut self, name: &str, run_dir: &Path, config: &Path, args: &[&str]) -> String {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("launch/scripts/slurm.sbatch");
        let out_file = self.dir.join(format!("{name}.out"));
        self.logs.push(out_file.clone());
        self.logs.push(run_dir.join("coordinator.log"));
        let out = Command::new(tool("sbatch"))
            .arg("--parsable")
            .arg(format!("--job-name={name}"))
            .arg(format!("--nodes={}", NODES.len()))
            .arg("--time=5")
            .arg(format!("--chdir={}", self.dir.display()))
            .arg(format!("--output={}", out_file.display()))
            .arg(&script)
            .arg(config)
            .args(args)
            .env("SLURM_CONF", &self.conf)
            .env("WEAVER_BIN", env!("CARGO_BIN_EXE_weaver"))
            .env("WEAVER_PORT", free_ports(1)[0].to_string())
            .env("WEAVER_RUN_DIR", run_dir)
            .env("WEAVER_DEVICE", "cpu")
            .env("GPUS_PER_NODE", "1")
            .env("RUST_LOG", "info")
            .output()
            .expect("cannot run sbatch");
        assert!(
            out.status.success(),
            "sbatch failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let id = String::from_utf8_lossy(&out.stdout).trim().to_string();
        assert!(!id.is_empty(), "sbatch printed no job id");
        id
    }

    fn job_state(&self, id: &str) -> (String, String) {
        job_state(&self.conf, id)
    }

    /// Waits for the job to end; its final state and exit code.
    fn wait_job(&mut self, id: &str, limit: Duration) -> (String, String) {
        const ENDED: [&str; 9] = [
            "COMPLETED",
            "FAILED",
            "CANCELLED",
            "TIMEOUT",
            "NODE_FAIL",
            "PREEMPTED",
            "BOOT_FAIL",
            "DEADLINE",
            "OUT_OF_MEMORY",
        ];
        let (mut state, conf) = ((String::new(), String::new()), self.conf.clone());
        self.wait(&format!("end of job {id}"), limit, || {
            state = job_state(&conf, id);
            ENDED.contains(&state.0.as_str())
        });
        state
    }

    /// Cancels every job (bounded wait for them to go), then stops the daemons.
    fn stop(&mut self) {
        let jobs = self.slurm("squeue", &["-h", "-o", "%i"]);
        for id in jobs.split_whitespace() {
            self.slurm("scancel", &[id]);
        }
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(20)
            && !self.slurm("squeue", &["-h", "-o", "%i"]).trim().is_empty()
        {
            std::thread::sleep(Duration::from_millis(200));
        }
        // slurmd before slurmctld before munged: each needs the next while it shuts down.
        for (name, child) in self.daemons.iter_mut().rev() {
            // SAFETY: kill(2) on our own child's pid.
            unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
            let start = Instant::now();
            while !matches!(child.try_wait(), Ok(Some(_))) {
                if start.elapsed() > Duration::from_secs(10) {
                    eprintln!("{name} did not stop on SIGTERM within 10 s: killing it");
                    let _ = child.kill();
                    let _ = child.wait();
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        self.daemons.clear();
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for log in &self.logs {
                eprintln!("===== {} =====\n{}", log.display(), tail(log, 60));
            }
        }
        self.stop();
    }
}

/// A safetensors file's tensors: name -> (dtype, shape, raw bytes), and its metadata.
type Tensors = std::collections::BTreeMap<String, (String, String, Vec<u8>)>;

fn read_safetensors(path: &Path) -> (Tensors, serde_json::Value) {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let data = &bytes[8 + n..];
    let mut tensors = Tensors::new();
    let mut meta = serde_json::Value::Null;
    for (name, t) in header.as_object().unwrap() {
        if name == "__metadata__" {
            meta = t.clone();
            continue;
        }
        let range = t["data_offsets"].as_array().unwrap();
        let (a, b) = (
            range[0].as_u64().unwrap() as usize,
            range[1].as_u64().unwrap() as usize,
        );
        tensors.insert(
            name.clone(),
            (
                t["dtype"].to_string(),
                t["shape"].to_string(),
                data[a..b].to_vec(),
            ),
        );
    }
    (tensors, meta)
}

fn latest_step(checkpoints: &Path) -> Option<u64> {
    let text = std::fs::read_to_string(checkpoints.join("latest")).ok()?;
    serde_json::from_str::<serde_json::Value>(&text).ok()?["step"].as_u64()
}

#[test]
fn slurm_runs_a_job_and_a_preempted_job_resumes_to_the_same_weights() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    // Two data-parallel CPU workers, one per node; a checkpoint every 5 steps.
    let config = dir.join("job.toml");
    std::fs::write(
        &config,
        format!(
            "[model]\nflavor = \"debug\"\n\
             [train]\nsteps = {STEPS}\nglobal_batch = 16\nwarmup_steps = 2\n\
             [eval]\npool = 20\n\
             [parallel]\ndp = 2\nmicrobatches = 2\nbackend = \"tcp\"\n\
             [checkpoint]\nevery = 5\n"
        ),
    )
    .unwrap();
    let mut cluster = Cluster::start(dir);

    // 1. A job to completion.
    let whole = dir.join("whole");
    let id = cluster.submit("whole", &whole, &config, &[]);
    let (state, code) = cluster.wait_job(&id, Duration::from_secs(120));
    assert_eq!(
        (state.as_str(), code.as_str()),
        ("COMPLETED", "0:0"),
        "job {id}"
    );
    let (want, meta) = read_safetensors(&whole.join("model.safetensors"));
    assert_eq!(meta["weaver.step"], STEPS.to_string(), "{meta}");

    // 2. The same job, preempted after its first committed checkpoint ...
    let pre = dir.join("preempted");
    let checkpoints = pre.join("checkpoints");
    let id = cluster.submit("preempted", &pre, &config, &[]);
    let mut first = None;
    cluster.wait(
        "a committed checkpoint of the second job",
        Duration::from_secs(120),
        || {
            first = latest_step(&checkpoints);
            first.is_some()
        },
    );
    let (state, _) = cluster.job_state(&id);
    assert_eq!(
        state, "RUNNING",
        "job {id} when its first checkpoint was committed"
    );
    cluster.slurm("scancel", &["--signal=TERM", "--batch", &id]);
    let (state, code) = cluster.wait_job(&id, Duration::from_secs(60));
    assert_ne!(state, "COMPLETED", "job {id} was preempted ({code})");
    assert!(
        !pre.join("model.safetensors").exists(),
        "a preempted job exports no final weights"
    );
    let stopped = latest_step(&checkpoints).unwrap();
    assert!(
        stopped < STEPS,
        "preempted before the end: latest checkpoint at step {stopped}"
    );
    // No work lost: the coordinator committed the checkpoint the workers took when the
    // signal came, newer than the periodic one it was preempted after.
    let first = first.unwrap();
    let log = std::fs::read_to_string(pre.join("coordinator.log")).unwrap_or_default();
    assert!(
        stopped > first
            && log.contains(&format!(
                "preempted: the checkpoint at step {stopped} is committed"
            )),
        "job {id}: preempted after the checkpoint at step {first}, it should have committed \
         a newer one at the signal; latest is step {stopped}. coordinator.log:\n{}",
        tail(&pre.join("coordinator.log"), 40)
    );

    // ... resubmitted with --resume latest, ends with the uninterrupted job's weights.
    let id = cluster.submit("resumed", &pre, &config, &["--resume", "latest"]);
    let (state, code) = cluster.wait_job(&id, Duration::from_secs(120));
    assert_eq!(
        (state.as_str(), code.as_str()),
        ("COMPLETED", "0:0"),
        "job {id}"
    );
    let out = std::fs::read_to_string(dir.join("resumed.out")).unwrap();
    assert!(
        out.contains(&format!("resumed step={stopped}")),
        "the resubmitted job resumed from step {stopped}"
    );
    let (got, meta) = read_safetensors(&pre.join("model.safetensors"));
    assert_eq!(meta["weaver.step"], STEPS.to_string(), "{meta}");
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        want.keys().collect::<Vec<_>>()
    );
    for (name, t) in &want {
        assert!(
            got[name] == *t,
            "{name}: the resumed job's final weights differ from the uninterrupted job's"
        );
    }
    cluster.stop();
}
