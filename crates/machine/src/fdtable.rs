//! The guest's file descriptor table: VM state, identical on every copy of the VM.
//!
//! The table records what each descriptor is (console, directory, file, socket), each
//! file's offset and flags, and what a copy going live on another host needs to
//! reopen it: the file's inode and its path inside the datastore as the kernel resolved it
//! when it was opened. Descriptors refer to files, not names: the guest's own renames move
//! the paths of the descriptors open below them, and a file unlinked or replaced while open
//! is *set aside* (linked under its inode number in the VM's set-aside folder beside the
//! datastore, as NFS's "silly rename" does) until its last descriptor closes.
//!
//! The table also knows each open file's size ([`FdTable::size_of`]): every change of a
//! file's size goes through an event of this VM, so appends are written at the end the VM
//! knows — the file's end at the time of the write — and a copy going live that writes
//! again an append its predecessor may already have made writes the same bytes in the
//! same place, never twice.
//!
//! The table changes only through pure functions of the guest's calls and the events'
//! outcomes, never by asking the host, so a replaying copy that never opens a host file
//! holds the same table as the primary; a copy going live reopens its host files from it
//! ([`crate::host::LiveHost::from_state`]).
//!
//! Invariant: every path in the table is relative to the datastore root as the kernel
//! resolved it beneath that root: no symlinks, no `.` or `..`, no empty components.

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
        ino: u64,
    },
    File {
        path: String,
        ino: u64,
        offset: u64,
        read: bool,
        write: bool,
        /// WASI fdflags: APPEND and NONBLOCK as last set, DSYNC, RSYNC and SYNC as opened.
        flags: u16,
        /// Unlinked or replaced while open: the file lives on in the set-aside folder.
        aside: bool,
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
    /// Directory cookies handed to the guest, per directory descriptor: guest cookie k
    /// (from 1) stands for the file system's directory offset `offsets[k - 1]`. The file
    /// system's offsets (64-bit hashes on ext4) do not survive wasi-libc's 32-bit `long`
    /// (`telldir`); small cookies do, and being VM state they mean the same after a go-live.
    cookies: BTreeMap<u32, Cookies>,
    /// The size of every open file, by inode, as the VM knows it.
    sizes: BTreeMap<u64, u64>,
    /// Inodes linked into the set-aside folder: the name goes when no descriptor holds the
    /// inode any more, however it was opened (by the name that went or by another link).
    aside: std::collections::BTreeSet<u64>,
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
                    ino: 0,
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
        FdTable {
            fds,
            cookies: BTreeMap::new(),
            sizes: BTreeMap::new(),
            aside: Default::default(),
        }
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

    /// A file opened at `fd`: its size as the host reported it is now the VM's knowledge.
    pub fn insert_file(&mut self, fd: u32, kind: FdKind, size: u64) {
        if let FdKind::File { ino, .. } = &kind {
            self.sizes.insert(*ino, size);
        }
        self.fds.insert(fd, kind);
    }

    /// Close `fd`. Returns what it was, and for a set-aside file whose last descriptor this
    /// was, its inode (the set-aside name is to be removed).
    pub fn remove(&mut self, fd: u32) -> Result<(FdKind, Option<u64>), u16> {
        let kind = self.fds.remove(&fd).ok_or(errno::BADF)?;
        self.cookies.remove(&fd);
        let drop_aside = self.closed(&kind);
        Ok((kind, drop_aside))
    }

    /// A descriptor of `kind` is gone: forget what only it held.
    fn closed(&mut self, kind: &FdKind) -> Option<u64> {
        let FdKind::File { ino, .. } = kind else {
            return None;
        };
        if self.holds_ino(*ino) {
            return None;
        }
        self.sizes.remove(ino);
        self.aside.remove(ino).then_some(*ino)
    }

    /// `fd_renumber`: `from` takes the place of `to`, which is closed. Returns what `to`
    /// was, and the inode of a set-aside file whose last descriptor closed.
    pub fn renumber(&mut self, from: u32, to: u32) -> Result<(Option<FdKind>, Option<u64>), u16> {
        self.get(from)?;
        self.get(to)?;
        if from == to {
            return Ok((None, None));
        }
        let cookies = self.cookies.remove(&from);
        let kind = self.fds.remove(&from).ok_or(errno::BADF)?;
        // `from` takes its place before `to` is counted out: a file both held stays open.
        let old = self.fds.insert(to, kind);
        self.cookies.remove(&to);
        if let Some(c) = cookies {
            self.cookies.insert(to, c);
        }
        let drop_aside = old.as_ref().and_then(|k| self.closed(k));
        Ok((old, drop_aside))
    }

    /// Whether a descriptor holds the file with inode `ino` open.
    pub fn holds_ino(&self, ino: u64) -> bool {
        self.fds
            .values()
            .any(|k| matches!(k, FdKind::File { ino: i, .. } if *i == ino))
    }

    /// The directory path a descriptor names.
    pub fn dir_path(&self, fd: u32) -> Result<&str, u16> {
        match self.get(fd)? {
            FdKind::Dir { path, .. } => Ok(path),
            _ => Err(errno::NOTDIR),
        }
    }

    /// The guest renamed `from` to `to` (kernel-resolved paths): descriptors open at or
    /// below `from` now live at or below `to`.
    pub fn moved(&mut self, from: &str, to: &str) {
        if from == to || from.is_empty() {
            return;
        }
        for kind in self.fds.values_mut() {
            let (FdKind::File { path, .. } | FdKind::Dir { path, .. }) = kind else {
                continue;
            };
            if let Some(rest) = path.strip_prefix(from)
                && (rest.is_empty() || rest.starts_with('/'))
            {
                *path = format!("{to}{rest}");
            }
        }
    }

    /// The open file `ino` was unlinked or replaced: its descriptors now reach it through
    /// the set-aside folder.
    pub fn set_aside(&mut self, ino: u64) {
        self.aside.insert(ino);
        for kind in self.fds.values_mut() {
            if let FdKind::File { ino: i, aside, .. } = kind
                && *i == ino
            {
                *aside = true;
            }
        }
    }

    /// The size the VM knows of open file `ino`.
    pub fn size_of(&self, ino: u64) -> u64 {
        self.sizes.get(&ino).copied().unwrap_or(0)
    }

    /// A write to open file `ino` ended at `end`.
    pub fn grow(&mut self, ino: u64, end: u64) {
        if let Some(s) = self.sizes.get_mut(&ino) {
            *s = (*s).max(end);
        }
    }

    /// Open file `ino` is now `size` bytes long (truncated, or its size observed).
    pub fn resize(&mut self, ino: u64, size: u64) {
        if let Some(s) = self.sizes.get_mut(&ino) {
            *s = size;
        }
    }

    /// The file system's directory offset that guest cookie `cookie` of directory `fd`
    /// stands for (0: the start); `None` for a cookie this VM never handed out.
    pub fn dir_offset(&mut self, fd: u32, cookie: u64) -> Option<u64> {
        let c = self.cookies.entry(fd).or_default();
        if cookie == 0 {
            // Cookies stay valid across rewinds; only a descriptor that has handed out
            // very many forgets them at a rewind, to stay bounded.
            if c.offsets.len() >= MAX_COOKIES / 2 {
                *c = Cookies::default();
            }
            return Some(0);
        }
        c.offsets.get(usize::try_from(cookie - 1).ok()?).copied()
    }

    /// Rewrite the `d_next` fields of a directory listing of `fd` (WASI dirents, the last
    /// possibly cut short) from file-system offsets to this VM's small cookies.
    pub fn give_cookies(&mut self, fd: u32, listing: &mut [u8]) -> Result<(), u16> {
        let c = self.cookies.entry(fd).or_default();
        let mut at = 0usize;
        while at < listing.len() {
            let rest = listing.len() - at;
            if rest < 8 {
                // A cut d_next: no part of a file-system offset reaches the guest.
                listing[at..].fill(0);
                break;
            }
            let mut raw = [0u8; 8];
            raw.copy_from_slice(&listing[at..at + 8]);
            let cookie = c.cookie_of(u64::from_le_bytes(raw))?;
            listing[at..at + 8].copy_from_slice(&cookie.to_le_bytes());
            if rest < 24 {
                break;
            }
            let namelen = u32::from_le_bytes([
                listing[at + 16],
                listing[at + 17],
                listing[at + 18],
                listing[at + 19],
            ]) as usize;
            at = at.saturating_add(24).saturating_add(namelen);
        }
        Ok(())
    }
}

/// The cookies of one directory descriptor (see [`FdTable::dir_offset`]).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Cookies {
    offsets: Vec<u64>,
    index: BTreeMap<u64, u64>,
}

/// The most cookies one directory descriptor holds: past half of it a rewind forgets them,
/// and a listing needing more is refused rather than grow VM state without bound.
const MAX_COOKIES: usize = 1 << 22;

impl Cookies {
    fn cookie_of(&mut self, offset: u64) -> Result<u64, u16> {
        if let Some(&c) = self.index.get(&offset) {
            return Ok(c);
        }
        if self.offsets.len() >= MAX_COOKIES {
            return Err(errno::OVERFLOW);
        }
        self.offsets.push(offset);
        let c = self.offsets.len() as u64;
        self.index.insert(offset, c);
        Ok(c)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn file(path: &str, ino: u64) -> FdKind {
        FdKind::File {
            path: path.into(),
            ino,
            offset: 0,
            read: true,
            write: true,
            flags: 0,
            aside: false,
        }
    }

    fn path_of(t: &FdTable, fd: u32) -> String {
        match t.get(fd).unwrap() {
            FdKind::File { path, .. } | FdKind::Dir { path, .. } => path.clone(),
            _ => panic!("not a file"),
        }
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

    #[test]
    fn renames_move_the_descriptors_below_them_only() {
        let mut t = FdTable::new(true, &[]);
        t.insert_file(4, file("d/a", 10), 0);
        t.insert_file(5, file("d2/a", 11), 0);
        t.insert_file(6, file("d", 12), 0);
        t.moved("d", "e/f");
        assert_eq!(path_of(&t, 4), "e/f/a");
        assert_eq!(path_of(&t, 5), "d2/a", "a sibling sharing a prefix stays");
        assert_eq!(path_of(&t, 6), "e/f");
    }

    #[test]
    fn a_set_aside_file_is_dropped_with_its_last_descriptor() {
        let mut t = FdTable::new(true, &[]);
        t.insert_file(4, file("a", 10), 5);
        t.insert_file(5, file("a", 10), 5);
        t.set_aside(10);
        assert_eq!(
            t.remove(4).unwrap().1,
            None,
            "one descriptor still holds it"
        );
        assert_eq!(t.size_of(10), 5);
        assert_eq!(t.remove(5).unwrap().1, Some(10));
        assert_eq!(t.size_of(10), 0);
        // Opened again by another link after it was set aside: still dropped at the end.
        t.insert_file(4, file("b", 11), 5);
        t.set_aside(11);
        t.insert_file(5, file("c", 11), 5);
        t.renumber(5, 4).unwrap();
        assert_eq!(t.remove(4).unwrap().1, Some(11));
    }

    #[test]
    fn renumber_onto_itself_keeps_the_descriptor() {
        let mut t = FdTable::new(true, &[]);
        t.insert_file(4, file("a", 10), 0);
        assert_eq!(t.renumber(4, 4).unwrap(), (None, None));
        assert!(t.get(4).is_ok());
        t.insert_file(5, file("b", 11), 0);
        t.renumber(4, 5).unwrap();
        assert!(t.get(4).is_err());
        assert_eq!(path_of(&t, 5), "a");
        assert_eq!(t.renumber(9, 5).unwrap_err(), errno::BADF);
    }

    #[test]
    fn guests_get_small_cookies_that_stand_for_file_system_offsets() {
        let mut t = FdTable::new(true, &[]);
        let entry = |next: u64, name: &[u8]| {
            let mut e = next.to_le_bytes().to_vec();
            e.extend_from_slice(&7u64.to_le_bytes());
            e.extend_from_slice(&(name.len() as u32).to_le_bytes());
            e.extend_from_slice(&[4, 0, 0, 0]);
            e.extend_from_slice(name);
            e
        };
        assert_eq!(t.dir_offset(3, 0), Some(0));
        let mut listing = [
            entry(0x7fff_0000_1234, b"a"),
            entry(0x1_0000_0000_0009, b"bc"),
        ]
        .concat();
        // Cut inside the third entry's d_next.
        listing.extend_from_slice(&[9, 9, 9]);
        t.give_cookies(3, &mut listing).unwrap();
        assert_eq!(&listing[0..8], &1u64.to_le_bytes());
        assert_eq!(&listing[25..33], &2u64.to_le_bytes());
        assert_eq!(&listing[listing.len() - 3..], &[0, 0, 0]);
        assert_eq!(t.dir_offset(3, 2), Some(0x1_0000_0000_0009));
        assert_eq!(t.dir_offset(3, 3), None, "never handed out");
        // The same offset listed again gets the same cookie.
        let mut again = entry(0x1_0000_0000_0009, b"bc");
        t.give_cookies(3, &mut again).unwrap();
        assert_eq!(&again[0..8], &2u64.to_le_bytes());
        // They stay valid across a rewind.
        assert_eq!(t.dir_offset(3, 0), Some(0));
        assert_eq!(t.dir_offset(3, 1), Some(0x7fff_0000_1234));
    }

    #[test]
    fn sizes_follow_writes_and_truncation() {
        let mut t = FdTable::new(true, &[]);
        t.insert_file(4, file("a", 10), 100);
        t.grow(10, 50);
        assert_eq!(t.size_of(10), 100);
        t.grow(10, 150);
        assert_eq!(t.size_of(10), 150);
        t.resize(10, 7);
        assert_eq!(t.size_of(10), 7);
    }
}
