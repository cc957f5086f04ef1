//! The communicator of a job with one process: every collective is the identity (on one
//! rank the sum, average, maximum and gather of a tensor are the tensor), so the parallel
//! step loop runs unchanged with no transport at all. It checks the arguments as every
//! backend does (device first), so code that works here works on the others.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tch::{Device, Tensor};

use super::{CommError, Communicator, P2POp, ReduceOp};

/// A world of one rank.
#[derive(Debug)]
pub struct SoloComm {
    aborted: Arc<AtomicBool>,
    timeout_ms: AtomicU64,
    device: Device,
}

impl SoloComm {
    /// The one-rank world, on the CPU.
    pub fn new() -> SoloComm {
        SoloComm::on(Device::Cpu)
    }

    /// The one-rank world whose tensors live on `device`.
    pub fn on(device: Device) -> SoloComm {
        SoloComm {
            aborted: Arc::new(AtomicBool::new(false)),
            timeout_ms: AtomicU64::new(60_000),
            device,
        }
    }

    fn check(&self) -> Result<(), CommError> {
        if self.aborted.load(Ordering::SeqCst) {
            Err(CommError::Aborted)
        } else {
            Ok(())
        }
    }

    /// Every backend's first check: the tensors live on the communicator's device.
    fn on_device(&self, op: &'static str, tensors: &[&Tensor]) -> Result<(), CommError> {
        for t in tensors {
            let got = t.device();
            if got != self.device {
                return Err(CommError::WrongDevice {
                    op,
                    expected: self.device,
                    got,
                });
            }
        }
        Ok(())
    }
}

impl Default for SoloComm {
    fn default() -> Self {
        SoloComm::new()
    }
}

fn copy_into(output: &mut Tensor, input: &Tensor, op: &'static str) -> Result<(), CommError> {
    if output.size() != input.size() {
        return Err(CommError::SizeMismatch {
            op,
            detail: format!("output {:?}, input {:?}", output.size(), input.size()),
        });
    }
    output.f_copy_(input)?;
    Ok(())
}

impl Communicator for SoloComm {
    fn backend(&self) -> &'static str {
        "solo"
    }
    fn device(&self) -> Device {
        self.device
    }
    fn rank(&self) -> usize {
        0
    }
    fn size(&self) -> usize {
        1
    }
    fn world_rank(&self, rank: usize) -> usize {
        rank
    }
    fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms.load(Ordering::SeqCst))
    }
    fn set_timeout(&self, timeout: Duration) {
        self.timeout_ms
            .store(timeout.as_millis() as u64, Ordering::SeqCst);
    }
    fn all_reduce(&self, tensor: &mut Tensor, _op: ReduceOp) -> Result<(), CommError> {
        self.on_device("all_reduce", &[tensor])?;
        self.check()
    }
    fn all_gather(&self, input: &Tensor, output: &mut Tensor) -> Result<(), CommError> {
        self.on_device("all_gather", &[input, output])?;
        self.check()?;
        copy_into(output, input, "all_gather")
    }
    fn reduce_scatter(
        &self,
        input: &Tensor,
        output: &mut Tensor,
        _op: ReduceOp,
    ) -> Result<(), CommError> {
        self.on_device("reduce_scatter", &[input, output])?;
        self.check()?;
        copy_into(output, input, "reduce_scatter")
    }
    fn broadcast(&self, tensor: &mut Tensor, root: usize) -> Result<(), CommError> {
        self.on_device("broadcast", &[tensor])?;
        self.check()?;
        if root != 0 {
            return Err(CommError::InvalidArgument(format!(
                "broadcast: root {root} in a world of one"
            )));
        }
        Ok(())
    }
    fn batch_p2p(&self, ops: &mut [P2POp<'_>]) -> Result<(), CommError> {
        for o in ops.iter() {
            let t = match o {
                P2POp::Send { tensor, .. } => &**tensor,
                P2POp::Recv { tensor, .. } => &**tensor,
            };
            self.on_device("send/recv", &[t])?;
        }
        self.check()?;
        if ops.is_empty() {
            return Ok(());
        }
        Err(CommError::InvalidArgument(
            "send/recv in a world of one: there is no peer".into(),
        ))
    }
    fn barrier(&self) -> Result<(), CommError> {
        self.check()
    }
    fn split(
        &self,
        color: Option<u32>,
        _key: usize,
    ) -> Result<Option<Arc<dyn Communicator>>, CommError> {
        self.check()?;
        Ok(color.map(|_| {
            Arc::new(SoloComm {
                aborted: self.aborted.clone(),
                timeout_ms: AtomicU64::new(self.timeout_ms.load(Ordering::SeqCst)),
                device: self.device,
            }) as Arc<dyn Communicator>
        }))
    }
    fn abort(&self) {
        self.aborted.store(true, Ordering::SeqCst);
    }
    fn is_aborted(&self) -> bool {
        self.aborted.load(Ordering::SeqCst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Kind;

    /// The device rule holds here too: a one-rank world on `cuda:0` refuses CPU tensors (no
    /// GPU needed), and stays usable.
    #[test]
    fn refuses_tensors_on_another_device() {
        let c = SoloComm::on(Device::Cuda(0));
        assert_eq!(c.device(), Device::Cuda(0));
        let mut t = Tensor::zeros([3], (Kind::Float, Device::Cpu));
        let e = c.all_reduce(&mut t, ReduceOp::Sum).unwrap_err();
        assert!(
            matches!(
                e,
                CommError::WrongDevice {
                    expected: Device::Cuda(0),
                    got: Device::Cpu,
                    ..
                }
            ),
            "{e}"
        );
        let e = c
            .all_gather_start(t.shallow_clone(), t.shallow_clone())
            .map(|_| ())
            .unwrap_err();
        assert!(matches!(e, CommError::WrongDevice { .. }), "{e}");
        c.barrier().expect("usable");
        let cpu = SoloComm::new();
        assert_eq!(cpu.device(), Device::Cpu);
        cpu.all_reduce(&mut t, ReduceOp::Sum)
            .expect("cpu tensor on cpu");
    }
}
