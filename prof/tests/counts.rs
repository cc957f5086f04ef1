//! The counts and the allocator peak against work whose answer is known: one `add` is one
//! ATen call, ten are ten, a backward pass adds its own; on a machine without CUDA the
//! allocator says so as an error.

use tch::{Device, Kind, Tensor};
use weaver_prof::{count, count_ops, cuda_memory, start, ProfError};

/// Profiles are process-wide; the tests take them one at a time.
fn serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

#[test]
fn counts_each_aten_call_once() {
    let _g = serial();
    let a = Tensor::ones([4, 4], (Kind::Float, Device::Cpu));
    let b = Tensor::ones([4, 4], (Kind::Float, Device::Cpu));
    let (_, one) = count(None, || a.f_add(&b)).unwrap();
    assert_eq!(one.aten_ops, 1, "{one:?}");
    let (_, ten) = count(None, || -> Result<(), tch::TchError> {
        for _ in 0..10 {
            let _ = a.f_add(&b)?;
        }
        Ok(())
    })
    .unwrap();
    assert_eq!(ten.aten_ops, 10, "{ten:?}");
    assert_eq!(ten.gpu_kernels, 0);
    assert_eq!(ten.sync_calls, 0);
}

#[test]
fn counts_the_backward_pass_too() {
    let _g = serial();
    let x = Tensor::ones([8, 8], (Kind::Float, Device::Cpu)).set_requires_grad(true);
    let (_, fwd) = count(None, || x.f_matmul(&x)?.f_relu()?.f_sum(Kind::Float)).unwrap();
    let (_, both) = count(None, || -> Result<(), tch::TchError> {
        x.f_matmul(&x)?.f_relu()?.f_sum(Kind::Float)?.f_backward()
    })
    .unwrap();
    assert!(both.aten_ops > fwd.aten_ops + 3, "{fwd:?} then {both:?}");
    // The same work counts the same.
    let (_, again) = count(None, || -> Result<(), tch::TchError> {
        x.f_matmul(&x)?.f_relu()?.f_sum(Kind::Float)?.f_backward()
    })
    .unwrap();
    assert_eq!(again.aten_ops, both.aten_ops);
}

/// Self time: a large `mm` under `matmul` is charged to `aten::mm`, not to the `matmul`
/// that called it, so the selves add up to no more than the region's wall time, and the
/// call counts are the calls made.
#[test]
fn self_times_charge_each_operator_its_own_work() {
    let _g = serial();
    let a = Tensor::ones([384, 384], (Kind::Float, Device::Cpu));
    let t0 = std::time::Instant::now();
    let (_, counts, ops) = count_ops(None, || -> Result<(), tch::TchError> {
        for _ in 0..3 {
            let _ = a.f_matmul(&a)?;
        }
        let _ = a.f_add(&a)?;
        Ok(())
    })
    .unwrap();
    let wall = t0.elapsed().as_nanos() as u64;
    let op = |n: &str| {
        ops.iter()
            .find(|o| o.name == n)
            .unwrap_or_else(|| panic!("{n} in {ops:?}"))
    };
    assert_eq!(op("aten::mm").calls, 3);
    assert_eq!(op("aten::matmul").calls, 3);
    assert_eq!(op("aten::add").calls, 1);
    // 3 · 384³ multiply-adds take far longer than matmul's own dispatch.
    assert!(
        op("aten::mm").self_ns > 4 * op("aten::matmul").self_ns,
        "{ops:?}"
    );
    assert_eq!(ops[0].name, "aten::mm", "slowest first: {ops:?}");
    let total: u64 = ops.iter().map(|o| o.self_ns).sum();
    assert!(
        total <= wall,
        "selves {total} ns within the region's {wall} ns"
    );
    assert_eq!(
        ops.iter()
            .filter(|o| o.name.starts_with("aten::"))
            .map(|o| o.calls)
            .sum::<u64>(),
        counts.aten_ops
    );
}

#[test]
fn one_profile_at_a_time_and_a_failing_region_is_reported() {
    let _g = serial();
    let p = start(false).unwrap();
    assert!(matches!(start(false), Err(ProfError::Busy)));
    drop(p);
    let e = count(None, || Err::<(), _>("no batch")).unwrap_err();
    assert!(matches!(&e, ProfError::Work(m) if m == "no batch"), "{e}");
    // And the profiler is free again.
    count(None, || Ok::<_, String>(())).unwrap();
}

#[test]
fn the_cuda_peak_is_read_where_there_is_cuda_and_an_error_elsewhere() {
    if !tch::Cuda::is_available() {
        let e = cuda_memory::peak(0).unwrap_err();
        eprintln!("no CUDA device here; the allocator says: {e}");
        assert!(matches!(e, ProfError::CudaAllocator(_)), "{e}");
        assert!(matches!(
            cuda_memory::info(0),
            Err(ProfError::CudaAllocator(_))
        ));
        return;
    }
    let (free, total) = cuda_memory::info(0).unwrap();
    assert!(free <= total && total >= 1 << 30, "{free} of {total}");
    cuda_memory::reset_peak(0).unwrap();
    let t = Tensor::zeros([64 << 20], (Kind::Uint8, Device::Cuda(0)));
    let p = cuda_memory::peak(0).unwrap();
    assert!(
        p.allocated >= 64 << 20 && p.reserved >= p.allocated,
        "{p:?}"
    );
    drop(t);
    cuda_memory::empty_cache().unwrap();
}
