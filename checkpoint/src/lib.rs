//! weaver-checkpoint: filled by later work.
