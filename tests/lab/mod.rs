//! The lab: the pods of some YAML as network namespaces on this machine, registered in a real
//! API server as running pods, and a prober that measures with real packets which flows pass
//! and compares each with the reference evaluator. See tests/lab/README.md.
//!
//! From an integration test: `#[path = "lab/mod.rs"] mod lab;`. As a program:
//! `cargo run --example lab -- up|probe|down ...` (tests/lab/cli.rs).
#![allow(dead_code, unused_imports)] // every user (test binaries, the example) uses its own part

pub mod cluster;
pub mod continuous;
pub mod net;
pub mod probe;
pub mod serve;
pub mod server;
pub mod state;

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::{Client, ResourceExt};
use kube_nsg::cli::load::Objects;
use kube_nsg::eval::Packet;
use kube_nsg::model::Inventory;
use kube_nsg::resolve::Resolved;

pub use continuous::{ContinuousProbe, ContinuousReport, ContinuousSpec, Expect, HeldConnection};
pub use net::{Endpoint, INTERNET, NODE_IP};
pub use probe::{Expectation, ProbeReport, ProbeResult, ProbeSpec};
pub use serve::{Outcome, Target};

use server::Server;
use state::{LabLock, PortAllocator, State};

#[derive(Debug, thiserror::Error)]
pub enum LabError {
    #[error("{command}: {message}")]
    Command { command: String, message: String },
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("{what}: {source}")]
    Kube {
        what: String,
        source: Box<kube::Error>,
    },
    #[error("{0}")]
    Other(String),
}

#[derive(Debug, Clone)]
pub struct LabConfig {
    /// The Node registered for this machine; every Pod is bound to it.
    pub node_name: String,
    /// Its InternalIP, on the `nsglab0` dummy interface.
    pub node_ip: Ipv4Addr,
    /// Create the Internet stand-in.
    pub internet: bool,
}

impl Default for LabConfig {
    fn default() -> Self {
        LabConfig {
            node_name: "lab-node".into(),
            node_ip: NODE_IP,
            internet: true,
        }
    }
}

/// The pods of the YAML and the Internet stand-in, as this machine runs them.
pub struct Lab {
    pub config: LabConfig,
    /// Pods in file order, then the Internet stand-in.
    pub endpoints: Vec<Endpoint>,
    client: Option<Client>,
    servers: tokio::sync::Mutex<BTreeMap<String, Arc<Server>>>,
    listening: tokio::sync::Mutex<BTreeSet<Target>>,
    ports: Arc<PortAllocator>,
    /// Held by a lab that `up` made; such a lab cleans up when dropped.
    lock: Option<LabLock>,
}

/// The pods of the YAML (with their API objects) and the namespaces to create.
struct Plan {
    endpoints: Vec<Endpoint>,
    pods: Vec<(Pod, Vec<IpAddr>)>,
    namespaces: Vec<Namespace>,
}

fn plan(paths: &[PathBuf], config: &LabConfig) -> Result<Plan, LabError> {
    let objects = Objects::read(paths).map_err(|e| LabError::Other(e.to_string()))?;
    let mut endpoints = Vec::new();
    let mut pods = Vec::new();
    let mut namespaces: BTreeMap<String, Namespace> = BTreeMap::new();
    for ns in &objects.namespaces {
        namespaces.insert(ns.name_any(), ns.clone());
    }
    for pod in &objects.pods {
        if pod.spec.as_ref().and_then(|s| s.host_network) == Some(true) {
            continue; // the host's own network: nothing to create
        }
        let namespace = pod.namespace().unwrap_or_else(|| "default".into());
        let Some(model) = kube_nsg::api::pod_from_api(pod) else {
            return Err(LabError::Other(format!(
                "pod {namespace}/{} has no status.podIP (or podIPs) to give its namespace",
                pod.name_any()
            )));
        };
        endpoints.push(Endpoint::for_pod(
            &namespace,
            &pod.name_any(),
            model.ips.clone(),
        ));
        pods.push((pod.clone(), model.ips));
        namespaces
            .entry(namespace.clone())
            .or_insert_with(|| Namespace {
                metadata: kube::api::ObjectMeta {
                    name: Some(namespace),
                    ..Default::default()
                },
                ..Default::default()
            });
    }
    if config.internet {
        let v6 = endpoints.iter().any(|e| e.ips.iter().any(IpAddr::is_ipv6));
        endpoints.push(Endpoint::internet(v6));
    }
    net::check_addresses(&endpoints)?;
    Ok(Plan {
        endpoints,
        pods,
        namespaces: namespaces.into_values().collect(),
    })
}

impl Lab {
    /// `up` with the default configuration.
    pub async fn up(paths: &[PathBuf], client: &Client) -> Result<Lab, LabError> {
        Lab::up_with(paths, Some(client.clone()), LabConfig::default()).await
    }

    /// Makes the machine and the API match the YAML's pods: blackholes first, then the node
    /// IP and forwarding, the namespaces and veths, then (with a client) the Node, Namespaces
    /// and Pods. Idempotent; removes endpoints and Pods of an earlier lab that the YAML no
    /// longer has. Waits while another lab on this machine is alive. The lab is torn down by
    /// `down`, or when dropped.
    pub async fn up_with(
        paths: &[PathBuf],
        client: Option<Client>,
        config: LabConfig,
    ) -> Result<Lab, LabError> {
        let plan = plan(paths, &config)?;
        let lock = LabLock::acquire()?;
        let lab = Lab {
            config,
            endpoints: plan.endpoints.clone(),
            client,
            servers: Default::default(),
            listening: Default::default(),
            ports: Default::default(),
            lock: Some(lock),
        };
        // From here on, a failure drops `lab`, which cleans up what was done.
        let mut state = State::load()?;
        let v6 = lab
            .endpoints
            .iter()
            .any(|e| e.ips.iter().any(IpAddr::is_ipv6));
        net::host_up(&mut state, v6)?;
        let stale: Vec<(String, String)> = state
            .endpoints
            .iter()
            .filter(|(ns, _)| !lab.endpoints.iter().any(|e| &e.netns == *ns))
            .map(|(a, b)| (a.clone(), b.clone()))
            .collect();
        for (netns, veth) in stale {
            net::endpoint_down(&netns, &veth)?;
            state.endpoints.remove(&netns);
            state.save()?;
        }
        let existing = net::existing_netns()?;
        for ep in &lab.endpoints {
            net::endpoint_up(&mut state, ep, &existing)?;
        }
        if let Some(client) = &lab.client {
            let node = &lab.config.node_name;
            let node_ip = IpAddr::V4(lab.config.node_ip);
            state.node_name = Some(node.clone());
            let wanted: BTreeSet<String> = plan
                .pods
                .iter()
                .map(|(p, _)| format!("{}/{}", p.namespace().unwrap_or_default(), p.name_any()))
                .collect();
            state.pods.extend(wanted.iter().cloned());
            state.save()?;
            cluster::apply_node(client, node, node_ip).await?;
            cluster::delete_pods(client, node, |id| wanted.contains(id)).await?;
            for ns in &plan.namespaces {
                cluster::apply_namespace(client, ns).await?;
            }
            for ((pod, ips), ep) in plan.pods.iter().zip(&lab.endpoints) {
                cluster::apply_pod(client, pod, ips, node, node_ip, &ep.netns).await?;
            }
            state.pods = wanted;
            state.save()?;
        }
        Ok(lab)
    }

    /// The lab of these files as it already runs (made by `lab up`, another process): for
    /// probing only; changes nothing and cleans nothing up.
    pub fn attach(paths: &[PathBuf], config: LabConfig) -> Result<Lab, LabError> {
        let plan = plan(paths, &config)?;
        let existing = net::existing_netns()?;
        if let Some(missing) = plan.endpoints.iter().find(|e| !existing.contains(&e.netns)) {
            return Err(LabError::Other(format!(
                "network namespace {} (of {}) does not exist: run `lab up` with the same files",
                missing.netns, missing.name
            )));
        }
        Ok(Lab {
            config,
            endpoints: plan.endpoints,
            client: None,
            servers: Default::default(),
            listening: Default::default(),
            ports: Default::default(),
            lock: None,
        })
    }

    /// Leaves the lab up when this handle goes (the CLI's `up`); `down` removes it later.
    pub fn keep(mut self) {
        self.lock.take();
    }

    pub fn endpoint(&self, name: &str) -> Result<&Endpoint, LabError> {
        self.endpoints
            .iter()
            .find(|e| e.name == name)
            .ok_or_else(|| LabError::Other(format!("no endpoint {name} in the lab")))
    }

    /// The inventory of these files with the lab's cluster ranges and node IP: what the
    /// evaluator needs to say what each flow here should do.
    pub fn inventory(&self, paths: &[PathBuf]) -> Result<Inventory, LabError> {
        let vnet = net::VIRTUAL_NETWORK
            .iter()
            .map(|r| r.parse().unwrap())
            .collect::<Vec<_>>();
        Objects::read(paths)
            .map_err(|e| LabError::Other(e.to_string()))?
            .into_inventory(&vnet, &[IpAddr::V4(self.config.node_ip)])
            .map_err(|errors| {
                LabError::Other(
                    errors
                        .iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join("\n"),
                )
            })
    }

    /// The server in an endpoint's namespace, started on first use.
    async fn server(&self, ep: &Endpoint) -> Result<Arc<Server>, LabError> {
        let mut servers = self.servers.lock().await;
        if let Some(s) = servers.get(&ep.netns) {
            return Ok(s.clone());
        }
        let s = Server::start(&ep.netns).await?;
        for &t in self.listening.lock().await.iter() {
            s.listen(t).await?;
        }
        servers.insert(ep.netns.clone(), s.clone());
        Ok(s)
    }

    /// Every endpoint answers on every target from now on.
    pub async fn listen(&self, targets: &[Target]) -> Result<(), LabError> {
        let new: Vec<Target> = {
            let mut listening = self.listening.lock().await;
            targets
                .iter()
                .copied()
                .filter(|t| listening.insert(*t))
                .collect()
        };
        for t in &new {
            if t.port() != 0 {
                self.ports.avoid(t.port());
            }
        }
        let started: Vec<Arc<Server>> = self.servers.lock().await.values().cloned().collect();
        for s in started {
            for &t in &new {
                s.listen(t).await?;
            }
        }
        for ep in &self.endpoints {
            self.server(ep).await?;
        }
        Ok(())
    }

    /// The matrix, each flow expected to do what the reference evaluator says on `inventory`.
    pub async fn probe(
        &self,
        inventory: &Inventory,
        spec: &ProbeSpec,
    ) -> Result<ProbeReport, LabError> {
        let res = Resolved::new(inventory);
        self.probe_with(spec, &|p: &Packet| Expectation::oracle(&res, p))
            .await
    }

    /// The matrix against any expectation: one new flow per ordered pair of endpoints (the
    /// Internet stand-in included unless `spec.internet` is off), target and address family
    /// both ends have. An unexpected failure is retried once, with a new flow and the longer
    /// timeout; an unexpected success never is.
    pub async fn probe_with(
        &self,
        spec: &ProbeSpec,
        expect: &(dyn Fn(&Packet) -> Expectation + Sync),
    ) -> Result<ProbeReport, LabError> {
        let start = Instant::now();
        self.listen(&spec.targets).await?;
        if let Some(unknown) = spec
            .endpoints
            .iter()
            .flatten()
            .find(|n| self.endpoint(n).is_err())
        {
            return Err(LabError::Other(format!("no endpoint {unknown} in the lab")));
        }
        let endpoints: Vec<&Endpoint> = self
            .endpoints
            .iter()
            .filter(|e| spec.internet || !e.is_internet())
            .filter(|e| {
                spec.endpoints
                    .as_ref()
                    .is_none_or(|only| only.contains(&e.name))
            })
            .collect();
        let mut flows = Vec::new();
        for (s, src) in endpoints.iter().enumerate() {
            for (d, dst) in endpoints.iter().enumerate() {
                if s == d {
                    continue;
                }
                for v6 in [false, true] {
                    let (Some(src_ip), Some(dst_ip)) = (src.ip(v6), dst.ip(v6)) else {
                        continue;
                    };
                    for &target in &spec.targets {
                        flows.push(probe::Flow {
                            src: s,
                            dst: d,
                            target,
                            src_ip,
                            dst_ip,
                        });
                    }
                }
            }
        }
        let mut servers = Vec::new();
        for ep in &endpoints {
            servers.push(self.server(ep).await?);
        }
        let servers = &servers;
        let endpoints = &endpoints;
        let mut results: Vec<(usize, ProbeResult)> =
            futures::stream::iter(flows.into_iter().enumerate().map(|(i, f)| async move {
                let server = &servers[f.src];
                let mut attempts = Vec::new();
                let mut timeout = spec.timeout;
                loop {
                    let port = if f.target == Target::Icmp {
                        0
                    } else {
                        self.ports.next()
                    };
                    let packet = probe::packet(f.target, f.src_ip, port, f.dst_ip);
                    let expected = expect(&packet);
                    let a = probe::attempt(server, f.target, &packet, timeout).await;
                    let measured = a.outcome;
                    attempts.push(a);
                    let ok = probe::matches(expected.access, measured);
                    if ok || attempts.len() > 1 || !probe::worth_retrying(expected.access, measured)
                    {
                        return (
                            i,
                            ProbeResult {
                                src: endpoints[f.src].name.clone(),
                                dst: endpoints[f.dst].name.clone(),
                                target: f.target,
                                packet,
                                expected,
                                measured,
                                attempts,
                                mismatch: !ok,
                            },
                        );
                    }
                    timeout = spec.retry_timeout;
                }
            }))
            .buffer_unordered(spec.concurrency.max(1))
            .collect()
            .await;
        results.sort_by_key(|(i, _)| *i);
        let results: Vec<ProbeResult> = results.into_iter().map(|(_, r)| r).collect();
        Ok(ProbeReport {
            endpoints: endpoints.iter().map(|e| e.name.clone()).collect(),
            targets: spec.targets.clone(),
            mismatches: results.iter().filter(|r| r.mismatch).cloned().collect(),
            results,
            elapsed_ms: start.elapsed().as_millis() as u64,
        })
    }

    fn ips(&self, src: &str, dst: &str, v6: bool) -> Result<(IpAddr, IpAddr), LabError> {
        let (s, d) = (self.endpoint(src)?, self.endpoint(dst)?);
        match (s.ip(v6), d.ip(v6)) {
            (Some(a), Some(b)) => Ok((a, b)),
            _ => Err(LabError::Other(format!(
                "{src} and {dst} do not both have an IPv{} address",
                if v6 { 6 } else { 4 }
            ))),
        }
    }

    /// Starts a background prober: a new flow every `spec.interval` from `spec.src` to
    /// `spec.dst`, each checked against `expect`.
    pub async fn continuous_probe(
        &self,
        spec: ContinuousSpec,
        expect: Expect,
    ) -> Result<ContinuousProbe, LabError> {
        let (src_ip, dst_ip) = self.ips(&spec.src, &spec.dst, spec.v6)?;
        self.listen(&[spec.target]).await?;
        let server = self.server(self.endpoint(&spec.src)?).await?;
        Ok(ContinuousProbe::start(
            server,
            self.ports.clone(),
            src_ip,
            dst_ip,
            spec,
            expect,
        ))
    }

    /// Opens a TCP connection from `src` to `dst:port` (IPv4) and keeps it open; fails with
    /// the measured attempt if it cannot be established within `timeout`.
    pub async fn hold_tcp(
        &self,
        src: &str,
        dst: &str,
        port: u16,
        timeout: std::time::Duration,
    ) -> Result<HeldConnection, LabError> {
        let (src_ip, dst_ip) = self.ips(src, dst, false)?;
        self.listen(&[Target::Tcp(port)]).await?;
        let server = self.server(self.endpoint(src)?).await?;
        let packet = probe::packet(Target::Tcp(port), src_ip, self.ports.next(), dst_ip);
        HeldConnection::open(server, src, dst, packet, timeout)
            .await
            .map_err(|a| {
                LabError::Other(format!(
                    "holding tcp {src} -> {dst}:{port}: {} {}",
                    a.outcome,
                    a.detail.unwrap_or_default()
                ))
            })
    }

    /// Stops the servers and undoes everything: the host side, then (with a client) the lab's
    /// Pods and its Node.
    pub async fn down(mut self) -> Result<(), LabError> {
        self.servers.lock().await.clear();
        let client = self.client.take();
        let lock = self.lock.take();
        match lock {
            Some(lock) => Lab::down_locked(client.as_ref(), &lock).await,
            None => Lab::down_all(client.as_ref()).await,
        }
    }

    /// Undoes whatever the state records, whoever made it (a lab of this process, a `lab up`
    /// of another, a crashed one). Keeps going past errors; returns the first.
    pub async fn down_all(client: Option<&Client>) -> Result<(), LabError> {
        let lock = LabLock::acquire()?;
        Lab::down_locked(client, &lock).await
    }

    async fn down_locked(client: Option<&Client>, _lock: &LabLock) -> Result<(), LabError> {
        let mut state = State::load()?;
        let host = net::host_down(&mut state);
        state.save()?;
        let mut api = Ok(());
        if let Some(client) = client {
            let node = state
                .node_name
                .clone()
                .unwrap_or_else(|| LabConfig::default().node_name);
            api = async {
                cluster::delete_pods(client, &node, |_| false).await?;
                cluster::delete_node(client, &node).await
            }
            .await;
            if api.is_ok() {
                state.pods.clear();
                state.node_name = None;
            }
        }
        state.save()?;
        if state.is_empty() {
            State::remove_file()?;
        }
        host.and(api)
    }

    /// Undoes the host side at once, without the API (whose client needs a running async
    /// runtime): what `Drop` does when it cannot do better.
    fn down_host_blocking(_lock: &LabLock) -> Result<(), LabError> {
        let mut state = State::load()?;
        let r = net::host_down(&mut state);
        state.save()?;
        r
    }
}

impl Drop for Lab {
    /// A lab made by `up` and not taken down (a failing test) is taken down here: the host
    /// side always; the Pods too when the runtime allows blocking (a multi-threaded one).
    fn drop(&mut self) {
        let Some(lock) = self.lock.take() else {
            return;
        };
        self.servers.get_mut().clear();
        let client = self.client.take();
        let multi_thread = tokio::runtime::Handle::try_current()
            .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
        let r = match (client, multi_thread) {
            (Some(client), true) => tokio::task::block_in_place(|| {
                tokio::runtime::Handle::current().block_on(Lab::down_locked(Some(&client), &lock))
            }),
            (client, _) => {
                if client.is_some() {
                    eprintln!(
                        "lab: dropped outside a multi-threaded runtime: its Pods stay in the \
                         API until the next `lab up` or `lab down`"
                    );
                }
                Lab::down_host_blocking(&lock)
            }
        };
        if let Err(e) = r {
            eprintln!("lab: cleaning up: {e}");
        }
    }
}
