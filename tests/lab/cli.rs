//! `lab`: netns pods on a real control plane, and a real-packet prober. Needs root.
//!
//!     cargo run --example lab -- up -f examples/three-tier
//!     cargo run --example lab -- probe -f examples/three-tier
//!     cargo run --example lab -- down
//!
//! See tests/lab/README.md.

#[path = "mod.rs"]
mod lab;

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use ipnet::IpNet;
use kube::Client;

use lab::{Lab, LabConfig, LabError, ProbeSpec, Target};

/// Where tests/cluster/up.sh writes the local control plane's admin kubeconfig.
const LOCAL_KUBECONFIG: &str = "/tmp/kube-nsg-cluster/kubeconfig";

#[derive(Parser)]
#[command(
    name = "lab",
    about = "Pods as network namespaces on this machine, registered in a real API server, and \
             a prober that compares real packets with the reference evaluator (root only)"
)]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args)]
struct ClusterArgs {
    /// Admin kubeconfig of the API server to register the Node and Pods in (default: the
    /// local control plane's, if it exists).
    #[arg(long, env = "KUBECONFIG")]
    kubeconfig: Option<PathBuf>,
    /// Only the host side: no Node, Namespaces or Pods.
    #[arg(long)]
    no_cluster: bool,
}

#[derive(Subcommand)]
enum Command {
    /// Create a network namespace per Pod of the files (and the Internet stand-in), and the
    /// Node, Namespaces and running Pods in the API. Idempotent.
    Up {
        /// YAML files or directories; their Pods (with status.podIP) become namespaces.
        #[arg(short = 'f', long = "filename", required = true)]
        files: Vec<PathBuf>,
        #[command(flatten)]
        cluster: ClusterArgs,
        /// Name of the Node registered for this machine.
        #[arg(long, default_value = "lab-node")]
        node_name: String,
        /// The Node's InternalIP, put on the dummy interface nsglab0.
        #[arg(long, default_value_t = lab::NODE_IP)]
        node_ip: Ipv4Addr,
        /// No Internet stand-in namespace.
        #[arg(long)]
        no_internet: bool,
    },
    /// Remove everything `up` made (even a partial `up`): namespaces, veths, routes, the
    /// node IP interface, blackholes; and the lab's Pods and Node if the API answers.
    Down {
        #[command(flatten)]
        cluster: ClusterArgs,
    },
    /// Send one new flow per ordered pair of endpoints and target, and compare each with the
    /// reference evaluator on the same files. Exits 1 on any mismatch.
    Probe {
        #[arg(short = 'f', long = "filename", required = true)]
        files: Vec<PathBuf>,
        /// Cluster ranges of the VirtualNetwork tag (default: the lab's pod and service ranges).
        #[arg(long, value_delimiter = ',')]
        virtual_network: Vec<IpNet>,
        /// Node IPs (default: the lab's).
        #[arg(long, value_delimiter = ',')]
        node_ips: Vec<IpAddr>,
        /// What to send to each destination.
        #[arg(
            long,
            value_delimiter = ',',
            default_value = "tcp:80,tcp:1433,udp:53,icmp"
        )]
        ports: Vec<Target>,
        #[arg(short = 'o', long, value_enum, default_value = "table")]
        output: Output,
        /// How long a first attempt waits for an answer.
        #[arg(long, default_value_t = 300)]
        timeout_ms: u64,
        /// How long the single retry of an unexpected failure waits.
        #[arg(long, default_value_t = 1000)]
        retry_timeout_ms: u64,
        /// Probes in flight at once.
        #[arg(long, default_value_t = 64)]
        concurrency: usize,
        /// Leave the Internet stand-in out.
        #[arg(long)]
        no_internet: bool,
    },
    /// Inside an endpoint's namespace: echo on the given ports, and run the probes its parent
    /// asks for on stdin.
    #[command(hide = true)]
    Serve {
        #[arg(long, value_delimiter = ',')]
        tcp: Vec<u16>,
        #[arg(long, value_delimiter = ',')]
        udp: Vec<u16>,
        /// Ignore stdin and serve until killed.
        #[arg(long)]
        standalone: bool,
    },
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Output {
    Table,
    Json,
}

fn kubeconfig(args: &ClusterArgs) -> Option<PathBuf> {
    if args.no_cluster {
        return None;
    }
    args.kubeconfig.clone().or_else(|| {
        Path::new(LOCAL_KUBECONFIG)
            .exists()
            .then(|| LOCAL_KUBECONFIG.into())
    })
}

/// A client if the API server answers within a few seconds.
async fn reachable(path: &Path) -> Result<Client, LabError> {
    let client = lab::cluster::client(path).await?;
    match tokio::time::timeout(Duration::from_secs(5), client.apiserver_version()).await {
        Ok(Ok(_)) => Ok(client),
        Ok(Err(e)) => Err(LabError::Other(format!("{}: {e}", path.display()))),
        Err(_) => Err(LabError::Other(format!(
            "{}: the API server did not answer in 5 s",
            path.display()
        ))),
    }
}

async fn run(command: Command) -> Result<ExitCode, LabError> {
    match command {
        Command::Up {
            files,
            cluster,
            node_name,
            node_ip,
            no_internet,
        } => {
            let t = Instant::now();
            let client = match kubeconfig(&cluster) {
                Some(path) => Some(reachable(&path).await?),
                None if cluster.no_cluster => None,
                None => {
                    return Err(LabError::Other(format!(
                        "no kubeconfig: pass --kubeconfig (or set KUBECONFIG), start the local \
                         control plane (tests/cluster/up.sh, {LOCAL_KUBECONFIG}), or pass \
                         --no-cluster"
                    )));
                }
            };
            let config = LabConfig {
                node_name,
                node_ip,
                internet: !no_internet,
            };
            let with_cluster = client.is_some();
            let lab = Lab::up_with(&files, client, config).await?;
            for ep in &lab.endpoints {
                let ips: Vec<String> = ep.ips.iter().map(ToString::to_string).collect();
                println!(
                    "{:<32} netns {:<28} host veth {:<13} {}",
                    ep.name,
                    ep.netns,
                    ep.host_veth,
                    ips.join(",")
                );
            }
            println!(
                "lab up: {} endpoints in {:.2} s; node IP {}; {}",
                lab.endpoints.len(),
                t.elapsed().as_secs_f64(),
                lab.config.node_ip,
                if with_cluster {
                    format!("Node {} and its Pods in the API", lab.config.node_name)
                } else {
                    "nothing in the API (--no-cluster)".into()
                }
            );
            lab.keep();
            Ok(ExitCode::SUCCESS)
        }
        Command::Down { cluster } => {
            let t = Instant::now();
            let client = match kubeconfig(&cluster) {
                Some(path) => match reachable(&path).await {
                    Ok(c) => Some(c),
                    Err(e) => {
                        eprintln!("lab down: {e}; leaving the API objects alone");
                        None
                    }
                },
                None => None,
            };
            Lab::down_all(client.as_ref()).await?;
            println!("lab down in {:.2} s", t.elapsed().as_secs_f64());
            Ok(ExitCode::SUCCESS)
        }
        Command::Probe {
            files,
            virtual_network,
            node_ips,
            ports,
            output,
            timeout_ms,
            retry_timeout_ms,
            concurrency,
            no_internet,
        } => {
            let lab = Lab::attach(&files, LabConfig::default())?;
            let mut inventory = lab.inventory(&files)?;
            if !virtual_network.is_empty() {
                inventory.virtual_network = virtual_network;
            }
            if !node_ips.is_empty() {
                inventory.node_ips = node_ips;
            }
            let spec = ProbeSpec {
                targets: ports,
                timeout: Duration::from_millis(timeout_ms),
                retry_timeout: Duration::from_millis(retry_timeout_ms),
                concurrency,
                internet: !no_internet,
                endpoints: None,
            };
            let report = lab.probe(&inventory, &spec).await?;
            match output {
                Output::Table => print!("{}", report.table()),
                Output::Json => println!(
                    "{}",
                    serde_json::to_string_pretty(&report).expect("report serializes")
                ),
            }
            Ok(if report.mismatches.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        Command::Serve { .. } => unreachable!("handled in main"),
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let Command::Serve {
        tcp,
        udp,
        standalone,
    } = &args.command
    {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("tokio runtime");
        return match rt.block_on(lab::serve::run(tcp, udp, *standalone)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("lab serve: {e}");
                ExitCode::from(2)
            }
        };
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    match rt.block_on(run(args.command)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("lab: {e}");
            ExitCode::from(2)
        }
    }
}
