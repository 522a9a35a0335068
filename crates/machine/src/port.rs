//! Where a live VM's outputs leave the host.
//!
//! Every output is tagged with the VM's position when it was produced: the number of
//! events taken before it, i.e. the events whose results could have shaped it. A port may
//! hold an output until whatever it waits for (lockstep: the secondary's acknowledgement of
//! those events) has happened. The machine itself knows nothing of why.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use crate::event::Bytes;
use crate::log::LogError;

/// A write to a datastore file whose outcome the guest was given before it was performed
/// (write-behind): a port that replicates performs it once the output rule lets it leave,
/// in order with the VM's other outputs, so that nothing after it (a reply to a client)
/// leaves before it. Only writes that cannot fail short of a lost storage path are taken
/// this way (see [`crate::host::LiveHost::write_behind`]).
pub struct DiskWrite {
    pub(crate) file: Arc<File>,
    pub(crate) at: u64,
    pub(crate) data: Bytes,
}

impl DiskWrite {
    /// A write of `data` at `at` to `file`.
    pub fn new(file: Arc<File>, at: u64, data: Bytes) -> DiskWrite {
        DiskWrite { file, at, data }
    }

    /// Perform the write, all of it.
    pub fn perform(&self) -> std::io::Result<()> {
        self.file.write_all_at(&self.data, self.at)
    }

    pub fn len(&self) -> usize {
        self.data.len()
    }

    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }
}

pub trait OutputPort: Send {
    /// A frame for the wire, produced at `position`.
    fn frame(&mut self, position: u64, frame: &[u8]);
    /// Console output (`fd` 1 or 2), produced at `position`.
    fn console(&mut self, position: u64, fd: u32, data: &[u8]);
    /// Called before a disk mutation is performed at `position`; it is performed only when
    /// this returns. An error stops the VM without performing it.
    fn before_disk(&mut self, position: u64) -> Result<(), LogError>;
    /// Called instead of [`OutputPort::before_disk`] before a disk mutation that must not
    /// be done twice: a port that replicates makes the intent known first. (No default: a
    /// port that wraps another must pass this on, not fall back to `before_disk`.)
    fn before_uncertain(&mut self, intent: &crate::event::Intent) -> Result<(), LogError>;
    /// Whether outputs go to a replica that may go live (intents are worth computing).
    fn replicates(&self) -> bool;
    /// The VM is about to wait for input (a frame, stdin or a deadline): a port that holds
    /// outputs back for a replica sends what they wait for on its way now, since nothing
    /// more comes from the guest until the wait ends. (No default: a port that wraps
    /// another must pass this on, or its outputs would wait for a heartbeat.)
    fn idle(&mut self);
    /// The disk operation at `position` failed the way a lost storage path fails (an I/O
    /// error). A port that replicates may hand the VM over to a copy that still reaches
    /// storage before the guest sees the error: it then returns an error and this copy
    /// stops at that boundary, the operation's result never given. `Ok`: the guest gets the
    /// error, as natively.
    fn storage_failed(&mut self, position: u64) -> Result<(), LogError>;
    /// Whether a write at `position` may be given its outcome now and performed later by
    /// [`OutputPort::write_behind`]: a port that would otherwise make the VM wait for the
    /// output rule before the write says yes.
    fn defers_writes(&self) -> bool {
        false
    }
    /// Take a write whose outcome (all of it written) the guest gets now, as the output
    /// produced at `position` (the write's own event): it is performed once it may leave,
    /// after every output before it and before every output after it. Called before the
    /// write's event is logged. `Ok(Some(write))`: not taken (nothing to wait for after
    /// all): the caller performs it now, as any write. An error stops the VM at that
    /// boundary.
    fn write_behind(
        &mut self,
        position: u64,
        write: DiskWrite,
    ) -> Result<Option<DiskWrite>, LogError> {
        let _ = position;
        Ok(Some(write))
    }
    /// Called before every other disk operation: returns once every write taken by
    /// [`OutputPort::write_behind`] was performed, so that the operation sees them (and a
    /// write performed now never overtakes one taken before it).
    fn settle_writes(&mut self) -> Result<(), LogError> {
        Ok(())
    }
}

/// Write a console output to this process's stdout or stderr.
pub fn write_console(fd: u32, data: &[u8]) {
    use std::io::Write;
    // A closed host console must not stop the VM; the output is in the digest regardless.
    let _ = if fd == 1 {
        let mut out = std::io::stdout().lock();
        out.write_all(data).and_then(|_| out.flush())
    } else {
        std::io::stderr().lock().write_all(data)
    };
}

/// Send a frame on a tap, logging (not failing) when the host refuses it.
pub fn send_frame(tap: &devices::Tap, frame: &[u8]) {
    if let Err(e) = tap.send(frame) {
        // Like a NIC with a broken link: the frame is lost and TCP will resend.
        tracing::warn!("tap {}: send failed: {e}", tap.name());
    }
}

/// Outputs leave at once: an unprotected VM.
pub struct Direct {
    pub tap: Option<Arc<devices::Tap>>,
    /// Whether console output reaches this process's stdout/stderr.
    pub console: bool,
}

impl OutputPort for Direct {
    fn frame(&mut self, _: u64, frame: &[u8]) {
        if let Some(tap) = &self.tap {
            send_frame(tap, frame);
        }
    }

    fn console(&mut self, _: u64, fd: u32, data: &[u8]) {
        if self.console {
            write_console(fd, data);
        }
    }

    fn before_disk(&mut self, _: u64) -> Result<(), LogError> {
        Ok(())
    }

    fn before_uncertain(&mut self, _: &crate::event::Intent) -> Result<(), LogError> {
        Ok(())
    }

    fn idle(&mut self) {}

    fn replicates(&self) -> bool {
        false
    }

    fn storage_failed(&mut self, _: u64) -> Result<(), LogError> {
        Ok(())
    }
}
