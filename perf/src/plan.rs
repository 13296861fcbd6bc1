//! Capacity planner (being built).
