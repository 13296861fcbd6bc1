//! `iris-tuning`: host checks and tuning for bare-metal Iris edge nodes.
//!
//! This crate will hold `iris-tune` (check, plan, apply) and the checks `iris-edge` runs at
//! startup. Not built yet.
