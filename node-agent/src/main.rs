//! aimodel-agent: the node agent and the operator's CLI.

use clap::Parser;

fn main() -> std::process::ExitCode {
    let args = aimodel_agent::cli::Args::parse();
    // The only place the environment is read.
    let env = aimodel_agent::env::Environment::from_process();
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("aimodel-agent: {e}");
            return std::process::ExitCode::from(1);
        }
    };
    let code = match rt.block_on(aimodel_agent::cli::run(args, env)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("aimodel-agent: {e:#}");
            std::process::ExitCode::from(1)
        }
    };
    // Dropping in-flight downloads releases their leases; a lease waiter
    // blocked on another node is not waited for.
    rt.shutdown_timeout(std::time::Duration::from_secs(2));
    code
}
