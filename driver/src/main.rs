//! nomad-driver-aimodel: started by the Nomad client from its plugin_dir.
//! `nomad-driver-aimodel log-relay ...` is the detached per-task log relay the
//! plugin starts itself.

use std::io::Write;
use std::process::ExitCode;

use aimodel_driver::logrelay;
use aimodel_driver::nomad::{logging, server};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some(logrelay::SUBCOMMAND) {
        return relay(&args[2..]);
    }
    if let Err(e) = server::check_environment(|k| std::env::var(k).ok()) {
        let _ = writeln!(std::io::stderr(), "{e}");
        return ExitCode::from(1);
    }
    logging::init();
    block_on(server::run())
}

fn relay(args: &[String]) -> ExitCode {
    match logrelay::RelayArgs::parse(args) {
        Ok(a) => block_on(logrelay::run(a)),
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "{e}");
            ExitCode::from(2)
        }
    }
}

fn block_on(f: impl std::future::Future<Output = std::io::Result<()>>) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(error = %e, "cannot start the async runtime");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(f) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "failed");
            ExitCode::from(1)
        }
    }
}
