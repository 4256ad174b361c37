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
    #[error("unexpected answer from {url}: {reason}")]
    Protocol { url: String, reason: String },
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
    /// `HF_ENDPOINT` (default https://huggingface.co) and `HF_TOKEN` from the environment.
    pub fn from_env() -> Result<Self, HubError> {
        let endpoint = std::env::var("HF_ENDPOINT").unwrap_or_else(|_| "https://huggingface.co".into());
        Hub::new(&endpoint, std::env::var("HF_TOKEN").ok().filter(|t| !t.is_empty()))
    }

    /// A client for `endpoint`.
    pub fn new(endpoint: &str, token: Option<String>) -> Result<Self, HubError> {
        let http = Client::builder()
            .connect_timeout(Duration::from_secs(20))
            .read_timeout(Duration::from_secs(60))
            .user_agent(concat!("aimodel-agent/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| HubError::Transport { url: endpoint.into(), reason: e.to_string() })?;
        Ok(Hub { endpoint: endpoint.trim_end_matches('/').to_string(), token, http })
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
        let mut delay = Duration::from_millis(500);
        for attempt in 1..=ATTEMPTS {
            let mut headers = self.headers();
            headers.extend(extra.clone());
            match self.http.get(url).headers(headers).send().await {
                Ok(r) if r.status().is_success() || r.status() == StatusCode::PARTIAL_CONTENT => return Ok(r),
                Ok(r) => {
                    let status = r.status();
                    let code = r.headers().get("x-error-code").and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
                    match status.as_u16() {
                        401 | 404 if code == "RevisionNotFound" => {
                            return Err(HubError::RevisionNotFound { repo: repo.into(), revision: String::new() })
                        }
                        401 | 404 if code == "GatedRepo" => return Err(HubError::Denied { repo: repo.into(), code }),
                        401 | 404 => return Err(HubError::NotFound { repo: repo.into(), code }),
                        403 => return Err(HubError::Denied { repo: repo.into(), code }),
                        429 | 500..=599 if attempt < ATTEMPTS => {
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
                        s => return Err(HubError::Status { url: url.into(), status: s, attempts: attempt }),
                    }
                }
                Err(e) if attempt < ATTEMPTS => {
                    let _ = e;
                    tokio::time::sleep(delay).await;
                }
                Err(e) => return Err(HubError::Transport { url: url.into(), reason: e.to_string() }),
            }
            delay = (delay * 2).min(Duration::from_secs(16));
        }
        Err(HubError::Status { url: url.into(), status: 0, attempts: ATTEMPTS })
    }

    /// The commit a revision points at.
    pub async fn resolve(&self, repo: &str, revision: &str) -> Result<String, HubError> {
        let url = format!("{}/api/models/{repo}/revision/{}", self.endpoint, encode(revision));
        let r = self.get(&url, HeaderMap::new(), repo).await.map_err(|e| match e {
            HubError::RevisionNotFound { repo, .. } => HubError::RevisionNotFound { repo, revision: revision.into() },
            e => e,
        })?;
        let info: RevisionInfo =
            r.json().await.map_err(|e| HubError::Protocol { url: url.clone(), reason: e.to_string() })?;
        if !hf_cache::layout::is_commit(&info.sha) {
            return Err(HubError::Protocol { url, reason: format!("{:?} is not a commit hash", info.sha) });
        }
        Ok(info.sha)
    }

    /// Every file of a commit (directories recursed, pages followed). Paths with
    /// `..` or absolute paths are refused: they would escape the snapshot.
    pub async fn tree(&self, repo: &str, commit: &str) -> Result<Vec<TreeItem>, HubError> {
        let mut url = format!("{}/api/models/{repo}/tree/{commit}?recursive=true&expand=false", self.endpoint);
        let mut files = Vec::new();
        loop {
            let r = self.get(&url, HeaderMap::new(), repo).await?;
            let next = r.headers().get(LINK).and_then(|v| v.to_str().ok()).and_then(next_link);
            let page: Vec<TreeItem> =
                r.json().await.map_err(|e| HubError::Protocol { url: url.clone(), reason: e.to_string() })?;
            for item in page.into_iter().filter(|i| i.kind == "file") {
                if item.path.starts_with('/') || item.path.split('/').any(|c| c == ".." || c.is_empty()) {
                    return Err(HubError::Protocol {
                        url: url.clone(),
                        reason: format!("unsafe path {:?} in the tree", item.path),
                    });
                }
                files.push(item);
            }
            match next {
                Some(n) => url = n,
                None => break,
            }
        }
        Ok(files)
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

/// `<url>; rel="next"` from a Link header.
fn next_link(h: &str) -> Option<String> {
    h.split(',').find(|p| p.contains("rel=\"next\"")).and_then(|p| {
        let start = p.find('<')? + 1;
        let end = p.find('>')?;
        Some(p[start..end].to_string())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn links_and_encoding() {
        assert_eq!(
            next_link(r#"<https://hub/api/models/a/b/tree/c?cursor=x>; rel="next""#).as_deref(),
            Some("https://hub/api/models/a/b/tree/c?cursor=x")
        );
        assert_eq!(next_link(r#"<https://x>; rel="prev""#), None);
        assert_eq!(encode("refs/pr/1"), "refs%2Fpr%2F1");
        let hub = Hub::new("http://h/", Some("secret".into())).unwrap();
        assert_eq!(hub.file_url("o/n", "c", "a b/x.json"), "http://h/o/n/resolve/c/a%20b/x.json");
        assert!(!format!("{hub:?}").contains("secret"));
    }
}
