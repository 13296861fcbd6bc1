//! The core's error type, [`CoreError`], classified by cause.
//!
//! - [`CoreError::Io`] and [`CoreError::Storage`]: the environment failed (disk full, I/O error,
//!   the storage engine refused a write). Transient or operator-fixable; the embedded core keeps
//!   the affected operations and retries them.
//! - [`CoreError::Redis`]: the session store (Redis) failed: unreachable, timed out, or it
//!   refused a command. Environment, transient; the session writer keeps state and retries.
//! - [`CoreError::InvalidInput`]: the caller asked for something the store cannot encode (a
//!   user name or sender longer than the key/value layout allows). Nothing was written.
//! - [`CoreError::Transport`] and [`CoreError::Kafka`]: the broker side of the cluster service
//!   failed (unreachable, refused a topic or a commit). Environment.
//! - [`CoreError::Corrupt`], [`CoreError::ThreadPanicked`] and [`CoreError::Encode`]: internal faults — stored bytes
//!   that do not decode, or the core thread died. Never caused by a client.

/// Errors of the core.
#[derive(Debug, thiserror::Error)]
pub enum CoreError {
    /// An operating-system I/O error (opening the data directory, spawning the core thread,
    /// journal writes and syncs surfaced by the storage engine as I/O).
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),

    /// The storage engine (fjall) failed for a reason other than plain I/O; after a failed
    /// journal write fjall also refuses further writes (`Poisoned`) until the process restarts.
    #[error("storage backend error: {0}")]
    Storage(fjall::Error),

    /// The session store (Redis) failed: connect, I/O, timeout, or a refused command.
    #[error("redis backend error: {0}")]
    Redis(#[from] redis::RedisError),

    /// Stored bytes that do not decode: an internal fault (a bug or on-disk damage).
    #[error("corrupt {what}: {detail}")]
    Corrupt {
        /// Which kind of record (e.g. "inbox value", "inbox key", "id_floor").
        what: &'static str,
        /// What was wrong with it.
        detail: String,
    },

    /// A request the store cannot represent; nothing was written.
    #[error("invalid input: {0}")]
    InvalidInput(String),

    /// The core thread panicked (an internal fault); its pending operations are lost.
    #[error("core thread panicked")]
    ThreadPanicked,

    /// The Kafka transport of the cluster service failed (broker unreachable at startup, topic
    /// creation refused, a transport thread could not start). Environment.
    #[error("kafka transport error: {0}")]
    Transport(#[from] iris_bus::kafka::TransportError),

    /// The cluster service's own Kafka consumer failed (configuration, subscribe, offset commit
    /// at shutdown). Environment.
    #[error("kafka consumer error: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),

    /// The broker lost the deliver or presence topics and the keeper re-created them (a
    /// memory-storage broker restarted). The consumer cannot follow a re-created topic in
    /// place; the process must restart to read the new logs from their beginning. Environment.
    #[error("the broker lost the topics {topics:?} and they were re-created; restart to read them from their beginning")]
    TopicsLost {
        /// The re-created topics.
        topics: Vec<String>,
    },

    /// A bus frame could not be encoded (never expected: allocation failure). Internal.
    #[error("bus frame encoding failed: {0}")]
    Encode(#[source] iris_bus::BusError),
}

impl CoreError {
    /// True for internal faults (corruption, a panicked core thread), false for environment
    /// failures and invalid input.
    pub fn is_internal(&self) -> bool {
        matches!(
            self,
            Self::Corrupt { .. } | Self::ThreadPanicked | Self::Encode(_)
        )
    }

    pub(crate) fn corrupt(what: &'static str, detail: impl Into<String>) -> Self {
        Self::Corrupt {
            what,
            detail: detail.into(),
        }
    }
}

impl From<fjall::Error> for CoreError {
    fn from(e: fjall::Error) -> Self {
        match e {
            fjall::Error::Io(io) => Self::Io(io),
            other => Self::Storage(other),
        }
    }
}
