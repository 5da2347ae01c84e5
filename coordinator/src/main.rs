//! `ferry-coordinator`: the coordinator alone, `ferry coordinator` without libtorch (idle in a
//! few MiB where the full binary maps hundreds). Same arguments, same state directory.

use clap::Parser;
use ferry_coordinator::cli::{run, CoordinatorArgs};

#[derive(Parser)]
#[command(
    name = "ferry-coordinator",
    version = ferry_coordinator::VERSION,
    about = "The ferry coordinator: membership, rendezvous, the sample ledger and durable job \
             state for one job (the same command as `ferry coordinator`, without libtorch)"
)]
struct Cli {
    #[command(flatten)]
    args: CoordinatorArgs,
}

fn main() {
    if let Err(e) = run(Cli::parse().args) {
        // One line: the chain of causes joined, so each error names its file and problem.
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
