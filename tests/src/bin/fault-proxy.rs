//! The test suite's fault proxy as a program, for the benchmark: `fault-proxy UPSTREAM
//! LINES_PER_SEC` forwards HTTP requests to UPSTREAM, at most LINES_PER_SEC lines a second
//! (all requests together), and prints the address it listens on as its first line.

use e2e::proxy::{Fault, FaultProxy};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let (Some(upstream), Some(rate)) = (args.next(), args.next()) else {
        anyhow::bail!("usage: fault-proxy UPSTREAM_URL LINES_PER_SEC");
    };
    let rate: u32 = rate
        .parse()
        .map_err(|_| anyhow::anyhow!("LINES_PER_SEC must be a whole number, not {rate:?}"))?;
    let proxy = FaultProxy::start(&upstream).await;
    proxy.set(Fault::Throttle(rate));
    println!("{}", proxy.url);
    tokio::signal::ctrl_c().await?;
    Ok(())
}
