//! A small stand-in for the Nomad HTTP API, enough for the agent's job watch:
//! `GET /v1/jobs` with blocking queries (`index`, `wait`, `X-Nomad-Index`)
//! `GET /v1/job/<id>` and `GET /v1/node/<id>`. Jobs and nodes are set by the test; every
//! query is recorded so a test can tell blocking queries from polling.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::watch;

/// One request the server saw.
#[derive(Debug, Clone)]
pub struct Seen {
    pub path: String,
    pub token: Option<String>,
}

#[derive(Default, Debug)]
struct State {
    index: u64,
    /// id → (namespace, modify index, stopped, job JSON).
    jobs: BTreeMap<String, (String, u64, bool, serde_json::Value)>,
    /// id → node JSON.
    nodes: BTreeMap<String, serde_json::Value>,
    seen: Vec<Seen>,
}

/// A running fake Nomad API.
#[derive(Debug)]
pub struct NomadApi {
    pub port: u16,
    state: Arc<Mutex<State>>,
    bump: watch::Sender<u64>,
}

fn query(path: &str, key: &str) -> Option<String> {
    path.split_once('?')?.1.split('&').find_map(|kv| kv.strip_prefix(&format!("{key}=")).map(str::to_string))
}

impl NomadApi {
    /// Starts on an ephemeral port; the index starts at 10.
    pub async fn start() -> std::io::Result<NomadApi> {
        let l = TcpListener::bind("127.0.0.1:0").await?;
        let port = l.local_addr()?.port();
        Ok(Self::serving(port, tokio_stream::wrappers::TcpListenerStream::new(l)))
    }

    /// Starts on a unix socket at `path`, as Nomad's task API
    /// (`${NOMAD_SECRETS_DIR}/api.sock`); `port` is 0.
    pub async fn start_unix(path: &std::path::Path) -> std::io::Result<NomadApi> {
        let l = UnixListener::bind(path)?;
        Ok(Self::serving(0, tokio_stream::wrappers::UnixListenerStream::new(l)))
    }

    /// Serves every connection `incoming` yields.
    fn serving<S, I>(port: u16, mut incoming: I) -> NomadApi
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
        I: futures::Stream<Item = std::io::Result<S>> + Unpin + Send + 'static,
    {
        use futures::StreamExt;
        let state = Arc::new(Mutex::new(State { index: 10, ..State::default() }));
        let (bump, _) = watch::channel(10u64);
        let (st, b) = (state.clone(), bump.clone());
        tokio::spawn(async move {
            while let Some(Ok(s)) = incoming.next().await {
                let (st, rx) = (st.clone(), b.subscribe());
                tokio::spawn(async move {
                    let _ = serve(s, st, rx).await;
                });
            }
        });
        NomadApi { port, state, bump }
    }

    /// `NOMAD_ADDR` for it.
    pub fn address(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn bump(&self, f: impl FnOnce(&mut State, u64)) {
        let idx = {
            let mut s = self.state.lock().unwrap();
            s.index += 1;
            let i = s.index;
            f(&mut s, i);
            i
        };
        self.bump.send_replace(idx);
    }

    /// Registers (or updates) a job given as Nomad's job JSON (`ID`, `TaskGroups`...).
    pub fn register(&self, namespace: &str, job: serde_json::Value) {
        let id = job["ID"].as_str().unwrap_or("job").to_string();
        self.bump(|s, i| {
            s.jobs.insert(id, (namespace.into(), i, false, job));
        });
    }

    /// Stops a job (it stays listed with `Stop: true`, as Nomad does until GC).
    pub fn stop(&self, id: &str) {
        self.bump(|s, i| {
            if let Some(j) = s.jobs.get_mut(id) {
                j.1 = i;
                j.2 = true;
            }
        });
    }

    /// Sets (or replaces) a node as `GET /v1/node/<id>` returns it (`ID` names it).
    pub fn set_node(&self, node: serde_json::Value) {
        let id = node["ID"].as_str().unwrap_or("node").to_string();
        self.bump(|s, _| {
            s.nodes.insert(id, node);
        });
    }

    /// Removes a job from the list (as Nomad's job GC does after a stop).
    pub fn purge(&self, id: &str) {
        self.bump(|s, _| {
            s.jobs.remove(id);
        });
    }

    /// Requests seen so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.state.lock().unwrap().seen.clone()
    }
}

async fn serve<S: AsyncRead + AsyncWrite + Unpin>(
    mut s: S,
    st: Arc<Mutex<State>>,
    mut bumped: watch::Receiver<u64>,
) -> std::io::Result<()> {
    let mut r = BufReader::new(&mut s);
    let mut line = String::new();
    r.read_line(&mut line).await?;
    let path = line.split_whitespace().nth(1).unwrap_or("/").to_string();
    let mut token = None;
    loop {
        let mut h = String::new();
        if r.read_line(&mut h).await? == 0 || h == "\r\n" {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            if k.eq_ignore_ascii_case("x-nomad-token") {
                token = Some(v.trim().to_string());
            }
        }
    }
    st.lock().unwrap().seen.push(Seen { path: path.clone(), token });
    let (status, body, index) = if path.starts_with("/v1/jobs") {
        let want: u64 = query(&path, "index").and_then(|v| v.parse().ok()).unwrap_or(0);
        let wait = query(&path, "wait")
            .and_then(|w| w.trim_end_matches('s').parse::<u64>().ok())
            .map(Duration::from_secs)
            .unwrap_or(Duration::from_secs(300));
        // Block until the index passes the client's, or the wait runs out.
        let _ = tokio::time::timeout(wait, bumped.wait_for(|i| *i > want)).await;
        let s = st.lock().unwrap();
        let list: Vec<serde_json::Value> = s
            .jobs
            .iter()
            .map(|(id, (ns, mi, stop, _))| {
                serde_json::json!({"ID": id, "Name": id, "Namespace": ns, "ModifyIndex": mi, "JobModifyIndex": mi,
                    "Stop": stop, "Status": if *stop { "dead" } else { "running" }, "Type": "service"})
            })
            .collect();
        ("200 OK", serde_json::Value::Array(list).to_string(), s.index)
    } else if let Some(rest) = path.strip_prefix("/v1/job/") {
        let id = rest.split('?').next().unwrap_or("");
        let s = st.lock().unwrap();
        match s.jobs.get(id) {
            Some((_, _, _, job)) => ("200 OK", job.to_string(), s.index),
            None => ("404 Not Found", "job not found".to_string(), s.index),
        }
    } else if let Some(rest) = path.strip_prefix("/v1/node/") {
        let id = rest.split('?').next().unwrap_or("");
        let s = st.lock().unwrap();
        match s.nodes.get(id) {
            Some(node) => ("200 OK", node.to_string(), s.index),
            None => ("404 Not Found", "node not found".to_string(), s.index),
        }
    } else {
        ("404 Not Found", "no such endpoint".to_string(), 0)
    };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nX-Nomad-Index: {index}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).await?;
    s.write_all(body.as_bytes()).await
}
