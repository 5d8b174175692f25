//! Ring schedules.
