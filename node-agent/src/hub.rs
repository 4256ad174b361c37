//! A HuggingFace hub client over reqwest (rustls): revision → commit, the
//! recursive tree listing (paginated), and resolve downloads with retries.
//! `HF_TOKEN` goes only to the hub's own host: reqwest drops `Authorization`
//! on a redirect to another host (the CDN), and the token is never logged.

use std::time::Duration;

use reqwest::header::{HeaderMap, AUTHORIZATION, LINK, RETRY_AFTER};
use reqwest::{Client, Response, StatusCode};
use serde::Deserialize;

/// Attempts per request for retryable failures (429, 5xx, transport errors).
pub const ATTEMPTS: u32 = 5;

/// Errors talking to the hub.
#[derive(Debug, thiserror::Error)]
pub enum HubError {
    #[error("{repo}: repository not found (or private: set HF_TOKEN) [{code}]")]
    NotFound { repo: String, code: String },
    #[error("{repo}: access denied; the repo is gated or private: accept its terms and set HF_TOKEN [{code}]")]
    Denied { repo: String, code: String },
    #[error("{repo}@{revision}: revision not found")]
    RevisionNotFound { repo: String, revision: String },
    #[error("{url}: HTTP {status} after {attempts} attempts")]
    Status { url: String, status: u16, attempts: u32 },
    #[error("{url}: {reason}")]
    Transport { url: String, reason: String },
    #[error(
        "HF_ENDPOINT {endpoint:?} is not usable: {reason} (expected an http(s) URL such as https://huggingface.co)"
    )]
    Endpoint { endpoint: String, reason: String },
    #[error("unexpected answer from {url}: {reason}")]
    Protocol { url: String, reason: String },
    #[error("refusing the tree listing from {url}: {reason}")]
    Listing { url: String, reason: String },
    #[error("{url}: answer larger than {max} bytes")]
    TooLarge { url: String, max: u64 },
    #[error("{url}: answer not read within {limit:?}")]
    Slow { url: String, limit: Duration },
    #[error("{url}: the tree listing has more than {max} pages")]
    TooManyPages { url: String, max: usize },
    #[error("{url}: refusing the next page link {link:?}: {reason} (the token goes only to the endpoint's scheme, host and port)")]
    ForeignLink { url: String, link: String, reason: String },
}

/// What failed, from the innermost causes of a reqwest error (its own text
/// only repeats the URL): "connection refused", "dns error: …", "timed out".
fn transport_reason(e: &reqwest::Error) -> String {
    let mut causes = Vec::new();
    let mut src = std::error::Error::source(e);
    while let Some(c) = src {
        let t = c.to_string();
        if !t.is_empty() && !causes.iter().any(|x: &String| x.contains(&t)) {
            causes.push(t);
        }
        src = c.source();
    }
    let kind = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "connect failed"
    } else {
        "request failed"
    };
    match causes.last() {
        Some(inner) => format!("{kind}: {inner}"),
        None => kind.to_string(),
    }
}

/// Checks an endpoint (an http(s) URL with a host, no query or fragment) and
/// builds the HTTP client for it; returns the endpoint without a trailing `/`.
/// reqwest follows redirects (a CDN) and drops `Authorization` when one leads
/// to another host.
pub(crate) fn client_for(endpoint: &str) -> Result<(String, Client), String> {
    let parsed = reqwest::Url::parse(endpoint).map_err(|e| e.to_string())?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(format!("the scheme {:?} is not http or https", parsed.scheme()));
    }
    if parsed.host_str().is_none_or(str::is_empty) {
        return Err("no host".into());
    }
    if parsed.query().is_some() || parsed.fragment().is_some() {
        return Err("a query or fragment".into());
    }
    let http = Client::builder()
        .connect_timeout(Duration::from_secs(20))
        .read_timeout(Duration::from_secs(60))
        .user_agent(concat!("aimodel-agent/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| e.to_string())?;
    Ok((endpoint.trim_end_matches('/').to_string(), http))
}

/// How a GET with retries failed.
#[derive(Debug)]
pub enum GetFailure {
    /// An answer that is not retried (4xx), or the last of the retried ones (429, 5xx).
    Status { resp: Response, attempts: u32 },
    /// No answer after [`ATTEMPTS`] tries; the reason names the host and the cause.
    Transport { reason: String },
}

/// GET `url` with `headers`, retrying 429 (honouring Retry-After, at most
/// 60 s), 5xx and transport errors with doubling pauses (0.5 s to 16 s), at
/// most [`ATTEMPTS`] times. Success is 2xx (206 included). Shared by the hub
/// and the Ollama registry clients.
pub async fn get_with_retries(http: &Client, url: &str, headers: HeaderMap) -> Result<Response, GetFailure> {
    let mut delay = Duration::from_millis(500);
    let mut attempt = 1;
    loop {
        match http.get(url).headers(headers.clone()).send().await {
            Ok(r) if r.status().is_success() || r.status() == StatusCode::PARTIAL_CONTENT => return Ok(r),
            Ok(r) if matches!(r.status().as_u16(), 429 | 500..=599) && attempt < ATTEMPTS => {
                let wait = r
                    .headers()
                    .get(RETRY_AFTER)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<u64>().ok())
                    .map(Duration::from_secs)
                    .unwrap_or(delay)
                    .min(Duration::from_secs(60));
                tokio::time::sleep(wait).await;
            }
            Ok(resp) => return Err(GetFailure::Status { resp, attempts: attempt }),
            Err(_) if attempt < ATTEMPTS => tokio::time::sleep(delay).await,
            Err(e) => {
                let host = reqwest::Url::parse(url).ok().and_then(|u| u.host_str().map(str::to_string));
                let reason = format!(
                    "cannot reach {} after {attempt} attempts: {}",
                    host.unwrap_or_else(|| url.to_string()),
                    transport_reason(&e)
                );
                return Err(GetFailure::Transport { reason });
            }
        }
        delay = (delay * 2).min(Duration::from_secs(16));
        attempt += 1;
    }
}

/// One file of a commit, as the tree API lists it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct TreeItem {
    #[serde(rename = "type")]
    pub kind: String,
    pub path: String,
    #[serde(default)]
    pub size: u64,
    #[serde(default)]
    pub oid: String,
    #[serde(default)]
    pub lfs: Option<LfsInfo>,
    #[serde(default, rename = "xetHash")]
    pub xet_hash: Option<String>,
}

/// LFS pointer facts of a tree item.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct LfsInfo {
    pub oid: String,
    pub size: u64,
}

/// The hub endpoint and credentials.
#[derive(Clone)]
pub struct Hub {
    pub endpoint: String,
    token: Option<String>,
    http: Client,
}

impl std::fmt::Debug for Hub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hub")
            .field("endpoint", &self.endpoint)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

#[derive(Deserialize)]
struct RevisionInfo {
    sha: String,
}

impl Hub {
    /// `HF_ENDPOINT` (default https://huggingface.co) and `HF_TOKEN` as read at start-up.
    pub fn from_env(env: &crate::env::Environment) -> Result<Self, HubError> {
        let endpoint = env.hf_endpoint.as_deref().unwrap_or("https://huggingface.co");
        Hub::new(endpoint, env.hf_token.clone())
    }

    /// A client for `endpoint`.
    pub fn new(endpoint: &str, token: Option<String>) -> Result<Self, HubError> {
        let (endpoint, http) =
            client_for(endpoint).map_err(|reason| HubError::Endpoint { endpoint: endpoint.into(), reason })?;
        Ok(Hub { endpoint, token, http })
    }

    fn headers(&self) -> HeaderMap {
        let mut h = HeaderMap::new();
        if let Some(t) = &self.token {
            if let Ok(v) = format!("Bearer {t}").parse() {
                h.insert(AUTHORIZATION, v);
            }
        }
        h
    }

    /// GET with retries on 429 (honouring Retry-After), 5xx and transport errors.
    pub async fn get(&self, url: &str, extra: HeaderMap, repo: &str) -> Result<Response, HubError> {
        let mut headers = self.headers();
        headers.extend(extra);
        match get_with_retries(&self.http, url, headers).await {
            Ok(r) => Ok(r),
            Err(GetFailure::Status { resp, attempts }) => {
                let code = resp.headers().get("x-error-code").and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
                Err(match resp.status().as_u16() {
                    401 | 404 if code == "RevisionNotFound" => {
                        HubError::RevisionNotFound { repo: repo.into(), revision: String::new() }
                    }
                    401 | 404 if code == "GatedRepo" => HubError::Denied { repo: repo.into(), code },
                    401 | 404 => HubError::NotFound { repo: repo.into(), code },
                    403 => HubError::Denied { repo: repo.into(), code },
                    s => HubError::Status { url: url.into(), status: s, attempts },
                })
            }
            Err(GetFailure::Transport { reason }) => Err(HubError::Transport { url: url.into(), reason }),
        }
    }

    /// The commit a revision points at.
    pub async fn resolve(&self, repo: &str, revision: &str) -> Result<String, HubError> {
        let url = format!("{}/api/models/{repo}/revision/{}", self.endpoint, encode(revision));
        let r = self.get(&url, HeaderMap::new(), repo).await.map_err(|e| match e {
            HubError::RevisionNotFound { repo, .. } => HubError::RevisionNotFound { repo, revision: revision.into() },
            e => e,
        })?;
        let body = read_capped(r, &url, MAX_JSON_BYTES, JSON_TIMEOUT).await?;
        let info: RevisionInfo = serde_json::from_slice(&body)
            .map_err(|e| HubError::Protocol { url: url.clone(), reason: e.to_string() })?;
        if !hf_cache::layout::is_commit(&info.sha) {
            return Err(HubError::Protocol { url, reason: format!("{:?} is not a commit hash", info.sha) });
        }
        Ok(info.sha)
    }

    /// Every file of a commit (directories recursed, pages followed). Each page
    /// is checked before anything touches the disk ([`parse_tree_page`]); pages,
    /// files and their total size are capped, and a next page is fetched only
    /// from the endpoint's own scheme, host and port (it gets the token).
    pub async fn tree(&self, repo: &str, commit: &str) -> Result<Vec<TreeItem>, HubError> {
        let mut url = format!("{}/api/models/{repo}/tree/{commit}?recursive=true&expand=false", self.endpoint);
        let mut files = Vec::new();
        let mut total: u64 = 0;
        let mut seen = std::collections::HashSet::new();
        for page_no in 1.. {
            if page_no > MAX_PAGES {
                return Err(HubError::TooManyPages { url, max: MAX_PAGES });
            }
            let r = self.get(&url, HeaderMap::new(), repo).await?;
            let link = r.headers().get_all(LINK).iter().map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
            let link: Vec<String> = link.collect();
            let next = next_link(&link.join(", "))
                .map_err(|reason| HubError::Protocol { url: url.clone(), reason: format!("Link header: {reason}") })?;
            let body = read_capped(r, &url, MAX_JSON_BYTES, JSON_TIMEOUT).await?;
            for item in parse_tree_page(&body).map_err(|e| HubError::Listing { url: url.clone(), reason: e.0 })? {
                total = total.checked_add(item.content_size()).ok_or_else(|| HubError::Listing {
                    url: url.clone(),
                    reason: "the listed sizes add up past 2^64 bytes".into(),
                })?;
                files.push(item);
                if files.len() > MAX_FILES {
                    return Err(HubError::Listing { url, reason: format!("more than {MAX_FILES} files") });
                }
            }
            seen.insert(url.clone());
            match next {
                Some(n) => {
                    let n = self.same_origin(&url, &n)?;
                    if seen.contains(&n) {
                        return Err(HubError::Protocol {
                            url,
                            reason: format!("the next page {n} was already listed"),
                        });
                    }
                    url = n;
                }
                None => break,
            }
        }
        Ok(files)
    }

    /// `link` (absolute, or relative to the endpoint) when it has the endpoint's
    /// exact scheme, host and port; the token goes with it.
    pub fn same_origin(&self, from: &str, link: &str) -> Result<String, HubError> {
        let bad = |reason: String| HubError::ForeignLink { url: from.into(), link: link.into(), reason };
        let base = reqwest::Url::parse(&format!("{}/", self.endpoint)).map_err(|e| bad(e.to_string()))?;
        let next = base.join(link).map_err(|e| bad(e.to_string()))?;
        if next.scheme() != base.scheme()
            || next.host_str() != base.host_str()
            || next.port_or_known_default() != base.port_or_known_default()
        {
            return Err(bad(format!("not the endpoint {}", self.endpoint)));
        }
        if !next.username().is_empty() || next.password().is_some() {
            return Err(bad("credentials in the link".into()));
        }
        Ok(next.to_string())
    }

    /// The resolve URL of a file at a commit.
    pub fn file_url(&self, repo: &str, commit: &str, path: &str) -> String {
        let path: Vec<String> = path.split('/').map(encode).collect();
        format!("{}/{repo}/resolve/{commit}/{}", self.endpoint, path.join("/"))
    }
}

fn encode(s: &str) -> String {
    hf_cache::layout::percent_encode(s, b"-_.~")
}

/// Largest file the agent accepts from a listing.
pub const MAX_FILE_SIZE: u64 = 1 << 40;
/// Largest JSON answer (revision info, one tree page).
pub const MAX_JSON_BYTES: usize = 16 << 20;
/// Time to read one JSON answer.
pub const JSON_TIMEOUT: Duration = Duration::from_secs(120);
/// Pages of one tree listing.
pub const MAX_PAGES: usize = 1000;
/// Files of one tree listing.
pub const MAX_FILES: usize = 200_000;

/// Reads a whole body, refusing more than `cap` bytes or more than `limit` of time.
pub async fn read_capped(r: Response, url: &str, cap: usize, limit: Duration) -> Result<Vec<u8>, HubError> {
    use futures::StreamExt;
    if r.content_length().is_some_and(|n| n > cap as u64) {
        return Err(HubError::TooLarge { url: url.into(), max: cap as u64 });
    }
    let read = async {
        let mut out = Vec::new();
        let mut body = r.bytes_stream();
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|e| HubError::Transport { url: url.into(), reason: e.to_string() })?;
            if out.len() + chunk.len() > cap {
                return Err(HubError::TooLarge { url: url.into(), max: cap as u64 });
            }
            out.extend_from_slice(&chunk);
        }
        Ok(out)
    };
    tokio::time::timeout(limit, read).await.map_err(|_| HubError::Slow { url: url.into(), limit })?
}

/// Whether `s` is exactly `n` lowercase hex digits.
pub fn is_hex(s: &str, n: usize) -> bool {
    s.len() == n && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// One page of the tree API, checked before anything touches the disk: every
/// file has a safe relative path, a git blob id of 40 lowercase hex, for LFS
/// files a sha256 of 64 lowercase hex (these become names in `blobs/`), and
/// sizes within [`MAX_FILE_SIZE`]. Directories are dropped.
pub fn parse_tree_page(body: &[u8]) -> Result<Vec<TreeItem>, ParseError> {
    tree_page(body).map_err(ParseError)
}

/// Why a tree page or a Link header is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ParseError(pub String);

fn tree_page(body: &[u8]) -> Result<Vec<TreeItem>, String> {
    let page: Vec<TreeItem> = serde_json::from_slice(body).map_err(|e| format!("not a tree page: {e}"))?;
    let mut files = Vec::new();
    for item in page.into_iter().filter(|i| i.kind == "file") {
        if item.path.is_empty()
            || item.path.starts_with('/')
            || item.path.split('/').any(|c| c == ".." || c == "." || c.is_empty())
            || item.path.contains('\0')
        {
            return Err(format!("unsafe path {:?}", item.path));
        }
        if !is_hex(&item.oid, 40) {
            return Err(format!("{}: oid {:?} is not a git blob id (40 lowercase hex)", item.path, item.oid));
        }
        if let Some(lfs) = &item.lfs {
            if !is_hex(&lfs.oid, 64) {
                return Err(format!("{}: lfs.oid {:?} is not a sha256 (64 lowercase hex)", item.path, lfs.oid));
            }
        }
        let size = item.content_size();
        if size > MAX_FILE_SIZE || item.size > MAX_FILE_SIZE {
            return Err(format!(
                "{}: listed size {} exceeds the limit of {MAX_FILE_SIZE} bytes",
                item.path,
                size.max(item.size)
            ));
        }
        files.push(item);
    }
    Ok(files)
}

impl TreeItem {
    /// The size of the file's content (the LFS size for LFS files).
    pub fn content_size(&self) -> u64 {
        self.lfs.as_ref().map_or(self.size, |l| l.size)
    }
}

/// The target of the `rel="next"` link of a Link header (RFC 8288), if any.
/// Never panics; a header that names a next link it cannot parse is an error.
pub fn next_link(h: &str) -> Result<Option<String>, ParseError> {
    next_link_text(h).map_err(ParseError)
}

fn next_link_text(h: &str) -> Result<Option<String>, String> {
    let mut rest = h;
    let mut next = None;
    loop {
        rest = rest.trim_start_matches(|c: char| c == ',' || c.is_whitespace());
        if rest.is_empty() {
            break;
        }
        let Some(after) = rest.strip_prefix('<') else {
            if rest.contains("next") {
                return Err("malformed (a link must start with <)".into());
            }
            return Ok(next);
        };
        let Some(end) = after.find('>') else { return Err("malformed (no closing >)".into()) };
        let (target, mut params) = (&after[..end], &after[end + 1..]);
        let mut is_next = false;
        // Parameters up to the next link: `; name=value` or `; name="quoted, value"`.
        loop {
            params = params.trim_start();
            let Some(p) = params.strip_prefix(';') else { break };
            let p = p.trim_start();
            let name_end = p.find(['=', ';', ',']).unwrap_or(p.len());
            let name = p[..name_end].trim().to_ascii_lowercase();
            let mut after_value = &p[name_end..];
            let mut value = "";
            if let Some(v) = after_value.strip_prefix('=') {
                let v = v.trim_start();
                if let Some(q) = v.strip_prefix('"') {
                    let Some(close) = q.find('"') else { return Err("malformed (unterminated quote)".into()) };
                    value = &q[..close];
                    after_value = &q[close + 1..];
                } else {
                    let e = v.find([';', ',']).unwrap_or(v.len());
                    value = v[..e].trim();
                    after_value = &v[e..];
                }
            }
            if name == "rel" && value.split_whitespace().any(|r| r.eq_ignore_ascii_case("next")) {
                is_next = true;
            }
            params = after_value;
        }
        if is_next {
            if target.is_empty() || target.chars().any(|c| c.is_whitespace() || c.is_control()) {
                return Err(format!("malformed next link {target:?}"));
            }
            if next.is_some() {
                return Err("more than one next link".into());
            }
            next = Some(target.to_string());
        }
        rest = params.trim_start();
        if !rest.is_empty() && !rest.starts_with(',') {
            return Err("malformed (expected , between links)".into());
        }
    }
    Ok(next)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn links_and_encoding() {
        assert_eq!(
            next_link(r#"<https://hub/api/models/a/b/tree/c?cursor=x>; rel="next""#).unwrap().as_deref(),
            Some("https://hub/api/models/a/b/tree/c?cursor=x")
        );
        assert_eq!(next_link(r#"<https://x>; rel="prev""#).unwrap(), None);
        assert_eq!(next_link("").unwrap(), None);
        assert_eq!(
            next_link(r#"<https://a/1>; rel="prev", <https://a/2?x=1,2>; title="a, b"; rel="last next""#).unwrap(),
            Some("https://a/2?x=1,2".into())
        );
        assert_eq!(next_link("</p?c=2>; rel=next").unwrap(), Some("/p?c=2".into()));
        // The reported panic, and other garbage: errors, never panics.
        for bad in [r#">x<; rel="next""#, r#"<x; rel="next""#, r#"<>; rel="next""#, r#"<a>; rel="next, <b>"#] {
            assert!(next_link(bad).is_err(), "{bad}");
        }
        assert!(next_link(r#"<https://a/1>; rel="next", <https://a/2>; rel="next""#).is_err());
        assert_eq!(encode("refs/pr/1"), "refs%2Fpr%2F1");
        let hub = Hub::new("http://h/", Some("secret".into())).unwrap();
        assert_eq!(hub.file_url("o/n", "c", "a b/x.json"), "http://h/o/n/resolve/c/a%20b/x.json");
        assert!(!format!("{hub:?}").contains("secret"));
    }

    #[test]
    fn next_pages_only_from_the_endpoint() {
        let hub = Hub::new("http://h:8080", None).unwrap();
        let from = "http://h:8080/api/models/a/b/tree/c";
        assert_eq!(hub.same_origin(from, "/api/x?cursor=2").unwrap(), "http://h:8080/api/x?cursor=2");
        assert_eq!(hub.same_origin(from, "http://h:8080/api/x").unwrap(), "http://h:8080/api/x");
        for bad in
            ["http://evil:8080/api/x", "http://h:8081/api/x", "https://h:8080/api/x", "//evil/x", "http://u:p@h:8080/x"]
        {
            let e = hub.same_origin(from, bad).unwrap_err().to_string();
            assert!(e.contains(bad) && e.contains(from), "{e}");
        }
        let tls = Hub::new("https://huggingface.co", None).unwrap();
        assert!(tls.same_origin(from, "https://huggingface.co:443/api/x").is_ok());
    }

    fn sha1() -> String {
        "a".repeat(40)
    }

    #[test]
    fn tree_pages_are_checked_before_use() {
        let ok = format!(
            r#"[{{"type":"directory","path":"d","oid":"x"}},{{"type":"file","path":"d/a.json","size":3,"oid":"{}"}},
            {{"type":"file","path":"m.bin","size":130,"oid":"{}","lfs":{{"oid":"{}","size":1000}}}}]"#,
            sha1(),
            "0".repeat(40),
            "b".repeat(64)
        );
        let files = parse_tree_page(ok.as_bytes()).unwrap();
        assert_eq!(files.len(), 2);
        assert_eq!(files[1].content_size(), 1000);
        let file = |oid: &str, lfs: &str| {
            format!(r#"[{{"type":"file","path":"f","size":10,"oid":"{oid}"{lfs}}}]"#).into_bytes()
        };
        let lfs = |oid: &str, size: u64| format!(r#","lfs":{{"oid":"{oid}","size":{size}}}"#);
        for (body, needle) in [
            (file("../../../../etc/cron.d/x", ""), "not a git blob id"),
            (file("/etc/hostname", ""), "not a git blob id"),
            (file(&"A".repeat(40), ""), "not a git blob id"),
            (file(&sha1(), &lfs("../../x", 10)), "not a sha256"),
            (file(&sha1(), &lfs(&"c".repeat(40), 10)), "not a sha256"),
            (file(&sha1(), &lfs(&"c".repeat(64), 1 << 62)), "exceeds the limit"),
            (br#"[{"type":"file","path":"../x","size":1,"oid":"x"}]"#.to_vec(), "unsafe path"),
            (b"{".to_vec(), "not a tree page"),
        ] {
            let e = parse_tree_page(&body).unwrap_err();
            assert!(e.0.contains(needle), "{e}");
        }
    }

    fn item() -> impl Strategy<Value = TreeItem> {
        (
            proptest::collection::vec("[a-zA-Z0-9_.-]{1,12}", 1..4),
            0..=MAX_FILE_SIZE,
            "[0-9a-f]{40}",
            proptest::option::of(("[0-9a-f]{64}", 0..=MAX_FILE_SIZE)),
        )
            .prop_filter("no . or .. components", |(p, ..)| p.iter().all(|c| c != "." && c != ".."))
            .prop_map(|(path, size, oid, lfs)| TreeItem {
                kind: "file".into(),
                path: path.join("/"),
                size,
                oid,
                lfs: lfs.map(|(oid, size)| LfsInfo { oid, size }),
                xet_hash: None,
            })
    }

    fn to_json(items: &[TreeItem]) -> String {
        let v: Vec<serde_json::Value> = items
            .iter()
            .map(|i| {
                let mut v = serde_json::json!({"type": i.kind, "path": i.path, "size": i.size, "oid": i.oid});
                if let Some(l) = &i.lfs {
                    v["lfs"] = serde_json::json!({"oid": l.oid, "size": l.size, "pointerSize": 134});
                }
                v
            })
            .collect();
        serde_json::to_string(&v).unwrap()
    }

    proptest! {
        // Bounded to run in about a second; PROPTEST_CASES=100000 runs longer (docs/security.md).
        #![proptest_config(ProptestConfig { cases: std::env::var("PROPTEST_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(512), ..ProptestConfig::default() })]

        #[test]
        fn link_parser_never_panics(s in "\\PC{0,80}") {
            let _ = next_link(&s);
        }

        #[test]
        fn link_parser_never_panics_on_link_like_text(s in "[<>;,=\" a-z/:?#]{0,60}") {
            let _ = next_link(&s);
        }

        #[test]
        fn link_parser_round_trips(target in "[a-zA-Z0-9/:?&=%._~-]{1,60}", prev in proptest::option::of("[a-z0-9/:]{1,20}"), quoted in any::<bool>()) {
            let rel = if quoted { "rel=\"next\"" } else { "rel=next" };
            let mut h = format!("<{target}>; {rel}");
            if let Some(p) = prev {
                h = format!("<{p}>; rel=\"prev\", {h}");
            }
            prop_assert_eq!(next_link(&h), Ok(Some(target)));
        }

        #[test]
        fn tree_parser_never_panics(body in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = parse_tree_page(&body);
        }

        #[test]
        fn tree_parser_never_panics_on_json_like_text(s in "[\\[\\]{}\":,a-z0-9./ -]{0,200}") {
            let _ = parse_tree_page(s.as_bytes());
        }

        #[test]
        fn tree_parser_round_trips(items in proptest::collection::vec(item(), 0..8)) {
            prop_assert_eq!(parse_tree_page(to_json(&items).as_bytes()), Ok(items));
        }

        #[test]
        fn tree_parser_refuses_non_hex_blob_names(oid in "\\PC{0,70}") {
            prop_assume!(!(oid.len() == 64 && oid.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())));
            let items = vec![TreeItem { kind: "file".into(), path: "f".into(), size: 1, oid: "0".repeat(40), lfs: Some(LfsInfo { oid, size: 1 }), xet_hash: None }];
            prop_assert!(parse_tree_page(to_json(&items).as_bytes()).is_err());
        }
    }
}
