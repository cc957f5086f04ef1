//! weaver-launch: filled by later work.
