//! Load generator (being built).
