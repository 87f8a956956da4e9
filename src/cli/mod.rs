//! The offline commands: `verify`, `effective`, `crds` (and the others as they land).
//! Each reads YAML with `load`, builds the model, asks the pure core, and prints.

pub mod load;

use std::net::IpAddr;
use std::path::PathBuf;

use ipnet::IpNet;

use crate::effective::{EffectiveStage, effective_rules};
use crate::eval::{Packet, Verdict, evaluate};
use crate::model::{Direction, Inventory, ObjectRef, Protocol};
use crate::resolve::Resolved;

/// New flows per NSG rule, summed over the nodes' agents.
type RuleHits = std::collections::BTreeMap<crate::agent::HitKey, u64>;

/// Where the objects come from and the cluster ranges that no object states.
#[derive(Debug, Clone, clap::Args)]
pub struct Inputs {
    /// YAML/JSON files or directories of NSGs, ASGs, ServiceTags, Namespaces and Pods.
    /// Without any, the objects are read from the cluster of the current kubeconfig.
    #[arg(short = 'f', long = "filename")]
    pub files: Vec<PathBuf>,
    /// Cluster ranges (pod and service CIDRs) that belong to the VirtualNetwork tag.
    #[arg(long, value_delimiter = ',')]
    pub virtual_network: Vec<IpNet>,
    /// Node IPs: part of VirtualNetwork, and the AzureLoadBalancer tag.
    #[arg(long, value_delimiter = ',')]
    pub node_ips: Vec<IpAddr>,
}

/// A command's failure, printed as is; the process exits non-zero.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct CliError(pub String);

impl Inputs {
    pub fn inventory(&self) -> Result<Inventory, CliError> {
        self.load(false).map(|(inventory, _)| inventory)
    }

    /// The objects from the files, or without any from the cluster; from the cluster and
    /// with `with_hits`, also the rule hits the node agents report (files hold no counters).
    fn load(&self, with_hits: bool) -> Result<(Inventory, Option<RuleHits>), CliError> {
        if self.files.is_empty() {
            return self.live(with_hits);
        }
        let objects = load::Objects::read(&self.files).map_err(|e| CliError(e.to_string()))?;
        let inventory = objects
            .into_inventory(&self.virtual_network, &self.node_ips)
            .map_err(|errors| {
                CliError(
                    errors
                        .iter()
                        .map(|e| e.to_string())
                        .collect::<Vec<_>>()
                        .join("\n"),
                )
            })?;
        Ok((inventory, None))
    }

    /// The cluster's objects, as the controller sees them, and with `with_hits` the rule
    /// hits the node agents report. Invalid objects are reported on stderr and left out, as
    /// the controller leaves them out (it keeps their last valid version; a one-shot read
    /// has none).
    fn live(&self, with_hits: bool) -> Result<(Inventory, Option<RuleHits>), CliError> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| CliError(e.to_string()))?;
        let (live, hits) = runtime.block_on(async {
            let client = kube::Client::try_default()
                .await
                .map_err(|e| CliError(format!("no -f given and no cluster reachable: {e}")))?;
            let live = crate::controller::inventory_from_cluster(&client, &self.virtual_network)
                .await
                .map_err(|e| CliError(format!("reading the cluster: {e}")))?;
            let hits = if with_hits {
                let hits = crate::agent::rule_hits(&client).await;
                Some(hits.map_err(|e| CliError(format!("reading the agents' rule hits: {e}")))?)
            } else {
                None
            };
            Ok::<_, CliError>((live, hits))
        })?;
        for errors in &live.invalid {
            eprintln!("warning: left out: {errors}");
        }
        let mut inventory = live.inventory;
        inventory.node_ips.extend(&self.node_ips);
        Ok((inventory, hits))
    }
}

fn find_pod(res: &Resolved, pod: &ObjectRef) -> Result<usize, CliError> {
    res.pod_index(pod).ok_or_else(|| {
        CliError(format!(
            "pod {pod} is not in the inputs (or has no IP, or uses the host network)"
        ))
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum TextOrJson {
    Text,
    Json,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum TableOrJson {
    Table,
    Json,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum FlowProtocol {
    Tcp,
    Udp,
    Icmp,
}

/// Azure's IP flow verify: would this flow be allowed, and by which rule?
#[derive(Debug, Clone, clap::Args)]
pub struct VerifyArgs {
    #[command(flatten)]
    pub inputs: Inputs,
    /// The pod, NAMESPACE/NAME.
    #[arg(long)]
    pub pod: ObjectRef,
    /// From the pod's point of view: Inbound is remote -> pod.
    #[arg(long, value_parser = parse_direction)]
    pub direction: Direction,
    #[arg(long, value_enum, ignore_case = true)]
    pub protocol: FlowProtocol,
    /// The other end; if it is a pod of the inputs, its ASG memberships count.
    #[arg(long)]
    pub remote_ip: IpAddr,
    /// The pod's port (required for Tcp and Udp).
    #[arg(long)]
    pub local_port: Option<u16>,
    /// The remote end's port (required for Tcp and Udp).
    #[arg(long)]
    pub remote_port: Option<u16>,
    #[arg(short = 'o', long, value_enum, default_value = "text")]
    pub output: TextOrJson,
}

fn parse_direction(s: &str) -> Result<Direction, String> {
    match s.to_ascii_lowercase().as_str() {
        "inbound" => Ok(Direction::Inbound),
        "outbound" => Ok(Direction::Outbound),
        _ => Err(format!("{s:?}: expected Inbound or Outbound")),
    }
}

/// The JSON answer of `verify`.
#[derive(serde::Serialize)]
struct VerifyOutput<'a> {
    access: crate::model::Access,
    rule: Option<DecidingRule<'a>>,
    stages: &'a [crate::eval::StageVerdict],
}

#[derive(serde::Serialize)]
struct DecidingRule<'a> {
    nsg: String,
    name: &'a str,
    priority: u32,
}

pub fn verify(args: &VerifyArgs) -> Result<String, CliError> {
    let inv = args.inputs.inventory()?;
    let res = Resolved::new(&inv);
    let pod = find_pod(&res, &args.pod)?;
    let (protocol, local_port, remote_port) = match args.protocol {
        FlowProtocol::Icmp => {
            if args.local_port.is_some() || args.remote_port.is_some() {
                return Err(CliError(
                    "Icmp has no ports: drop --local-port and --remote-port".into(),
                ));
            }
            (Protocol::Icmp, 0, 0)
        }
        p => {
            let (Some(l), Some(r)) = (args.local_port, args.remote_port) else {
                return Err(CliError(
                    "Tcp and Udp need --local-port and --remote-port".into(),
                ));
            };
            (
                if matches!(p, FlowProtocol::Tcp) {
                    Protocol::Tcp
                } else {
                    Protocol::Udp
                },
                l,
                r,
            )
        }
    };
    let local_ip = *inv.pods[pod]
        .ips
        .iter()
        .find(|ip| ip.is_ipv4() == args.remote_ip.is_ipv4())
        .ok_or_else(|| {
            CliError(format!(
                "pod {} has no address of the remote IP's family",
                args.pod
            ))
        })?;
    let packet = match args.direction {
        Direction::Inbound => Packet {
            protocol,
            src: args.remote_ip,
            src_port: remote_port,
            dst: local_ip,
            dst_port: local_port,
        },
        Direction::Outbound => Packet {
            protocol,
            src: local_ip,
            src_port: local_port,
            dst: args.remote_ip,
            dst_port: remote_port,
        },
    };
    let verdict = evaluate(&res, pod, args.direction, &packet);
    Ok(match args.output {
        TextOrJson::Json => {
            let out = VerifyOutput {
                access: verdict.access,
                rule: verdict.deciding().map(|s| DecidingRule {
                    nsg: s.nsg.to_string(),
                    name: &s.rule,
                    priority: s.priority,
                }),
                stages: &verdict.stages,
            };
            serde_json::to_string_pretty(&out).expect("serializes") + "\n"
        }
        TextOrJson::Text => verify_text(args, &packet, &verdict),
    })
}

fn endpoint_text(ip: IpAddr, port: u16, protocol: Protocol) -> String {
    match (protocol, ip) {
        (Protocol::Icmp, ip) => ip.to_string(),
        (_, IpAddr::V6(ip)) => format!("[{ip}]:{port}"),
        (_, ip) => format!("{ip}:{port}"),
    }
}

fn verify_text(args: &VerifyArgs, packet: &Packet, verdict: &Verdict) -> String {
    let flow = format!(
        "{} {} {} -> {}",
        args.direction,
        packet.protocol,
        endpoint_text(packet.src, packet.src_port, packet.protocol),
        endpoint_text(packet.dst, packet.dst_port, packet.protocol)
    );
    let mut out = match verdict.deciding() {
        None => format!(
            "{}: {flow} for pod {}: no security group applies, so all traffic passes.\n",
            verdict.access, args.pod
        ),
        Some(s) => format!(
            "{}: {flow} for pod {}: {} by rule {} (priority {}) of {}.\n",
            verdict.access,
            args.pod,
            if verdict.access == crate::model::Access::Allow {
                "allowed"
            } else {
                "denied"
            },
            s.rule,
            s.priority,
            s.nsg
        ),
    };
    for (i, s) in verdict.stages.iter().enumerate() {
        out += &format!(
            "  stage {}: {:?} {}: {} by {} ({})\n",
            i + 1,
            s.level,
            s.nsg,
            s.access,
            s.rule,
            s.priority
        );
    }
    out
}

/// The rules in force for a pod, per direction and stage, references expanded.
#[derive(Debug, Clone, clap::Args)]
pub struct EffectiveArgs {
    #[command(flatten)]
    pub inputs: Inputs,
    /// The pod, NAMESPACE/NAME.
    #[arg(long)]
    pub pod: ObjectRef,
    #[arg(short = 'o', long, value_enum, default_value = "table")]
    pub output: TableOrJson,
}

/// In live mode the rules also carry the new flows they decided, summed over every node's
/// agent (`hits`; the HITS column): files hold no counters.
pub fn effective(args: &EffectiveArgs) -> Result<String, CliError> {
    let (inv, hits) = args.inputs.load(true)?;
    let res = Resolved::new(&inv);
    let pod = find_pod(&res, &args.pod)?;
    let mut stages = effective_rules(&res, pod);
    if let Some(hits) = &hits {
        for stage in &mut stages {
            for rule in &mut stage.rules {
                let key = (stage.nsg.clone(), stage.direction, rule.name.clone());
                rule.hits = Some(hits.get(&key).copied().unwrap_or(0));
            }
        }
    }
    Ok(match args.output {
        TableOrJson::Json => serde_json::to_string_pretty(&stages).expect("serializes") + "\n",
        TableOrJson::Table => effective_table(&args.pod, &inv.pods[pod].ips, &stages),
    })
}

fn effective_table(pod: &ObjectRef, ips: &[IpAddr], stages: &[EffectiveStage]) -> String {
    let ips: Vec<String> = ips.iter().map(|ip| ip.to_string()).collect();
    let mut out = format!("Pod {pod} ({})\n", ips.join(", "));
    if stages.is_empty() {
        out += "No security group applies: all traffic passes.\n";
    }
    for stage in stages {
        out += &format!("\n{} {:?} {}\n", stage.direction, stage.level, stage.nsg);
        let mut rows = vec![
            [
                "PRIORITY",
                "NAME",
                "ACCESS",
                "PROTOCOL",
                "SOURCE",
                "SPORTS",
                "DESTINATION",
                "DPORTS",
                "EXPANDS TO",
                "HITS",
            ]
            .map(String::from)
            .to_vec(),
        ];
        for r in &stage.rules {
            rows.push(vec![
                r.priority.to_string(),
                r.name.clone(),
                r.access.to_string(),
                r.protocol.to_string(),
                r.source.clone(),
                r.source_ports.clone(),
                r.destination.clone(),
                r.destination_ports.clone(),
                format!(
                    "{} -> {}",
                    r.source_expansion.summary(),
                    r.destination_expansion.summary()
                ),
                r.hits.map(|n| n.to_string()).unwrap_or_default(),
            ]);
        }
        // Files hold no counters: the HITS column only in live mode.
        if stage.rules.iter().all(|r| r.hits.is_none()) {
            rows.iter_mut().for_each(|row| drop(row.pop()));
        }
        out += &render_table(&rows);
    }
    out
}

/// Left-aligned columns separated by two spaces, as kubectl prints.
pub fn render_table<R: AsRef<[String]>>(rows: &[R]) -> String {
    let columns = rows.first().map_or(0, |r| r.as_ref().len());
    let widths: Vec<usize> = (0..columns)
        .map(|c| {
            let width = |r: &R| r.as_ref()[c].chars().count();
            rows.iter().map(width).max().unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for row in rows {
        let line: Vec<String> = row
            .as_ref()
            .iter()
            .zip(&widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        out += line.join("  ").trim_end();
        out += "\n";
    }
    out
}

#[derive(Debug, Clone, clap::Args)]
pub struct ImportAzureArgs {
    /// The JSON file.
    pub file: PathBuf,
    /// The namespace of the objects produced (the "subnet" the groups are associated with).
    #[arg(long, short = 'n')]
    pub namespace: String,
    #[arg(short = 'o', long, value_enum, default_value = "yaml")]
    pub output: crate::import::OutputFormat,
}

/// Prints the objects; what was not converted goes to stderr (and the YAML's comments).
pub fn import_azure(args: &ImportAzureArgs) -> Result<String, CliError> {
    let import = crate::import::import_azure_file(&args.file, &args.namespace)
        .map_err(|e| CliError(e.to_string()))?;
    eprint!("{}", import.report());
    Ok(import.render(args.output))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum CompileTarget {
    Networkpolicy,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ReportFormat {
    Json,
}

/// The NetworkPolicies the controller would apply for the inputs.
#[derive(Debug, Clone, clap::Args)]
pub struct CompileArgs {
    #[command(flatten)]
    pub inputs: Inputs,
    #[arg(long, value_enum, default_value = "networkpolicy")]
    pub to: CompileTarget,
    /// strict: never allow more than the NSG; permissive: never deny what it allows.
    #[arg(long, default_value = "strict")]
    pub mode: crate::netpol::Mode,
    /// Also print each input Pod with the labels the controller maintains on it.
    #[arg(long)]
    pub with_pods: bool,
    /// Print the per-rule fidelity report instead of the policies.
    #[arg(long, value_enum)]
    pub report: Option<ReportFormat>,
}

fn yaml_documents<T: serde::Serialize>(items: impl IntoIterator<Item = T>) -> String {
    items
        .into_iter()
        .map(|i| serde_yaml_ng::to_string(&i).expect("serializes"))
        .collect::<Vec<_>>()
        .join("---\n")
}

pub fn compile(args: &CompileArgs) -> Result<String, CliError> {
    let inv = args.inputs.inventory()?;
    let res = Resolved::new(&inv);
    let compiled = crate::netpol::compile(&res, args.mode);
    if args.report.is_some() {
        return Ok(serde_json::to_string_pretty(&compiled.report).expect("serializes") + "\n");
    }
    let mut docs: Vec<serde_json::Value> = compiled
        .policies
        .iter()
        .map(|p| serde_json::to_value(p).expect("serializes"))
        .collect();
    if args.with_pods {
        docs.extend(inv.pods.iter().enumerate().map(|(i, pod)| {
            let ips: Vec<serde_json::Value> = pod
                .ips
                .iter()
                .map(|ip| serde_json::json!({"ip": ip.to_string()}))
                .collect();
            serde_json::json!({
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {
                    "name": pod.id.name,
                    "namespace": pod.id.namespace,
                    "labels": crate::netpol::labels_with_managed(&res, i),
                    "annotations": pod.annotations,
                },
                "status": {"podIP": pod.ips.first().map(|ip| ip.to_string()), "podIPs": ips},
            })
        }));
    }
    Ok(yaml_documents(docs))
}

/// Rules that never decide, could go, or whose order decides.
#[derive(Debug, Clone, clap::Args)]
pub struct AnalyzeArgs {
    #[command(flatten)]
    pub inputs: Inputs,
    #[arg(short = 'o', long, value_enum, default_value = "table")]
    pub output: TableOrJson,
}

pub fn analyze(args: &AnalyzeArgs) -> Result<String, CliError> {
    let inv = args.inputs.inventory()?;
    let res = Resolved::new(&inv);
    let anomalies = crate::analyze::analyze_all(&res);
    if args.output == TableOrJson::Json {
        return Ok(serde_json::to_string_pretty(&anomalies).expect("serializes") + "\n");
    }
    if anomalies.is_empty() {
        return Ok(
            "No anomalies: every rule can decide some flow, and none is redundant.\n".into(),
        );
    }
    let mut rows = vec![
        [
            "NSG",
            "DIRECTION",
            "KIND",
            "RULE",
            "RELATED",
            "EXAMPLE FLOW",
        ]
        .map(String::from),
    ];
    for a in &anomalies {
        let example = a.example.map_or(String::new(), |p| {
            format!(
                "{} {} -> {}",
                p.protocol,
                endpoint_text(p.src, p.src_port, p.protocol),
                endpoint_text(p.dst, p.dst_port, p.protocol)
            )
        });
        rows.push([
            a.nsg.to_string(),
            a.direction.to_string(),
            format!("{:?}", a.kind),
            format!("{} ({})", a.rule, a.priority),
            a.related.join(", "),
            example,
        ]);
    }
    Ok(render_table(&rows))
}
