//! Parallelism for weaver: the device mesh ([`mesh`]), the rendezvous store ([`store`],
//! with a small TCP implementation in [`tcp_store`]), the collectives ([`comm`]), tensor
//! parallelism ([`tp`]) and pipeline schedules ([`pp`]).

pub mod comm;
pub mod pp;
pub mod tcp_store;
pub mod tp;

/// The mesh and the store trait live in the serde-only `weaver-config` crate (the control
/// plane uses them without libtorch); `weaver_parallel::mesh::…` and
/// `weaver_parallel::store::…` keep working.
pub use weaver_config::{mesh, store};
