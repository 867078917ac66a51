//! The benchmarks of `trellis-bench`: `tunnel` and `http` (direct vs. Trellis only) and `all` (the suite of every scenario
//! against every contender).

pub mod contenders;
pub mod control;
pub mod http;
pub mod idle;
pub mod link_order;
pub mod load;
pub mod netpath;
pub mod nsdial;
pub mod plot;
pub mod procfs;
pub mod report;
pub mod rotation;
pub mod scale;
pub mod scoping;
pub mod soak;
pub mod suite;
pub mod tunnel;
pub mod ztunnel;

/// Waits until every proxy is ready and has the server's workload (at `server_ip`) in its registry; a failure names
/// the step and ends with the proxies' last log lines.
pub fn wait_for_server_in_registry(proxies: &[trellis_tests::Proxy], server_ip: &str) -> anyhow::Result<()> {
    let logs: Vec<(&str, std::path::PathBuf)> = proxies.iter().map(|p| ("proxy", p.log_path())).collect();
    crate::common::step("waiting for the proxies", &logs, || {
        for proxy in proxies {
            proxy.wait_ready();
            proxy.wait_config("the server's workload in the registry", |d| {
                d["workloads"].to_string().contains(server_ip)
            });
        }
        Ok(())
    })
}

/// One short connection through a SOCKS5 listener: send `message`, half-close, read the echo to its end.
pub async fn short_exchange(
    socks: std::net::SocketAddr,
    echo: std::net::SocketAddr,
    message: &[u8],
) -> std::io::Result<Vec<u8>> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = crate::common::socks5::connect_async(socks, echo).await?;
    stream.write_all(message).await?;
    stream.shutdown().await?;
    let mut back = Vec::new();
    stream.read_to_end(&mut back).await?;
    Ok(back)
}
