//! Device→host reads, counted. Every value the training step path reads back from a tensor
//! goes through [`read_f64s`] or [`read_i64s`], so that benchmarks can report host syncs
//! per step by counting ([`host_syncs`]) rather than estimating. On a GPU each read waits
//! for every kernel queued before it; on the CPU it costs nothing, but is counted all the
//! same (the count is a property of the code path, not of the device).

use std::sync::atomic::{AtomicU64, Ordering};

use tch::{Device, Kind, Tensor};

static HOST_SYNCS: AtomicU64 = AtomicU64::new(0);

/// Device→host reads made by this process so far (all threads).
pub fn host_syncs() -> u64 {
    HOST_SYNCS.load(Ordering::Relaxed)
}

fn to_host(t: &Tensor, kind: Kind) -> Result<Tensor, tch::TchError> {
    HOST_SYNCS.fetch_add(1, Ordering::Relaxed);
    t.f_to_kind(kind)?.f_to_device(Device::Cpu)?.f_reshape([-1])
}

/// The values of `t` (any shape, any numeric dtype) as f64, read back in one transfer.
pub fn read_f64s(t: &Tensor) -> Result<Vec<f64>, tch::TchError> {
    Vec::<f64>::try_from(&to_host(t, Kind::Double)?)
}

/// The values of `t` (any shape, an integer dtype) as i64, read back in one transfer.
pub fn read_i64s(t: &Tensor) -> Result<Vec<i64>, tch::TchError> {
    Vec::<i64>::try_from(&to_host(t, Kind::Int64)?)
}

/// `t` (a small host tensor) on `device` without waiting: a non-blocking copy, which CUDA
/// stages from pageable memory before returning, so `t` may go away at once. A plain
/// `to_device` would wait for the copy (a host sync) on every call.
pub fn to_device_async(t: &Tensor, device: Device) -> Result<Tensor, tch::TchError> {
    if device == Device::Cpu {
        return Ok(t.shallow_clone());
    }
    t.f_to_device_(device, t.kind(), true, false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_read_counts_once() {
        let before = host_syncs();
        let v = read_f64s(&Tensor::from_slice(&[1.5f32, 2.0]).view([1, 2])).unwrap();
        assert_eq!(v, vec![1.5, 2.0]);
        assert_eq!(read_i64s(&Tensor::from_slice(&[7i32])).unwrap(), vec![7]);
        // Other tests of this process may read too: at least our two.
        assert!(host_syncs() >= before + 2);
    }
}
