//! The counting CPU allocator against allocations whose sizes are known. One test in its
//! own binary: the counter is process-wide, and other tests' tensors would count too.

use tch::{Device, Kind, Tensor};
use weaver_prof::cpu_memory;

#[test]
fn counts_live_cpu_tensors_and_their_peak() {
    cpu_memory::install().unwrap();
    cpu_memory::install().unwrap(); // idempotent
    let base = cpu_memory::read();
    let a = Tensor::zeros([1024, 256], (Kind::Float, Device::Cpu));
    let after_a = cpu_memory::read();
    assert_eq!(after_a.current - base.current, 1024 * 256 * 4);
    assert!(after_a.allocations > base.allocations);
    // A temporary raises the peak, not the live bytes once it is gone.
    cpu_memory::reset_peak();
    {
        let b = a.f_add_scalar(1.0).unwrap();
        let _c = b.f_mul_scalar(2.0).unwrap();
    }
    let r = cpu_memory::read();
    assert_eq!(r.current, after_a.current);
    // The two results, and the scalar operands libtorch wraps as 0-d tensors (a few bytes).
    let temps = r.peak - after_a.current;
    assert!(
        (2 * 1024 * 256 * 4..2 * 1024 * 256 * 4 + 64).contains(&temps),
        "{temps}"
    );
    // Freed on another thread: still subtracted.
    let d = Tensor::zeros([1000], (Kind::Double, Device::Cpu));
    assert_eq!(cpu_memory::read().current, after_a.current + 8000);
    std::thread::spawn(move || drop(d)).join().unwrap();
    assert_eq!(cpu_memory::read().current, after_a.current);
    // Autograd keeps what the backward needs: x @ w saves x and w (already live), the
    // backward allocates the gradients.
    let x = Tensor::ones([64, 32], (Kind::Float, Device::Cpu)).set_requires_grad(true);
    let w = Tensor::ones([32, 16], (Kind::Float, Device::Cpu)).set_requires_grad(true);
    let before = cpu_memory::read().current;
    let y = x.f_matmul(&w).unwrap();
    assert_eq!(cpu_memory::read().current - before, 64 * 16 * 4);
    y.f_sum(Kind::Float).unwrap().f_backward().unwrap();
    drop(y);
    let grads = cpu_memory::read().current - before;
    assert_eq!(grads, (64 * 32 + 32 * 16) * 4);
    drop(a);
    let leaves = (64 * 32 + 32 * 16) * 4;
    assert_eq!(cpu_memory::read().current, base.current + leaves + grads);
    owners_count_their_threads_allocations();
}

/// Part of the one test: owners (ranks as threads of one process) count what their threads
/// allocate, wherever it is freed.
fn owners_count_their_threads_allocations() {
    let before = cpu_memory::claimed();
    let a = cpu_memory::Owner::claim().unwrap();
    let b = cpu_memory::Owner::claim().unwrap();
    assert_eq!(cpu_memory::claimed(), before + 2);
    let (a0, _) = a.read();
    let (b0, _) = b.read();
    let t = std::thread::scope(|s| {
        let ta = s.spawn(|| {
            a.enter();
            let x = Tensor::zeros([1000], (Kind::Float, Device::Cpu));
            let tmp = Tensor::zeros([3000], (Kind::Float, Device::Cpu));
            drop(tmp);
            x
        });
        let tb = s.spawn(|| {
            b.enter();
            Tensor::zeros([500], (Kind::Double, Device::Cpu))
        });
        (ta.join().unwrap(), tb.join().unwrap())
    });
    let (cur_a, peak_a) = a.read();
    let (cur_b, _) = b.read();
    assert_eq!(cur_a - a0, 4000);
    assert_eq!(peak_a - a0, 16000);
    assert_eq!(cur_b - b0, 4000);
    // Freed here, on a thread of no owner: still subtracted from its owner.
    drop(t);
    assert_eq!(a.read().0, a0);
    assert_eq!(b.read().0, b0);
    a.reset_peak();
    assert_eq!(a.read().1, a0);
    drop(a);
    drop(b);
    assert_eq!(cpu_memory::claimed(), before);
}
