//! The status files (`<vm>/status`, `<vm>/status.secondary`): written by a thread of
//! their own, never by the thread that has something to report.
//!
//! A status file lives on shared storage, and storage can be slow: under load a lab's
//! storage server, or a real filer, may take hundreds of milliseconds to answer. A status
//! written by the logging channel's threads (or by the VM's thread, with the primary's
//! state locked) stalled the channel for as long, and a peer took the silence for a
//! failure: a soak on a busy machine saw a secondary claim while the primary's sender sat
//! in a status write. So a writer only posts the text; the `ft-status` thread writes it
//! (temporary file, then rename) and, for the VM's status, checks first that the writer's
//! generation is still the live one.
//!
//! A post of the very text posted last for that file, written or about to be, less than
//! [`REFRESH`] ago, is dropped: an idle copy re-posts the same counters every quarter
//! second, and each write is several round trips to the storage server and wakes this
//! thread (a context switch each, which on a paravirtualised host is a tenth of an idle
//! copy's CPU). A text not written (the write failed, or its generation could not be
//! confirmed live) is forgotten, so the next post of it writes it; and a file changed
//! behind the writer's back (a write of another copy landing late on slow storage) is put
//! right within [`REFRESH`].
//!
//! Invariants: per file, the text written last is the text posted last (a newer post
//! replaces one not yet written); [`flush`] returns once everything posted before it is
//! written (or its bound passes), so a process that ends calls it last.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Condvar, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use crate::arbiter::Arbiter;

/// How long a post of the text posted last for a file is dropped.
const REFRESH: Duration = Duration::from_secs(5);

/// One file's text to write, and the generation that must still be live (the VM's
/// status), with the arbitration folder to ask.
struct Post {
    text: String,
    live: Option<(PathBuf, u64)>,
}

#[derive(Default)]
struct Queue {
    posts: BTreeMap<PathBuf, Post>,
    /// Per file, the text posted last and when, unless it was not written.
    last: BTreeMap<PathBuf, (String, Instant)>,
    /// The thread is writing what it took.
    writing: bool,
}

struct Writer {
    queue: Mutex<Queue>,
    changed: Condvar,
}

impl Writer {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The process's writer; its thread starts with the first post.
static WRITER: OnceLock<&'static Writer> = OnceLock::new();

fn writer() -> &'static Writer {
    WRITER.get_or_init(|| {
        let w: &'static Writer = Box::leak(Box::new(Writer {
            queue: Mutex::new(Queue::default()),
            changed: Condvar::new(),
        }));
        let spawned = std::thread::Builder::new()
            .name("ft-status".into())
            .spawn(move || write_posts(w));
        if let Err(e) = spawned {
            tracing::warn!("no status writer ({e}): status files are not updated");
        }
        w
    })
}

fn write_posts(w: &'static Writer) {
    loop {
        let posts = {
            let mut q = w.lock();
            while q.posts.is_empty() {
                q = w.changed.wait(q).unwrap_or_else(|p| p.into_inner());
            }
            q.writing = true;
            std::mem::take(&mut q.posts)
        };
        for (path, post) in posts {
            let live = post
                .live
                .as_ref()
                .is_none_or(|(arb, g)| Arbiter::new(arb).current().is_ok_and(|c| c == *g));
            if !(live && write_now(&path, &post.text)) {
                let mut q = w.lock();
                if q.last.get(&path).is_some_and(|(t, _)| *t == post.text) {
                    q.last.remove(&path);
                }
            }
        }
        let mut q = w.lock();
        q.writing = false;
        w.changed.notify_all();
    }
}

/// Whether the file now holds `text`.
fn write_now(path: &Path, text: &str) -> bool {
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("status");
    let Some(dir) = path.parent() else {
        return false;
    };
    let tmp = dir.join(format!(".{name}.{}", std::process::id()));
    std::fs::write(&tmp, text).is_ok() && std::fs::rename(&tmp, path).is_ok()
}

/// Have `fields` written to `path` as `key=value` lines; with `live`, only while that
/// generation is the one claimed in that arbitration folder.
pub(crate) fn post(path: PathBuf, fields: &[(&str, String)], live: Option<(PathBuf, u64)>) {
    let text: String = fields.iter().map(|(k, v)| format!("{k}={v}\n")).collect();
    let w = writer();
    let mut q = w.lock();
    if q.last
        .get(&path)
        .is_some_and(|(t, at)| *t == text && at.elapsed() < REFRESH)
    {
        return;
    }
    q.last.insert(path.clone(), (text.clone(), Instant::now()));
    q.posts.insert(path, Post { text, live });
    drop(q);
    w.changed.notify_all();
}

/// Wait until every status posted so far is written, at most `bound`; whether it was.
pub fn flush(bound: Duration) -> bool {
    // Nothing was ever posted: nothing to wait for, and no thread to start for it.
    let Some(w) = WRITER.get() else {
        return true;
    };
    let deadline = Instant::now() + bound;
    let mut q = w.lock();
    while !q.posts.is_empty() || q.writing {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        q = w
            .changed
            .wait_timeout(q, left)
            .map(|r| r.0)
            .unwrap_or_else(|p| p.into_inner().0);
    }
    true
}

/// A status file as it stands once everything posted is written (for tests).
#[cfg(test)]
pub(crate) fn read_flushed(path: &Path) -> std::io::Result<String> {
    flush(Duration::from_secs(5));
    std::fs::read_to_string(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_last_text_posted_is_the_one_written_and_flush_waits_for_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("status");
        for i in 0..50 {
            post(path.clone(), &[("n", i.to_string())], None);
        }
        assert!(flush(Duration::from_secs(5)));
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "n=49\n");
    }

    #[test]
    fn the_same_text_again_is_not_rewritten_but_a_failed_write_is_retried() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("status");
        post(path.clone(), &[("n", "1".into())], None);
        assert!(flush(Duration::from_secs(5)));
        // Posted again unchanged: not written (the file removed behind its back stays so).
        std::fs::remove_file(&path).unwrap();
        post(path.clone(), &[("n", "1".into())], None);
        assert!(flush(Duration::from_secs(5)));
        assert!(!path.exists());
        // A change, then the first text again: the last posted is the one written.
        post(path.clone(), &[("n", "2".into())], None);
        post(path.clone(), &[("n", "1".into())], None);
        assert!(flush(Duration::from_secs(5)));
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "n=1\n");
        // A write that fails (its folder is gone) is written when the same text comes again;
        // so is one whose generation could not be confirmed live (no arbitration yet).
        let gone = dir.path().join("gone");
        let inner = gone.join("status");
        std::fs::create_dir(&gone).unwrap();
        std::fs::remove_dir(&gone).unwrap();
        post(inner.clone(), &[("n", "3".into())], None);
        assert!(flush(Duration::from_secs(5)));
        std::fs::create_dir(&gone).unwrap();
        post(inner.clone(), &[("n", "3".into())], None);
        assert!(flush(Duration::from_secs(5)));
        assert_eq!(std::fs::read_to_string(&inner).unwrap(), "n=3\n");
        let arb = dir.path().join("arbitration");
        let live = dir.path().join("live");
        post(live.clone(), &[("g", "1".into())], Some((arb.clone(), 1)));
        assert!(flush(Duration::from_secs(5)));
        assert!(!live.exists(), "written without a live generation");
        std::fs::create_dir(&arb).unwrap();
        Arbiter::new(&arb).claim(1, "one").unwrap();
        post(live.clone(), &[("g", "1".into())], Some((arb, 1)));
        assert!(flush(Duration::from_secs(5)));
        assert_eq!(std::fs::read_to_string(&live).unwrap(), "g=1\n");
    }

    #[test]
    fn a_status_of_a_generation_no_longer_live_is_not_written() {
        let dir = tempfile::tempdir().unwrap();
        let arb = dir.path().join("arbitration");
        std::fs::create_dir_all(&arb).unwrap();
        Arbiter::new(&arb).claim(1, "one").unwrap();
        Arbiter::new(&arb).claim(2, "two").unwrap();
        let path = dir.path().join("status");
        post(
            path.clone(),
            &[("role", "primary".into())],
            Some((arb.clone(), 1)),
        );
        assert!(flush(Duration::from_secs(5)));
        assert!(
            !path.exists(),
            "generation 1 wrote after generation 2 was claimed"
        );
        post(path.clone(), &[("role", "live".into())], Some((arb, 2)));
        assert!(flush(Duration::from_secs(5)));
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "role=live\n");
    }
}
