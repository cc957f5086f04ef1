//! The conformance suite of `comm`: every backend must pass these functions (STYLE rule 4).
//! `comm_tcp.rs` runs them on tcp at world sizes 1, 2, 3, 4 and 8; `comm_nccl.rs` runs them
//! on NCCL at world size 1 where a GPU is present.
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
    mesh_groups, new_group, shard_range, CommError, Communicator, P2POp, ReduceOp,
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
