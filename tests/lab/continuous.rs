//! Watching a flow over time: a background prober that opens a new flow every few
//! milliseconds and records every wrong verdict (for "an agent restart leaks no denied packet
//! and breaks no allowed flow"), and a held TCP connection that can be checked later (for
//! "removing a rule does not cut established connections").

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use kube_nsg::eval::{Packet, evaluate_flow};
use kube_nsg::model::{Access, Inventory};
use kube_nsg::resolve::Resolved;
use tokio::sync::watch;
use tokio::task::JoinSet;

use super::probe::{Attempt, attempt, matches, packet};
use super::serve::{Op, Outcome, Target};
use super::server::Server;
use super::state::PortAllocator;

/// What a flow should do; called for every new flow (its source port differs each time).
pub type Expect = Arc<dyn Fn(&Packet) -> Access + Send + Sync>;

/// The same answer for every flow.
pub fn always(access: Access) -> Expect {
    Arc::new(move |_| access)
}

/// The reference evaluator on an inventory.
pub fn oracle(inventory: Inventory) -> Expect {
    Arc::new(move |p| evaluate_flow(&Resolved::new(&inventory), p).access)
}

#[derive(Debug, Clone)]
pub struct ContinuousSpec {
    pub src: String,
    pub dst: String,
    pub target: Target,
    /// IPv6 instead of IPv4.
    pub v6: bool,
    /// A new flow this often.
    pub interval: Duration,
    /// How long each flow waits for its answer. No retries here: a flow that fails during a
    /// restart is exactly what this looks for, so the timeout is generous instead.
    pub timeout: Duration,
}

impl ContinuousSpec {
    pub fn new(src: &str, dst: &str, target: Target) -> Self {
        ContinuousSpec {
            src: src.into(),
            dst: dst.into(),
            target,
            v6: false,
            interval: Duration::from_millis(20),
            timeout: Duration::from_millis(1000),
        }
    }
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct WrongVerdict {
    /// When the flow started, from the start of the prober.
    pub at_ms: u64,
    pub expected: Access,
    pub attempt: Attempt,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct ContinuousReport {
    pub sent: u64,
    pub correct: u64,
    pub wrong: Vec<WrongVerdict>,
    pub elapsed_ms: u64,
}

/// A running background prober; `stop` it to get the report.
pub struct ContinuousProbe {
    stop: watch::Sender<bool>,
    sent: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<ContinuousReport>,
}

impl ContinuousProbe {
    pub(super) fn start(
        server: Arc<Server>,
        ports: Arc<PortAllocator>,
        src_ip: IpAddr,
        dst_ip: IpAddr,
        spec: ContinuousSpec,
        expect: Expect,
    ) -> ContinuousProbe {
        let (stop, mut stopped) = watch::channel(false);
        let sent = Arc::new(AtomicU64::new(0));
        let counter = sent.clone();
        let task = tokio::spawn(async move {
            let start = Instant::now();
            let mut flows = JoinSet::new();
            let mut ticks = tokio::time::interval(spec.interval);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut report = ContinuousReport {
                sent: 0,
                correct: 0,
                wrong: vec![],
                elapsed_ms: 0,
            };
            let mut record = |r: Result<(u64, Access, Attempt), tokio::task::JoinError>| {
                if let Ok((at_ms, expected, attempt)) = r {
                    if matches(expected, attempt.outcome) {
                        report.correct += 1;
                    } else {
                        report.wrong.push(WrongVerdict {
                            at_ms,
                            expected,
                            attempt,
                        });
                    }
                }
            };
            loop {
                tokio::select! {
                    _ = stopped.changed() => break,
                    _ = ticks.tick() => {
                        let port = ports.next();
                        let p = packet(spec.target, src_ip, port, dst_ip);
                        let expected = expect(&p);
                        let server = server.clone();
                        let at_ms = start.elapsed().as_millis() as u64;
                        counter.fetch_add(1, Ordering::Relaxed);
                        flows.spawn(async move {
                            (at_ms, expected, attempt(&server, spec.target, &p, spec.timeout).await)
                        });
                    }
                    Some(r) = flows.join_next(), if !flows.is_empty() => record(r),
                }
            }
            while let Some(r) = flows.join_next().await {
                record(r);
            }
            report.sent = counter.load(Ordering::Relaxed);
            report.wrong.sort_by_key(|w| w.at_ms);
            report.elapsed_ms = start.elapsed().as_millis() as u64;
            report
        });
        ContinuousProbe { stop, sent, task }
    }

    /// Flows started so far.
    pub fn sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }

    /// Stops sending, waits for the flows in flight, and reports.
    pub async fn stop(self) -> ContinuousReport {
        let _ = self.stop.send(true);
        self.task
            .await
            .expect("the continuous prober does not panic")
    }
}

static NEXT_CONN: AtomicU64 = AtomicU64::new(1);

/// An established TCP connection kept open in the source's namespace.
pub struct HeldConnection {
    server: Arc<Server>,
    conn: u64,
    pub src: String,
    pub dst: String,
    pub packet: Packet,
}

impl HeldConnection {
    pub(super) async fn open(
        server: Arc<Server>,
        src: &str,
        dst: &str,
        packet: Packet,
        timeout: Duration,
    ) -> Result<HeldConnection, Attempt> {
        let conn = NEXT_CONN.fetch_add(1, Ordering::Relaxed);
        let reply = server
            .call(Op::HoldOpen {
                conn,
                dst: packet.dst,
                port: packet.dst_port,
                src_port: packet.src_port,
                timeout_ms: timeout.as_millis() as u64,
            })
            .await;
        if reply.outcome != Outcome::Allowed {
            return Err(Attempt {
                src_port: packet.src_port,
                outcome: reply.outcome,
                micros: reply.micros,
                detail: reply.detail,
            });
        }
        Ok(HeldConnection {
            server,
            conn,
            src: src.into(),
            dst: dst.into(),
            packet,
        })
    }

    /// Sends data and waits for its echo: `Allowed` while the connection still passes.
    pub async fn check(&self, timeout: Duration) -> Attempt {
        let reply = self
            .server
            .call(Op::HoldCheck {
                conn: self.conn,
                timeout_ms: timeout.as_millis() as u64,
            })
            .await;
        Attempt {
            src_port: self.packet.src_port,
            outcome: reply.outcome,
            micros: reply.micros,
            detail: reply.detail,
        }
    }

    pub async fn close(self) {
        self.server.call(Op::HoldClose { conn: self.conn }).await;
    }
}
