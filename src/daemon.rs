//! What the two long-running roles, `kube-nsg controller` and `kube-nsg agent`, share: the
//! flags both take, the logging set-up, the shutdown signal, duration parsing, and the
//! HTTP server of `/metrics`, `/livez` and `/readyz`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use futures::FutureExt;
use ipnet::IpNet;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

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

/// Why the controller or the agent could not start; their own errors wrap it.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot start the Tokio runtime: {0}")]
    Runtime(#[source] std::io::Error),
    #[error("cannot build a Kubernetes client: {0}")]
    Client(#[source] kube::Error),
    #[error("cannot serve metrics on {addr}: {source}")]
    Metrics {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// Runs `future` to completion on a new single-threaded Tokio runtime (I/O and timers
/// enabled), for a synchronous `main`; an error if the runtime cannot start.
pub fn block_on<T>(future: impl Future<Output = T>) -> Result<T, StartError> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(StartError::Runtime)?
        .block_on(future))
}

/// A client from the kubeconfig or the pod's service account.
pub async fn client() -> Result<kube::Client, StartError> {
    kube::Client::try_default()
        .await
        .map_err(StartError::Client)
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

/// What a role's `/metrics` and `/readyz` answer.
pub trait Probes: Send + Sync + 'static {
    /// The metrics in the text exposition format.
    fn metrics(&self) -> String;
    /// `Err(why)` while not ready: `/readyz` answers 503 with it.
    fn ready(&self) -> Result<(), &'static str>;
}

async fn metrics<P: Probes>(State(p): State<Arc<P>>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        p.metrics(),
    )
}

async fn livez() -> &'static str {
    "ok"
}

async fn readyz<P: Probes>(State(p): State<Arc<P>>) -> impl IntoResponse {
    match p.ready() {
        Ok(()) => (StatusCode::OK, "ok"),
        Err(why) => (StatusCode::SERVICE_UNAVAILABLE, why),
    }
}

/// Binds `addr` (so a busy address fails the start, not a background task) and serves
/// `/metrics`, `/livez` and `/readyz` there in a task until `shutdown` turns true.
pub async fn spawn_server<P: Probes>(
    addr: SocketAddr,
    probes: Arc<P>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<JoinHandle<std::io::Result<()>>, StartError> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| StartError::Metrics { addr, source })?;
    let app = Router::new()
        .route("/metrics", get(metrics::<P>))
        .route("/livez", get(livez))
        .route("/readyz", get(readyz::<P>))
        .with_state(probes);
    let shutdown = async move {
        let _ = shutdown.wait_for(|s| *s).await;
    };
    Ok(tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(shutdown)
            .await
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    struct Fake(AtomicBool);

    impl Probes for Fake {
        fn metrics(&self) -> String {
            "# EOF\n".into()
        }
        fn ready(&self) -> Result<(), &'static str> {
            if self.0.load(Ordering::Relaxed) {
                Ok(())
            } else {
                Err("not yet")
            }
        }
    }

    async fn get(addr: SocketAddr, path: &str) -> String {
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).await.unwrap();
        response
    }

    #[tokio::test]
    async fn serves_the_probes_until_shutdown() {
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let probes = Arc::new(Fake(AtomicBool::new(false)));
        let (tx, rx) = watch::channel(false);
        let server = spawn_server(addr, probes.clone(), rx).await.unwrap();
        assert!(
            spawn_server(addr, probes.clone(), tx.subscribe())
                .await
                .is_err()
        );

        let livez = get(addr, "/livez").await;
        assert!(
            livez.starts_with("HTTP/1.1 200") && livez.ends_with("ok"),
            "{livez}"
        );
        let readyz = get(addr, "/readyz").await;
        assert!(
            readyz.starts_with("HTTP/1.1 503") && readyz.ends_with("not yet"),
            "{readyz}"
        );
        probes.0.store(true, Ordering::Relaxed);
        let readyz = get(addr, "/readyz").await;
        assert!(
            readyz.starts_with("HTTP/1.1 200") && readyz.ends_with("ok"),
            "{readyz}"
        );
        let metrics = get(addr, "/metrics").await;
        assert!(
            metrics.contains("application/openmetrics-text; version=1.0.0"),
            "{metrics}"
        );
        assert!(metrics.ends_with("# EOF\n"), "{metrics}");

        tx.send_replace(true);
        server.await.unwrap().unwrap();
    }
}
