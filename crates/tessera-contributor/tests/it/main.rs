//! The contributor core with others and a coordinator: `simulation.rs` drives several cores
//! with the coordinator's sans-IO pieces over a simulated network.

mod simulation;
