//! The `sluice-operator` command line.

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

use crate::{manifests, planner::Planner, report};

#[derive(Parser, Debug)]
#[command(
    name = "sluice-operator",
    version,
    about = "Sluice egress gateway control plane"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Plan offline from manifest files: print every node's entries and every policy's status.
    Plan {
        /// Directory of *.yaml / *.yml files (Nodes, Namespaces, Pods, EgressGatewayPolicies and
        /// CiliumEgressGatewayPolicies; other kinds are ignored). Repeat to read several.
        #[arg(long, required = true)]
        manifests: Vec<PathBuf>,
        #[arg(long, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// Print the EgressGatewayPolicy CRD.
    Crd,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Output {
    Json,
    Table,
}

/// Runs a command and returns what it prints on stdout.
pub fn run(cli: Cli) -> anyhow::Result<String> {
    match cli.command {
        Command::Plan { manifests, output } => plan(&manifests, output),
        Command::Crd => Ok(crate::api::crd_yaml()),
    }
}

fn plan(dirs: &[PathBuf], output: Output) -> anyhow::Result<String> {
    let mut m = manifests::Manifests::default();
    for dir in dirs {
        m.read_dir(dir)?;
    }
    for ignored in &m.ignored {
        eprintln!("note: ignoring {ignored}");
    }
    let planner = Planner::from_snapshot(m.namespaces, m.nodes, m.policies, m.pods);
    let doc = report::document(&planner);
    Ok(match output {
        Output::Json => serde_json::to_string_pretty(&doc)? + "\n",
        Output::Table => report::table(&doc),
    })
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }
}
