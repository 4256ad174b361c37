//! The hub as a [`BlobSource`]: resolve URLs through [`Hub::get`], and each
//! answer's own headers checked against the tree listing.

use reqwest::header::HeaderMap;

use crate::fetch::{BlobSource, FetchError};
use crate::hub::Hub;

/// One blob of one commit on the hub.
#[derive(Debug, Clone)]
pub(super) struct HfBlob {
    pub hub: Hub,
    pub repo: String,
    pub commit: String,
    pub etag: String,
    pub size: u64,
    pub lfs: bool,
}

impl BlobSource for HfBlob {
    async fn get(&self, url: &str, headers: HeaderMap) -> Result<reqwest::Response, FetchError> {
        self.hub.get(url, headers, &self.repo).await.map_err(|e| FetchError::Source(Box::new(e)))
    }

    fn check(&self, resp: &reqwest::Response, url: &str) -> Result<(), FetchError> {
        check_answer(resp, url, &self.commit, &self.etag, self.size, self.lfs)
    }
}

/// Compares what a resolve answer says about itself (`X-Repo-Commit`,
/// `X-Linked-Etag`, `X-Linked-Size`, present when the hub answers without a
/// redirect) with the tree listing, before any byte is written.
fn check_answer(
    resp: &reqwest::Response,
    url: &str,
    commit: &str,
    etag: &str,
    size: u64,
    lfs: bool,
) -> Result<(), FetchError> {
    let h = |k: &str| {
        resp.headers()
            .get(k)
            .and_then(|v| v.to_str().ok())
            .map(|v| v.trim().trim_start_matches("W/").trim_matches('"').to_string())
    };
    let mismatch =
        |header, expected: String, actual: String| FetchError::Mismatch { path: url.into(), header, expected, actual };
    if let Some(c) = h("x-repo-commit").filter(|c| !c.is_empty() && c != commit) {
        return Err(mismatch("X-Repo-Commit", commit.into(), c));
    }
    if lfs {
        if let Some(e) = h("x-linked-etag").filter(|e| !e.is_empty() && e != etag) {
            return Err(mismatch("X-Linked-Etag", etag.into(), e));
        }
        if let Some(n) = h("x-linked-size").and_then(|n| n.parse::<u64>().ok()).filter(|n| *n != size) {
            return Err(mismatch("X-Linked-Size", size.to_string(), n.to_string()));
        }
    }
    Ok(())
}
