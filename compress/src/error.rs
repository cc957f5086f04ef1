//! The one error type of the compression crate.

/// What went wrong while quantizing, pruning or loading a model.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CompressError {
    /// An option or configuration value is wrong; `key` names it (a CLI flag or
    /// `section.key`).
    #[error("bad option `{key}`: {message}")]
    BadOption {
        /// The flag or key to fix.
        key: String,
        /// What is wrong and how to fix it.
        message: String,
    },
    /// The checkpoint does not fit what was asked of it (no config, a tensor missing or of
    /// the wrong shape or dtype, already quantized).
    #[error("checkpoint {url}: {message}")]
    BadCheckpoint {
        /// The checkpoint.
        url: String,
        /// What is wrong.
        message: String,
    },
    /// Reading the held-out data of the calibration pass failed (the shards and the fix
    /// are in the message).
    #[error("held-out data for calibration: {0}")]
    Heldout(String),
    /// Reading or writing the checkpoint failed.
    #[error(transparent)]
    Checkpoint(#[from] weaver_checkpoint::CheckpointError),
    /// Building or running the model failed.
    #[error(transparent)]
    Model(#[from] weaver_models::ModelError),
    /// A tensor operation failed inside libtorch.
    #[error("tensor operation failed: {0}")]
    Torch(#[from] tch::TchError),
}

impl From<weaver_models::ConfigError> for CompressError {
    fn from(e: weaver_models::ConfigError) -> Self {
        CompressError::Model(e.into())
    }
}

/// Result with [`CompressError`].
pub type Result<T, E = CompressError> = std::result::Result<T, E>;

/// Parses a command-line choice: the one of `choices` whose `name` is `s`, or
/// [`CompressError::BadOption`] naming `flag` and listing what it takes
/// (`unknown method "x"; use magnitude, heads or mlp`).
pub(crate) fn parse_choice<T: Copy>(
    flag: &str,
    what: &str,
    s: &str,
    choices: &[T],
    name: fn(T) -> &'static str,
) -> Result<T> {
    if let Some(&c) = choices.iter().find(|&&c| name(c) == s) {
        return Ok(c);
    }
    let names: Vec<&str> = choices.iter().map(|&c| name(c)).collect();
    let listed = match names.split_last() {
        Some((last, rest)) if !rest.is_empty() => format!("{} or {last}", rest.join(", ")),
        _ => names.join(""),
    };
    Err(CompressError::BadOption {
        key: flag.into(),
        message: format!("unknown {what} {s:?}; use {listed}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Clone, Copy, PartialEq)]
    enum Abc {
        A,
        B,
        C,
    }

    fn name(x: Abc) -> &'static str {
        match x {
            Abc::A => "a",
            Abc::B => "b",
            Abc::C => "c",
        }
    }

    #[test]
    fn a_choice_parses_by_name_and_a_wrong_one_lists_them_all() {
        let all = [Abc::A, Abc::B, Abc::C];
        assert_eq!(parse_choice("--x", "x", "b", &all, name).unwrap(), Abc::B);
        let e = parse_choice("--x", "thing", "d", &all, name).unwrap_err();
        assert_eq!(
            e.to_string(),
            "bad option `--x`: unknown thing \"d\"; use a, b or c"
        );
        let e = parse_choice("--x", "thing", "", &all[..1], name).unwrap_err();
        assert_eq!(e.to_string(), "bad option `--x`: unknown thing \"\"; use a");
    }
}
