//! The GPU check (bench/gpu/run.sh) cannot rot: its CPU smoke mode runs here against the
//! binaries this build made (weaver, model_bench, the comm_nccl test binary) — every part
//! that needs no CUDA passes, and the CUDA-only parts say loudly that they skipped and why.
//! And the anchor config it times is the model the issue names (1.18e9 parameters; the
//! issue's MFU figures follow from its FLOPs).

mod common;

use common::python;
use std::path::{Path, PathBuf};
use std::process::Command;

use weaver_models::JobConfig;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// `target/<profile>`: where this build put the `weaver` binary.
fn profile_dir() -> PathBuf {
    Path::new(env!("CARGO_BIN_EXE_weaver"))
        .parent()
        .expect("the weaver binary lives in a folder")
        .to_path_buf()
}

/// The newest `comm_nccl-<hash>` test binary of this profile.
fn comm_nccl() -> PathBuf {
    let deps = profile_dir().join("deps");
    let newest = std::fs::read_dir(&deps)
        .unwrap_or_else(|e| panic!("{}: {e}", deps.display()))
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| {
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
            name.starts_with("comm_nccl-") && p.extension().is_none()
        })
        .max_by_key(|p| p.metadata().and_then(|m| m.modified()).ok());
    newest.unwrap_or_else(|| {
        panic!(
            "no comm_nccl test binary in {}: build it first (`cargo test --release -p \
             weaver-parallel --test comm_nccl --no-run`; scripts/test.sh builds every target)",
            deps.display()
        )
    })
}

#[test]
fn the_gpu_check_runs_in_cpu_smoke_mode() {
    let model_bench = profile_dir().join("examples/model_bench");
    assert!(
        model_bench.is_file(),
        "{} is missing: build it first (`cargo build --release -p weaver-worker --example \
         model_bench`; scripts/test.sh builds every target)",
        model_bench.display()
    );
    let dir = tempfile::tempdir().unwrap();
    let bin = dir.path().join("bin");
    std::fs::create_dir(&bin).unwrap();
    for (name, from) in [
        ("weaver", PathBuf::from(env!("CARGO_BIN_EXE_weaver"))),
        ("model_bench", model_bench),
        ("comm_nccl", comm_nccl()),
    ] {
        std::os::unix::fs::symlink(&from, bin.join(name)).unwrap();
    }
    let out = Command::new("bash")
        .arg(repo().join("bench/gpu/run.sh"))
        .arg("--cpu-smoke")
        .arg("--bin")
        .arg(&bin)
        .arg("--work")
        .arg(dir.path().join("work"))
        .current_dir(repo())
        .env("WEAVER_PYTHON", python())
        .env_remove("OUT")
        .output()
        .expect("cannot run bash");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("{stdout}\n{stderr}");
    assert!(
        out.status.success(),
        "run.sh --cpu-smoke failed: {}",
        out.status
    );
    for part in [
        "env",
        "one_process",
        "tcp_2proc",
        "tcp_4proc",
        "nccl_launch",
        "anchor_step",
        "train_30",
    ] {
        assert!(
            stdout.contains(&format!("\nPASS {part} ")),
            "{part} did not pass"
        );
    }
    // The CUDA-only parts skip loudly, naming why; the NCCL binary still ran.
    assert!(stdout.contains("SKIP nccl_world1: needs a CUDA GPU"));
    assert!(stdout.contains("the binary ran and reported NCCL unavailable"));
    assert!(stdout.contains("SKIP stream_order: needs a CUDA GPU"));
    assert!(stdout.contains("SKIP nccl_launch on nccl: needs a CUDA GPU"));
    // The layouts trained the one-process losses (the check compares them).
    assert!(stdout.contains("losses of steps 1..6 match one process"));
    // The table, then one RESULT line per part, each one JSON object.
    let results: Vec<serde_json::Value> = stdout
        .lines()
        .filter_map(|l| l.strip_prefix("RESULT "))
        .map(|j| serde_json::from_str(j).expect("RESULT is JSON"))
        .collect();
    assert_eq!(results.len(), 9, "{results:?}");
    assert!(stdout.contains("9 parts: 7 PASS, 0 FAIL, 2 SKIP"));
    let anchor = results
        .iter()
        .find(|r| r["part"] == "anchor_step")
        .expect("an anchor_step RESULT");
    // The dtype path of the GPU run: bf16 weights with f32 masters against bf16 autocast.
    assert_eq!(anchor["dtype"], "bf16", "{anchor}");
    // Counted on the CPU: ATen ops (no kernel launches there), both sides.
    assert!(
        anchor["aten_ops_per_step"].as_u64().unwrap_or(0) > 100,
        "{anchor}"
    );
    assert!(anchor["kernel_launches_per_step"].is_null(), "{anchor}");
    assert!(
        anchor["torch_aten_ops_per_step"].as_u64().unwrap_or(0) > 100,
        "{anchor}"
    );
    for k in ["weaver_step_s", "torch_step_s", "compile_step_s"] {
        assert!(anchor[k].as_f64().is_some_and(|s| s > 0.0), "{k}: {anchor}");
    }
    let train = results.iter().find(|r| r["part"] == "train_30").unwrap();
    assert_eq!(train["steps"], 30, "{train}");
}

#[test]
fn the_anchor_config_is_the_issues_model() {
    let job = JobConfig::load(&repo().join("bench/gpu/anchor.toml"), &[]).unwrap();
    let m = &job.model;
    let params = m.num_params() as f64;
    assert!(
        (1.175e9..1.185e9).contains(&params),
        "{params:e} parameters"
    );
    assert_eq!(
        (m.image_size, m.patch_size, m.vision_width, m.vision_layers),
        (224, 14, 1024, 24)
    );
    assert_eq!(
        (m.text_width, m.unimodal_layers, m.multimodal_layers),
        (1536, 12, 12)
    );
    assert_eq!(job.train.global_batch, 64);
    assert_eq!(job.train.dtype, "bf16");
    // The issue's anchor: eager 196.5 ms/step at 30.2% MFU, torch.compile 151.7 ms at 39.1%
    // of 989 TFLOP/s. This shape's formula FLOPs give the same MFU within half a point,
    // so MFU figures of the GPU check compare with the issue's.
    let flops = m.train_flops_per_sample(job.train.itm_weight > 0.0) * 64.0;
    for (step_s, mfu) in [(0.1965, 0.302), (0.1517, 0.391)] {
        let ours = flops / step_s / (job.train.peak_tflops * 1e12);
        assert!((ours - mfu).abs() < 0.005, "{ours} vs the issue's {mfu}");
    }
}

#[test]
fn prepare_sh_parses() {
    let out = Command::new("bash")
        .arg("-n")
        .arg(repo().join("bench/gpu/prepare.sh"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
