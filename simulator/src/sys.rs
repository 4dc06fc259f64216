//! What the process needs from the operating system: enough file descriptors for one socket
//! per device, and its own CPU time for the ceiling figures.

use std::time::Duration;

use anyhow::{bail, Result};
use rlimit::Resource;

/// Descriptors beyond one per device: the runtime, the sink's HTTP connections, stdio.
const SPARE_FILES: u64 = 256;

/// Raises the open-files limit to fit `devices` connections. The soft limit goes up to the
/// hard one; when even that is too low the hard limit is raised too, which works as root.
pub fn raise_open_files(devices: u64) -> Result<()> {
    let needed = devices + SPARE_FILES;
    let (soft, hard) = Resource::NOFILE.get()?;
    if soft >= needed {
        return Ok(());
    }
    if hard >= needed {
        Resource::NOFILE.set(hard, hard)?;
        return Ok(());
    }
    if Resource::NOFILE.set(needed, needed).is_ok() {
        return Ok(());
    }
    // Not allowed to raise the hard limit: take what there is and say what is missing.
    Resource::NOFILE.set(hard, hard)?;
    bail!(
        "{devices} devices need {needed} open files but the limit is {hard}; \
         raise it (`ulimit -n {needed}` as root, or LimitNOFILE= in a systemd unit) \
         or simulate fewer devices"
    )
}

/// CPU time (user + system) of this process so far, all threads, including ended ones.
pub fn cpu_time() -> Option<Duration> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // The command name may hold spaces and parentheses: count fields after its last ')'.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    // In USER_HZ ticks, which Linux fixes at 100 for user space on every architecture it
    // exports /proc on (the kernel's own HZ may differ; the ABI does not).
    Some(Duration::from_millis((utime + stime) * 10))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_limit_fits_a_small_fleet_and_cpu_time_is_readable() {
        raise_open_files(100).expect("100 devices fit any limit");
        let (soft, _) = Resource::NOFILE.get().expect("limit");
        assert!(soft >= 100 + SPARE_FILES);
        let a = cpu_time().expect("cpu time");
        // Burn a little CPU so the clock moves.
        let mut x = 0u64;
        for i in 0..50_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        assert!(x != 1);
        assert!(cpu_time().expect("cpu time") >= a);
    }
}
