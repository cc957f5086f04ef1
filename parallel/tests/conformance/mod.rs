//! The conformance suite of `comm`: every backend must pass these functions (STYLE rule 4).
//! `comm_tcp.rs` runs them on tcp at world sizes 1, 2, 3, 4 and 8 (CPU tensors, directly and
//! staged through host buffers; CUDA tensors where a GPU is present); `comm_nccl.rs` runs
//! them on NCCL at world size 1 where a GPU is present. The blocking calls come first, then
//! the device rule ([`wrong_device`]), then the started (`*_start`) operations.
//!
//! Ranks of a world run as threads of the test process (a backend's `world` says how to
//! build each rank's communicator). Values are small integers, exact in every dtype, so
//! results are compared exactly whatever the reduction order.

#![allow(dead_code)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Barrier, Mutex};
use std::time::{Duration, Instant};

use tch::{Device, Kind, Tensor};
use weaver_parallel::comm::{
    mesh_groups, new_group, shard_range, CommError, Communicator, P2POp, P2POwned, ReduceOp, Work,
};
use weaver_parallel::mesh::ParallelDims;

/// Builds the ranks of a world.
pub(crate) type Maker = Box<dyn FnOnce() -> Result<Arc<dyn Communicator>, CommError> + Send>;

/// A backend under test.
pub(crate) trait Backend: Sync {
    /// For messages.
    fn name(&self) -> &'static str;
    /// Where its tensors live.
    fn device(&self) -> Device;
    /// One constructor per rank of a fresh world of `n` ranks, with `timeout`.
    fn world(&self, n: usize, timeout: Duration) -> Vec<Maker>;
    /// Whether a point-to-point shape/dtype mismatch is detected (NCCL cannot).
    fn detects_p2p_mismatch(&self) -> bool;
    /// A device other than [`Backend::device`] on which tensors can be made here (to hand
    /// the communicator tensors it must refuse), if there is one.
    fn other_device(&self) -> Option<Device>;
}

/// Generous: a loaded 2-core machine runs eight ranks as threads.
pub(crate) const TIMEOUT: Duration = Duration::from_secs(60);

pub(crate) fn init() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| tch::set_num_threads(1));
}

/// Runs `body(comm)` on every rank of a fresh world, one thread each; panics with the
/// failing rank's message.
pub(crate) fn run_world<F>(b: &dyn Backend, n: usize, timeout: Duration, body: F)
where
    F: Fn(Arc<dyn Communicator>) + Sync,
{
    init();
    let makers = b.world(n, timeout);
    let body = &body;
    std::thread::scope(|s| {
        let handles: Vec<_> = makers
            .into_iter()
            .enumerate()
            .map(|(r, make)| {
                std::thread::Builder::new()
                    .name(format!("rank-{r}"))
                    .spawn_scoped(s, move || {
                        let comm = make()
                            .unwrap_or_else(|e| panic!("rank {r}: building the communicator: {e}"));
                        body(comm)
                    })
                    .expect("spawn rank thread")
            })
            .collect();
        let mut failures = Vec::new();
        for (r, h) in handles.into_iter().enumerate() {
            if let Err(p) = h.join() {
                let msg = p
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                failures.push(format!("rank {r}: {msg}"));
            }
        }
        assert!(
            failures.is_empty(),
            "{} world of {n}: {}",
            b.name(),
            failures.join("\n")
        );
    });
}

fn ints(v: &[i64], kind: Kind, device: Device) -> Tensor {
    Tensor::from_slice(v).to_kind(kind).to_device(device)
}

fn assert_exact(got: &Tensor, want: &[i64], what: &str) {
    let got = got
        .to_device(Device::Cpu)
        .to_kind(Kind::Double)
        .flatten(0, -1);
    let want_t = Tensor::from_slice(want).to_kind(Kind::Double);
    if got.size() != want_t.size() || !got.equal(&want_t) {
        let g: Vec<f64> = Vec::try_from(&got).unwrap_or_default();
        let show = |v: &[f64]| format!("{:?}", &v[..v.len().min(12)]);
        let w: Vec<f64> = want.iter().map(|&x| x as f64).collect();
        let first = g.iter().zip(&w).position(|(a, b)| a != b);
        panic!(
            "{what}: got {} want {} (len {} vs {}, first difference at {first:?})",
            show(&g),
            show(&w),
            g.len(),
            w.len()
        );
    }
}

/// Small integer values, distinct per rank and position, exact in every dtype: in -2..=2
/// (0..=4 for u8).
fn val(kind: Kind, rank: usize, i: usize) -> i64 {
    let v = ((i * 7 + rank * 3) % 5) as i64;
    if kind == Kind::Uint8 {
        v
    } else {
        v - 2
    }
}

/// Values for Avg: multiples of n, so the average is exact.
fn avg_val(kind: Kind, rank: usize, i: usize, n: usize) -> i64 {
    let v = ((i * 5 + rank) % 3) as i64;
    n as i64 * if kind == Kind::Uint8 { v } else { v - 1 }
}

fn input(kind: Kind, op: ReduceOp, rank: usize, i: usize, n: usize) -> i64 {
    if op == ReduceOp::Avg {
        avg_val(kind, rank, i, n)
    } else {
        val(kind, rank, i)
    }
}

fn expected_reduce(kind: Kind, op: ReduceOp, n: usize, i: usize) -> i64 {
    let xs = (0..n).map(|r| input(kind, op, r, i, n));
    match op {
        ReduceOp::Sum => xs.sum(),
        ReduceOp::Avg => xs.sum::<i64>() / n as i64,
        ReduceOp::Max => xs.max().unwrap_or(0),
        ReduceOp::Min => xs.min().unwrap_or(0),
    }
}

pub(crate) const MAIN_KINDS: [Kind; 4] = [Kind::Float, Kind::BFloat16, Kind::Half, Kind::Int64];
pub(crate) const OTHER_KINDS: [Kind; 4] = [Kind::Double, Kind::Int, Kind::Int8, Kind::Uint8];
pub(crate) const OPS: [ReduceOp; 4] = [ReduceOp::Sum, ReduceOp::Avg, ReduceOp::Max, ReduceOp::Min];

/// Lengths that exercise empty and tiny tensors, lengths that do not divide by `n`, the
/// one-shot path and the pipelined ring (several chunks per segment).
pub(crate) fn lengths(n: usize) -> Vec<usize> {
    let mut v = vec![0, 1, 2 * n + 1, 999, 40_001];
    if n > 1 {
        v.push(n - 1);
    }
    v
}

/// all_reduce: every op on every dtype, every length class, exact results.
pub(crate) fn all_reduce_all(b: &dyn Backend, n: usize) {
    let dev = b.device();
    run_world(b, n, TIMEOUT, |c| {
        let r = c.rank();
        let mut cases: Vec<(Kind, ReduceOp, usize)> = Vec::new();
        for kind in MAIN_KINDS {
            for op in OPS {
                for len in lengths(n) {
                    cases.push((kind, op, len));
                }
            }
        }
        for kind in OTHER_KINDS {
            for op in [ReduceOp::Sum, ReduceOp::Avg, ReduceOp::Max] {
                for len in [n + 2, 20_003] {
                    cases.push((kind, op, len));
                }
            }
        }
        // A large one: many chunks in flight, segments of unequal length.
        cases.push((Kind::Float, ReduceOp::Sum, 1_000_003));
        cases.push((Kind::BFloat16, ReduceOp::Avg, 700_001));
        for (kind, op, len) in cases {
            let v: Vec<i64> = (0..len).map(|i| input(kind, op, r, i, n)).collect();
            let mut t = ints(&v, kind, dev);
            c.all_reduce(&mut t, op)
                .unwrap_or_else(|e| panic!("{kind:?} {op:?} len {len}: {e}"));
            let want: Vec<i64> = (0..len).map(|i| expected_reduce(kind, op, n, i)).collect();
            assert_exact(&t, &want, &format!("all_reduce {kind:?} {op:?} len {len}"));
        }
        // Non-contiguous input: the result lands in the caller's view.
        let v: Vec<i64> = (0..60).map(|i| val(Kind::Float, r, i)).collect();
        let mut t = ints(&v, Kind::Float, dev).view([6, 10]).tr();
        c.all_reduce(&mut t, ReduceOp::Sum)
            .expect("non-contiguous all_reduce");
        let want_t: Vec<i64> = (0..60)
            .map(|i| expected_reduce(Kind::Float, ReduceOp::Sum, n, i))
            .collect();
        assert_exact(
            &t.tr().contiguous(),
            &want_t,
            "all_reduce of a transposed view",
        );
    });
}

/// The rows of the global tensor used by gather/scatter tests: element (row, col).
fn cell(kind: Kind, rank: usize, row: usize, col: usize, width: usize) -> i64 {
    val(kind, rank, row * width + col)
}

/// all_gather and reduce_scatter with row counts that do not divide by the world size, with
/// and without trailing dims, several dtypes (bool for gather).
pub(crate) fn gather_scatter(b: &dyn Backend, n: usize) {
    let dev = b.device();
    run_world(b, n, TIMEOUT, |c| {
        let r = c.rank();
        for kind in [
            Kind::Float,
            Kind::BFloat16,
            Kind::Half,
            Kind::Int64,
            Kind::Uint8,
        ] {
            for width in [1usize, 7] {
                for rows in [0usize, 1, n + 1, 3 * n - 1, 5003] {
                    let shape = |k: usize| {
                        if width == 1 {
                            vec![k as i64]
                        } else {
                            vec![k as i64, width as i64]
                        }
                    };
                    // all_gather: rank p holds rows shard_range(rows, n, p) of the global.
                    let mine = shard_range(rows, n, r);
                    let part: Vec<i64> = mine
                        .clone()
                        .flat_map(|row| (0..width).map(move |col| cell(kind, 0, row, col, width)))
                        .collect();
                    let inp = ints(&part, kind, dev).view(shape(mine.len()).as_slice());
                    let mut out = Tensor::zeros(shape(rows).as_slice(), (kind, dev));
                    c.all_gather(&inp, &mut out)
                        .unwrap_or_else(|e| panic!("all_gather {kind:?} {rows}x{width}: {e}"));
                    let want: Vec<i64> = (0..rows)
                        .flat_map(|row| (0..width).map(move |col| cell(kind, 0, row, col, width)))
                        .collect();
                    assert_exact(&out, &want, &format!("all_gather {kind:?} {rows}x{width}"));

                    // reduce_scatter: everyone holds all rows; rank r gets its shard, summed.
                    let full: Vec<i64> = (0..rows)
                        .flat_map(|row| (0..width).map(move |col| cell(kind, r, row, col, width)))
                        .collect();
                    let inp = ints(&full, kind, dev).view(shape(rows).as_slice());
                    let mut out = Tensor::zeros(shape(mine.len()).as_slice(), (kind, dev));
                    c.reduce_scatter(&inp, &mut out, ReduceOp::Sum)
                        .unwrap_or_else(|e| panic!("reduce_scatter {kind:?} {rows}x{width}: {e}"));
                    let want: Vec<i64> = mine
                        .clone()
                        .flat_map(|row| {
                            (0..width).map(move |col| {
                                (0..n).map(|p| cell(kind, p, row, col, width)).sum::<i64>()
                            })
                        })
                        .collect();
                    assert_exact(
                        &out,
                        &want,
                        &format!("reduce_scatter {kind:?} {rows}x{width}"),
                    );
                }
            }
        }
        // Avg and Max through reduce_scatter (large: the ring path).
        for op in [ReduceOp::Avg, ReduceOp::Max] {
            let rows = 100_003;
            let full: Vec<i64> = (0..rows).map(|i| input(Kind::Float, op, r, i, n)).collect();
            let inp = ints(&full, Kind::Float, dev);
            let mine = shard_range(rows, n, r);
            let mut out = Tensor::zeros([mine.len() as i64], (Kind::Float, dev));
            c.reduce_scatter(&inp, &mut out, op)
                .unwrap_or_else(|e| panic!("reduce_scatter {op:?}: {e}"));
            let want: Vec<i64> = mine
                .map(|i| expected_reduce(Kind::Float, op, n, i))
                .collect();
            assert_exact(&out, &want, &format!("reduce_scatter {op:?}"));
        }
        // Bool moves through all_gather.
        let rows = 2 * n + 1;
        let mine = shard_range(rows, n, r);
        let part: Vec<i64> = mine.clone().map(|i| (i % 2) as i64).collect();
        let inp = ints(&part, Kind::Bool, dev);
        let mut out = Tensor::zeros([rows as i64], (Kind::Bool, dev));
        c.all_gather(&inp, &mut out).expect("bool all_gather");
        assert_exact(
            &out,
            &(0..rows).map(|i| (i % 2) as i64).collect::<Vec<_>>(),
            "bool all_gather",
        );
    });
}

/// broadcast from every root, small (flat) and large (pipelined chain), several dtypes.
pub(crate) fn broadcast_all(b: &dyn Backend, n: usize) {
    let dev = b.device();
    run_world(b, n, TIMEOUT, |c| {
        let r = c.rank();
        for root in 0..n {
            for (kind, len) in [
                (Kind::Float, 3),
                (Kind::BFloat16, 1001),
                (Kind::Int64, 0),
                (Kind::Float, 300_007),
                (Kind::Uint8, 70_000),
            ] {
                let v: Vec<i64> = (0..len)
                    .map(|i| if r == root { val(kind, root, i) } else { 0 })
                    .collect();
                let mut t = ints(&v, kind, dev);
                c.broadcast(&mut t, root)
                    .unwrap_or_else(|e| panic!("broadcast {kind:?} {len} from {root}: {e}"));
                let want: Vec<i64> = (0..len).map(|i| val(kind, root, i)).collect();
                assert_exact(&t, &want, &format!("broadcast {kind:?} {len} from {root}"));
            }
        }
    });
}

/// Point to point: a ring exchange with batch_p2p (crossing for two ranks), small and large;
/// ordered plain send/recv; several messages to one peer in one batch.
pub(crate) fn point_to_point(b: &dyn Backend, n: usize) {
    if n < 2 {
        return;
    }
    let dev = b.device();
    run_world(b, n, TIMEOUT, |c| {
        let r = c.rank();
        let (next, prev) = ((r + 1) % n, (r + n - 1) % n);
        for (kind, len) in [
            (Kind::Float, 5),
            (Kind::BFloat16, 2_000_003),
            (Kind::Int64, 0),
            (Kind::Half, 77),
        ] {
            let mine: Vec<i64> = (0..len).map(|i| val(kind, r, i)).collect();
            let send = ints(&mine, kind, dev).view([1, len as i64]);
            let mut recv = Tensor::zeros([1, len as i64], (kind, dev));
            c.batch_p2p(&mut [
                P2POp::Send {
                    tensor: &send,
                    peer: next,
                },
                P2POp::Recv {
                    tensor: &mut recv,
                    peer: prev,
                },
            ])
            .unwrap_or_else(|e| panic!("ring exchange {kind:?} {len}: {e}"));
            let want: Vec<i64> = (0..len).map(|i| val(kind, prev, i)).collect();
            assert_exact(&recv, &want, &format!("ring exchange {kind:?} {len}"));
        }
        // Plain send/recv, rank 0 → every other rank, two messages each, in order.
        if r == 0 {
            for p in 1..n {
                for k in 0..2 {
                    let t = ints(&[p as i64, k], Kind::Int64, dev);
                    c.send(&t, p).unwrap_or_else(|e| panic!("send to {p}: {e}"));
                }
            }
        } else {
            for k in 0..2 {
                let mut t = Tensor::zeros([2], (Kind::Int64, dev));
                c.recv(&mut t, 0)
                    .unwrap_or_else(|e| panic!("recv {k}: {e}"));
                assert_exact(&t, &[r as i64, k], "ordered send/recv");
            }
        }
        // Several messages to the same peer in one batch keep their order.
        let a = ints(&[1, 2, 3], Kind::Int64, dev);
        let bb = ints(&[4, 5], Kind::Int64, dev);
        let mut x = Tensor::zeros([3], (Kind::Int64, dev));
        let mut y = Tensor::zeros([2], (Kind::Int64, dev));
        c.batch_p2p(&mut [
            P2POp::Send {
                tensor: &a,
                peer: next,
            },
            P2POp::Send {
                tensor: &bb,
                peer: next,
            },
            P2POp::Recv {
                tensor: &mut x,
                peer: prev,
            },
            P2POp::Recv {
                tensor: &mut y,
                peer: prev,
            },
        ])
        .expect("batched messages");
        assert_exact(&x, &[1, 2, 3], "first of a batch");
        assert_exact(&y, &[4, 5], "second of a batch");
    });
}

/// A receive whose shape or dtype differs from what the peer sends fails with a typed error,
/// and the communicator stays usable.
pub(crate) fn p2p_mismatch(b: &dyn Backend) {
    if !b.detects_p2p_mismatch() {
        return;
    }
    let dev = b.device();
    run_world(b, 2, TIMEOUT, |c| {
        if c.rank() == 0 {
            c.send(&Tensor::zeros([4], (Kind::Float, dev)), 1)
                .expect("send 1");
            c.send(&Tensor::zeros([4], (Kind::Float, dev)), 1)
                .expect("send 2");
            c.send(&Tensor::zeros([2, 3], (Kind::Float, dev)), 1)
                .expect("send 3");
            c.send(&ints(&[9, 8], Kind::Int64, dev), 1).expect("send 4");
        } else {
            let e = c
                .recv(&mut Tensor::zeros([5], (Kind::Float, dev)), 0)
                .unwrap_err();
            assert!(matches!(e, CommError::SizeMismatch { .. }), "{e}");
            let e = c
                .recv(&mut Tensor::zeros([4], (Kind::Int, dev)), 0)
                .unwrap_err();
            assert!(matches!(e, CommError::DtypeMismatch { .. }), "{e}");
            let e = c
                .recv(&mut Tensor::zeros([3, 2], (Kind::Float, dev)), 0)
                .unwrap_err();
            assert!(matches!(e, CommError::SizeMismatch { .. }), "{e}");
            let mut ok = Tensor::zeros([2], (Kind::Int64, dev));
            c.recv(&mut ok, 0)
                .expect("the stream stays in step after mismatches");
            assert_exact(&ok, &[9, 8], "recv after mismatches");
        }
        c.barrier().expect("barrier after mismatches");
    });
}

/// Ranks that disagree on a collective's size, dtype or operation get typed errors.
pub(crate) fn collective_mismatch(b: &dyn Backend) {
    let dev = b.device();
    for case in 0..3 {
        run_world(b, 2, Duration::from_secs(20), |c| {
            let r = c.rank();
            let res = match case {
                0 => c.all_reduce(
                    &mut Tensor::zeros([10 + 2 * r as i64], (Kind::Float, dev)),
                    ReduceOp::Sum,
                ),
                1 => c.all_reduce(
                    &mut Tensor::zeros(
                        [10],
                        (if r == 0 { Kind::Float } else { Kind::Double }, dev),
                    ),
                    ReduceOp::Sum,
                ),
                _ => {
                    if r == 0 {
                        c.all_gather(
                            &Tensor::zeros([5], (Kind::Float, dev)),
                            &mut Tensor::zeros([10], (Kind::Float, dev)),
                        )
                    } else {
                        c.all_reduce(&mut Tensor::zeros([10], (Kind::Float, dev)), ReduceOp::Sum)
                    }
                }
            };
            let e = res.expect_err("ranks disagree: must fail");
            let ok = match case {
                0 => matches!(
                    e,
                    CommError::SizeMismatch { .. } | CommError::PeerLost { .. }
                ),
                1 => matches!(
                    e,
                    CommError::DtypeMismatch { .. } | CommError::PeerLost { .. }
                ),
                _ => matches!(e, CommError::Protocol(_) | CommError::PeerLost { .. }),
            };
            assert!(ok, "case {case}: {e}");
            // Afterwards the communicator refuses work instead of misreading the stream.
            let again = c.barrier().expect_err("broken after a mismatch");
            assert!(matches!(again, CommError::Broken { .. }), "{again}");
        });
    }
}

/// Bad arguments fail before any communication and leave the communicator usable.
pub(crate) fn argument_errors(b: &dyn Backend, n: usize) {
    let dev = b.device();
    run_world(b, n, TIMEOUT, |c| {
        let r = c.rank();
        let e = c
            .broadcast(&mut Tensor::zeros([2], (Kind::Float, dev)), n)
            .unwrap_err();
        assert!(matches!(e, CommError::InvalidArgument(_)), "{e}");
        let e = c
            .send(&Tensor::zeros([2], (Kind::Float, dev)), r)
            .unwrap_err();
        assert!(matches!(e, CommError::InvalidArgument(_)), "{e}");
        let e = c
            .all_reduce(&mut Tensor::zeros([2], (Kind::Bool, dev)), ReduceOp::Sum)
            .unwrap_err();
        assert!(matches!(e, CommError::InvalidArgument(_)), "{e}");
        let wrong_rows = shard_range(10, n, r).len() + 1;
        let e = c
            .all_gather(
                &Tensor::zeros([wrong_rows as i64], (Kind::Float, dev)),
                &mut Tensor::zeros([10], (Kind::Float, dev)),
            )
            .unwrap_err();
        assert!(matches!(e, CommError::SizeMismatch { .. }), "{e}");
        let e = c
            .all_gather(
                &Tensor::zeros([shard_range(10, n, r).len() as i64], (Kind::Int64, dev)),
                &mut Tensor::zeros([10], (Kind::Float, dev)),
            )
            .unwrap_err();
        assert!(matches!(e, CommError::DtypeMismatch { .. }), "{e}");
        let mut t = ints(&[r as i64], Kind::Int64, dev);
        c.all_reduce(&mut t, ReduceOp::Sum)
            .expect("usable after argument errors");
        assert_exact(&t, &[(0..n as i64).sum()], "sum of ranks");
    });
}

/// barrier: nobody leaves round k before everybody entered it.
pub(crate) fn barrier_orders(b: &dyn Backend, n: usize) {
    let entered = AtomicUsize::new(0);
    run_world(b, n, TIMEOUT, |c| {
        for round in 1..=5 {
            entered.fetch_add(1, Ordering::SeqCst);
            c.barrier()
                .unwrap_or_else(|e| panic!("barrier {round}: {e}"));
            let seen = entered.load(Ordering::SeqCst);
            assert!(
                seen >= round * n,
                "left barrier {round} after only {seen} entries"
            );
            c.barrier().expect("second barrier");
        }
    });
}

/// Sub-groups: the TP, PP and DP groups of a 2×2×2 mesh (or what fits in `n`), used at the
/// same time from two threads (DP all-reduces in one, PP exchanges in the other), plus
/// `new_group` with non-members and a permuted order.
pub(crate) fn subgroups(b: &dyn Backend, n: usize) {
    let dims = match n {
        8 => ParallelDims {
            dp: 2,
            pp: 2,
            tp: 2,
        },
        4 => ParallelDims {
            dp: 2,
            pp: 2,
            tp: 1,
        },
        2 => ParallelDims {
            dp: 1,
            pp: 2,
            tp: 1,
        },
        _ => ParallelDims {
            dp: n,
            pp: 1,
            tp: 1,
        },
    };
    let dev = b.device();
    run_world(b, n, TIMEOUT, |c| {
        let me = c.rank();
        let g = mesh_groups(&*c, &dims).expect("mesh groups");
        // The timeout reaches the groups; restore the suite's afterwards.
        c.set_timeout(Duration::from_secs(77));
        assert_eq!(
            (g.tp.timeout(), g.dp.timeout()),
            (Duration::from_secs(77), Duration::from_secs(77))
        );
        c.set_timeout(TIMEOUT);
        for (axis, grp) in [("tp", &g.tp), ("pp", &g.pp), ("dp", &g.dp)] {
            let members: Vec<usize> = (0..grp.size()).map(|i| grp.world_rank(i)).collect();
            assert_eq!(grp.world_rank(grp.rank()), me, "{axis}");
            let mut t = ints(&[me as i64], Kind::Int64, dev);
            grp.all_reduce(&mut t, ReduceOp::Sum)
                .unwrap_or_else(|e| panic!("{axis} all_reduce: {e}"));
            assert_exact(
                &t,
                &[members.iter().map(|&m| m as i64).sum()],
                &format!("{axis} group sum"),
            );
        }
        // Concurrent use: DP gradient reduction in the background, PP traffic in front.
        let (dp, pp) = (g.dp.clone(), g.pp.clone());
        std::thread::scope(|s| {
            let bg = s.spawn(move || {
                for it in 0..12i64 {
                    let len = 50_003;
                    let mut t = Tensor::full([len], it + me as i64, (Kind::Float, dev));
                    dp.all_reduce(&mut t, ReduceOp::Sum)
                        .unwrap_or_else(|e| panic!("dp iteration {it}: {e}"));
                    let want: i64 = (0..dp.size()).map(|i| it + dp.world_rank(i) as i64).sum();
                    assert_exact(&t.narrow(0, len - 1, 1), &[want], "dp sum while pp runs");
                }
            });
            if pp.size() > 1 {
                let (pr, pn) = (pp.rank(), pp.size());
                for it in 0..12i64 {
                    let send = Tensor::full([30_000], it * 100 + me as i64, (Kind::Float, dev));
                    let mut recv = Tensor::zeros([30_000], (Kind::Float, dev));
                    let (next, prev) = ((pr + 1) % pn, (pr + pn - 1) % pn);
                    pp.batch_p2p(&mut [
                        P2POp::Send {
                            tensor: &send,
                            peer: next,
                        },
                        P2POp::Recv {
                            tensor: &mut recv,
                            peer: prev,
                        },
                    ])
                    .unwrap_or_else(|e| panic!("pp iteration {it}: {e}"));
                    let want = it * 100 + pp.world_rank(prev) as i64;
                    assert_exact(&recv.narrow(0, 0, 1), &[want], "pp exchange while dp runs");
                }
            }
            bg.join().expect("dp thread");
        });
        // new_group: a permuted subset; non-members get None and still take part.
        if n >= 3 {
            let ranks = [n - 1, 0, 1];
            let grp = new_group(&*c, &ranks).expect("new_group");
            match ranks.iter().position(|&x| x == me) {
                Some(i) => {
                    let grp = grp.expect("member gets a group");
                    assert_eq!((grp.rank(), grp.size()), (i, 3));
                    let mut t = ints(&[i as i64 * 10], Kind::Int64, dev);
                    grp.broadcast(&mut t, 0)
                        .expect("broadcast in the new group");
                    assert_exact(&t, &[0], "broadcast from group rank 0");
                }
                None => assert!(grp.is_none(), "non-member gets None"),
            }
        }
        let none = c.split(None, 0).expect("split without color");
        assert!(none.is_none());
        c.barrier().expect("world still usable");
    });
}

/// A rank that never joins makes the others fail with Timeout within the timeout, not hang;
/// the communicator is then unusable.
pub(crate) fn timeout(b: &dyn Backend) {
    let dev = b.device();
    let (done_tx, done_rx) = mpsc::channel::<()>();
    let done_rx = Mutex::new(done_rx);
    run_world(b, 2, TIMEOUT, |c| {
        if c.rank() == 0 {
            let limit = Duration::from_millis(400);
            c.set_timeout(limit);
            assert_eq!(c.timeout(), limit);
            let t0 = Instant::now();
            let e = c
                .all_reduce(&mut Tensor::ones([1000], (Kind::Float, dev)), ReduceOp::Sum)
                .unwrap_err();
            let took = t0.elapsed();
            assert!(matches!(e, CommError::Timeout { .. }), "{e}");
            assert!(
                took >= limit && took < limit + Duration::from_secs(3),
                "timed out after {took:?}"
            );
            let e = c.barrier().unwrap_err();
            assert!(matches!(e, CommError::Broken { .. }), "{e}");
            done_tx.send(()).expect("signal");
        } else {
            // Rank 1 stays away until rank 0 has given up.
            done_rx
                .lock()
                .expect("lock")
                .recv()
                .expect("wait for rank 0");
        }
    });
}

/// Like [`timeout`], but after the ranks have worked together (connections, shared
/// memory and the like are set up): the waiting rank times out, typed, within its timeout,
/// and the rank that was late then fails instead of waiting for a broken peer.
pub(crate) fn timeout_after_warm_up(b: &dyn Backend, len: i64) {
    let dev = b.device();
    let (done_tx, done_rx) = mpsc::channel::<()>();
    let done_rx = Mutex::new(done_rx);
    run_world(b, 2, TIMEOUT, |c| {
        let mut t = Tensor::ones([len], (Kind::Float, dev));
        c.all_reduce(&mut t, ReduceOp::Sum).expect("warm-up");
        if c.rank() == 0 {
            let limit = Duration::from_millis(400);
            c.set_timeout(limit);
            let t0 = Instant::now();
            let e = c.all_reduce(&mut t, ReduceOp::Sum).unwrap_err();
            let took = t0.elapsed();
            assert!(matches!(e, CommError::Timeout { .. }), "{e}");
            assert!(
                took >= limit && took < limit + Duration::from_secs(3),
                "timed out after {took:?}"
            );
            let e = c.barrier().unwrap_err();
            assert!(matches!(e, CommError::Broken { .. }), "{e}");
            done_tx.send(()).expect("signal");
        } else {
            done_rx
                .lock()
                .expect("lock")
                .recv()
                .expect("wait for rank 0");
            let t0 = Instant::now();
            let e = c.all_reduce(&mut t, ReduceOp::Sum).unwrap_err();
            assert!(matches!(e, CommError::PeerLost { .. }), "{e}");
            assert!(t0.elapsed() < Duration::from_secs(10), "{:?}", t0.elapsed());
        }
    });
}

/// abort(): the pending call fails with Aborted at once, later calls and groups too, and a
/// peer blocked on the aborted rank sees a typed error long before its timeout.
pub(crate) fn abort(b: &dyn Backend) {
    let dev = b.device();
    let gate = Barrier::new(2);
    let (r1_tx, r1_rx) = mpsc::channel::<()>();
    let r1_rx = Mutex::new(r1_rx);
    run_world(b, 3, TIMEOUT, |c| {
        let r = c.rank();
        // Warm up (connections exist), and make a group to check it is aborted with us.
        let mut t = Tensor::ones([100], (Kind::Float, dev));
        c.all_reduce(&mut t, ReduceOp::Sum).expect("warm-up");
        let grp = new_group(&*c, &[0, 1, 2]).expect("group").expect("member");
        match r {
            0 => {
                let t0 = Instant::now();
                let e = std::thread::scope(|s| {
                    s.spawn(|| c.abort());
                    c.all_reduce(
                        &mut Tensor::ones([1_000_000], (Kind::Float, dev)),
                        ReduceOp::Sum,
                    )
                    .unwrap_err()
                });
                assert!(matches!(e, CommError::Aborted), "{e}");
                assert!(
                    t0.elapsed() < Duration::from_secs(10),
                    "abort took {:?}",
                    t0.elapsed()
                );
                assert!(c.is_aborted() && grp.is_aborted());
                let e = c.barrier().unwrap_err();
                assert!(matches!(e, CommError::Aborted), "{e}");
                let e = grp.barrier().unwrap_err();
                assert!(matches!(e, CommError::Aborted), "{e}");
                c.abort(); // twice is fine
                gate.wait();
            }
            1 => {
                gate.wait();
                // Rank 0 aborted; rank 2 is waiting for us to finish: this call fails fast.
                let t0 = Instant::now();
                let e = c
                    .all_reduce(
                        &mut Tensor::ones([1_000_000], (Kind::Float, dev)),
                        ReduceOp::Sum,
                    )
                    .unwrap_err();
                assert!(
                    matches!(e, CommError::PeerLost { .. } | CommError::Aborted),
                    "{e}"
                );
                assert!(
                    t0.elapsed() < Duration::from_secs(20),
                    "took {:?}",
                    t0.elapsed()
                );
                r1_tx.send(()).expect("signal");
            }
            _ => {
                r1_rx.lock().expect("lock").recv().expect("wait");
                let e = c
                    .all_reduce(&mut Tensor::ones([10], (Kind::Float, dev)), ReduceOp::Sum)
                    .unwrap_err();
                assert!(
                    matches!(e, CommError::PeerLost { .. } | CommError::Aborted),
                    "{e}"
                );
            }
        }
    });
}

/// Stream order: a collective reads what the kernels queued before it wrote, and kernels
/// queued after it see its result, with no host synchronisation in between. Each rank's
/// all-gather input comes straight from a `dim`×`dim` matmul queued behind four more
/// (about 0.1 s of work on an H200 at dim 8192): a collective that did not wait for them
/// would read the NaN poison the input was filled with, or a partial product. The output,
/// poisoned too, is summed by a kernel queued right after the collective returns. The
/// products are of small integers (0..=2 times 0..=1), exact in f32 and TF32 whatever the
/// summation order, so the result is compared exactly with every rank's product recomputed
/// after a synchronisation. Both the blocking call and `all_gather_start` + `wait`.
pub(crate) fn collective_after_compute(b: &dyn Backend, n: usize, dim: i64) {
    let dev = b.device();
    run_world(b, n, TIMEOUT, |c| {
        let r = c.rank();
        let operands = |p: usize| {
            let idx = Tensor::arange(dim * dim, (Kind::Int64, dev)).view([dim, dim]);
            let a = (&idx + p as i64).remainder(3).to_kind(Kind::Float);
            let m = (idx * 7 + 1).remainder(2).to_kind(Kind::Float);
            (a, m)
        };
        let want = Tensor::cat(
            &(0..n)
                .map(|p| {
                    let (a, m) = operands(p);
                    a.matmul(&m)
                })
                .collect::<Vec<_>>(),
            0,
        );
        let want_sum = want.sum(Kind::Double).double_value(&[]);
        if let Device::Cuda(i) = dev {
            tch::Cuda::synchronize(i as i64);
        }
        for started in [false, true] {
            let what = if started {
                "all_gather_start + wait"
            } else {
                "all_gather"
            };
            let (a, m) = operands(r);
            let input = Tensor::full([dim, dim], f64::NAN, (Kind::Float, dev));
            let mut output = Tensor::full([n as i64 * dim, dim], f64::NAN, (Kind::Float, dev));
            for _ in 0..4 {
                let _ = a.matmul(&m);
            }
            let _ = a.matmul_out(&input, &m);
            if started {
                let work = c
                    .all_gather_start(input.shallow_clone(), output.shallow_clone())
                    .unwrap_or_else(|e| panic!("{what}: {e}"));
                work.wait().unwrap_or_else(|e| panic!("{what}: wait: {e}"));
            } else {
                c.all_gather(&input, &mut output)
                    .unwrap_or_else(|e| panic!("{what}: {e}"));
            }
            let consumed = output.sum(Kind::Double);
            let got_sum = consumed.double_value(&[]);
            assert!(
                got_sum == want_sum,
                "{what} on {dev:?}: the kernel queued after the collective summed {got_sum}, \
                 want {want_sum} (NaN: it read the poison, not the matmul's product)"
            );
            assert!(
                output.equal(&want),
                "{what} on {dev:?}: the gathered rows differ from the matmul products"
            );
            if r == 0 {
                eprintln!(
                    "stream order: {what} of {n} rank(s), input straight from a {dim}x{dim} \
                     matmul on {dev:?} ({}): verified",
                    b.name()
                );
            }
        }
    });
}

// ---- The device rule ------------------------------------------------------------------------

/// Every tensor handed to a communicator lives on its device: a tensor elsewhere is refused
/// with [`CommError::WrongDevice`] naming both devices, by every operation (blocking and
/// started, in every argument position), before any communication — so the communicator
/// stays usable (a barrier afterwards, which would trip over any stray message, succeeds).
pub(crate) fn wrong_device(b: &dyn Backend, n: usize) {
    let Some(other) = b.other_device() else {
        eprintln!(
            "SKIPPED: {}: no second device here to make wrong-device tensors on (needs a GPU); \
             the CUDA-communicator variant of this test covers the rule without one",
            b.name()
        );
        return;
    };
    let dev = b.device();
    // Tensors on the communicator's own device can be made unless it is a GPU we lack.
    let can_make_own = dev == Device::Cpu || tch::Cuda::is_available();
    run_world(b, n, TIMEOUT, |c| {
        assert_eq!(c.device(), dev, "Communicator::device");
        let r = c.rank();
        let bad = |len: i64| Tensor::zeros([len], (Kind::Float, other));
        let own = |len: i64| Tensor::zeros([len], (Kind::Float, dev));
        let check = |what: &str, res: Result<(), CommError>| match res {
            Err(CommError::WrongDevice { expected, got, .. }) => {
                assert_eq!((expected, got), (dev, other), "{what}")
            }
            Err(e) => panic!("{what}: expected WrongDevice, got {e}"),
            Ok(()) => panic!("{what}: a tensor on {other:?} was accepted"),
        };
        let started = |res: Result<Box<dyn Work>, CommError>| res.map(|_| ());
        let mine = shard_range(4 * n, n, r).len() as i64;
        let full = 4 * n as i64;
        check("all_reduce", c.all_reduce(&mut bad(4), ReduceOp::Sum));
        check("broadcast", c.broadcast(&mut bad(4), 0));
        check("all_gather", c.all_gather(&bad(mine), &mut bad(full)));
        check(
            "reduce_scatter",
            c.reduce_scatter(&bad(full), &mut bad(mine), ReduceOp::Sum),
        );
        check(
            "all_reduce_start",
            started(c.all_reduce_start(bad(4), ReduceOp::Sum)),
        );
        check(
            "all_gather_start",
            started(c.all_gather_start(bad(mine), bad(full))),
        );
        check(
            "reduce_scatter_start",
            started(c.reduce_scatter_start(bad(full), bad(mine), ReduceOp::Sum)),
        );
        if can_make_own {
            // The other argument position.
            check(
                "all_gather output",
                c.all_gather(&own(mine), &mut bad(full)),
            );
            check("all_gather input", c.all_gather(&bad(mine), &mut own(full)));
            check(
                "reduce_scatter output",
                c.reduce_scatter(&own(full), &mut bad(mine), ReduceOp::Sum),
            );
            check(
                "all_gather_start output",
                started(c.all_gather_start(own(mine), bad(full))),
            );
        }
        if n > 1 {
            let peer = (r + 1) % n;
            check("send", c.send(&bad(4), peer));
            check("recv", c.recv(&mut bad(4), peer));
            check(
                "batch_p2p_start",
                started(c.batch_p2p_start(vec![P2POwned::Send {
                    tensor: bad(4),
                    peer,
                }])),
            );
            if can_make_own {
                // One good and one bad tensor: nothing is sent.
                let mut recv = bad(4);
                check(
                    "batch_p2p with one bad tensor",
                    c.batch_p2p(&mut [
                        P2POp::Send {
                            tensor: &own(4),
                            peer,
                        },
                        P2POp::Recv {
                            tensor: &mut recv,
                            peer: (r + n - 1) % n,
                        },
                    ]),
                );
            }
        }
        // Still usable, and no stray message was sent.
        c.barrier().expect("usable after wrong-device calls");
        assert!(!c.is_aborted());
        if can_make_own {
            let mut t = ints(&[r as i64], Kind::Int64, dev);
            c.all_reduce(&mut t, ReduceOp::Sum)
                .expect("all_reduce after wrong-device calls");
            assert_exact(&t, &[(0..n as i64).sum()], "sum of ranks");
        }
        c.barrier().expect("barrier");
    });
}

// ---- Started operations ---------------------------------------------------------------------

/// Borrowed ops of a started batch (the owned tensors share storage with these).
fn owned(ops: &[(bool, &Tensor, usize)]) -> Vec<P2POwned> {
    ops.iter()
        .map(|&(send, t, peer)| {
            let tensor = t.shallow_clone();
            if send {
                P2POwned::Send { tensor, peer }
            } else {
                P2POwned::Recv { tensor, peer }
            }
        })
        .collect()
}

/// Started operations give the blocking calls' results: all-reduce for every dtype and op
/// (several lengths, a transposed view), all-gather and reduce-scatter with uneven rows and
/// trailing dims, and a batched point-to-point ring exchange; each is started and then
/// waited for at once.
pub(crate) fn started_match_blocking(b: &dyn Backend, n: usize) {
    let dev = b.device();
    run_world(b, n, TIMEOUT, |c| {
        let r = c.rank();
        let mut kinds: Vec<Kind> = MAIN_KINDS.to_vec();
        kinds.extend(OTHER_KINDS);
        for kind in kinds {
            for op in OPS {
                for len in [0usize, 1, 2 * n + 1, 40_001] {
                    let v: Vec<i64> = (0..len).map(|i| input(kind, op, r, i, n)).collect();
                    let t = ints(&v, kind, dev);
                    let w = c
                        .all_reduce_start(t.shallow_clone(), op)
                        .unwrap_or_else(|e| panic!("start {kind:?} {op:?} {len}: {e}"));
                    w.wait()
                        .unwrap_or_else(|e| panic!("wait {kind:?} {op:?} {len}: {e}"));
                    let want: Vec<i64> =
                        (0..len).map(|i| expected_reduce(kind, op, n, i)).collect();
                    assert_exact(
                        &t,
                        &want,
                        &format!("all_reduce_start {kind:?} {op:?} {len}"),
                    );
                }
            }
        }
        // A transposed view: the result lands in the caller's view.
        let v: Vec<i64> = (0..60).map(|i| val(Kind::Float, r, i)).collect();
        let t = ints(&v, Kind::Float, dev).view([6, 10]).tr();
        c.all_reduce_start(t.shallow_clone(), ReduceOp::Sum)
            .and_then(|w| w.wait())
            .expect("all_reduce_start of a view");
        let want: Vec<i64> = (0..60)
            .map(|i| expected_reduce(Kind::Float, ReduceOp::Sum, n, i))
            .collect();
        assert_exact(&t.tr().contiguous(), &want, "all_reduce_start of a view");

        for kind in [Kind::Float, Kind::BFloat16, Kind::Int64, Kind::Uint8] {
            for width in [1usize, 5] {
                for rows in [0usize, 1, n + 1, 3 * n - 1, 20_011] {
                    let shape = |k: usize| [k as i64, width as i64];
                    let mine = shard_range(rows, n, r);
                    let part: Vec<i64> = mine
                        .clone()
                        .flat_map(|row| (0..width).map(move |col| cell(kind, 0, row, col, width)))
                        .collect();
                    let out = Tensor::zeros(shape(rows), (kind, dev));
                    c.all_gather_start(
                        ints(&part, kind, dev).view(shape(mine.len())),
                        out.shallow_clone(),
                    )
                    .and_then(|w| w.wait())
                    .unwrap_or_else(|e| panic!("all_gather_start {kind:?} {rows}x{width}: {e}"));
                    let want: Vec<i64> = (0..rows)
                        .flat_map(|row| (0..width).map(move |col| cell(kind, 0, row, col, width)))
                        .collect();
                    assert_exact(&out, &want, &format!("all_gather_start {kind:?} {rows}"));

                    let full: Vec<i64> = (0..rows)
                        .flat_map(|row| (0..width).map(move |col| cell(kind, r, row, col, width)))
                        .collect();
                    let out = Tensor::zeros(shape(mine.len()), (kind, dev));
                    c.reduce_scatter_start(
                        ints(&full, kind, dev).view(shape(rows)),
                        out.shallow_clone(),
                        ReduceOp::Sum,
                    )
                    .and_then(|w| w.wait())
                    .unwrap_or_else(|e| panic!("reduce_scatter_start {kind:?} {rows}: {e}"));
                    let want: Vec<i64> = mine
                        .flat_map(|row| {
                            (0..width).map(move |col| {
                                (0..n).map(|p| cell(kind, p, row, col, width)).sum::<i64>()
                            })
                        })
                        .collect();
                    assert_exact(
                        &out,
                        &want,
                        &format!("reduce_scatter_start {kind:?} {rows}"),
                    );
                }
            }
        }
        if n > 1 {
            let (next, prev) = ((r + 1) % n, (r + n - 1) % n);
            for (kind, len) in [
                (Kind::Float, 5usize),
                (Kind::BFloat16, 300_007),
                (Kind::Int64, 0),
            ] {
                let mine: Vec<i64> = (0..len).map(|i| val(kind, r, i)).collect();
                let send = ints(&mine, kind, dev).view([1, len as i64]);
                let recv = Tensor::zeros([1, len as i64], (kind, dev));
                c.batch_p2p_start(owned(&[(true, &send, next), (false, &recv, prev)]))
                    .and_then(|w| w.wait())
                    .unwrap_or_else(|e| panic!("batch_p2p_start {kind:?} {len}: {e}"));
                let want: Vec<i64> = (0..len).map(|i| val(kind, prev, i)).collect();
                assert_exact(&recv, &want, &format!("batch_p2p_start {kind:?} {len}"));
            }
        }
        c.barrier().expect("barrier");
    });
}

/// Polls `w` until it reports done (it must, once the peers have done their part); fails
/// the test after a minute instead of hanging.
fn until_done(w: &dyn Work, what: &str) {
    let t0 = Instant::now();
    while !w.is_done() {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "{what}: is_done never became true"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Several started operations in flight at once — all-reduces small and large, an
/// all-gather, a reduce-scatter and (n > 1) a point-to-point exchange — waited for in
/// start order, in reverse order, and after polling `is_done`; then started operations
/// followed by a blocking call (which runs after them) before any wait. Every result is
/// checked, so ranks that ran them in different orders would fail.
pub(crate) fn started_in_flight(b: &dyn Backend, n: usize) {
    let dev = b.device();
    run_world(b, n, TIMEOUT, |c| {
        let r = c.rank();
        let (next, prev) = ((r + 1) % n, (r + n - 1) % n);
        for round in 0..3 {
            // Operation k all-reduces values that depend on k, so a mix-up shows.
            let lens = [3usize, 70_001, 1, 400_003, 9];
            let tensors: Vec<Tensor> = lens
                .iter()
                .enumerate()
                .map(|(k, &len)| {
                    Tensor::full([len as i64], (k * 10 + r) as i64, (Kind::Int64, dev))
                })
                .collect();
            let mut works: Vec<(String, Box<dyn Work>)> = Vec::new();
            for (k, t) in tensors.iter().enumerate() {
                let w = c
                    .all_reduce_start(t.shallow_clone(), ReduceOp::Sum)
                    .unwrap_or_else(|e| panic!("start {k}: {e}"));
                works.push((format!("all_reduce {k}"), w));
            }
            let rows = 3 * n + 1;
            let mine = shard_range(rows, n, r);
            let gathered = Tensor::zeros([rows as i64], (Kind::Float, dev));
            let part = Tensor::full([mine.len() as i64], r as f64, (Kind::Float, dev));
            works.push((
                "all_gather".into(),
                c.all_gather_start(part, gathered.shallow_clone())
                    .expect("all_gather_start"),
            ));
            let scattered = Tensor::zeros([mine.len() as i64], (Kind::Float, dev));
            works.push((
                "reduce_scatter".into(),
                c.reduce_scatter_start(
                    Tensor::ones([rows as i64], (Kind::Float, dev)),
                    scattered.shallow_clone(),
                    ReduceOp::Sum,
                )
                .expect("reduce_scatter_start"),
            ));
            let recv = Tensor::zeros([7], (Kind::Int64, dev));
            if n > 1 {
                let send = Tensor::full([7], (100 + r) as i64, (Kind::Int64, dev));
                works.push((
                    "batch_p2p".into(),
                    c.batch_p2p_start(owned(&[(true, &send, next), (false, &recv, prev)]))
                        .expect("batch_p2p_start"),
                ));
            }
            match round {
                0 => {
                    for (what, w) in works {
                        w.wait().unwrap_or_else(|e| panic!("{what}: {e}"));
                    }
                }
                1 => {
                    for (what, w) in works.into_iter().rev() {
                        w.wait().unwrap_or_else(|e| panic!("{what} (reverse): {e}"));
                    }
                }
                _ => {
                    for (what, w) in &works {
                        until_done(&**w, what);
                    }
                    for (what, w) in works {
                        assert!(w.is_done(), "{what}");
                        w.wait().unwrap_or_else(|e| panic!("{what} (polled): {e}"));
                    }
                }
            }
            for (k, (t, &len)) in tensors.iter().zip(&lens).enumerate() {
                let want = (0..n).map(|p| (k * 10 + p) as i64).sum::<i64>();
                assert_exact(
                    &t.narrow(0, len as i64 - 1, 1),
                    &[want],
                    &format!("round {round} all_reduce {k}"),
                );
                assert!(
                    t.eq(want).all().int64_value(&[]) == 1,
                    "round {round} all_reduce {k}: not every element"
                );
            }
            let want: Vec<i64> = (0..rows)
                .map(|i| {
                    (0..n)
                        .find(|&p| shard_range(rows, n, p).contains(&i))
                        .unwrap_or(0) as i64
                })
                .collect();
            assert_exact(&gathered, &want, "all_gather in flight");
            assert_exact(
                &scattered,
                &vec![n as i64; mine.len()],
                "reduce_scatter in flight",
            );
            if n > 1 {
                assert_exact(&recv, &[(100 + prev) as i64; 7], "batch_p2p in flight");
            }
        }
        // Started operations, then a blocking call before any wait: the blocking call runs
        // after them (same order on every rank), and everything completes.
        let a = Tensor::full([50_003], r as i64, (Kind::Int64, dev));
        let bb = Tensor::full([5], 2 * r as i64, (Kind::Int64, dev));
        let wa = c
            .all_reduce_start(a.shallow_clone(), ReduceOp::Sum)
            .expect("start a");
        let wb = c
            .all_reduce_start(bb.shallow_clone(), ReduceOp::Max)
            .expect("start b");
        let mut blocking = Tensor::full([11], 3 * r as i64, (Kind::Int64, dev));
        c.all_reduce(&mut blocking, ReduceOp::Sum)
            .expect("blocking call after started ones");
        // The blocking call returned after the started ones had finished.
        assert!(wa.is_done() && wb.is_done(), "started work still pending");
        wb.wait().expect("wait b");
        wa.wait().expect("wait a");
        let s = (0..n as i64).sum::<i64>();
        assert_exact(&a.narrow(0, 0, 1), &[s], "a");
        assert_exact(&bb.narrow(0, 4, 1), &[2 * (n as i64 - 1)], "b");
        assert_exact(&blocking.narrow(0, 10, 1), &[3 * s], "blocking");
        // A barrier after started work that nobody waited for yet.
        let w = c
            .all_reduce_start(Tensor::ones([10], (Kind::Float, dev)), ReduceOp::Sum)
            .expect("start");
        c.barrier().expect("barrier after a started op");
        w.wait().expect("wait after the barrier");
    });
}

/// Started work when a peer never takes part: `start` returns at once, `wait` fails with
/// Timeout within the timeout, work queued behind it fails too (the communicator is
/// broken), and later calls say Broken. Then the same after a warm-up: the late peer fails
/// fast instead of waiting for a broken rank.
pub(crate) fn started_timeout(b: &dyn Backend) {
    let dev = b.device();
    let limit = Duration::from_millis(400);
    let (done_tx, done_rx) = mpsc::channel::<()>();
    let done_rx = Mutex::new(done_rx);
    run_world(b, 2, TIMEOUT, |c| {
        if c.rank() == 0 {
            c.set_timeout(limit);
            let t0 = Instant::now();
            let w1 = c
                .all_reduce_start(Tensor::ones([1000], (Kind::Float, dev)), ReduceOp::Sum)
                .expect("start returns at once");
            let w2 = c
                .all_reduce_start(Tensor::ones([10], (Kind::Float, dev)), ReduceOp::Sum)
                .expect("a second one queues");
            assert!(t0.elapsed() < limit, "start blocked for {:?}", t0.elapsed());
            let e = w1.wait().unwrap_err();
            let took = t0.elapsed();
            assert!(matches!(e, CommError::Timeout { .. }), "{e}");
            assert!(
                took >= limit && took < limit + Duration::from_secs(3),
                "timed out after {took:?}"
            );
            let e = w2.wait().unwrap_err();
            assert!(matches!(e, CommError::Broken { .. }), "queued behind: {e}");
            let e = c.barrier().unwrap_err();
            assert!(matches!(e, CommError::Broken { .. }), "{e}");
            let e = c
                .all_reduce_start(Tensor::ones([1], (Kind::Float, dev)), ReduceOp::Sum)
                .map(|_| ())
                .unwrap_err();
            assert!(matches!(e, CommError::Broken { .. }), "{e}");
            done_tx.send(()).expect("signal");
        } else {
            done_rx
                .lock()
                .expect("lock")
                .recv()
                .expect("wait for rank 0");
        }
    });
    let (done_tx, done_rx) = mpsc::channel::<()>();
    let done_rx = Mutex::new(done_rx);
    run_world(b, 2, TIMEOUT, |c| {
        let t = Tensor::ones([300_000], (Kind::Float, dev));
        c.all_reduce_start(t.shallow_clone(), ReduceOp::Sum)
            .and_then(|w| w.wait())
            .expect("warm-up");
        if c.rank() == 0 {
            c.set_timeout(limit);
            let t0 = Instant::now();
            let e = c
                .all_reduce_start(t.shallow_clone(), ReduceOp::Sum)
                .and_then(|w| w.wait())
                .unwrap_err();
            assert!(matches!(e, CommError::Timeout { .. }), "{e}");
            assert!(
                t0.elapsed() < limit + Duration::from_secs(3),
                "{:?}",
                t0.elapsed()
            );
            done_tx.send(()).expect("signal");
        } else {
            done_rx
                .lock()
                .expect("lock")
                .recv()
                .expect("wait for rank 0");
            let t0 = Instant::now();
            let e = c
                .all_reduce_start(t.shallow_clone(), ReduceOp::Sum)
                .and_then(|w| w.wait())
                .unwrap_err();
            assert!(matches!(e, CommError::PeerLost { .. }), "{e}");
            assert!(t0.elapsed() < Duration::from_secs(10), "{:?}", t0.elapsed());
        }
    });
}

/// abort() from another thread while started work is queued (the first operation waits
/// for a peer that holds back): every work fails with Aborted promptly, later starts are
/// refused, and the held-back peer then fails fast instead of at its timeout.
pub(crate) fn started_abort(b: &dyn Backend) {
    let dev = b.device();
    let (tx, rx) = mpsc::channel::<()>();
    let rx = Mutex::new(rx);
    let warmed = std::sync::Barrier::new(2);
    run_world(b, 2, TIMEOUT, |c| {
        // Warm up: connections (and shared memory) exist. Both ranks must have finished
        // it before rank 0 aborts: rank 0 can return from the all-reduce while rank 1 still
        // reads its last chunk, and the abort would then fail rank 1's warm-up.
        let mut t = Tensor::ones([100_000], (Kind::Float, dev));
        c.all_reduce(&mut t, ReduceOp::Sum).expect("warm-up");
        warmed.wait();
        if c.rank() == 0 {
            let t0 = Instant::now();
            let works: Vec<Box<dyn Work>> = [1_000_000i64, 10, 300_000]
                .iter()
                .map(|&len| {
                    c.all_reduce_start(Tensor::ones([len], (Kind::Float, dev)), ReduceOp::Sum)
                        .expect("start")
                })
                .collect();
            std::thread::scope(|s| {
                s.spawn(|| c.abort());
            });
            for w in works {
                let e = w.wait().unwrap_err();
                assert!(matches!(e, CommError::Aborted), "{e}");
            }
            assert!(t0.elapsed() < Duration::from_secs(10), "{:?}", t0.elapsed());
            let e = c
                .all_reduce_start(Tensor::ones([1], (Kind::Float, dev)), ReduceOp::Sum)
                .map(|_| ())
                .unwrap_err();
            assert!(matches!(e, CommError::Aborted), "{e}");
            tx.send(()).expect("signal");
        } else {
            rx.lock().expect("lock").recv().expect("wait for rank 0");
            let t0 = Instant::now();
            let e = c
                .all_reduce_start(Tensor::ones([1_000_000], (Kind::Float, dev)), ReduceOp::Sum)
                .and_then(|w| w.wait())
                .unwrap_err();
            assert!(
                matches!(e, CommError::PeerLost { .. } | CommError::Aborted),
                "{e}"
            );
            assert!(t0.elapsed() < Duration::from_secs(20), "{:?}", t0.elapsed());
        }
    });
}

/// Argument errors of started operations come from the start call, and leave the
/// communicator usable.
pub(crate) fn started_argument_errors(b: &dyn Backend, n: usize) {
    let dev = b.device();
    run_world(b, n, TIMEOUT, |c| {
        let r = c.rank();
        let e = c
            .all_reduce_start(Tensor::zeros([2], (Kind::Bool, dev)), ReduceOp::Sum)
            .map(|_| ())
            .unwrap_err();
        assert!(matches!(e, CommError::InvalidArgument(_)), "{e}");
        let wrong_rows = shard_range(10, n, r).len() + 1;
        let e = c
            .all_gather_start(
                Tensor::zeros([wrong_rows as i64], (Kind::Float, dev)),
                Tensor::zeros([10], (Kind::Float, dev)),
            )
            .map(|_| ())
            .unwrap_err();
        assert!(matches!(e, CommError::SizeMismatch { .. }), "{e}");
        let e = c
            .reduce_scatter_start(
                Tensor::zeros([10], (Kind::Float, dev)),
                Tensor::zeros([shard_range(10, n, r).len() as i64], (Kind::Int64, dev)),
                ReduceOp::Sum,
            )
            .map(|_| ())
            .unwrap_err();
        assert!(matches!(e, CommError::DtypeMismatch { .. }), "{e}");
        let e = c
            .batch_p2p_start(vec![P2POwned::Send {
                tensor: Tensor::zeros([2], (Kind::Float, dev)),
                peer: r,
            }])
            .map(|_| ())
            .unwrap_err();
        assert!(matches!(e, CommError::InvalidArgument(_)), "{e}");
        let t = ints(&[r as i64], Kind::Int64, dev);
        c.all_reduce_start(t.shallow_clone(), ReduceOp::Sum)
            .and_then(|w| w.wait())
            .expect("usable after argument errors");
        assert_exact(&t, &[(0..n as i64).sum()], "sum of ranks");
    });
}
