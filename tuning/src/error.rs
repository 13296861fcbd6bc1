//! Library errors of `iris-tuning`, classified by cause.
//!
//! Reading the host never fails: a file that is missing or unreadable is reported as "unknown" in
//! a [`crate::Finding`]. Errors come only from the things an operator hands us (a profiles file,
//! a profile name, an edge config) and from writing tuning files during `apply`.

use std::path::PathBuf;

/// Everything that can go wrong in `iris-tuning`.
#[derive(Debug, thiserror::Error)]
pub enum TuningError {
    /// A profiles file (`--profiles FILE`) could not be read.
    #[error("cannot read profiles file {path}: {source}")]
    ProfilesRead {
        path: PathBuf,
        source: std::io::Error,
    },
    /// A profiles file is not valid TOML or has keys we do not know.
    #[error("invalid profiles file {origin}: {message}")]
    ProfilesParse { origin: String, message: String },
    /// `--profile NAME` names no profile.
    #[error("unknown profile {name:?}; known profiles: {known}")]
    UnknownProfile { name: String, known: String },
    /// An `iris-edge` config file (`--edge-config FILE`) could not be read or parsed.
    #[error("cannot use edge config {path}: {message}")]
    EdgeConfig { path: PathBuf, message: String },
    /// `apply` could not write a file or a kernel setting.
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}
