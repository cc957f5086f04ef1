//! Parallelism for weaver: the device mesh ([`mesh`]), the rendezvous store ([`store`],
//! with a small TCP implementation in [`tcp_store`]), the collectives ([`comm`]), and (filled
//! by later work) the tensor-, pipeline- and data-parallel building blocks.

pub mod comm;
pub mod mesh;
pub mod store;
pub mod tcp_store;
