//! Who is on the other end of a connection: transport, Unix credentials, TLS identity.

use std::fmt;
use std::net::SocketAddr;
use std::os::fd::RawFd;

/// Unix-socket peer credentials as the kernel reports them (`SO_PEERCRED`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnixCred {
    /// Process id at connect time.
    pub pid: i32,
    /// Effective user id.
    pub uid: u32,
    /// Effective group id.
    pub gid: u32,
}

/// How the peer reached us.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transport {
    /// A Unix socket; credentials when the kernel gave them.
    Unix(Option<UnixCred>),
    /// TCP from this address.
    Tcp(SocketAddr),
}

/// One connection's peer, as the export table's access check sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    /// Transport and credentials.
    pub transport: Transport,
    /// The PSK identity (user name) the peer proved in the TLS handshake; `None` without TLS.
    pub tls_identity: Option<String>,
}

impl Peer {
    /// A local Unix peer without known credentials and without TLS (tests, fuzzing).
    pub fn local() -> Self {
        Self {
            transport: Transport::Unix(None),
            tls_identity: None,
        }
    }

    /// Unix credentials, if the peer came over a Unix socket and the kernel gave them.
    pub fn unix_cred(&self) -> Option<UnixCred> {
        match self.transport {
            Transport::Unix(c) => c,
            Transport::Tcp(_) => None,
        }
    }

    /// True for TCP peers.
    pub fn is_tcp(&self) -> bool {
        matches!(self.transport, Transport::Tcp(_))
    }
}

impl fmt::Display for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.transport {
            Transport::Unix(Some(c)) => {
                write!(f, "unix(pid {} uid {} gid {})", c.pid, c.uid, c.gid)?
            }
            Transport::Unix(None) => write!(f, "unix")?,
            Transport::Tcp(a) => write!(f, "tcp({a})")?,
        }
        if let Some(id) = &self.tls_identity {
            write!(f, " tls-psk {id:?}")?;
        }
        Ok(())
    }
}

/// Reads `SO_PEERCRED` from a connected Unix socket.
pub(crate) fn unix_peer_cred(fd: RawFd) -> Option<UnixCred> {
    let mut c = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: `c` is a valid ucred and `len` its size; the kernel writes at most `len` bytes.
    let r = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut c as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    (r == 0).then_some(UnixCred {
        pid: c.pid,
        uid: c.uid,
        gid: c.gid,
    })
}
