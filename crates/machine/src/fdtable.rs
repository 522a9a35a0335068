//! The guest's file descriptor table: VM state, identical on every copy of the VM.
//!
//! The table records what each descriptor is (console, directory or file, by its path
//! inside the datastore) and each file's offset. It changes only through pure functions of
//! the guest's calls and the events' outcomes, never by asking the host, so a replaying
//! copy that never opens a host file holds the same table as the primary; a copy going live
//! reopens its host files from it ([`crate::host::LiveHost::from_state`]).
//!
//! Invariant: every path in the table is normalised and relative to the datastore root; it
//! never contains `..`, `.` or empty components, so it can never name anything outside.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::wasi::{errno, filetype};

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum FdKind {
    Stdin,
    Stdout,
    Stderr,
    /// A directory; `preopen` is the name the guest sees for a preopened one.
    Dir {
        path: String,
        preopen: Option<String>,
    },
    File {
        path: String,
        offset: u64,
        read: bool,
        write: bool,
        append: bool,
        /// Where the next append goes: the file's end as the VM knows it.
        append_at: u64,
    },
    /// A preopened TCP listener of the VM's network stack.
    Listener {
        port: u16,
        nonblocking: bool,
    },
    /// An accepted TCP connection of the VM's network stack.
    Socket {
        conn: u64,
        nonblocking: bool,
    },
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FdTable {
    fds: BTreeMap<u32, FdKind>,
}

/// The largest number of descriptors a guest may hold open.
const MAX_FDS: usize = 4096;

impl FdTable {
    /// Console at 0-2, with a datastore the root directory preopened as "/" at 3, and the
    /// TCP listeners at 4, 5, ... in the order given.
    pub fn new(datastore: bool, listen: &[u16]) -> Self {
        let mut fds = BTreeMap::new();
        fds.insert(0, FdKind::Stdin);
        fds.insert(1, FdKind::Stdout);
        fds.insert(2, FdKind::Stderr);
        if datastore {
            fds.insert(
                3,
                FdKind::Dir {
                    path: String::new(),
                    preopen: Some("/".into()),
                },
            );
        }
        for (i, &port) in listen.iter().enumerate() {
            fds.insert(
                4 + i as u32,
                FdKind::Listener {
                    port,
                    nonblocking: false,
                },
            );
        }
        FdTable { fds }
    }

    pub fn get(&self, fd: u32) -> Result<&FdKind, u16> {
        self.fds.get(&fd).ok_or(errno::BADF)
    }

    pub fn get_mut(&mut self, fd: u32) -> Result<&mut FdKind, u16> {
        self.fds.get_mut(&fd).ok_or(errno::BADF)
    }

    pub fn iter(&self) -> impl Iterator<Item = (u32, &FdKind)> {
        self.fds.iter().map(|(k, v)| (*k, v))
    }

    /// The lowest free descriptor, as POSIX allocates.
    pub fn lowest_free(&self) -> Result<u32, u16> {
        if self.fds.len() >= MAX_FDS {
            return Err(errno::MFILE);
        }
        let mut want = 0u32;
        for &k in self.fds.keys() {
            if k != want {
                break;
            }
            want += 1;
        }
        Ok(want)
    }

    pub fn insert(&mut self, fd: u32, kind: FdKind) {
        self.fds.insert(fd, kind);
    }

    pub fn remove(&mut self, fd: u32) -> Result<FdKind, u16> {
        self.fds.remove(&fd).ok_or(errno::BADF)
    }

    /// The directory path a descriptor names, for resolving a guest path against it.
    pub fn dir_path(&self, fd: u32) -> Result<&str, u16> {
        match self.get(fd)? {
            FdKind::Dir { path, .. } => Ok(path),
            _ => Err(errno::NOTDIR),
        }
    }

    /// Resolve `guest` relative to directory `fd` into a datastore path.
    pub fn resolve(&self, fd: u32, guest: &str) -> Result<String, u16> {
        resolve(self.dir_path(fd)?, guest)
    }
}

impl FdKind {
    pub fn filetype(&self) -> u8 {
        match self {
            FdKind::Stdin | FdKind::Stdout | FdKind::Stderr => filetype::CHARACTER_DEVICE,
            FdKind::Dir { .. } => filetype::DIRECTORY,
            FdKind::File { .. } => filetype::REGULAR_FILE,
            FdKind::Listener { .. } | FdKind::Socket { .. } => filetype::SOCKET_STREAM,
        }
    }
}

/// Lexically join `guest` onto `base`, refusing any path that leaves the datastore.
pub fn resolve(base: &str, guest: &str) -> Result<String, u16> {
    if guest.starts_with('/') {
        return Err(errno::NOTCAPABLE);
    }
    if guest.contains('\0') {
        return Err(errno::INVAL);
    }
    let mut parts: Vec<&str> = base.split('/').filter(|p| !p.is_empty()).collect();
    for comp in guest.split('/') {
        match comp {
            "" | "." => {}
            ".." => {
                if parts.pop().is_none() {
                    return Err(errno::NOTCAPABLE);
                }
            }
            c => parts.push(c),
        }
    }
    Ok(parts.join("/"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolve_stays_inside() {
        assert_eq!(resolve("", "a/b/../c").unwrap(), "a/c");
        assert_eq!(resolve("d", "./x//y").unwrap(), "d/x/y");
        assert_eq!(resolve("d", "..").unwrap(), "");
        assert_eq!(resolve("", "..").unwrap_err(), errno::NOTCAPABLE);
        assert_eq!(resolve("d", "../../etc").unwrap_err(), errno::NOTCAPABLE);
        assert_eq!(resolve("", "/etc/passwd").unwrap_err(), errno::NOTCAPABLE);
    }

    #[test]
    fn lowest_free_fills_holes() {
        let mut t = FdTable::new(true, &[]);
        assert_eq!(t.lowest_free().unwrap(), 4);
        t.insert(4, FdKind::Stdin);
        t.insert(6, FdKind::Stdin);
        assert_eq!(t.lowest_free().unwrap(), 5);
        t.remove(1).unwrap();
        assert_eq!(t.lowest_free().unwrap(), 1);
    }
}
