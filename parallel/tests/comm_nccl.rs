//! The conformance suite on the nccl backend. NCCL refuses two ranks on one GPU, so the
//! suite runs at world size 1, on machines with a GPU. Everywhere else these tests check
//! that the backend says plainly what is missing instead of crashing.

mod conformance;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use conformance::{Backend, Maker};
use tch::Device;
use weaver_parallel::comm::nccl::NcclLibrary;
use weaver_parallel::comm::{CommError, Communicator, NcclComm};
use weaver_parallel::store::Store;
use weaver_parallel::tcp_store::{TcpStore, TcpStoreServer};

struct Nccl;

fn store() -> Arc<dyn Store> {
    static SERVER: OnceLock<TcpStoreServer> = OnceLock::new();
    let server =
        SERVER.get_or_init(|| TcpStoreServer::bind("127.0.0.1:0").expect("bind the store"));
    Arc::new(TcpStore::new(server.addr(), Duration::from_secs(10)))
}

fn prefix() -> String {
    static WORLDS: AtomicUsize = AtomicUsize::new(0);
    format!(
        "nccl-test/{}/gen{}",
        std::process::id(),
        WORLDS.fetch_add(1, Ordering::SeqCst)
    )
}

impl Backend for Nccl {
    fn name(&self) -> &'static str {
        "nccl"
    }

    fn device(&self) -> Device {
        Device::Cuda(0)
    }

    fn world(&self, n: usize, timeout: Duration) -> Vec<Maker> {
        assert_eq!(n, 1, "one GPU: NCCL runs at world size 1 only");
        let prefix = prefix();
        vec![Box::new(move || {
            NcclComm::new(store(), &prefix, 0, 1, 0, timeout)
                .map(|c| Arc::new(c) as Arc<dyn Communicator>)
        })]
    }

    fn detects_p2p_mismatch(&self) -> bool {
        false
    }

    fn other_device(&self) -> Option<Device> {
        Some(Device::Cpu)
    }
}

/// With a GPU: the whole suite at world size 1. Without: a clear `Unavailable`.
#[test]
fn world_1_suite_or_a_clear_unavailable() {
    conformance::init();
    match NcclComm::new(store(), &prefix(), 0, 1, 0, Duration::from_secs(60)) {
        Err(CommError::Unavailable(msg)) => {
            eprintln!("nccl backend unavailable here (expected without a GPU): {msg}");
            assert!(msg.contains("NCCL") || msg.contains("nccl"), "{msg}");
            assert!(
                !tch::Cuda::is_available() || msg.contains("libnccl"),
                "a GPU is visible but: {msg}"
            );
        }
        Err(e) => panic!("expected Ok or Unavailable, got {e}"),
        Ok(c) => {
            eprintln!(
                "nccl backend available: {c:?}, {:?}",
                NcclLibrary::load().ok()
            );
            drop(c);
            conformance::all_reduce_all(&Nccl, 1);
            conformance::gather_scatter(&Nccl, 1);
            conformance::broadcast_all(&Nccl, 1);
            conformance::barrier_orders(&Nccl, 1);
            conformance::subgroups(&Nccl, 1);
            conformance::argument_errors(&Nccl, 1);
            conformance::wrong_device(&Nccl, 1);
            conformance::started_match_blocking(&Nccl, 1);
            conformance::started_in_flight(&Nccl, 1);
            conformance::started_argument_errors(&Nccl, 1);
            conformance::run_world(&Nccl, 1, conformance::TIMEOUT, |c| {
                c.abort();
                let e = c.barrier().unwrap_err();
                assert!(matches!(e, CommError::Aborted), "{e}");
            });
        }
    }
}

/// Stream order on NCCL at world size 1: an all-gather whose input comes straight from a
/// large matmul, consumed right after, with no host synchronisation (bench/gpu/run.sh runs
/// this test by name on the GPU machine).
#[test]
fn all_gather_waits_for_the_matmul_that_made_its_input() {
    conformance::init();
    match NcclComm::new(store(), &prefix(), 0, 1, 0, Duration::from_secs(60)) {
        Err(CommError::Unavailable(msg)) => {
            eprintln!(
                "SKIP stream order on nccl: the nccl backend is unavailable here ({msg}); this \
                 check needs a GPU (comm_tcp runs the same check on CPU tensors)"
            );
        }
        Err(e) => panic!("expected Ok or Unavailable, got {e}"),
        Ok(c) => {
            drop(c);
            conformance::collective_after_compute(&Nccl, 1, 8192);
        }
    }
}

#[test]
fn a_missing_library_is_unavailable_not_a_panic() {
    let e = NcclLibrary::open("/nonexistent/libnccl.so.2").unwrap_err();
    assert!(
        matches!(&e, CommError::Unavailable(m) if m.contains("cannot load")),
        "{e}"
    );
}

/// The pip NCCL (libnccl.so.2, which cudarc's own loader would not find) is found in the
/// project venv and loads on a machine without CUDA.
#[test]
fn the_pip_nccl_is_found_by_name_so_2() {
    let venv_copy = NcclLibrary::candidates()
        .into_iter()
        .find(|c| c.contains("nvidia/nccl/lib") && std::path::Path::new(c).exists());
    let Some(path) = venv_copy else {
        eprintln!("no pip NCCL in this environment; nothing to check");
        return;
    };
    let lib = NcclLibrary::open(&path).expect("load libnccl.so.2");
    assert!(lib.version_string().starts_with("2."), "{lib:?}");
    let any = NcclLibrary::load().expect("the search finds it");
    assert!(any.version_string().starts_with("2."));
}
