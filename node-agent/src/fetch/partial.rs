//! Partial downloads beside a blob: `<name>.<token>.incomplete` (and its
//! range record `.parts`), owned by the lease holder whose token they carry.

use std::path::{Path, PathBuf};

use crate::lease::{is_released, live_token, remove_if};

/// `blobs/<etag>.<token>.incomplete` (or `.incomplete.parts`): the token, for
/// any name of a partial download of `etag` (`Some("")` for the older
/// `<etag>.incomplete`).
pub(super) fn partial_token<'a>(name: &'a str, etag: &str) -> Option<&'a str> {
    let rest = name.strip_prefix(etag)?;
    let rest = rest.strip_suffix(".parts").unwrap_or(rest);
    let rest = rest.strip_suffix(".incomplete")?;
    if rest.is_empty() {
        return Some("");
    }
    rest.strip_prefix('.')
}

/// Removes the partial downloads of `etag` in `dir` except `keep`'s and those
/// of the holder the lease file names now (a live holder's). The directory is
/// listed before the lease is read: a holder creates its lease before its file.
pub(super) fn remove_stale_partials(dir: &Path, etag: &str, lease_path: &Path, keep: Option<&str>) -> usize {
    let names: Vec<String> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str().map(str::to_string))
        .filter(|n| partial_token(n, etag).is_some())
        .collect();
    let lease = std::fs::read_to_string(lease_path).unwrap_or_default();
    let live = live_token(&lease);
    if keep.is_none() && is_released(&lease) {
        // The blob is here: nobody will resume the released download.
        remove_if(lease_path, |c| c == lease);
    }
    let mut removed = 0;
    for n in names {
        let t = partial_token(&n, etag);
        if t.is_some() && (t == live || t == keep) {
            continue;
        }
        if std::fs::remove_file(dir.join(&n)).is_ok() {
            removed += 1;
        }
    }
    removed
}

/// The temp file of the lease holder: `<etag>.<token>.incomplete`. A holder
/// that took a stale lease over adopts the dead holder's file (and its range
/// record); every other partial of the blob is litter now (its holder lost
/// the lease) and goes.
pub(super) fn prepare_partial(
    dir: &Path,
    etag: &str,
    token: &str,
    took_over: Option<&str>,
    lease_path: &Path,
) -> PathBuf {
    let mine = dir.join(format!("{etag}.{token}.incomplete"));
    if let Some(old) = took_over.filter(|t| is_token(t)) {
        let old = dir.join(format!("{etag}.{old}.incomplete"));
        if !mine.exists() && std::fs::rename(&old, &mine).is_ok() {
            let _ = std::fs::rename(parts_of(&old), parts_of(&mine));
        }
    }
    remove_stale_partials(dir, etag, lease_path, Some(token));
    if !mine.exists() {
        // A range record whose file is gone says nothing.
        let _ = std::fs::remove_file(parts_of(&mine));
    }
    mine
}

/// Moves a corrupt blob to `blobs/<etag>.corrupt` (kept for inspection, replacing
/// an earlier one; safe to delete), so that it is downloaded again.
pub fn set_aside(blob: &Path, dir: &Path, etag: &str) -> std::io::Result<()> {
    match std::fs::rename(blob, dir.join(format!("{etag}.corrupt"))) {
        // Another agent set it aside first.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        r => r,
    }
}

fn is_token(t: &str) -> bool {
    !t.is_empty() && t.len() <= 64 && t.bytes().all(|b| b.is_ascii_hexdigit())
}

/// The record of finished ranges beside a ranged temp file.
pub(super) fn parts_of(tmp: &Path) -> PathBuf {
    let mut s = tmp.as_os_str().to_owned();
    s.push(".parts");
    PathBuf::from(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partial_names() {
        let e = "ab".repeat(32);
        assert_eq!(partial_token(&format!("{e}.0a1b.incomplete"), &e), Some("0a1b"));
        assert_eq!(partial_token(&format!("{e}.0a1b.incomplete.parts"), &e), Some("0a1b"));
        assert_eq!(partial_token(&format!("{e}.incomplete"), &e), Some(""));
        assert_eq!(partial_token(&e, &e), None);
        assert_eq!(partial_token(&format!("{e}.lease"), &e), None);
        assert_eq!(partial_token(&format!("{e}x.1.incomplete"), &e), None);
    }

    #[test]
    fn partials_are_adopted_only_from_a_stale_takeover_and_live_ones_kept() {
        let d = tempfile::tempdir().unwrap();
        let e = "cd".repeat(32);
        let lease = d.path().join(format!("{e}.lease"));
        let touch = |n: &str, body: &[u8]| std::fs::write(d.path().join(n), body).unwrap();
        let names = || {
            let mut v: Vec<String> = std::fs::read_dir(d.path())
                .unwrap()
                .flatten()
                .map(|x| x.file_name().to_string_lossy().into_owned())
                .collect();
            v.sort();
            v
        };
        // A fresh lease adopts nothing: an older partial may belong to a paused holder.
        touch(&format!("{e}.aaaa.incomplete"), b"old");
        touch(&format!("{e}.aaaa.incomplete.parts"), b"ranges 1 3\n");
        std::fs::write(&lease, "aimodel-lease 1\ntoken bbbb\n").unwrap();
        let mine = prepare_partial(d.path(), &e, "bbbb", None, &lease);
        assert_eq!(mine, d.path().join(format!("{e}.bbbb.incomplete")));
        assert!(!mine.exists());
        assert_eq!(names(), vec![format!("{e}.lease")]);
        // After a stale takeover of cccc's lease, cccc's partial and record are ours.
        touch(&format!("{e}.cccc.incomplete"), b"prefix");
        touch(&format!("{e}.cccc.incomplete.parts"), b"ranges 1 6\n0\n");
        touch(&format!("{e}.dddd.incomplete"), b"other");
        std::fs::write(&lease, "aimodel-lease 1\ntoken eeee\n").unwrap();
        let mine = prepare_partial(d.path(), &e, "eeee", Some("cccc"), &lease);
        assert_eq!(std::fs::read(&mine).unwrap(), b"prefix");
        assert_eq!(
            names(),
            vec![format!("{e}.eeee.incomplete"), format!("{e}.eeee.incomplete.parts"), format!("{e}.lease")]
        );
        // Beside a present blob: the live holder's partial stays, the rest goes.
        touch(&format!("{e}.ffff.incomplete"), b"dead");
        assert_eq!(remove_stale_partials(d.path(), &e, &lease, None), 1);
        assert!(mine.exists());
        std::fs::remove_file(&lease).unwrap();
        assert_eq!(remove_stale_partials(d.path(), &e, &lease, None), 2);
        assert_eq!(names(), Vec::<String>::new());
    }
}
