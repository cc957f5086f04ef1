//! What the planner plans for: how many devices, how they are grouped into nodes, their
//! memory, their speed and the links between them. Every figure is an input with a stated
//! default, so that a printed plan says what it assumed.

use crate::error::PlanError;

/// GPUs or CPU processes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceKind {
    /// CUDA devices: bf16 compute by default, NCCL, the allocator's peak is what must fit.
    Gpu,
    /// CPU processes (the tcp backend): f32 compute by default, host memory shared by the
    /// processes of a host.
    Cpu,
}

/// The machines a job runs on.
#[derive(Debug, Clone, PartialEq)]
pub struct Hardware {
    /// GPUs or CPU processes.
    pub kind: DeviceKind,
    /// Devices (ranks) in all.
    pub devices: usize,
    /// Devices per node (tensor parallelism stays inside a node).
    pub per_node: usize,
    /// Memory of one device in bytes (for CPU processes: the host's memory divided among
    /// its processes).
    pub memory_bytes: u64,
    /// Memory one device spends outside the tensor allocator, in bytes: the CUDA context,
    /// cuBLAS workspaces and NCCL's buffers (0 on CPU, where nothing of the kind is counted).
    pub reserve_bytes: u64,
    /// Fraction of the memory kept free for the allocator's fragmentation.
    pub headroom: f64,
    /// Achieved collective bus bandwidth between devices of one node, Gbit/s per device
    /// (NVLink; shared memory between CPU processes).
    pub intra_node_gbps: f64,
    /// Achieved bandwidth between nodes, Gbit/s per device (one NIC per GPU).
    pub inter_node_gbps: f64,
    /// Latency of one collective step or transfer, seconds.
    pub latency_s: f64,
    /// Peak dense TFLOP/s of one device in the compute dtype.
    pub peak_tflops: f64,
    /// Fraction of the peak the compute runs at between communications (matmul-bound
    /// work; communication and the pipeline bubble are modelled separately).
    pub mfu: f64,
    /// Device memory bandwidth, GB/s (the optimizer step is bound by it).
    pub memory_gbps: f64,
}

impl Hardware {
    /// `devices` H200s (SXM, 141 GB HBM3e), `per_node` to a node: 140 GiB each (nvidia-smi's
    /// 143,771 MiB), 989 dense bf16 TFLOP/s at 45% between communications, NVLink at
    /// 3,000 Gbit/s (375 GB/s, NCCL's achieved bus bandwidth on 8-GPU NVSwitch nodes),
    /// 360 Gbit/s between nodes (one 400G NIC per GPU, achieved), 4.8 TB/s HBM, 3 GiB
    /// outside the allocator (CUDA context, cuBLAS, NCCL buffers), 5% headroom.
    pub fn h200(devices: usize, per_node: usize) -> Hardware {
        Hardware {
            kind: DeviceKind::Gpu,
            devices,
            per_node,
            memory_bytes: 140 << 30,
            reserve_bytes: 3 << 30,
            headroom: 0.05,
            intra_node_gbps: 3000.0,
            inter_node_gbps: 360.0,
            latency_s: 10e-6,
            peak_tflops: 989.0,
            mfu: 0.45,
            memory_gbps: 4800.0,
        }
    }

    /// `devices` CPU processes, `per_node` to a host, `memory_bytes` each: loopback TCP
    /// and shared memory at 40 Gbit/s inside a host, 10 Gbit/s between hosts, 0.2 TFLOP/s
    /// per process at 50%, 20 GB/s memory bandwidth, no reserve, 10% headroom (the
    /// process's own code and malloc's slack).
    pub fn cpu(devices: usize, per_node: usize, memory_bytes: u64) -> Hardware {
        Hardware {
            kind: DeviceKind::Cpu,
            devices,
            per_node,
            memory_bytes,
            reserve_bytes: 0,
            headroom: 0.10,
            intra_node_gbps: 40.0,
            inter_node_gbps: 10.0,
            latency_s: 50e-6,
            peak_tflops: 0.2,
            mfu: 0.5,
            memory_gbps: 20.0,
        }
    }

    /// Checks the figures; the message names the one to fix.
    pub fn validate(&self) -> Result<(), PlanError> {
        let bad = |what: &str, why: String| Err(PlanError::BadHardware(format!("{what}: {why}")));
        if self.devices == 0 {
            return bad("--gpus", "must be at least 1".into());
        }
        if self.per_node == 0 {
            return bad("--gpus-per-node", "must be at least 1".into());
        }
        if self.devices > self.per_node && !self.devices.is_multiple_of(self.per_node) {
            return bad(
                "--gpus",
                format!(
                    "{} devices do not fill whole nodes of {}; use a multiple of --gpus-per-node",
                    self.devices, self.per_node
                ),
            );
        }
        if self.memory_bytes == 0 {
            return bad("--gpu-memory", "must be positive".into());
        }
        for (what, v) in [
            ("--intra-node-gbps", self.intra_node_gbps),
            ("--inter-node-gbps", self.inter_node_gbps),
            ("--peak-tflops", self.peak_tflops),
            ("memory bandwidth", self.memory_gbps),
        ] {
            if !(v.is_finite() && v > 0.0) {
                return bad(what, format!("must be a positive number, got {v}"));
            }
        }
        if !(self.mfu > 0.0 && self.mfu <= 1.0) {
            return bad("--mfu", format!("must lie in (0, 1], got {}", self.mfu));
        }
        if !(0.0..1.0).contains(&self.headroom) {
            return bad(
                "headroom",
                format!("must lie in [0, 1), got {}", self.headroom),
            );
        }
        Ok(())
    }

    /// Devices per node actually used (fewer when the whole job is smaller than a node).
    pub fn node_size(&self) -> usize {
        self.per_node.min(self.devices).max(1)
    }

    /// Bytes a device may fill with tensors: its memory less the reserve and the headroom.
    pub fn usable_bytes(&self) -> u64 {
        let after = self.memory_bytes.saturating_sub(self.reserve_bytes) as f64;
        (after * (1.0 - self.headroom)) as u64
    }

    /// Bytes per second of a link: `inter` between nodes, else inside one.
    pub fn link_bytes_per_s(&self, inter: bool) -> f64 {
        let gbps = if inter {
            self.inter_node_gbps
        } else {
            self.intra_node_gbps
        };
        gbps * 1e9 / 8.0
    }
}

/// Parses a size: a number with an optional unit `B`, `KB`, `MB`, `GB`, `TB` (powers of
/// 1000) or `KiB`, `MiB`, `GiB`, `TiB` (powers of 1024), case-insensitive: `141GiB`,
/// `80 GB`, `1.5TiB`, `1000000`.
pub fn parse_bytes(text: &str) -> Result<u64, PlanError> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let value: f64 = num.parse().map_err(|_| {
        PlanError::BadHardware(format!(
            "{text:?} is not a size; write e.g. 141GiB, 80GB or 1000000"
        ))
    })?;
    let scale = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "kb" => 1e3,
        "mb" => 1e6,
        "gb" => 1e9,
        "tb" => 1e12,
        "kib" => 1024.0,
        "mib" => 1024f64.powi(2),
        "gib" => 1024f64.powi(3),
        "tib" => 1024f64.powi(4),
        other => {
            return Err(PlanError::BadHardware(format!(
            "unknown size unit {other:?} in {text:?}; use B, KB, MB, GB, TB, KiB, MiB, GiB or TiB"
        )))
        }
    };
    let bytes = value * scale;
    if !(bytes.is_finite() && bytes >= 0.0) {
        return Err(PlanError::BadHardware(format!("{text:?} is not a size")));
    }
    Ok(bytes.round() as u64)
}

/// A byte count for people: `1.23 GiB`, `512.0 MiB`, `900 B`.
pub fn fmt_bytes(b: u64) -> String {
    let x = b as f64;
    let k = 1024.0;
    if x >= k * k * k {
        format!("{:.2} GiB", x / (k * k * k))
    } else if x >= k * k {
        format!("{:.1} MiB", x / (k * k))
    } else if x >= k {
        format!("{:.1} KiB", x / k)
    } else {
        format!("{b} B")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_either_unit_family() {
        assert_eq!(parse_bytes("141GiB").unwrap(), 141 << 30);
        assert_eq!(parse_bytes("80 GB").unwrap(), 80_000_000_000);
        assert_eq!(parse_bytes("1.5tib").unwrap(), 3 << 39);
        assert_eq!(parse_bytes("1000").unwrap(), 1000);
        assert!(parse_bytes("lots").is_err());
        assert!(parse_bytes("3 parsecs").is_err());
        assert_eq!(fmt_bytes(3 << 30), "3.00 GiB");
        assert_eq!(fmt_bytes(900), "900 B");
    }

    #[test]
    fn hardware_is_checked() {
        assert!(Hardware::h200(8, 8).validate().is_ok());
        assert!(Hardware::h200(12, 8).validate().is_err());
        assert!(Hardware::h200(4, 8).validate().is_ok());
        let mut h = Hardware::h200(8, 8);
        h.mfu = 1.5;
        assert!(h.validate().is_err());
        let h = Hardware::h200(8, 8);
        assert!(h.usable_bytes() < h.memory_bytes - h.reserve_bytes);
        assert_eq!(h.link_bytes_per_s(false), 375e9);
    }
}
