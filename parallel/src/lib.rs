//! Parallelism for weaver: the device mesh ([`mesh`]), the rendezvous store ([`store`]),
//! and (filled by later work) the collectives, tensor-, pipeline- and data-parallel
//! building blocks.

pub mod mesh;
pub mod pp;
pub mod store;
pub mod tp;
