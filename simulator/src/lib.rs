//! Device simulator for the telemetry gateway, as a library so that integration tests can
//! build the same payloads and run the same checks as the `simulator` binary.

pub mod bad;
pub mod bench;
pub mod cli;
pub mod config;
pub mod connect;
pub mod device;
pub mod fleet;
pub mod generate;
pub mod payload;
pub mod profile;
pub mod progress;
pub mod report;
pub mod shared;
pub mod sys;
pub mod tracker;
pub mod verify;
