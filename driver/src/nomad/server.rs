//! The go-plugin server side: environment checks, the unix socket, the
//! handshake line, signals and the gRPC services (go-plugin `server.go`,
//! `docs/guide-plugin-write-non-go.md`; facts in nomad-wire.md §1).

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::net::UnixListener;
use tokio::signal::unix::{signal, SignalKind};
use tokio_stream::wrappers::UnixListenerStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::Server;

use aimodel_proto::base::base_plugin_server::BasePluginServer;
use aimodel_proto::drivers::driver_server::DriverServer;
use aimodel_proto::goplugin::{
    grpc_broker_server::GrpcBrokerServer, grpc_controller_server::GrpcControllerServer,
    grpc_stdio_server::GrpcStdioServer,
};

use crate::driver::Driver;
use crate::nomad::service::Service;

/// Nomad's handshake cookie (`plugins/base/plugin.go` `Handshake`).
pub const MAGIC_COOKIE_KEY: &str = "NOMAD_PLUGIN_MAGIC_COOKIE";
/// The value Nomad sets for [`MAGIC_COOKIE_KEY`].
pub const MAGIC_COOKIE_VALUE: &str = "e4327c2e01eabfd75a8a67adb114fb34a757d57eee7728d857a8cec6e91a7255";
/// go-plugin's core protocol version.
pub const CORE_PROTOCOL_VERSION: u32 = 1;
/// Nomad's app protocol version (gRPC plugins, Nomad ≥ 0.9).
pub const APP_PROTOCOL_VERSION: u32 = 2;
/// After a shutdown request the process exits by this time even if an RPC is
/// still in flight; go-plugin's host SIGKILLs at 2 s.
const HARD_EXIT_AFTER: Duration = Duration::from_millis(1500);
/// Go clients allow messages up to MaxInt32.
const MAX_MESSAGE: usize = i32::MAX as usize;

/// Why the plugin refuses to start.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HandshakeError {
    #[error(
        "This binary is a plugin. These are not meant to be executed directly.\n\
         Please execute the program that consumes these plugins, which will\n\
         load any plugins automatically: put nomad-driver-aimodel in the Nomad\n\
         client's plugin_dir and add a plugin \"nomad-driver-aimodel\" {{}} block\n\
         to the client configuration."
    )]
    MissingCookie,
    #[error("{MAGIC_COOKIE_KEY} has the wrong value; this binary is a Nomad plugin and only Nomad should start it")]
    WrongCookie,
    #[error(
        "PLUGIN_PROTOCOL_VERSIONS is {0:?}, but this plugin speaks protocol version {APP_PROTOCOL_VERSION} only (Nomad 0.9 or newer)"
    )]
    ProtocolVersion(String),
}

/// Checks what go-plugin's host puts in the environment.
pub fn check_environment(get: impl Fn(&str) -> Option<String>) -> Result<(), HandshakeError> {
    match get(MAGIC_COOKIE_KEY) {
        None => return Err(HandshakeError::MissingCookie),
        Some(v) if v != MAGIC_COOKIE_VALUE => return Err(HandshakeError::WrongCookie),
        Some(_) => {}
    }
    if let Some(versions) = get("PLUGIN_PROTOCOL_VERSIONS") {
        let ok = versions.split(',').any(|v| v.trim().parse::<u32>() == Ok(APP_PROTOCOL_VERSION));
        if !ok {
            return Err(HandshakeError::ProtocolVersion(versions));
        }
    }
    Ok(())
}

/// The handshake line for a unix socket path.
pub fn handshake_line(socket: &Path) -> String {
    format!("{CORE_PROTOCOL_VERSION}|{APP_PROTOCOL_VERSION}|unix|{}|grpc|\n", socket.display())
}

/// Where the socket goes: `PLUGIN_UNIX_SOCKET_DIR`, else `$TMPDIR`, else /tmp.
fn socket_dir() -> PathBuf {
    std::env::var_os("PLUGIN_UNIX_SOCKET_DIR")
        .or_else(|| std::env::var_os("TMPDIR"))
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/tmp"))
}

fn bind_socket() -> std::io::Result<(UnixListener, PathBuf)> {
    let dir = socket_dir();
    let seed = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().subsec_nanos();
    for attempt in 0..32u32 {
        let path =
            dir.join(format!("plugin{}{:09}", std::process::id(), seed.wrapping_add(attempt.wrapping_mul(7919))));
        match UnixListener::bind(&path) {
            Ok(l) => {
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
                return Ok((l, path));
            }
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => continue,
            Err(e) => return Err(std::io::Error::new(e.kind(), format!("binding a socket in {}: {e}", dir.display()))),
        }
    }
    Err(std::io::Error::other(format!("no free socket name in {}", dir.display())))
}

/// Removes the socket when the server stops, however it stops.
struct SocketGuard(PathBuf);

impl Drop for SocketGuard {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Binds, prints the handshake, serves until GRPCController.Shutdown or SIGTERM.
pub async fn run() -> std::io::Result<()> {
    let stop = CancellationToken::new();
    let (listener, path) = bind_socket()?;
    let guard = SocketGuard(path.clone());

    watch_signals(stop.clone())?;
    arm_hard_exit(stop.clone(), path.clone());

    let driver = Driver::new(stop.clone());
    let service = Service::new(driver);
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_service_status("plugin", tonic_health::ServingStatus::Serving).await;

    // The handshake is the first and only thing we ever write to stdout.
    {
        let mut out = std::io::stdout().lock();
        out.write_all(handshake_line(&path).as_bytes())?;
        out.flush()?;
    }
    tracing::info!(socket = %path.display(), version = crate::driver::PLUGIN_VERSION, "plugin serving");

    let result = Server::builder()
        .add_service(health_service)
        .add_service(
            BasePluginServer::new(service.clone())
                .max_decoding_message_size(MAX_MESSAGE)
                .max_encoding_message_size(MAX_MESSAGE),
        )
        .add_service(
            DriverServer::new(service.clone())
                .max_decoding_message_size(MAX_MESSAGE)
                .max_encoding_message_size(MAX_MESSAGE),
        )
        .add_service(GrpcControllerServer::new(service.clone()))
        .add_service(GrpcStdioServer::new(service.clone()))
        .add_service(GrpcBrokerServer::new(service))
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), stop.clone().cancelled_owned())
        .await;
    drop(guard);
    tracing::info!("plugin stopped");
    result.map_err(std::io::Error::other)
}

/// SIGINT is ignored like go-plugin does (Ctrl-C on a foreground Nomad reaches
/// the whole process group and Nomad runs the shutdown itself); SIGTERM stops.
fn watch_signals(stop: CancellationToken) -> std::io::Result<()> {
    let mut int = signal(SignalKind::interrupt())?;
    let mut term = signal(SignalKind::terminate())?;
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = int.recv() => tracing::debug!("ignoring SIGINT"),
                _ = term.recv() => {
                    tracing::info!("SIGTERM received, stopping");
                    stop.cancel();
                }
            }
        }
    });
    Ok(())
}

/// A long-poll RPC (WaitTask) would hold graceful shutdown open forever; once
/// asked to stop, exit by [`HARD_EXIT_AFTER`] regardless.
fn arm_hard_exit(stop: CancellationToken, socket: PathBuf) {
    tokio::spawn(async move {
        stop.cancelled().await;
        std::thread::spawn(move || {
            std::thread::sleep(HARD_EXIT_AFTER);
            let _ = std::fs::remove_file(&socket);
            std::process::exit(0);
        });
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &'static [(&'static str, &'static str)]) -> impl Fn(&str) -> Option<String> {
        move |k| pairs.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string())
    }

    #[test]
    fn environment_checks() {
        assert_eq!(check_environment(env(&[])), Err(HandshakeError::MissingCookie));
        assert_eq!(check_environment(env(&[(MAGIC_COOKIE_KEY, "nope")])), Err(HandshakeError::WrongCookie));
        assert!(check_environment(env(&[(MAGIC_COOKIE_KEY, MAGIC_COOKIE_VALUE)])).is_ok());
        assert!(check_environment(env(&[(MAGIC_COOKIE_KEY, MAGIC_COOKIE_VALUE), ("PLUGIN_PROTOCOL_VERSIONS", "1,2")]))
            .is_ok());
        assert!(matches!(
            check_environment(env(&[(MAGIC_COOKIE_KEY, MAGIC_COOKIE_VALUE), ("PLUGIN_PROTOCOL_VERSIONS", "1")])),
            Err(HandshakeError::ProtocolVersion(_))
        ));
    }

    #[test]
    fn handshake_format() {
        assert_eq!(handshake_line(Path::new("/tmp/plugin1")), "1|2|unix|/tmp/plugin1|grpc|\n");
    }
}
