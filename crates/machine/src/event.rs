//! Events: the VM's nondeterministic inputs.
//!
//! Every WASI call whose result is not a pure function of the guest's own execution is an
//! [`Event`]: its position (sequence number), its kind, a digest of its arguments, the
//! running digest of the outputs the VM produced before it, and its result. Recording
//! appends events; replay takes results from them and checks kind, arguments and outputs
//! so that the first difference is reported as a divergence at that event.
//!
//! Invariant: the sequence numbers of a VM's events are 0, 1, 2, ... without gaps, on the
//! primary and on every replay of its log.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// What a WASI call was. Stored as one byte in the log; never renumber a variant.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[repr(u8)]
pub enum Kind {
    ClockTimeGet = 1,
    RandomGet = 2,
    PollOneoff = 3,
    FdRead = 4,
    FdPread = 5,
    FdWrite = 6,
    FdPwrite = 7,
    FdSeekEnd = 8,
    FdSync = 9,
    FdFilestatGet = 10,
    FdFilestatSetSize = 11,
    FdFilestatSetTimes = 12,
    FdReaddir = 13,
    FdAllocate = 14,
    PathOpen = 15,
    PathCreateDirectory = 16,
    PathRemoveDirectory = 17,
    PathUnlinkFile = 18,
    PathRename = 19,
    PathFilestatGet = 20,
    PathFilestatSetTimes = 21,
    PathReadlink = 22,
    /// The network's inputs: frames that arrived and the time, consumed by the VM's stack.
    NetStep = 23,
    /// Entropy for the VM's network stack, taken at power-on.
    NetSeed = 24,
    PathSymlink = 25,
    PathLink = 26,
    /// The last descriptor of a file set aside (unlinked or replaced while open) closed:
    /// the set-aside name is removed.
    AsideDrop = 27,
}

/// No event carries more than this many bytes of data: larger reads, entropy and
/// directory listings are served in parts, each its own event, so that a log record and a
/// logging-channel frame stay bounded whatever the guest asks for.
pub const MAX_EVENT_DATA: usize = 16 << 20;

/// The bytes an event hands the guest, shared rather than copied: the guest's read and the
/// history a primary keeps for its secondary (see `lockstep::primary`) hold one buffer, so
/// an event of 16 MiB costs 16 MiB once, not once per holder. Immutable once made (a test
/// that alters a logged event gets its own copy: [`Bytes::make_mut`]). Encoded exactly as
/// a byte string (as `serde_bytes` encodes a `Vec<u8>`): logs and frames are unchanged.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Bytes(Arc<Vec<u8>>);

impl Bytes {
    /// The bytes to change, copied first if they are shared.
    pub fn make_mut(&mut self) -> &mut Vec<u8> {
        Arc::make_mut(&mut self.0)
    }

    /// A buffer of `len` bytes for data an event will carry: the one this thread set aside
    /// last ([`Bytes::spare`]) if it fits `len` (room enough, and not over twice as much),
    /// else a new one. Its contents are unspecified (an earlier event's data, not zeroed
    /// again: that cost as much as the read): the caller fills it and truncates it to what
    /// it filled.
    pub(crate) fn buffer(len: usize) -> Vec<u8> {
        // No buffer kept fits so small a read (entropy, a short record) nor one larger than
        // any kept: leave them be.
        if !(SPARE_SMALLEST / 2..=SPARE_LARGEST).contains(&len) {
            return vec![0; len];
        }
        match SPARE.with(|spare| spare.borrow_mut().take(len)) {
            Some(mut v) => {
                v.resize(len, 0);
                v
            }
            None => vec![0; len],
        }
    }

    /// Set these bytes' buffer aside for this thread's next [`Bytes::buffer`], if nothing
    /// else holds them and it is worth keeping; else just drop them.
    pub(crate) fn spare(self) {
        if let Ok(v) = Arc::try_unwrap(self.0) {
            SPARE.with(|spare| spare.borrow_mut().keep(v));
        }
    }
}

/// Buffers smaller than this are not set aside: malloc's per-thread cache serves them warm.
const SPARE_SMALLEST: usize = 1 << 10;
/// Buffers larger than this are not set aside.
const SPARE_LARGEST: usize = 64 << 10;
/// A thread sets aside buffers of at most this many bytes in all.
const SPARE_BYTES: usize = 4 << 20;

/// Data buffers a thread set aside, last in first out.
struct Spare {
    buffers: Vec<Vec<u8>>,
    /// Their capacities, summed.
    bytes: usize,
}

impl Spare {
    /// The last buffer set aside, if it fits `len`. One that does not is dropped (reads
    /// changed size: the next ones are unlikely to fit it either), so the buffers kept are
    /// those of the reads the guest makes now. Never more than twice `len`: a small read
    /// does not hold a large buffer in a batch that counts only its data.
    fn take(&mut self, len: usize) -> Option<Vec<u8>> {
        let v = self.buffers.pop()?;
        self.bytes -= v.capacity();
        (v.capacity() >= len && v.capacity() <= 2 * len).then_some(v)
    }

    fn keep(&mut self, v: Vec<u8>) {
        let size = v.capacity();
        if !(SPARE_SMALLEST..=SPARE_LARGEST).contains(&size) || self.bytes + size > SPARE_BYTES {
            return;
        }
        self.bytes += size;
        self.buffers.push(v);
    }
}

/// How many data buffers this thread set aside.
#[cfg(test)]
pub(crate) fn spare_buffers() -> usize {
    SPARE.with(|s| s.borrow().buffers.len())
}

thread_local! {
    /// Data buffers of events this thread let go of (see [`Bytes::buffer`]): reading into
    /// one costs no allocation. A recorder keeps each event's data until it is written, so
    /// without them malloc hands out cold memory for every read, which the kernel's copy
    /// then faults in (`bench_io` recorded: about a sixth of what recording cost).
    static SPARE: std::cell::RefCell<Spare> = const {
        std::cell::RefCell::new(Spare {
            buffers: Vec::new(),
            bytes: 0,
        })
    };
}

impl From<Vec<u8>> for Bytes {
    fn from(v: Vec<u8>) -> Self {
        Bytes(Arc::new(v))
    }
}

impl std::ops::Deref for Bytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.0
    }
}

impl AsRef<[u8]> for Bytes {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl std::fmt::Debug for Bytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl Serialize for Bytes {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(&self.0)
    }
}

impl<'de> Deserialize<'de> for Bytes {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        serde_bytes::ByteBuf::deserialize(d).map(|b| Bytes::from(b.into_vec()))
    }
}

/// File metadata as the guest sees it (WASI `filestat`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Filestat {
    pub dev: u64,
    pub ino: u64,
    pub filetype: u8,
    pub nlink: u64,
    pub size: u64,
    pub atim: u64,
    pub mtim: u64,
    pub ctim: u64,
}

/// One entry of a `poll_oneoff` result (WASI `event`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PollEvent {
    pub userdata: u64,
    pub error: u16,
    pub kind: u8,
    pub nbytes: u64,
    pub flags: u16,
}

/// The result of an event: everything the guest may observe of the call.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    /// The call failed with this WASI errno.
    Errno(u16),
    /// The call succeeded and returns nothing else.
    Done,
    /// A time in nanoseconds, a size or an offset.
    Value(u64),
    /// Bytes handed to the guest (data read, entropy, directory entries, a link target).
    Data(Bytes),
    /// Bytes written and the file offset after the write.
    Written {
        n: u32,
        offset: u64,
    },
    /// A file or directory was opened: its WASI filetype, size and inode, and its path
    /// inside the datastore as the kernel resolved it (no symlinks, no `..`).
    Opened {
        filetype: u8,
        size: u64,
        ino: u64,
        path: String,
    },
    Stat(Filestat),
    Polled(Vec<PollEvent>),
    /// Frames received since the last step, the VM monotonic time, and whether stdin was
    /// readable (only looked at when the guest waits on it).
    Net {
        now: u64,
        frames: Vec<Bytes>,
        stdin: bool,
    },
    /// A rename: the source's and the target's paths inside the datastore as the kernel
    /// resolved them (equal when unknown), and the inode of an open file it replaced,
    /// which was set aside first.
    Moved {
        from: String,
        to: String,
        aside: Option<u64>,
    },
    /// An unlink; the inode of the open file it removed, which was set aside first.
    Removed {
        aside: Option<u64>,
    },
}

/// What a name stood for just before a disk operation that must not be done twice.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum NameState {
    Missing,
    Present {
        ino: u64,
        dir: bool,
    },
    /// Its folder could not be reached (the errno).
    Unreachable(u16),
}

/// Announced to the secondary before a disk operation that must not be done twice
/// (create, remove, rename, link — unlike a positional write, doing one again answers
/// differently) and performed only once the secondary holds it. A copy going live whose
/// first event is that operation compares the names with `names`: if they changed, its
/// predecessor performed it, and the copy takes the outcome from the disk instead of doing
/// it again, so the guest sees what it would have seen had nothing failed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Intent {
    pub seq: u64,
    pub kind: Kind,
    pub args: u64,
    pub names: Vec<NameState>,
}

/// One entry of the VM's log.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// Position: the number of events before this one.
    pub seq: u64,
    pub kind: Kind,
    /// Digest of the call's arguments, including the guest memory they point at.
    pub args: u64,
    /// Running digest of every output the VM produced before this event.
    pub outputs: u64,
    pub outcome: Outcome,
}

impl Event {
    /// Let go of this event, setting its data read aside for this thread's next reads
    /// ([`Bytes::spare`]): called on the thread that made it. (Frames received are not
    /// read into such buffers and are left to malloc.)
    pub(crate) fn spare_data(self) {
        if let Outcome::Data(d) = self.outcome {
            d.spare();
        }
    }

    /// Its size encoded (postcard, as in a log and on the logging channel), computed from
    /// its fields without encoding or walking it through serde: what a log's batch and a
    /// primary's history weigh, counted at every event, where measuring the encoding cost
    /// a tenth of what recording costs (`bench_io`). Postcard writes `u8` and `bool` as one
    /// byte, every other integer as a varint, an enum's variant index as a varint (`Kind`
    /// and `Outcome` have fewer than 128 variants: one byte each), an `Option` as a byte
    /// and its value, bytes, strings and sequences as their length (a varint) and items,
    /// and a struct as its fields in order. Tested equal to the encoding for every variant
    /// over the varints' boundaries.
    pub fn encoded_len(&self) -> usize {
        use crate::event::varint_len as varint;
        fn bytes(len: usize) -> usize {
            varint(len as u64) + len
        }
        fn option(x: &Option<u64>) -> usize {
            1 + x.map_or(0, varint)
        }
        let outcome = match &self.outcome {
            Outcome::Errno(e) => varint(u64::from(*e)),
            Outcome::Done => 0,
            Outcome::Value(v) => varint(*v),
            Outcome::Data(d) => bytes(d.len()),
            Outcome::Written { n, offset } => varint(u64::from(*n)) + varint(*offset),
            Outcome::Opened {
                filetype: _,
                size,
                ino,
                path,
            } => 1 + varint(*size) + varint(*ino) + bytes(path.len()),
            Outcome::Stat(s) => {
                1 + [s.dev, s.ino, s.nlink, s.size, s.atim, s.mtim, s.ctim]
                    .into_iter()
                    .map(varint)
                    .sum::<usize>()
            }
            Outcome::Polled(p) => {
                varint(p.len() as u64)
                    + p.iter()
                        .map(|e| {
                            varint(e.userdata)
                                + varint(u64::from(e.error))
                                + 1
                                + varint(e.nbytes)
                                + varint(u64::from(e.flags))
                        })
                        .sum::<usize>()
            }
            Outcome::Net { now, frames, .. } => {
                varint(*now)
                    + varint(frames.len() as u64)
                    + frames.iter().map(|f| bytes(f.len())).sum::<usize>()
                    + 1
            }
            Outcome::Moved { from, to, aside } => {
                bytes(from.len()) + bytes(to.len()) + option(aside)
            }
            Outcome::Removed { aside } => option(aside),
        };
        // seq, the kind's index, args, outputs, the outcome's index.
        varint(self.seq) + 1 + varint(self.args) + varint(self.outputs) + 1 + outcome
    }
}

/// The bytes postcard writes for an integer wider than a byte: a varint, 7 bits a byte.
pub fn varint_len(x: u64) -> usize {
    (64 - (x | 1).leading_zeros() as usize).div_ceil(7)
}

impl Kind {
    /// Whether the call reaches the datastore (reads as well as mutations).
    pub fn uses_disk(self) -> bool {
        self.mutates_disk()
            || matches!(
                self,
                Kind::FdRead
                    | Kind::FdPread
                    | Kind::FdSeekEnd
                    | Kind::FdSync
                    | Kind::FdFilestatGet
                    | Kind::FdReaddir
                    | Kind::PathFilestatGet
                    | Kind::PathReadlink
            )
    }

    /// Whether the call may change the datastore: such a call is an output as well as an
    /// input, and waits for the output rule before it is performed.
    pub fn mutates_disk(self) -> bool {
        matches!(
            self,
            Kind::FdWrite
                | Kind::FdPwrite
                | Kind::FdFilestatSetSize
                | Kind::FdFilestatSetTimes
                | Kind::FdAllocate
                | Kind::PathOpen
                | Kind::PathCreateDirectory
                | Kind::PathRemoveDirectory
                | Kind::PathUnlinkFile
                | Kind::PathRename
                | Kind::PathFilestatSetTimes
                | Kind::PathSymlink
                | Kind::PathLink
                | Kind::AsideDrop
        )
    }
}

/// A 64-bit digest of a call's arguments (XXH3: fast and stable; collisions only weaken
/// divergence detection, see `vm::Outputs`).
pub fn args_digest(parts: &[&[u8]]) -> u64 {
    let mut x = xxhash_rust::xxh3::Xxh3Default::new();
    for p in parts {
        x.update(&(p.len() as u64).to_le_bytes());
        x.update(p);
    }
    x.digest()
}

pub(crate) fn first_u64(bytes: &[u8; 32]) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&bytes[..8]);
    u64::from_le_bytes(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_events_encoded_len_is_the_length_of_its_encoding_for_every_variant_and_varint_size() {
        // Each side of every varint length boundary, and the extremes.
        let mut values = vec![0u64, u64::MAX];
        for bits in (7..64).step_by(7) {
            values.extend([(1u64 << bits) - 1, 1u64 << bits]);
        }
        let text = |v: u64| "p".repeat((v % 300) as usize);
        let data = |v: u64| Bytes::from(vec![7u8; (v % 20_000) as usize]);
        let mut outcomes = vec![Outcome::Done];
        for &v in &values {
            let poll = PollEvent {
                userdata: v,
                error: v as u16,
                kind: v as u8,
                nbytes: v.rotate_left(7),
                flags: (v >> 3) as u16,
            };
            outcomes.extend([
                Outcome::Errno(v as u16),
                Outcome::Value(v),
                Outcome::Data(data(v)),
                Outcome::Written {
                    n: v as u32,
                    offset: v,
                },
                Outcome::Opened {
                    filetype: v as u8,
                    size: v,
                    ino: v.rotate_left(11),
                    path: text(v),
                },
                Outcome::Stat(Filestat {
                    dev: v,
                    ino: v >> 1,
                    filetype: v as u8,
                    nlink: v >> 9,
                    size: v.rotate_left(3),
                    atim: v >> 20,
                    mtim: v >> 40,
                    ctim: v >> 60,
                }),
                Outcome::Polled(vec![poll; (v % 5) as usize]),
                Outcome::Net {
                    now: v,
                    frames: vec![data(v), data(v >> 2), data(60)],
                    stdin: v % 2 == 0,
                },
                Outcome::Net {
                    now: v,
                    frames: Vec::new(),
                    stdin: false,
                },
                Outcome::Moved {
                    from: text(v),
                    to: text(v >> 1),
                    aside: Some(v),
                },
                Outcome::Moved {
                    from: String::new(),
                    to: text(v),
                    aside: None,
                },
                Outcome::Removed { aside: Some(v) },
                Outcome::Removed { aside: None },
            ]);
        }
        for outcome in &outcomes {
            for &v in &values {
                for kind in [Kind::ClockTimeGet, Kind::AsideDrop] {
                    let e = Event {
                        seq: v,
                        kind,
                        args: v.rotate_left(17),
                        outputs: v >> 13,
                        outcome: outcome.clone(),
                    };
                    let encoded = postcard::to_stdvec(&e).unwrap();
                    assert_eq!(e.encoded_len(), encoded.len(), "{e:?}");
                }
            }
        }
    }

    #[test]
    fn a_data_buffer_set_aside_serves_the_next_read_on_its_thread_if_unshared_and_fitting() {
        // This test's own thread: it starts with nothing set aside.
        assert_eq!(spare_buffers(), 0);
        let mut v = Bytes::buffer(4096);
        v.fill(7);
        let at = v.as_ptr();
        Bytes::from(v).spare();
        assert_eq!(spare_buffers(), 1);
        // Another thread has its own (none).
        assert_eq!(std::thread::spawn(spare_buffers).join().unwrap(), 0);
        let again = Bytes::buffer(3000);
        assert_eq!(
            (again.as_ptr(), again.len()),
            (at, 3000),
            "the same buffer, cut"
        );
        assert_eq!(spare_buffers(), 0);
        // Longer than what it last held (but within its room): the rest is zeroed, not
        // bytes of an earlier event.
        let mut longer = again;
        longer.truncate(10);
        Bytes::from(longer).spare();
        let grown = Bytes::buffer(4000);
        assert_eq!(grown.as_ptr(), at);
        assert!(grown[..10].iter().all(|&b| b == 7) && grown[10..].iter().all(|&b| b == 0));
        // Still held elsewhere (a primary's history): not taken.
        let shared = Bytes::from(grown);
        let held = shared.clone();
        shared.spare();
        assert_eq!(spare_buffers(), 0);
        drop(held);
        // A read it does not fit (too large, or under half of it) gets a new buffer, and
        // the unfitting one is dropped.
        for len in [4097, 1000] {
            Bytes::from(vec![0; 4096]).spare();
            let fresh = Bytes::buffer(len);
            assert_eq!((fresh.len(), fresh.capacity()), (len, len));
            assert_eq!(spare_buffers(), 0, "{len}");
        }
        // A read too small or too large for any of them leaves them be.
        Bytes::from(vec![0; 4096]).spare();
        assert_eq!(Bytes::buffer(16).capacity(), 16);
        assert_eq!(spare_buffers(), 1);
        assert_eq!(Bytes::buffer(SPARE_LARGEST + 1).len(), SPARE_LARGEST + 1);
        assert_eq!(spare_buffers(), 1);
        drop(Bytes::buffer(4096));
        // Too small or too large to keep.
        Bytes::from(vec![0; SPARE_SMALLEST - 1]).spare();
        Bytes::from(vec![0; SPARE_LARGEST + 1]).spare();
        assert_eq!(spare_buffers(), 0);
        // Never more than the bound in all.
        for _ in 0..SPARE_BYTES / SPARE_LARGEST + 4 {
            Bytes::from(vec![0; SPARE_LARGEST]).spare();
        }
        assert_eq!(spare_buffers(), SPARE_BYTES / SPARE_LARGEST);
        SPARE.with(|s| assert_eq!(s.borrow().bytes, SPARE_BYTES));
    }

    #[test]
    fn args_digest_separates_parts() {
        // Length-prefixing keeps ("ab","c") apart from ("a","bc").
        assert_ne!(args_digest(&[b"ab", b"c"]), args_digest(&[b"a", b"bc"]));
        assert_eq!(args_digest(&[b"x"]), args_digest(&[b"x"]));
        // Logs carry it and a replay by another build compares it: pinned, like the
        // output digest (`vm::tests`).
        let d = args_digest(&[b"fd", &7u64.to_le_bytes()]);
        assert_eq!(d, 0x351d_7810_9a67_74d5, "{d:#x}");
    }

    #[test]
    fn shared_bytes_encode_as_a_byte_string_and_back() {
        let v: Vec<u8> = (0..300u32).map(|i| i as u8).collect();
        let shared = postcard::to_stdvec(&Bytes::from(v.clone())).unwrap();
        let plain = postcard::to_stdvec(&serde_bytes::ByteBuf::from(v.clone())).unwrap();
        assert_eq!(shared, plain);
        let back: Bytes = postcard::from_bytes(&shared).unwrap();
        assert_eq!(&back[..], &v[..]);
        // A change to shared bytes copies them: the other holder keeps what it had.
        let mut a = back.clone();
        a.make_mut()[0] = 0xff;
        assert_eq!((a[0], back[0]), (0xff, 0));
    }
}
