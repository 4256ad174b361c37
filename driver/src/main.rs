//! nomad-driver-aimodel: started by the Nomad client from its plugin_dir.

use std::io::Write;
use std::process::ExitCode;

use aimodel_driver::{logging, server};

fn main() -> ExitCode {
    if let Err(e) = server::check_environment(|k| std::env::var(k).ok()) {
        let _ = writeln!(std::io::stderr(), "{e}");
        return ExitCode::from(1);
    }
    logging::init();
    let runtime = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(error = %e, "cannot start the async runtime");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(server::run()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "plugin failed");
            ExitCode::from(1)
        }
    }
}
