//! Host side of a Tandem VM's devices: the tap NIC attached to a bridge.
//!
//! A [`Tap`] is a Linux tap device created for one VM and attached to a named bridge. Its
//! file descriptor is non-blocking; the device disappears when the `Tap` is dropped (it is
//! not persistent), so a VM that stops, or a process that dies, leaves nothing behind.
//!
//! This crate knows nothing of events or replay: it moves frames between the host and
//! whoever owns the `Tap`.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("bridge {0:?} does not exist on this host")]
    NoBridge(String),
    #[error("interface name {0:?} is invalid (1 to 15 characters, no '/' or whitespace)")]
    BadName(String),
    #[error("cannot {what} tap {name}: {source}")]
    Tap {
        what: &'static str,
        name: String,
        source: io::Error,
    },
}

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const SIOCGIFFLAGS: libc::c_ulong = 0x8913;
const SIOCSIFFLAGS: libc::c_ulong = 0x8914;
const SIOCGIFINDEX: libc::c_ulong = 0x8933;
const SIOCBRADDIF: libc::c_ulong = 0x89a2;

/// `struct ifreq`: an interface name and a 24-byte union (flags or index here).
#[repr(C)]
struct IfReq {
    name: [u8; 16],
    data: [u8; 24],
}

impl IfReq {
    fn new(name: &str) -> Self {
        let mut r = IfReq {
            name: [0; 16],
            data: [0; 24],
        };
        r.name[..name.len()].copy_from_slice(name.as_bytes());
        r
    }
    fn short(&self) -> libc::c_short {
        libc::c_short::from_ne_bytes([self.data[0], self.data[1]])
    }
    fn set_short(&mut self, v: libc::c_short) {
        self.data[..2].copy_from_slice(&v.to_ne_bytes());
    }
    fn int(&self) -> libc::c_int {
        libc::c_int::from_ne_bytes([self.data[0], self.data[1], self.data[2], self.data[3]])
    }
    fn set_int(&mut self, v: libc::c_int) {
        self.data[..4].copy_from_slice(&v.to_ne_bytes());
    }
}

fn valid_name(name: &str) -> bool {
    !name.is_empty() && name.len() < 16 && !name.contains(['/', ' ', '\t', '\n', '\0'])
}

/// Whether a bridge of this name exists on this host (in this network namespace).
pub fn bridge_exists(bridge: &str) -> bool {
    valid_name(bridge)
        && Path::new("/sys/class/net")
            .join(bridge)
            .join("bridge")
            .is_dir()
}

fn ioctl(fd: RawFd, req: libc::c_ulong, ifr: &mut IfReq) -> io::Result<()> {
    // SAFETY: `ifr` is a valid, writable `struct ifreq` for the duration of the call, and
    // every request used here reads and writes at most that structure.
    let r = unsafe { libc::ioctl(fd, req as _, ifr as *mut IfReq) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

pub struct Tap {
    fd: OwnedFd,
    name: String,
}

impl Tap {
    /// Create tap `name`, bring it up and attach it to `bridge`.
    pub fn create(name: &str, bridge: &str) -> Result<Tap, DeviceError> {
        if !valid_name(name) {
            return Err(DeviceError::BadName(name.into()));
        }
        if !bridge_exists(bridge) {
            return Err(DeviceError::NoBridge(bridge.into()));
        }
        let err = |what: &'static str| {
            let name = name.to_string();
            move |source| DeviceError::Tap { what, name, source }
        };
        let path = CString::new("/dev/net/tun")
            .map_err(|_| err("open")(io::Error::from_raw_os_error(libc::EINVAL)))?;
        // SAFETY: `path` is a NUL-terminated string alive for the call.
        let raw = unsafe {
            libc::open(
                path.as_ptr(),
                libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC,
            )
        };
        if raw < 0 {
            return Err(err("open /dev/net/tun for")(io::Error::last_os_error()));
        }
        // SAFETY: `raw` is a file descriptor we just opened and own exclusively.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let mut ifr = IfReq::new(name);
        ifr.set_short(IFF_TAP | IFF_NO_PI);
        ioctl(fd.as_raw_fd(), TUNSETIFF, &mut ifr).map_err(err("create"))?;

        // SAFETY: plain socket creation; the result is checked and owned below.
        let sock = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if sock < 0 {
            return Err(err("configure")(io::Error::last_os_error()));
        }
        // SAFETY: `sock` is a descriptor we just created and own exclusively.
        let sock = unsafe { OwnedFd::from_raw_fd(sock) };
        let mut ifr = IfReq::new(name);
        ioctl(sock.as_raw_fd(), SIOCGIFFLAGS, &mut ifr).map_err(err("read flags of"))?;
        let flags = ifr.short() | libc::IFF_UP as libc::c_short;
        ifr.set_short(flags);
        ioctl(sock.as_raw_fd(), SIOCSIFFLAGS, &mut ifr).map_err(err("bring up"))?;
        let mut ifr = IfReq::new(name);
        ioctl(sock.as_raw_fd(), SIOCGIFINDEX, &mut ifr).map_err(err("find"))?;
        let index = ifr.int();
        let mut br = IfReq::new(bridge);
        br.set_int(index);
        ioctl(sock.as_raw_fd(), SIOCBRADDIF, &mut br).map_err(err("attach to the bridge"))?;
        Ok(Tap {
            fd,
            name: name.to_string(),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// One received frame into `buf`; `None` when no frame is waiting.
    pub fn recv(&self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        // SAFETY: `buf` is valid for writes of `buf.len()` bytes.
        let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n >= 0 {
            return Ok(Some(n as usize));
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EAGAIN) | Some(libc::EINTR) => Ok(None),
            _ => Err(e),
        }
    }

    /// Send one frame. A full transmit queue drops it, as a real NIC would; TCP recovers.
    pub fn send(&self, frame: &[u8]) -> io::Result<()> {
        // SAFETY: `frame` is valid for reads of `frame.len()` bytes.
        let n = unsafe { libc::write(self.fd.as_raw_fd(), frame.as_ptr().cast(), frame.len()) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EAGAIN) {
                return Err(e);
            }
        }
        Ok(())
    }

    pub fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        assert!(valid_name("tnd0"));
        assert!(!valid_name(""));
        assert!(!valid_name("a-name-that-is-too-long"));
        assert!(!valid_name("a/b"));
        assert!(!bridge_exists("../../etc"));
    }

    #[test]
    fn a_missing_bridge_is_a_clear_error() {
        match Tap::create("tndtest0", "no-such-br0") {
            Err(DeviceError::NoBridge(b)) => assert_eq!(b, "no-such-br0"),
            Err(e) => panic!("wrong error: {e}"),
            Ok(_) => panic!("created a tap on a missing bridge"),
        }
    }
}
