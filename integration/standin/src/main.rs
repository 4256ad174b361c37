//! A stand-in for a model server, built as a static binary into a `FROM scratch`
//! test image (there is no registry here). It accepts every engine's command
//! line, reads `--port`, and speaks enough of the OpenAI API to be asked a
//! question. Behaviour for tests comes from `STANDIN_*` environment variables:
//!
//! - `STANDIN_HEALTH_DELAY_MS`: `/health` answers 503 until this much time passed.
//! - `STANDIN_COUNT=N`, `STANDIN_INTERVAL_MS`: print `line 1`..`line N`, then exit.
//! - `STANDIN_EXIT=C`: exit code after counting (default 0).
//! - `STANDIN_ALLOC_MB=N`: allocate and touch N MiB, then sleep.
//! - `STANDIN_MODEL_DIR`: directory whose files are listed in answers (the HF snapshot).
//!
//! As an Ollama server ([`ollama`]): describes the store under `OLLAMA_MODELS`
//! at start, lists it at `GET /api/tags`, and loads a model from it for
//! `POST /api/generate` (404 when its manifest or a blob is missing).
//!
//! As an SGLang worker behind SGLang's router (sglang-router 0.3.2, observed):
//! the router adds a worker after `GET /health` answers 200, then reads
//! `GET /server_info` and `GET /model_info` (falling back to `/get_server_info`
//! and `/get_model_info` on 404; both optional) for the model id it serves
//! under, and forwards `POST /v1/chat/completions` (and `/generate`) as sent.

mod ollama;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

fn env_u64(k: &str) -> Option<u64> {
    std::env::var(k).ok().and_then(|v| v.parse().ok())
}

fn flag(args: &[String], name: &str) -> Option<String> {
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned()
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    println!("standin starting: {}", args[1..].join(" "));
    if let Some(mb) = env_u64("STANDIN_ALLOC_MB") {
        let mut blocks: Vec<Vec<u8>> = Vec::new();
        for i in 0..mb {
            blocks.push(vec![(i % 251) as u8 + 1; 1 << 20]);
            if i % 16 == 0 {
                println!("allocated {i} MiB");
            }
        }
        println!("allocated {} MiB in total", blocks.len());
        std::thread::sleep(Duration::from_secs(3600));
        return;
    }
    if let Some(n) = env_u64("STANDIN_COUNT") {
        let interval = Duration::from_millis(env_u64("STANDIN_INTERVAL_MS").unwrap_or(0));
        let out = std::io::stdout();
        for i in 1..=n {
            {
                let mut o = out.lock();
                let _ = writeln!(o, "line {i}");
                let _ = o.flush();
            }
            if i % 100 == 0 {
                eprintln!("progress {i}");
            }
            std::thread::sleep(interval);
        }
        std::process::exit(i32::try_from(env_u64("STANDIN_EXIT").unwrap_or(0)).unwrap_or(i32::MAX));
    }
    serve(&args);
}

fn serve(args: &[String]) {
    let port = flag(args, "--port")
        .or_else(|| std::env::var("AIMODEL_PORT").ok())
        .or_else(|| std::env::var("OLLAMA_HOST").ok().and_then(|h| h.rsplit(':').next().map(String::from)))
        .unwrap_or_else(|| "8000".into());
    let model = flag(args, "--served-model-name")
        .or_else(|| flag(args, "--model"))
        .or_else(|| flag(args, "--model-path"))
        .or_else(|| flag(args, "--model-id"))
        .unwrap_or_else(|| "standin".into());
    let delay = Duration::from_millis(env_u64("STANDIN_HEALTH_DELAY_MS").unwrap_or(0));
    let started = Instant::now();
    let listener = match TcpListener::bind(format!("0.0.0.0:{port}")) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("cannot listen on {port}: {e}");
            std::process::exit(1);
        }
    };
    println!("listening on 0.0.0.0:{port}, serving model {model}");
    ollama::describe_store();
    for conn in listener.incoming().flatten() {
        let ready = started.elapsed() >= delay;
        let model = model.clone();
        std::thread::spawn(move || handle(conn, ready, &model));
    }
}

fn handle(mut conn: TcpStream, ready: bool, model: &str) {
    let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
    let mut reader = BufReader::new(conn.try_clone().expect("clone"));
    let mut request_line = String::new();
    if reader.read_line(&mut request_line).is_err() {
        return;
    }
    let mut content_length = 0usize;
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h).is_err() || h == "\r\n" || h.is_empty() {
            break;
        }
        if let Some(v) = h.to_ascii_lowercase().strip_prefix("content-length:") {
            content_length = v.trim().parse().unwrap_or(0);
        }
    }
    let mut body = vec![0u8; content_length.min(1 << 20)];
    let _ = reader.read_exact(&mut body);
    let path = request_line.split_whitespace().nth(1).unwrap_or("/").to_string();
    let method = request_line.split_whitespace().next().unwrap_or("GET").to_string();
    println!("request {}", request_line.trim());
    let api = if ready { ollama::answer(&method, &path, &body) } else { None };
    let (status, text) = match path.as_str() {
        _ if api.is_some() => api.unwrap_or(("500 Internal Server Error", String::new())),
        "/health" | "/api/version" | "/ready" if !ready => {
            ("503 Service Unavailable", "{\"status\":\"loading\"}".to_string())
        }
        "/health" | "/ready" => ("200 OK", "{\"status\":\"ok\"}".to_string()),
        "/api/version" => ("200 OK", "{\"version\":\"standin\"}".to_string()),
        "/v1/models" => {
            ("200 OK", format!("{{\"object\":\"list\",\"data\":[{{\"id\":\"{model}\",\"object\":\"model\"}}]}}"))
        }
        "/v1/chat/completions" | "/v1/completions" | "/generate" => ("200 OK", completion(model, &body)),
        "/server_info" | "/get_server_info" => ("200 OK", server_info(model)),
        "/model_info" | "/get_model_info" => ("200 OK", model_info(model)),
        _ => ("404 Not Found", "{\"error\":\"not found\"}".to_string()),
    };
    let resp = format!(
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{text}",
        text.len()
    );
    let _ = conn.write_all(resp.as_bytes());
}

/// What SGLang's `/server_info` reports of its launch arguments (those the router reads).
fn server_info(model: &str) -> String {
    format!(
        "{{\"model_path\":\"{model}\",\"tokenizer_path\":\"{model}\",\"served_model_name\":\"{model}\",\"tp_size\":1,\"dp_size\":1,\"version\":\"standin\"}}"
    )
}

/// SGLang's `/model_info`.
fn model_info(model: &str) -> String {
    format!("{{\"model_path\":\"{model}\",\"tokenizer_path\":\"{model}\",\"is_generation\":true}}")
}

/// The model's snapshot directory: `STANDIN_MODEL_DIR`, or resolved offline the
/// way huggingface_hub does: `$HF_HUB_CACHE/models--org--name/refs/<rev>` holds
/// the commit, `snapshots/<commit>/` the files.
fn model_dir() -> Option<String> {
    if let Ok(d) = std::env::var("STANDIN_MODEL_DIR") {
        return Some(d);
    }
    let cache = std::env::var("HF_HUB_CACHE").ok()?;
    let model = std::env::var("AIMODEL_MODEL").ok()?;
    let rev = std::env::var("AIMODEL_REVISION").unwrap_or_else(|_| "main".into());
    let repo = format!("{cache}/models--{}", model.replace('/', "--"));
    let commit = std::fs::read_to_string(format!("{repo}/refs/{rev}")).unwrap_or(rev);
    Some(format!("{repo}/snapshots/{commit}"))
}

/// An OpenAI-shaped answer that proves the server read the model's files.
fn completion(model: &str, body: &[u8]) -> String {
    let asked = String::from_utf8_lossy(body);
    let files = model_dir()
        .and_then(|d| std::fs::read_dir(d).ok())
        .map(|rd| {
            let mut names: Vec<String> = rd
                .flatten()
                .map(|e| {
                    let len = std::fs::metadata(e.path()).map(|m| m.len()).unwrap_or(0);
                    format!("{} ({len} bytes)", e.file_name().to_string_lossy())
                })
                .collect();
            names.sort();
            names.join(", ")
        })
        .unwrap_or_else(|| "no model directory".into());
    let content = format!("Hello from {model}. Weights read from the cache: {files}. You sent {} bytes.", asked.len());
    let escaped = content.replace('\\', "\\\\").replace('"', "\\\"");
    format!(
        "{{\"id\":\"chatcmpl-standin\",\"object\":\"chat.completion\",\"model\":\"{model}\",\"choices\":[{{\"index\":0,\"message\":{{\"role\":\"assistant\",\"content\":\"{escaped}\"}},\"finish_reason\":\"stop\"}}]}}"
    )
}
