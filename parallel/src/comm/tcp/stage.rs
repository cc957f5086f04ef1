//! Host memory for the tcp backend's algorithms, which read and write plain bytes.
//!
//! * **Direct** (a CPU communicator): the algorithms work in the caller's tensor itself when
//!   it is contiguous, else in a contiguous copy whose result is copied back into the
//!   caller's view.
//! * **Staged** (a communicator on a CUDA device, as gloo does; or a CPU communicator with
//!   [`TcpComm::with_host_staging`](super::TcpComm::with_host_staging), which runs the same
//!   code on CPU tensors so that CI tests it): every tensor of a call gets a region of one
//!   host buffer that the communicator keeps and reuses — pinned (page-locked) for CUDA,
//!   so the device copies are plain DMA, allocated again only when a call needs more than
//!   it holds. Inputs are copied device → host into their regions (libtorch's `copy_`,
//!   which also gathers non-contiguous views), the CPU algorithms run on the regions, and
//!   results are copied host → device into the caller's tensors.
//!
//! The copies are libtorch's blocking `copy_` on the current (default) stream of the
//! thread that runs the call: the device → host copy is ordered after every kernel the
//! caller queued before the call, and the host → device copy has landed when it returns.
//! Nothing here touches CUDA directly.

use tch::{Device, Kind, Tensor};

use super::super::elem::Elem;
use super::super::CommError;

/// Regions start on this boundary (element alignment for every dtype, and cache lines).
const ALIGN: usize = 64;
/// The buffer grows in steps of at least this much.
const GROW: usize = 1 << 20;

/// Whether a call reads the caller's values of a tensor (inputs, in-place tensors) or only
/// writes it (outputs): outputs are not copied in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Fill {
    /// Copy the caller's values in.
    In,
    /// The call overwrites every byte; nothing to copy in.
    Out,
}

/// How a communicator's calls reach host memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum HostMode {
    /// Work in the caller's (CPU) tensors.
    Direct,
    /// Copy through the communicator's host buffer, pinned for `pin` (a CUDA device) if set.
    Staged { pin: Option<Device> },
}

/// A tensor's bytes in host memory, contiguous, for the duration of one call.
#[derive(Debug)]
pub(super) struct Host {
    /// Contiguous, on the CPU, the caller's shape and dtype.
    t: Tensor,
    /// Whether results must be copied into the caller's tensor at the end.
    back: bool,
}

impl Host {
    /// Start of the bytes (element-aligned).
    pub(super) fn ptr(&self) -> *mut u8 {
        self.t.data_ptr().cast::<u8>()
    }

    /// The host tensor (for shapes and sizes).
    pub(super) fn tensor(&self) -> &Tensor {
        &self.t
    }

    /// Copies the result into the caller's tensor `dst` (the one this was made for) if it
    /// does not hold it already.
    pub(super) fn finish(self, dst: &mut Tensor) -> Result<(), CommError> {
        if self.back {
            dst.f_copy_(&self.t)?;
        }
        Ok(())
    }
}

/// The communicator's host buffer (staged mode), reused across calls.
#[derive(Debug, Default)]
pub(super) struct Staging {
    /// A 1-D `u8` tensor of `cap` bytes; regions are views of it.
    buf: Option<Tensor>,
    cap: usize,
    /// Times the buffer was (re)allocated (tests check the reuse).
    allocations: u64,
}

impl Staging {
    /// Host memory for each `(tensor, fill)` of one call, in order. The tensors have been
    /// checked (device, dtype) by the caller. Staged regions are only valid until the next
    /// call on this communicator (the call holds the communicator's lock meanwhile).
    pub(super) fn host(
        &mut self,
        mode: HostMode,
        args: &[(&Tensor, Fill)],
    ) -> Result<Vec<Host>, CommError> {
        let HostMode::Staged { pin } = mode else {
            return args
                .iter()
                .map(|(t, _)| {
                    Ok(if t.is_contiguous() {
                        Host {
                            t: t.shallow_clone(),
                            back: false,
                        }
                    } else {
                        Host {
                            t: t.f_contiguous()?,
                            back: true,
                        }
                    })
                })
                .collect();
        };
        let mut offsets = Vec::with_capacity(args.len());
        let mut total = 0usize;
        for (t, _) in args {
            offsets.push(total);
            total += region_bytes(t)?.next_multiple_of(ALIGN);
        }
        let buf = self.reserve(total, pin)?;
        let mut out = Vec::with_capacity(args.len());
        for ((t, fill), off) in args.iter().zip(offsets) {
            let bytes = region_bytes(t)?;
            let mut region = buf
                .f_narrow(0, off as i64, bytes as i64)?
                .f_view_dtype(t.f_kind()?)?
                .f_view(t.size().as_slice())?;
            if *fill == Fill::In {
                // Device → host (or host → host for forced staging); gathers views.
                region.f_copy_(t)?;
            }
            out.push(Host {
                t: region,
                back: true,
            });
        }
        Ok(out)
    }

    /// The buffer, at least `bytes` long.
    fn reserve(&mut self, bytes: usize, pin: Option<Device>) -> Result<&Tensor, CommError> {
        if self.buf.is_none() || self.cap < bytes {
            // Drop the old buffer first: regions of past calls are gone, and this lowers the
            // peak of pinned memory.
            self.buf = None;
            let cap = bytes.max(self.cap + self.cap / 2).next_multiple_of(GROW);
            let t = Tensor::f_empty([cap as i64], (Kind::Uint8, Device::Cpu))?;
            let t = match pin {
                // Page-locked through libtorch's caching host allocator.
                Some(device) => t.f_pin_memory(device)?,
                None => t,
            };
            self.cap = cap;
            self.allocations += 1;
            self.buf = Some(t);
        }
        self.buf.as_ref().ok_or_else(|| {
            CommError::Protocol("the staging buffer vanished (internal error)".into())
        })
    }

    /// Bytes held, and how many times the buffer was allocated.
    pub(super) fn stats(&self) -> (usize, u64) {
        (self.cap, self.allocations)
    }
}

fn region_bytes(t: &Tensor) -> Result<usize, CommError> {
    let kind = t.f_kind()?;
    let elem = Elem::from_kind(kind).ok_or_else(|| {
        CommError::InvalidArgument(format!("unsupported dtype {kind:?} (internal error)"))
    })?;
    Ok(t.numel() * elem.size())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Staged regions hold the caller's values (views gathered, every dtype), results go
    /// back into the caller's views, and the buffer is reused while it is large enough.
    #[test]
    fn regions_copy_in_and_out_and_the_buffer_is_reused() {
        let mut s = Staging::default();
        let mode = HostMode::Staged { pin: None };
        let a = Tensor::arange(12, (Kind::Float, Device::Cpu)).view([3, 4]);
        let view = a.tr(); // non-contiguous
        let b = Tensor::from_slice(&[1i64, -2, 3]);
        let c = Tensor::from_slice(&[true, false, true, true, false]);
        let empty = Tensor::zeros([0, 7], (Kind::BFloat16, Device::Cpu));
        let hosts = s
            .host(
                mode,
                &[
                    (&view, Fill::In),
                    (&b, Fill::In),
                    (&c, Fill::In),
                    (&empty, Fill::Out),
                ],
            )
            .expect("host");
        assert!(hosts[0].tensor().is_contiguous());
        assert!(hosts[0].tensor().equal(&view));
        assert!(hosts[1].tensor().equal(&b) && hosts[2].tensor().equal(&c));
        assert_eq!(hosts[3].tensor().size(), vec![0, 7]);
        for h in &hosts {
            assert_eq!(h.ptr() as usize % ALIGN, 0, "aligned regions");
        }
        // Distinct regions.
        assert_ne!(hosts[0].ptr(), hosts[1].ptr());
        // A result written in the region lands in the caller's view.
        let mut hosts = hosts.into_iter();
        let h = hosts.next().expect("first");
        let _ = h.tensor().shallow_clone().f_mul_scalar_(2.0).expect("mul");
        let mut dst = view.shallow_clone();
        h.finish(&mut dst).expect("finish");
        assert!(a.equal(&(Tensor::arange(12, (Kind::Float, Device::Cpu)).view([3, 4]) * 2)));
        drop(hosts);
        let (cap, allocs) = s.stats();
        assert_eq!(allocs, 1);
        // Same or smaller sizes: no new allocation.
        for _ in 0..3 {
            let _ = s.host(mode, &[(&b, Fill::In)]).expect("again");
        }
        assert_eq!(s.stats(), (cap, 1));
        // Larger: grows once.
        let big = Tensor::zeros([(cap / 4 + 1) as i64], (Kind::Float, Device::Cpu));
        let _ = s.host(mode, &[(&big, Fill::Out)]).expect("big");
        assert_eq!(s.stats().1, 2);
        assert!(s.stats().0 >= cap + 4);
    }

    /// Direct mode works in contiguous tensors themselves and copies views.
    #[test]
    fn direct_mode_shares_contiguous_storage() {
        let mut s = Staging::default();
        let a = Tensor::zeros([4], (Kind::Float, Device::Cpu));
        let v = Tensor::zeros([2, 3], (Kind::Float, Device::Cpu)).tr();
        let hosts = s
            .host(HostMode::Direct, &[(&a, Fill::In), (&v, Fill::In)])
            .expect("host");
        assert_eq!(hosts[0].ptr() as usize, a.data_ptr() as usize);
        assert!(hosts[1].tensor().is_contiguous());
        assert_eq!(s.stats(), (0, 0));
    }
}
