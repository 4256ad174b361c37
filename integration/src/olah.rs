//! olah (PyPI), a real hub-protocol server, serving a local git repo offline.

use std::path::Path;

use sha2::Digest;

/// A real hub-protocol server (olah, offline) serving a local git repo with an
/// LFS file, stopped on drop.
/// A running olah, stopped on drop.
#[derive(Debug)]
pub struct Olah {
    child: std::process::Child,
    pub port: u16,
    _dir: tempfile::TempDir,
}

impl Drop for Olah {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn git(dir: &Path, args: &[&str]) {
    let out = std::process::Command::new("git").args(args).current_dir(dir).output().unwrap();
    assert!(out.status.success(), "git {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// Serves `org/served` (config.json + an LFS `model.safetensors` holding `weights`).
pub fn start(py: &Path, weights: &[u8]) -> Olah {
    start_repo(py, "org/served", &[("config.json", br#"{"model_type":"served"}"#)], weights)
}

/// Serves `repo_id` with plain `files` and an LFS `model.safetensors` holding `weights`.
pub fn start_repo(py: &Path, repo_id: &str, files: &[(&str, &[u8])], weights: &[u8]) -> Olah {
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("mirrors/models").join(repo_id);
    std::fs::create_dir_all(&repo).unwrap();
    git(&repo, &["init", "-q", "-b", "main"]);
    git(&repo, &["config", "user.email", "t@example.invalid"]);
    git(&repo, &["config", "user.name", "t"]);
    for (name, bytes) in files {
        std::fs::write(repo.join(name), bytes).unwrap();
    }
    std::fs::write(repo.join(".gitattributes"), "*.safetensors filter=lfs diff=lfs merge=lfs -text\n").unwrap();
    // An LFS file: the pointer in git, the bytes in .git/lfs/objects (no git-lfs needed).
    let sha = format!("{:x}", sha2::Sha256::digest(weights));
    let pointer = format!("version https://git-lfs.github.com/spec/v1\noid sha256:{sha}\nsize {}\n", weights.len());
    std::fs::write(repo.join("model.safetensors"), pointer).unwrap();
    let obj = repo.join(".git/lfs/objects").join(&sha[..2]).join(&sha[2..4]);
    std::fs::create_dir_all(&obj).unwrap();
    std::fs::write(obj.join(&sha), weights).unwrap();
    git(&repo, &["add", "-A"]);
    git(&repo, &["commit", "-q", "-m", "weights"]);

    let port = crate::task::free_port();
    let config = format!(
        "[basic]\nhost = \"127.0.0.1\"\nport = {port}\nmirrors-path = [\"{m}\"]\nrepos-path = \"{r}\"\nhf-scheme = \"http\"\nhf-netloc = \"127.0.0.1:9\"\nhf-lfs-netloc = \"127.0.0.1:9\"\n\n[accessibility]\noffline = true\n",
        m = dir.path().join("mirrors").display(),
        r = dir.path().join("repos").display()
    );
    std::fs::write(dir.path().join("configs.toml"), config).unwrap();
    let cli = py.parent().unwrap().join("olah-cli");
    let child = std::process::Command::new(cli)
        .args(["-c", "configs.toml"])
        .current_dir(dir.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(std::time::Instant::now() < deadline, "olah did not start");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    Olah { child, port, _dir: dir }
}

impl Olah {
    /// `HF_ENDPOINT` for this server.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}
