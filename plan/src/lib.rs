//! weaver's parallel planner: which layouts of a job fit on which machines, and which runs
//! fastest — `weaver plan` prints them.
//!
//! - [`memory`]: the memory of each rank (parameters, f32 gradients, optimizer state,
//!   activations per micro-batch and per schedule, working memory), counted from the
//!   model's tensors.
//! - [`time`]: the step time of a layout (FLOPs at a stated MFU, TP/PP/DP communication
//!   over the stated links, the pipeline bubble, the optimizer step).
//! - [`search`]: every valid layout with its memory and time, best first (`weaver plan`).
//! - [`auto`]: the layout chosen from the hosts that registered (for `layout = "auto"`).
//! - [`hardware`]: the devices, nodes and links planned for, and their stated defaults.
//!
//! Serde only, like `weaver-config`, whose validation it reuses for every candidate: the
//! coordinator plans without libtorch.

pub mod auto;
pub mod error;
pub mod hardware;
pub mod memory;
pub mod search;
pub mod time;

pub use error::PlanError;
pub use hardware::{DeviceKind, Hardware};
pub use memory::{ActSpec, ChunkActivations, MemoryBreakdown, MemoryModel};
pub use search::{plan, search, why, Found, Plan};
pub use time::StepTime;
