//! `nomad-sim`: run a plugin directory the way a Nomad client does.

use anyhow::Result;
use clap::Parser;

use aimodel_integration::cli;

fn main() -> Result<()> {
    let args = cli::Args::parse();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    rt.block_on(cli::run(args))
}
