// Placeholder CLI until the real one lands: `kube-nsg controller [FLAGS]` runs the controller;
// `kube-nsg crds` (or no arguments) prints the CRDs.
use clap::Parser;

#[derive(Parser)]
enum Cli {
    /// Run the controller.
    Controller(kube_nsg::controller::ControllerArgs),
    /// Print the CRDs.
    Crds,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    if std::env::args().len() < 2 {
        print!("{}", kube_nsg::api::crds_yaml());
        return std::process::ExitCode::SUCCESS;
    }
    match Cli::parse() {
        Cli::Controller(args) => match kube_nsg::controller::run(args).await {
            Ok(()) => std::process::ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e}");
                std::process::ExitCode::FAILURE
            }
        },
        Cli::Crds => {
            print!("{}", kube_nsg::api::crds_yaml());
            std::process::ExitCode::SUCCESS
        }
    }
}
