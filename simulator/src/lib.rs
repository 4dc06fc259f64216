//! Device simulator for the telemetry gateway, as a library so that integration tests can
//! build the same payloads and run the same checks as the `simulator` binary.

pub mod device;
pub mod payload;
pub mod verify;
