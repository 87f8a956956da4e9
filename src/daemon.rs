//! What the two long-running roles, `kube-nsg controller` and `kube-nsg agent`, share: the
//! flags both take, the logging set-up, the shutdown signal and duration parsing.

use std::time::Duration;

use futures::FutureExt;
use ipnet::IpNet;

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Plain,
    Json,
}

/// The flags the controller and the agent both take, with the same meaning and default.
#[derive(Debug, Clone, clap::Args)]
pub struct DaemonArgs {
    /// Address ranges of the cluster that belong to the VirtualNetwork service tag and cannot
    /// be discovered: the pod and service CIDRs (node IPs, node pod CIDRs and pod IPs are
    /// discovered). Comma-separated or repeated; the controller and the agent take the same
    /// list.
    #[arg(
        long = "virtual-network",
        value_name = "CIDR",
        value_delimiter = ',',
        env = "KUBE_NSG_VIRTUAL_NETWORK"
    )]
    pub virtual_network: Vec<IpNet>,
    /// Log format: plain text or one JSON object per line. Filter with RUST_LOG.
    #[arg(long, value_enum, default_value = "plain", env = "KUBE_NSG_LOG_FORMAT")]
    pub log_format: LogFormat,
}

pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (number, unit) = s.split_at(
        s.find(|c: char| !c.is_ascii_digit() && c != '.')
            .unwrap_or(s.len()),
    );
    let n: f64 = number
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 500ms, 10s, 5m or 1h"))?;
    let seconds = match unit {
        "ms" => n / 1000.0,
        "" | "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(format!("{s:?}: unknown unit {unit:?} (ms, s, m, h)")),
    };
    Ok(Duration::from_secs_f64(seconds))
}

/// Sets up logging; a no-op when a subscriber is already installed (by the CLI).
pub fn init_tracing(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let _ = match format {
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
        LogFormat::Plain => builder.try_init(),
    };
}

pub(crate) async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c().map(|_| ());
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("installing a SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    ctrl_c.await;
}
