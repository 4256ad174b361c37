//! A local image registry with authentication (Debian's `docker-registry`,
//! distribution 2.x, htpasswd with a bcrypt hash), on a port of the test's own,
//! and images built from the stand-in with a layer of their own (so a pull
//! really downloads), pushed with the docker CLI under a config directory of
//! the test's own (never `~/.docker`), then removed locally.

use std::path::Path;
use std::time::{Duration, Instant};

use crate::support::standin_image;
use crate::task::{free_port, random_hex};

/// The registry binary (scripts/test installs it).
pub const REGISTRY_BIN: &str = "/usr/bin/docker-registry";
/// The one user.
pub const USER: &str = "puller";

/// A running registry; killed when dropped.
#[derive(Debug)]
pub struct AuthRegistry {
    pub port: u16,
    pub password: String,
    _child: tokio::process::Child,
    _dir: tempfile::TempDir,
    docker_cfg: tempfile::TempDir,
}

impl AuthRegistry {
    /// Starts one, or `None` (a skip) when the binary is missing and `CI` is
    /// not `true`; with `CI=true` a missing binary fails the test.
    pub async fn start() -> Option<AuthRegistry> {
        if !Path::new(REGISTRY_BIN).exists() {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "{REGISTRY_BIN} is missing (scripts/test installs it)"
            );
            eprintln!("SKIP: no {REGISTRY_BIN}");
            return None;
        }
        let dir = tempfile::tempdir().expect("temp dir");
        let port = free_port();
        let password = format!("pw-{}", random_hex(8));
        let hash = bcrypt::hash(&password, 5).expect("bcrypt");
        std::fs::write(dir.path().join("htpasswd"), format!("{USER}:{hash}\n")).expect("htpasswd");
        std::fs::write(
            dir.path().join("config.yml"),
            format!(
                "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\nauth:\n  htpasswd:\n    realm: test\n    path: {}\n",
                dir.path().join("data").display(),
                dir.path().join("htpasswd").display()
            ),
        )
        .expect("registry config");
        let child = tokio::process::Command::new(REGISTRY_BIN)
            .arg("serve")
            .arg(dir.path().join("config.yml"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("start docker-registry");
        let deadline = Instant::now() + Duration::from_secs(20);
        while tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_err() {
            assert!(Instant::now() < deadline, "the registry did not start");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let r = AuthRegistry { port, password, _child: child, _dir: dir, docker_cfg: tempfile::tempdir().ok()? };
        r.docker(&["login", "-u", USER, "-p", &r.password, &r.host()]);
        Some(r)
    }

    /// `127.0.0.1:<port>`, the registry part of its image references.
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Runs the docker CLI with the test's own credentials store.
    pub fn docker(&self, args: &[&str]) {
        let out = std::process::Command::new("docker")
            .args(args)
            .env("DOCKER_BUILDKIT", "0")
            .env("DOCKER_CONFIG", self.docker_cfg.path())
            .output()
            .expect("docker");
        assert!(out.status.success(), "docker {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }

    /// Builds `<host>/<repo>:<random tag>` from the stand-in plus a layer of
    /// its own, pushes it, removes it locally; returns the reference.
    pub fn push_image(&self, repo: &str) -> String {
        self.push_image_with(repo, &standin_image().expect("stand-in image"), 0)
    }

    /// [`AuthRegistry::push_image`] from `from`, with a layer of `bytes` random
    /// bytes (incompressible: a pull moves them all) besides the nonce.
    pub fn push_image_with(&self, repo: &str, from: &str, bytes: usize) -> String {
        let tag = format!("{}/{repo}:{}", self.host(), random_hex(4));
        let ctx = tempfile::tempdir().expect("temp dir");
        std::fs::write(ctx.path().join("nonce"), random_hex(64)).expect("nonce");
        let mut random = vec![0u8; bytes];
        if bytes > 0 {
            use std::io::Read;
            std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut random)).expect("random bytes");
        }
        std::fs::write(ctx.path().join("payload"), &random).expect("payload");
        std::fs::write(ctx.path().join("Dockerfile"), format!("FROM {from}\nCOPY nonce payload /aimodel-bench/\n"))
            .expect("Dockerfile");
        self.docker(&["build", "-q", "-t", &tag, ctx.path().to_str().expect("utf-8 path")]);
        self.docker(&["push", &tag]);
        self.docker(&["rmi", &tag]);
        tag
    }
}

/// Whether the local engine has `image`.
pub fn image_present(image: &str) -> bool {
    std::process::Command::new("docker").args(["image", "inspect", image]).output().is_ok_and(|o| o.status.success())
}
