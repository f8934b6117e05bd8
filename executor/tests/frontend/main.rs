//! The Dockerfile front end and planner against fixed inputs (golden plans)
//! and arbitrary ones (property tests), linked into ONE test binary
//! (`cargo test --release -p kiln-executor --test frontend [MODULE::][NAME]`).

mod fuzz;
mod golden;
