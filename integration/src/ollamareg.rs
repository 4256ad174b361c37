//! A real registry for Ollama models: Debian's `docker-registry` (distribution
//! 2.x) on a free port, filled through the registry HTTP API (blob uploads,
//! then a v2 manifest with Ollama's media types), with its access log for
//! counting what it served. Also the no-op file-lock library that makes one
//! machine behave like NFS mounted `nolock` (flock, lockf and fcntl locks
//! succeed without locking).

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use sha2::Digest as _;

/// Where Debian installs the registry.
pub const REGISTRY_BIN: &str = "/usr/bin/docker-registry";
/// Ollama's layer media types.
pub const MODEL: &str = "application/vnd.ollama.image.model";
pub const TEMPLATE: &str = "application/vnd.ollama.image.template";
pub const PARAMS: &str = "application/vnd.ollama.image.params";
/// The config blob's media type in Ollama's manifests.
pub const CONFIG: &str = "application/vnd.docker.container.image.v1+json";

/// A running registry; killed on drop.
#[derive(Debug)]
pub struct OllamaRegistry {
    child: Child,
    pub port: u16,
    dir: tempfile::TempDir,
}

impl Drop for OllamaRegistry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `sha256:<hex>` of `bytes`.
pub fn digest_of(bytes: &[u8]) -> String {
    format!("sha256:{}", hex(&sha2::Sha256::digest(bytes)))
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).unwrap_or(0)
}

/// One HTTP/1.1 exchange (`Connection: close`): status, head, body.
pub fn http(port: u16, method: &str, target: &str, headers: &[(&str, &str)], body: &[u8]) -> (u16, String, Vec<u8>) {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect to the registry");
    let mut req = format!("{method} {target} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
    s.write_all(req.as_bytes()).and_then(|()| s.write_all(body)).expect("send");
    let mut out = Vec::new();
    s.read_to_end(&mut out).expect("read the answer");
    let end = out.windows(4).position(|w| w == b"\r\n\r\n").expect("an HTTP head");
    let head = String::from_utf8_lossy(&out[..end]).into_owned();
    let status = head.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0);
    (status, head, out[end + 4..].to_vec())
}

fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().filter_map(|l| l.split_once(':')).find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.trim())
}

impl OllamaRegistry {
    /// Starts a registry, or `None` (a skip) when the binary is missing and
    /// `CI` is not `true`; with `CI=true` a missing binary fails the test.
    pub fn start() -> Option<OllamaRegistry> {
        if !Path::new(REGISTRY_BIN).exists() {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "{REGISTRY_BIN} is missing and CI=true (scripts/test installs docker-registry)"
            );
            eprintln!("SKIP: no {REGISTRY_BIN}");
            return None;
        }
        let dir = tempfile::tempdir().expect("temp dir");
        let port = free_port();
        let config = dir.path().join("config.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n",
                dir.path().join("data").display()
            ),
        )
        .expect("write the registry config");
        let log = std::fs::File::create(dir.path().join("access.log")).expect("log file");
        let child = Command::new(REGISTRY_BIN)
            .arg("serve")
            .arg(&config)
            .stdout(log.try_clone().expect("log fd"))
            .stderr(log)
            .spawn()
            .expect("start docker-registry");
        let r = OllamaRegistry { child, port, dir };
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "the registry did not start: {}", r.log());
            std::thread::sleep(Duration::from_millis(50));
        }
        Some(r)
    }

    /// `http://127.0.0.1:<port>`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The registry's log (its access log lines included).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("access.log")).unwrap_or_default()
    }

    /// Uploads a blob to `repo` (monolithic upload); returns its digest.
    pub fn push_blob(&self, repo: &str, bytes: &[u8]) -> String {
        let digest = digest_of(bytes);
        let (status, head, _) = http(self.port, "POST", &format!("/v2/{repo}/blobs/uploads/"), &[], b"");
        assert_eq!(status, 202, "start an upload: {head}");
        let location = header(&head, "location").expect("a Location").to_string();
        let target = location.strip_prefix(&self.endpoint()).unwrap_or(&location);
        let sep = if target.contains('?') { '&' } else { '?' };
        let (status, head, _) = http(
            self.port,
            "PUT",
            &format!("{target}{sep}digest={digest}"),
            &[("Content-Type", "application/octet-stream")],
            bytes,
        );
        assert_eq!(status, 201, "finish the upload: {head}");
        digest
    }

    /// Pushes an Ollama-layout model: a config blob, the layers (media type,
    /// bytes), then the manifest for `repo:tag`. Returns the manifest's bytes as pushed.
    pub fn push_model(&self, repo: &str, tag: &str, layers: &[(&str, &[u8])]) -> Vec<u8> {
        let config = format!(r#"{{"model_format":"gguf","model_family":"test","file_type":"F16","repo":"{repo}"}}"#);
        let config_digest = self.push_blob(repo, config.as_bytes());
        let layers: Vec<String> = layers
            .iter()
            .map(|(media, bytes)| {
                let d = self.push_blob(repo, bytes);
                format!(r#"{{"mediaType":"{media}","digest":"{d}","size":{}}}"#, bytes.len())
            })
            .collect();
        let manifest = format!(
            r#"{{"schemaVersion":2,"mediaType":"application/vnd.docker.distribution.manifest.v2+json","config":{{"mediaType":"{CONFIG}","digest":"{config_digest}","size":{}}},"layers":[{}]}}"#,
            config.len(),
            layers.join(",")
        );
        let (status, head, _) = http(
            self.port,
            "PUT",
            &format!("/v2/{repo}/manifests/{tag}"),
            &[("Content-Type", "application/vnd.docker.distribution.manifest.v2+json")],
            manifest.as_bytes(),
        );
        assert_eq!(status, 201, "push the manifest: {head}");
        manifest.into_bytes()
    }

    /// Bytes the registry sent for GETs of `digest` (from its access log
    /// lines, `"GET <uri> HTTP/1.1" <status> <bytes>`), and how many GETs.
    pub fn blob_served(&self, digest: &str) -> (u64, usize) {
        // The access log line is written as the response completes: give it a moment.
        std::thread::sleep(Duration::from_millis(300));
        let needle = format!("/blobs/{digest} HTTP/1.1\" ");
        let mut bytes = 0;
        let mut gets = 0;
        for line in self.log().lines().filter(|l| l.contains("\"GET ") && l.contains(&needle)) {
            let rest = line.split(&needle).nth(1).unwrap_or("");
            let mut f = rest.split_whitespace();
            let (_status, n) = (f.next(), f.next().and_then(|n| n.parse::<u64>().ok()).unwrap_or(0));
            bytes += n;
            gets += 1;
        }
        (bytes, gets)
    }

    /// Overwrites the stored bytes of `digest` with as many other bytes (the
    /// registry serves what it stores without checking it again).
    pub fn corrupt_blob(&self, digest: &str) {
        let hex = digest.trim_start_matches("sha256:");
        let data: PathBuf =
            self.dir.path().join(format!("data/docker/registry/v2/blobs/sha256/{}/{hex}/data", &hex[..2]));
        let mut bytes = std::fs::read(&data).expect("the stored blob");
        for b in bytes.iter_mut().take(64) {
            *b ^= 0x5a;
        }
        std::fs::write(&data, bytes).expect("corrupt the stored blob");
    }
}

/// A shared library whose `flock`, `lockf` and `fcntl` locking calls succeed
/// without locking (what NFS mounted `nolock` gives every node), built with
/// `cc` once per process; `None` when there is no C compiler.
pub fn nolock_library() -> Option<PathBuf> {
    static LIB: OnceLock<Option<PathBuf>> = OnceLock::new();
    LIB.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("aimodel-nolock-{}", std::process::id()));
        std::fs::create_dir_all(&dir).ok()?;
        let src = dir.join("nolock.c");
        std::fs::write(
            &src,
            "#define _GNU_SOURCE\n#include <dlfcn.h>\n#include <fcntl.h>\n#include <stdarg.h>\n\
             int flock(int fd, int op) { (void)fd; (void)op; return 0; }\n\
             int lockf(int fd, int cmd, long len) { (void)fd; (void)cmd; (void)len; return 0; }\n\
             int fcntl(int fd, int cmd, ...) {\n\
               va_list ap; va_start(ap, cmd); void *arg = va_arg(ap, void *); va_end(ap);\n\
               if (cmd == F_SETLK || cmd == F_SETLKW || cmd == F_OFD_SETLK || cmd == F_OFD_SETLKW) return 0;\n\
               int (*real)(int, int, ...) = (int (*)(int, int, ...))dlsym(RTLD_NEXT, \"fcntl\");\n\
               return real(fd, cmd, arg);\n\
             }\n",
        )
        .ok()?;
        let lib = dir.join("libnolock.so");
        let ok = Command::new("cc")
            .args(["-shared", "-fPIC", "-O2", "-o"])
            .arg(&lib)
            .arg(&src)
            .arg("-ldl")
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        ok.then_some(lib)
    })
    .clone()
}
