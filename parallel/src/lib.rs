//! Parallelism for weaver: the device mesh ([`mesh`]), the rendezvous store ([`store`],
//! with a small TCP implementation in [`tcp_store`]), the collectives ([`comm`]), tensor
//! parallelism ([`tp`]) and pipeline schedules ([`pp`]).

pub mod comm;
pub mod tcp_store;
pub mod tp;

/// The mesh, the store trait and the pipeline schedules (pure data) live in the serde-only
/// `weaver-config` crate (the control plane and the planner use them without libtorch);
/// `weaver_parallel::mesh::…`, `weaver_parallel::store::…` and `weaver_parallel::pp::…` keep
/// working.
pub use weaver_config::{mesh, pp, store};
