//! The one error type of the planner.

/// Why no plan came out.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum PlanError {
    /// A hardware figure is wrong; the message names the flag.
    #[error("bad hardware description: {0}")]
    BadHardware(String),
    /// A layout handed to the model is not one the trainer accepts (the message says why).
    #[error("invalid layout: {0}")]
    BadLayout(String),
    /// The job's config is wrong before any layout is tried.
    #[error(transparent)]
    Config(#[from] weaver_config::ConfigError),
    /// No layout is valid at all for this many devices (the message says why, per rule).
    #[error("no valid layout for {devices} devices: {reason}")]
    NoLayout {
        /// Devices planned for.
        devices: usize,
        /// What every candidate ran into.
        reason: String,
    },
    /// Valid layouts exist, but none fits in memory.
    #[error(
        "nothing fits in {usable} per device: the smallest is {smallest} per device ({layout}); {advice}"
    )]
    NothingFits {
        /// Usable bytes per device, for people.
        usable: String,
        /// The smallest modelled peak, for people.
        smallest: String,
        /// The layout that has it.
        layout: String,
        /// What would make something fit.
        advice: String,
    },
}
