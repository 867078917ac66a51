//! The benchmarks of `trellis-bench`: `tunnel` and `http` (direct vs. Trellis only) and `all` (the suite of every scenario
//! against every contender).

pub mod contenders;
pub mod control;
pub mod http;
pub mod load;
pub mod plot;
pub mod procfs;
pub mod report;
pub mod rotation;
pub mod scale;
pub mod scoping;
pub mod soak;
pub mod suite;
pub mod tunnel;
