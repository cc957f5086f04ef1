//! weaver-worker: filled by later work.
