//! Telemetry gateway: MQTT in, InfluxDB line protocol out, nothing dropped silently.
//!
//! The stages, in the order data flows through them:
//!
//! 1. [`ingest`]: MQTT messages from devices through the guard (embedded mode), or from an
//!    external broker.
//! 2. [`decode`]: CBOR or JSON payload → readings → [`line_protocol`] lines, each bad reading
//!    refused with a reason.
//! 3. [`queue`]: bounded in readings and bytes; a full queue makes ingest wait.
//! 4. [`batch`]: lines → batches by size or linger, a bounded number in flight.
//! 5. [`deliver`] and [`sink`]: write to InfluxDB, [`retry`] what is worth retrying, account
//!    for every reading in [`metrics`], served by [`admin`].
//!
//! [`pipeline::run`] starts them from the sink back to the devices, watches their tasks
//! ([`tasks`]), and stops them from the devices to the sink; the binary and the in-process
//! tests call it.

pub mod ack;
pub mod admin;
pub mod batch;
pub mod config;
pub mod decode;
pub mod deliver;
pub mod dlq;
pub mod events;
pub mod ingest;
pub mod line_protocol;
pub mod metrics;
pub mod pipeline;
pub mod queue;
pub mod redrive;
pub mod replay;
pub mod retry;
pub mod seglog;
pub mod selfmetrics;
pub mod sink;
pub mod tasks;
pub mod wal;

pub use pipeline::{run, RunError};
