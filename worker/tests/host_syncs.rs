//! The step reads nothing back from the device except at logged steps: the losses, the
//! gradient norm and the control requests, in one read. (Alone in its test binary: the
//! counter is per process.)

use weaver_models::JobConfig;
use weaver_worker::parallel::ParallelTrainer;
use weaver_worker::sync::host_syncs;

#[test]
fn an_unlogged_step_reads_nothing_back_and_a_logged_one_once() {
    let job = JobConfig::parse(
        "[model]\nflavor = \"debug\"\n[train]\nglobal_batch = 8\nthreads = 1\n[parallel]\ndp = 2\nmicrobatches = 2\n",
        &[],
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut t = ParallelTrainer::solo(job, dir.path().to_path_buf(), false).unwrap();
    t.step_once(false).unwrap();
    let before = host_syncs();
    for _ in 0..3 {
        assert!(t.step_once(false).unwrap().is_none());
    }
    assert_eq!(host_syncs(), before, "unlogged steps read from the device");
    let before = host_syncs();
    let m = t.train_step().unwrap();
    assert!(m.loss.is_finite() && m.grad_norm > 0.0, "{m:?}");
    assert_eq!(host_syncs() - before, 1, "a logged step reads once");
}
