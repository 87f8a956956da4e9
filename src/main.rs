//! `kube-nsg`: one binary, several roles. Argument parsing only; the work is in the library.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use kube_nsg::cli::{self, CliError};

// jemalloc: its small objects live in slabs of a few 4 KiB pages, so the pages a burst
// leaves partly used (the first lists, a pass that rewrites every status) are few; with
// the chart's `_RJEM_MALLOC_CONF` (no decay) emptied pages go back at once. Controller
// benchmark (2,000 pods, 100 groups): 13.2-14.1 MB of heap, against 17.5-19.1 MB with
// mimalloc v2 (64 KiB pages) and 24.7 MB with glibc's malloc.
#[global_allocator]
static ALLOCATOR: kube_nsg::Allocator = kube_nsg::Allocator;

#[derive(Parser)]
#[command(
    name = "kube-nsg",
    version,
    about = "Azure-style network security groups for Kubernetes"
)]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the CustomResourceDefinitions as YAML.
    Crds,
    /// IP flow verify: is a flow to or from a pod allowed, and by which rule?
    Verify(cli::VerifyArgs),
    /// The effective security rules of a pod, per direction and stage.
    Effective(cli::EffectiveArgs),
    /// The NetworkPolicies the controller would apply, or the per-rule fidelity report.
    Compile(cli::CompileArgs),
    /// Shadowed, redundant and correlated rules, each with an example flow.
    Analyze(cli::AnalyzeArgs),
    /// Convert security groups from other systems into kube-nsg objects.
    #[command(subcommand)]
    Import(ImportSource),
    /// Run the controller: pod labels, NetworkPolicies and status (leader-elected).
    Controller(kube_nsg::controller::ControllerArgs),
    /// Run the node agent: program the node's nftables table, report what is in force.
    /// Stopping it leaves the table in force (unless its DaemonSet is gone); `--cleanup`
    /// removes the table.
    Agent(kube_nsg::agent::AgentArgs),
}

#[derive(Subcommand)]
enum ImportSource {
    /// An Azure NSG export: an ARM template, `az network nsg show/list` or REST JSON.
    /// What cannot be converted is reported on stderr and in the output's comments.
    Azure(cli::ImportAzureArgs),
}

fn run(args: Args) -> Result<String, CliError> {
    match args.command {
        Command::Crds => Ok(kube_nsg::api::crds_yaml()),
        Command::Verify(a) => cli::verify(&a),
        Command::Effective(a) => cli::effective(&a),
        Command::Compile(a) => cli::compile(&a),
        Command::Analyze(a) => cli::analyze(&a),
        Command::Import(ImportSource::Azure(a)) => cli::import_azure(&a),
        Command::Controller(a) => kube_nsg::controller::run_blocking(a)
            .map(|()| String::new())
            .map_err(|e| CliError(e.to_string())),
        Command::Agent(a) => kube_nsg::agent::run_blocking(a)
            .map(|()| String::new())
            .map_err(|e| CliError(e.to_string())),
    }
}

fn main() -> ExitCode {
    match run(Args::parse()) {
        Ok(out) => {
            print!("{out}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
