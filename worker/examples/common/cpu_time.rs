//! The process CPU clock the benches time with. Shared by model_bench and infer_bench
//! (`#[path]`-included; not an example of its own).

/// This process's CPU time (every thread), seconds: the same clock as Python's
/// `time.process_time()`.
pub(crate) fn process_cpu_s() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime(2) writes the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}
