//! placeholder
/// Errors of the core.
#[derive(Debug, thiserror::Error)]
pub enum CoreError {
    #[error("store: {0}")]
    Store(String),
}
