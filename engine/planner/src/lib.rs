//! The convoy capacity planner: workload specs and traces, device profiles, fleets of simulated
//! replicas running the real scheduler, the GPU-count search, and SVG charts.

pub mod chart;
pub mod plan;
pub mod workload;
