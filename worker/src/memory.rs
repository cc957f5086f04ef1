//! The peak memory of a rank in a step, for the step metrics (`peak_mem_bytes`).
//!
//! - **CUDA**: the caching allocator's peak of allocated bytes on the rank's device
//!   (`torch.cuda.max_memory_allocated`), reset at the start of every step. It counts every
//!   tensor on the device; it leaves out the allocator's cached but free blocks, the CUDA
//!   context and NCCL's buffers.
//! - **CPU**: the bytes of live CPU tensors, counted by `weaver_prof::cpu_memory`'s
//!   allocator (installed in libtorch's place when the first rank of the process is built),
//!   their high-water mark reset at the start of every step. It counts every tensor storage
//!   libtorch allocates: parameters, the f32 gradient buckets, AdamW's moments, activations,
//!   temporaries, input batches. It leaves out memory taken outside libtorch's allocator
//!   (oneDNN and BLAS scratch space, the tcp backend's staging buffers, which are Rust
//!   vectors), allocator slack, code and stacks; and tensors allocated before the rank was
//!   built. When one rank runs in the process (`weaver launch`, `weaver worker`,
//!   `weaver train`) the figure is the whole process's; when several ranks run as threads
//!   of one process (the tests), each counts what its own thread allocates, so the input
//!   batches its loader threads prepare ahead are missing from it.

use tch::Device;
use weaver_prof::{cpu_memory, cuda_memory};

/// Measures one rank's peak per step.
#[derive(Debug)]
pub struct MemoryMeter {
    kind: Kind,
}

#[derive(Debug)]
enum Kind {
    Cuda(usize),
    Cpu(cpu_memory::Owner),
    /// Not measurable here (the reason was logged once).
    Off,
}

impl MemoryMeter {
    /// A meter for a rank computing on `device`. Build it on the rank's thread before the
    /// rank's tensors exist (CPU tensors allocated earlier are not counted). Never fails:
    /// when the figure cannot be had, it says why in the log and reports none.
    pub fn new(device: Device) -> MemoryMeter {
        let kind = match device {
            Device::Cuda(k) => match cuda_memory::reset_peak(k) {
                Ok(()) => Kind::Cuda(k),
                Err(e) => {
                    tracing::warn!("peak memory is not reported: {e}");
                    Kind::Off
                }
            },
            _ => match cpu_memory::install() {
                Ok(()) => match cpu_memory::Owner::claim() {
                    Some(owner) => {
                        owner.enter();
                        Kind::Cpu(owner)
                    }
                    None => {
                        tracing::warn!(
                            "peak memory is not reported: more than 63 ranks in this process"
                        );
                        Kind::Off
                    }
                },
                Err(e) => {
                    tracing::warn!("peak memory is not reported: {e}");
                    Kind::Off
                }
            },
        };
        MemoryMeter { kind }
    }

    /// Starts a step's peak at what is live now; call it on the thread that runs the step.
    pub fn begin_step(&self) {
        match &self.kind {
            Kind::Cuda(k) => {
                if let Err(e) = cuda_memory::reset_peak(*k) {
                    tracing::debug!("resetting the CUDA peak failed: {e}");
                }
            }
            Kind::Cpu(owner) => {
                owner.enter();
                owner.reset_peak();
                if cpu_memory::claimed() == 1 {
                    cpu_memory::reset_peak();
                }
            }
            Kind::Off => {}
        }
    }

    /// The peak since [`MemoryMeter::begin_step`] in bytes (`None`: not measurable here).
    pub fn peak(&self) -> Option<u64> {
        match &self.kind {
            Kind::Cuda(k) => cuda_memory::peak(*k).ok().map(|p| p.allocated),
            Kind::Cpu(owner) => Some(if cpu_memory::claimed() == 1 {
                cpu_memory::read().peak
            } else {
                owner.read().1
            }),
            Kind::Off => None,
        }
    }
}
