//! Parallelism for weaver: the device mesh ([`mesh`]), the rendezvous store ([`store`],
//! with a small TCP implementation in [`tcp_store`]), the collectives ([`comm`]), tensor
//! parallelism ([`tp`]) and pipeline schedules ([`pp`]).

pub mod comm;
pub mod mesh;
pub mod pp;
pub mod store;
pub mod tcp_store;
pub mod tp;
