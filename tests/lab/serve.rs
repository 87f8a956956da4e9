//! `lab serve`: the process that runs inside each endpoint's network namespace. It answers
//! TCP and UDP on the ports it is told to (echo), and it is the client end of every probe that
//! starts in its namespace: the parent sends it requests as JSON lines on stdin and reads the
//! replies on stdout, so a probe costs no process start and its timeout is measured where the
//! packets are. It exits when stdin closes (its parent is gone).

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::io::{self, BufRead, Write as _};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream, UdpSocket};
use tokio::sync::{Mutex, mpsc};
use tokio::time::timeout;

/// What a probe sends: TCP or UDP to a port, or an ICMP echo.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Target {
    Tcp(u16),
    Udp(u16),
    Icmp,
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Tcp(p) => write!(f, "tcp:{p}"),
            Target::Udp(p) => write!(f, "udp:{p}"),
            Target::Icmp => write!(f, "icmp"),
        }
    }
}

impl FromStr for Target {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("{s:?} is not tcp:PORT, udp:PORT or icmp");
        if s.eq_ignore_ascii_case("icmp") {
            return Ok(Target::Icmp);
        }
        let (proto, port) = s.split_once(':').ok_or_else(bad)?;
        let port: u16 = port.parse().map_err(|_| bad())?;
        match proto.to_ascii_lowercase().as_str() {
            "tcp" => Ok(Target::Tcp(port)),
            "udp" => Ok(Target::Udp(port)),
            _ => Err(bad()),
        }
    }
}

impl serde::Serialize for Target {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Target {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl Target {
    pub fn port(self) -> u16 {
        match self {
            Target::Tcp(p) | Target::Udp(p) => p,
            Target::Icmp => 0,
        }
    }
}

/// What a probe measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// The flow passed both ways: TCP connected and echoed, the UDP echo or ICMP reply came.
    Allowed,
    /// Nothing came back within the timeout: what a dropped flow looks like.
    NoAnswer,
    /// A TCP reset or ICMP port unreachable: the packet reached the far end, nobody listened.
    Refused,
    /// An ICMP host/network unreachable.
    Unreachable,
    /// Anything else (a local error, a wrong echo); the detail says what.
    Error,
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Outcome::Allowed => "allowed",
            Outcome::NoAnswer => "no answer",
            Outcome::Refused => "refused",
            Outcome::Unreachable => "unreachable",
            Outcome::Error => "error",
        })
    }
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Op {
    /// Start answering on a port (idempotent).
    Listen {
        target: Target,
    },
    /// Send one new flow.
    Probe {
        target: Target,
        dst: IpAddr,
        src_port: u16,
        timeout_ms: u64,
    },
    /// Open a TCP connection and keep it, as `conn`.
    HoldOpen {
        conn: u64,
        dst: IpAddr,
        port: u16,
        src_port: u16,
        timeout_ms: u64,
    },
    /// Send data over a held connection and wait for its echo.
    HoldCheck {
        conn: u64,
        timeout_ms: u64,
    },
    HoldClose {
        conn: u64,
    },
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Request {
    pub id: u64,
    #[serde(flatten)]
    pub op: Op,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Reply {
    pub id: u64,
    pub outcome: Outcome,
    /// Time from the first packet to the answer (or to the timeout).
    pub micros: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

#[derive(Default)]
struct Serve {
    listening: Mutex<BTreeSet<Target>>,
    held: Mutex<HashMap<u64, Arc<Mutex<TcpStream>>>>,
}

/// Runs the server: listeners for `tcp` and `udp` ports, then requests from stdin until it
/// closes (or forever with `standalone`).
pub async fn run(tcp: &[u16], udp: &[u16], standalone: bool) -> io::Result<()> {
    let serve = Arc::new(Serve::default());
    for target in tcp
        .iter()
        .map(|&p| Target::Tcp(p))
        .chain(udp.iter().map(|&p| Target::Udp(p)))
    {
        serve.listen(target).await?;
    }
    if standalone {
        std::future::pending::<()>().await;
    }
    // Plain threads for stdin and stdout (tokio's stdio needs a feature this crate does not
    // enable, and blocking reads belong on a thread anyway).
    let (out_tx, out_rx) = std::sync::mpsc::channel::<Reply>();
    std::thread::spawn(move || {
        let mut out = std::io::stdout().lock();
        for reply in out_rx {
            let line = serde_json::to_string(&reply).expect("reply serializes");
            if writeln!(out, "{line}").and_then(|_| out.flush()).is_err() {
                break;
            }
        }
    });
    let (in_tx, mut in_rx) = mpsc::unbounded_channel::<String>();
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines() {
            let Ok(line) = line else { break };
            if in_tx.send(line).is_err() {
                break;
            }
        }
    });
    while let Some(line) = in_rx.recv().await {
        let request: Request = match serde_json::from_str(&line) {
            Ok(r) => r,
            Err(e) => {
                eprintln!("lab serve: bad request {line:?}: {e}");
                continue;
            }
        };
        let serve = serve.clone();
        let out_tx = out_tx.clone();
        tokio::spawn(async move {
            let _ = out_tx.send(serve.handle(request).await);
        });
    }
    // Stdin closed: the parent is gone or done. Pending probes are abandoned.
    Ok(())
}

fn unspecified(v6: bool) -> IpAddr {
    if v6 {
        IpAddr::V6(Ipv6Addr::UNSPECIFIED)
    } else {
        IpAddr::V4(Ipv4Addr::UNSPECIFIED)
    }
}

fn classify(e: &io::Error) -> Outcome {
    match e.kind() {
        io::ErrorKind::ConnectionRefused | io::ErrorKind::ConnectionReset => Outcome::Refused,
        io::ErrorKind::HostUnreachable | io::ErrorKind::NetworkUnreachable => Outcome::Unreachable,
        io::ErrorKind::TimedOut => Outcome::NoAnswer,
        _ => Outcome::Error,
    }
}

fn token(id: u64) -> Vec<u8> {
    format!("kube-nsg lab probe {id}\n").into_bytes()
}

type Measured = (Outcome, Option<String>);

impl Serve {
    async fn handle(&self, request: Request) -> Reply {
        let start = Instant::now();
        let (outcome, detail) = match request.op {
            Op::Listen { target } => match self.listen(target).await {
                Ok(()) => (Outcome::Allowed, None),
                Err(e) => (Outcome::Error, Some(format!("listen on {target}: {e}"))),
            },
            Op::Probe {
                target,
                dst,
                src_port,
                timeout_ms,
            } => {
                let t = Duration::from_millis(timeout_ms);
                match target {
                    Target::Tcp(port) => {
                        match connect(dst, port, src_port, t).await {
                            Ok(mut stream) => {
                                let r = echo(
                                    &mut stream,
                                    request.id,
                                    t.saturating_sub(start.elapsed()),
                                )
                                .await;
                                // A reset, not a FIN: no TIME_WAIT left behind on either end.
                                let _ = stream.set_zero_linger();
                                r
                            }
                            Err(m) => m,
                        }
                    }
                    Target::Udp(port) => udp_probe(dst, port, src_port, request.id, t).await,
                    Target::Icmp => ping(dst, t).await,
                }
            }
            Op::HoldOpen {
                conn,
                dst,
                port,
                src_port,
                timeout_ms,
            } => {
                let t = Duration::from_millis(timeout_ms);
                match connect(dst, port, src_port, t).await {
                    Ok(mut stream) => {
                        let r =
                            echo(&mut stream, request.id, t.saturating_sub(start.elapsed())).await;
                        if r.0 == Outcome::Allowed {
                            self.held
                                .lock()
                                .await
                                .insert(conn, Arc::new(Mutex::new(stream)));
                        }
                        r
                    }
                    Err(m) => m,
                }
            }
            Op::HoldCheck { conn, timeout_ms } => {
                let stream = self.held.lock().await.get(&conn).cloned();
                match stream {
                    Some(stream) => {
                        let mut stream = stream.lock().await;
                        echo(&mut stream, request.id, Duration::from_millis(timeout_ms)).await
                    }
                    None => (Outcome::Error, Some(format!("no held connection {conn}"))),
                }
            }
            Op::HoldClose { conn } => {
                if let Some(stream) = self.held.lock().await.remove(&conn) {
                    let _ = stream.lock().await.set_zero_linger();
                }
                (Outcome::Allowed, None)
            }
        };
        Reply {
            id: request.id,
            outcome,
            micros: start.elapsed().as_micros() as u64,
            detail,
        }
    }

    async fn listen(&self, target: Target) -> io::Result<()> {
        let mut listening = self.listening.lock().await;
        if listening.contains(&target) {
            return Ok(());
        }
        let result = match target {
            Target::Tcp(port) => tcp_listener(port).map(|l| {
                tokio::spawn(tcp_echo_server(l));
            }),
            Target::Udp(port) => udp_socket(port).await.map(|s| {
                tokio::spawn(udp_echo_server(s));
            }),
            Target::Icmp => Ok(()), // the kernel answers
        };
        match result {
            Ok(()) => {}
            // Another lab process in this namespace already answers on the port (a CLI
            // probe next to a library lab): the echo service is there, which is what counts.
            Err(e) if e.kind() == io::ErrorKind::AddrInUse => {}
            Err(e) => return Err(e),
        }
        listening.insert(target);
        Ok(())
    }
}

/// A dual-stack listener on `[::]`, or IPv4 only where IPv6 is off.
fn tcp_listener(port: u16) -> io::Result<TcpListener> {
    let bind = |v6: bool| -> io::Result<TcpListener> {
        let s = if v6 {
            TcpSocket::new_v6()?
        } else {
            TcpSocket::new_v4()?
        };
        s.set_reuseaddr(true)?;
        s.bind(SocketAddr::new(unspecified(v6), port))?;
        s.listen(1024)
    };
    match bind(true) {
        Err(e) if e.kind() != io::ErrorKind::AddrInUse => bind(false),
        r => r,
    }
}

async fn udp_socket(port: u16) -> io::Result<UdpSocket> {
    match UdpSocket::bind(SocketAddr::new(unspecified(true), port)).await {
        Err(e) if e.kind() != io::ErrorKind::AddrInUse => {
            UdpSocket::bind(SocketAddr::new(unspecified(false), port)).await
        }
        r => r,
    }
}

async fn tcp_echo_server(listener: TcpListener) {
    loop {
        let Ok((mut stream, _)) = listener.accept().await else {
            continue;
        };
        tokio::spawn(async move {
            let (mut r, mut w) = stream.split();
            let _ = tokio::io::copy(&mut r, &mut w).await;
        });
    }
}

async fn udp_echo_server(socket: UdpSocket) {
    let mut buf = vec![0u8; 65536];
    loop {
        if let Ok((n, peer)) = socket.recv_from(&mut buf).await {
            let _ = socket.send_to(&buf[..n], peer).await;
        }
    }
}

/// Connects from `src_port`; the error is the measured outcome.
async fn connect(
    dst: IpAddr,
    port: u16,
    src_port: u16,
    t: Duration,
) -> Result<TcpStream, Measured> {
    let local = |e: io::Error| (Outcome::Error, Some(format!("local socket: {e}")));
    let socket = if dst.is_ipv6() {
        TcpSocket::new_v6()
    } else {
        TcpSocket::new_v4()
    }
    .map_err(local)?;
    socket.set_reuseaddr(true).map_err(local)?;
    socket
        .bind(SocketAddr::new(unspecified(dst.is_ipv6()), src_port))
        .map_err(local)?;
    match timeout(t, socket.connect(SocketAddr::new(dst, port))).await {
        Err(_) => Err((Outcome::NoAnswer, None)),
        Ok(Err(e)) => Err((classify(&e), Some(e.to_string()))),
        Ok(Ok(stream)) => Ok(stream),
    }
}

/// Sends a token over a connected stream and waits for it to come back.
async fn echo(stream: &mut TcpStream, id: u64, t: Duration) -> Measured {
    let token = token(id);
    let exchange = async {
        stream.write_all(&token).await?;
        let mut back = vec![0u8; token.len()];
        stream.read_exact(&mut back).await?;
        Ok::<_, io::Error>(back)
    };
    match timeout(t, exchange).await {
        Err(_) => (
            Outcome::NoAnswer,
            Some("connected, but the echo did not come back in time".into()),
        ),
        Ok(Err(e)) => (classify(&e), Some(format!("connected, then: {e}"))),
        Ok(Ok(back)) if back == token => (Outcome::Allowed, None),
        Ok(Ok(back)) => (
            Outcome::Error,
            Some(format!("wrong echo {:?}", String::from_utf8_lossy(&back))),
        ),
    }
}

async fn udp_probe(dst: IpAddr, port: u16, src_port: u16, id: u64, t: Duration) -> Measured {
    let socket = match UdpSocket::bind(SocketAddr::new(unspecified(dst.is_ipv6()), src_port)).await
    {
        Ok(s) => s,
        Err(e) => return (Outcome::Error, Some(format!("local socket: {e}"))),
    };
    let token = token(id);
    let exchange = async {
        socket.connect(SocketAddr::new(dst, port)).await?;
        socket.send(&token).await?;
        let mut back = vec![0u8; 2048];
        let n = socket.recv(&mut back).await?;
        back.truncate(n);
        Ok::<_, io::Error>(back)
    };
    match timeout(t, exchange).await {
        Err(_) => (Outcome::NoAnswer, None),
        Ok(Err(e)) => (classify(&e), Some(e.to_string())),
        Ok(Ok(back)) if back == token => (Outcome::Allowed, None),
        Ok(Ok(back)) => (
            Outcome::Error,
            Some(format!("wrong echo {:?}", String::from_utf8_lossy(&back))),
        ),
    }
}

/// One ICMP echo with `ping`: each run is a new ICMP id, so a new flow for conntrack.
async fn ping(dst: IpAddr, t: Duration) -> Measured {
    let wait = format!("{:.3}", t.as_secs_f64().max(0.001));
    let run = tokio::process::Command::new("ping")
        .args(["-c1", "-n", "-q", "-W", &wait, &dst.to_string()])
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    match timeout(t + Duration::from_secs(2), run).await {
        Err(_) => (Outcome::NoAnswer, Some("ping did not exit".into())),
        Ok(Err(e)) => (Outcome::Error, Some(format!("running ping: {e}"))),
        Ok(Ok(out)) => match out.status.code() {
            Some(0) => (Outcome::Allowed, None),
            Some(1) => (Outcome::NoAnswer, None),
            _ => (
                Outcome::Error,
                Some(format!(
                    "ping: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                )),
            ),
        },
    }
}
