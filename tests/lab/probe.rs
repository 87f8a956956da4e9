//! The connectivity matrix: one new flow per ordered pair of endpoints and target, measured
//! with real packets, each compared with an expectation (normally the reference evaluator's).

use std::fmt::Write as _;
use std::net::IpAddr;
use std::time::Duration;

use kube_nsg::eval::{FlowVerdict, Packet, StageVerdict, Verdict, evaluate_flow};
use kube_nsg::model::{Access, Protocol};
use kube_nsg::resolve::Resolved;

use super::serve::{Op, Outcome, Target};
use super::server::Server;

#[derive(Debug, Clone)]
pub struct ProbeSpec {
    pub targets: Vec<Target>,
    /// How long a first attempt waits for an answer.
    pub timeout: Duration,
    /// How long the one retry of an unexpected failure waits.
    pub retry_timeout: Duration,
    /// Probes in flight at once.
    pub concurrency: usize,
    /// Include the Internet stand-in as a source and a destination.
    pub internet: bool,
    /// Only these endpoints (`namespace/name`, `internet`) as sources and destinations;
    /// `None`: all.
    pub endpoints: Option<Vec<String>>,
}

impl Default for ProbeSpec {
    fn default() -> Self {
        ProbeSpec {
            targets: vec![
                Target::Tcp(80),
                Target::Tcp(1433),
                Target::Udp(53),
                Target::Icmp,
            ],
            timeout: Duration::from_millis(300),
            retry_timeout: Duration::from_millis(1000),
            concurrency: 64,
            internet: true,
            endpoints: None,
        }
    }
}

/// What a flow should do, and why.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Expectation {
    pub access: Access,
    /// The deciding rules, for people.
    pub reason: String,
    /// The evaluator's full answer, when it is the source.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub verdict: Option<FlowVerdict>,
}

impl Expectation {
    pub fn allow(reason: impl Into<String>) -> Self {
        Expectation {
            access: Access::Allow,
            reason: reason.into(),
            verdict: None,
        }
    }

    pub fn deny(reason: impl Into<String>) -> Self {
        Expectation {
            access: Access::Deny,
            reason: reason.into(),
            verdict: None,
        }
    }

    /// The reference evaluator's verdict for the flow.
    pub fn oracle(res: &Resolved, packet: &Packet) -> Self {
        let verdict = evaluate_flow(res, packet);
        Expectation {
            access: verdict.access,
            reason: describe(&verdict),
            verdict: Some(verdict),
        }
    }
}

fn describe_stage(s: &StageVerdict) -> String {
    format!(
        "{:?} {} {:?} {} ({})",
        s.level, s.nsg, s.access, s.rule, s.priority
    )
}

fn describe_direction(label: &str, v: &Option<Verdict>) -> Option<String> {
    let v = v.as_ref()?;
    Some(if v.stages.is_empty() {
        format!("{label}: no group")
    } else {
        let stages: Vec<_> = v.stages.iter().map(describe_stage).collect();
        format!("{label}: {}", stages.join(", then "))
    })
}

/// "out: ...; in: ..." with the stage verdicts, in evaluation order.
pub fn describe(v: &FlowVerdict) -> String {
    let parts: Vec<String> = [
        describe_direction("out", &v.outbound),
        describe_direction("in", &v.inbound),
    ]
    .into_iter()
    .flatten()
    .collect();
    if parts.is_empty() {
        "no group on either end".into()
    } else {
        parts.join("; ")
    }
}

/// One try at a flow.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Attempt {
    pub src_port: u16,
    pub outcome: Outcome,
    pub micros: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct ProbeResult {
    pub src: String,
    pub dst: String,
    pub target: Target,
    /// The last attempt's first packet.
    pub packet: Packet,
    /// For that packet.
    pub expected: Expectation,
    /// The last attempt's outcome.
    pub measured: Outcome,
    pub attempts: Vec<Attempt>,
    pub mismatch: bool,
}

impl ProbeResult {
    pub fn describe(&self) -> String {
        let last = self.attempts.last().expect("at least one attempt");
        let mut s = format!(
            "{} {} {} -> {} {}: expected {:?} ({}), measured {}",
            self.target,
            self.src,
            endpoint(self.packet.src, self.packet.src_port, self.target),
            self.dst,
            endpoint(self.packet.dst, self.packet.dst_port, self.target),
            self.expected.access,
            self.expected.reason,
            self.measured,
        );
        if let Some(d) = &last.detail {
            let _ = write!(s, " ({d})");
        }
        let _ = write!(
            s,
            " after {:.1} ms, {} attempt{}",
            last.micros as f64 / 1000.0,
            self.attempts.len(),
            if self.attempts.len() == 1 { "" } else { "s" }
        );
        s
    }
}

fn endpoint(ip: IpAddr, port: u16, target: Target) -> String {
    match (target, ip) {
        (Target::Icmp, _) => ip.to_string(),
        (_, IpAddr::V4(_)) => format!("{ip}:{port}"),
        (_, IpAddr::V6(_)) => format!("[{ip}]:{port}"),
    }
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct ProbeReport {
    /// Endpoint names, in matrix order.
    pub endpoints: Vec<String>,
    pub targets: Vec<Target>,
    pub results: Vec<ProbeResult>,
    pub mismatches: Vec<ProbeResult>,
    pub elapsed_ms: u64,
}

/// Whether a measurement is what the expectation says: allowed means the flow passed both
/// ways; denied means no answer at all (a reset or an unreachable means packets got through
/// to something, or the lab is broken: never a match).
pub fn matches(expected: Access, measured: Outcome) -> bool {
    match expected {
        Access::Allow => measured == Outcome::Allowed,
        Access::Deny => measured == Outcome::NoAnswer,
    }
}

/// Whether to try again: only an unexpected failure that could be the machine being slow.
/// An unexpected success, or a reset where a drop was expected, is evidence; never retried.
pub fn worth_retrying(expected: Access, measured: Outcome) -> bool {
    match expected {
        Access::Allow => measured != Outcome::Allowed,
        Access::Deny => measured == Outcome::Error,
    }
}

pub fn packet(target: Target, src: IpAddr, src_port: u16, dst: IpAddr) -> Packet {
    let (protocol, src_port) = match target {
        Target::Tcp(_) => (Protocol::Tcp, src_port),
        Target::Udp(_) => (Protocol::Udp, src_port),
        Target::Icmp => (Protocol::Icmp, 0),
    };
    Packet {
        protocol,
        src,
        src_port,
        dst,
        dst_port: target.port(),
    }
}

/// One attempt from `server` (in the source's namespace).
pub async fn attempt(server: &Server, target: Target, packet: &Packet, t: Duration) -> Attempt {
    let reply = server
        .call(Op::Probe {
            target,
            dst: packet.dst,
            src_port: packet.src_port,
            timeout_ms: t.as_millis() as u64,
        })
        .await;
    Attempt {
        src_port: packet.src_port,
        outcome: reply.outcome,
        micros: reply.micros,
        detail: reply.detail,
    }
}

/// A flow of the matrix, before it is measured.
pub struct Flow {
    pub src: usize,
    pub dst: usize,
    pub target: Target,
    pub src_ip: IpAddr,
    pub dst_ip: IpAddr,
}

const LEGEND: &str = "A allowed, . no answer, R refused, U unreachable, E error, \
                      ! differs from expected, blank: not probed";

fn symbol(o: Outcome) -> char {
    match o {
        Outcome::Allowed => 'A',
        Outcome::NoAnswer => '.',
        Outcome::Refused => 'R',
        Outcome::Unreachable => 'U',
        Outcome::Error => 'E',
    }
}

impl ProbeReport {
    pub fn find(&self, src: &str, dst: &str, target: Target) -> Option<&ProbeResult> {
        self.results
            .iter()
            .find(|r| r.src == src && r.dst == dst && r.target == target)
    }

    pub fn retried(&self) -> usize {
        self.results.iter().filter(|r| r.attempts.len() > 1).count()
    }

    /// Per target, the measured matrix next to the expected one (rows: from, columns: to),
    /// then every mismatch with the deciding rules.
    pub fn table(&self) -> String {
        // Short labels: the pod name alone where that is unambiguous.
        let labels: Vec<String> = self
            .endpoints
            .iter()
            .map(|e| {
                let short = e.rsplit('/').next().unwrap_or(e);
                let unique = self
                    .endpoints
                    .iter()
                    .filter(|o| o.rsplit('/').next() == Some(short))
                    .count()
                    == 1;
                if unique { short.to_string() } else { e.clone() }
            })
            .collect();
        let row_w = labels.iter().map(|l| l.len()).max().unwrap_or(4).max(9);
        let col_w: Vec<usize> = labels.iter().map(|l| l.len().max(2)).collect();
        let matrix_w: usize = col_w.iter().map(|w| w + 1).sum();
        let mut out = String::new();
        for &target in &self.targets {
            let cell = |src: usize, dst: usize, measured: bool| -> String {
                let r = self.results.iter().find(|r| {
                    r.target == target
                        && r.src == self.endpoints[src]
                        && r.dst == self.endpoints[dst]
                });
                match r {
                    None => String::new(),
                    Some(r) if measured => {
                        let mut s = symbol(r.measured).to_string();
                        if r.mismatch {
                            s.push('!');
                        }
                        s
                    }
                    Some(r) => match r.expected.access {
                        Access::Allow => "A".into(),
                        Access::Deny => ".".into(),
                    },
                }
            };
            let _ = writeln!(
                out,
                "{:<row_w$}  {:<matrix_w$}   expected",
                target.to_string(),
                "measured"
            );
            let mut header = format!("{:<row_w$}  ", "from \\ to");
            for _ in 0..2 {
                for (l, w) in labels.iter().zip(&col_w) {
                    let _ = write!(header, "{l:<w$} ");
                }
                header.push_str("   ");
            }
            let _ = writeln!(out, "{}", header.trim_end());
            for (src, label) in labels.iter().enumerate() {
                let mut line = format!("{label:<row_w$}  ");
                for measured in [true, false] {
                    for (dst, w) in col_w.iter().enumerate() {
                        let _ = write!(line, "{:<w$} ", cell(src, dst, measured));
                    }
                    line.push_str("   ");
                }
                let _ = writeln!(out, "{}", line.trim_end());
            }
            out.push('\n');
        }
        let _ = writeln!(out, "{LEGEND}");
        let _ = writeln!(
            out,
            "{} flows in {:.2} s ({} retried): {} mismatch{}",
            self.results.len(),
            self.elapsed_ms as f64 / 1000.0,
            self.retried(),
            self.mismatches.len(),
            if self.mismatches.len() == 1 { "" } else { "es" }
        );
        for m in &self.mismatches {
            let _ = writeln!(out, "MISMATCH {}", m.describe());
        }
        out
    }
}
