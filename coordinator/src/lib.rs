//! weaver-coordinator: filled by later work.
