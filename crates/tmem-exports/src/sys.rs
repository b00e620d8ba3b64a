//! Small OS helpers: page-aligned buffers, hole punching, `SEEK_DATA`/`SEEK_HOLE`, and
//! positioned I/O that tolerates short reads at end of file.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;

use tmem_core::PAGE_SIZE;

/// One page-aligned page (the unit of [`AlignedBuf`]).
#[derive(Clone, Copy)]
#[repr(C, align(4096))]
struct Block([u8; PAGE_SIZE]);

/// A zero-initialised buffer of whole pages, aligned to 4096 bytes (usable with `O_DIRECT`).
pub(crate) struct AlignedBuf {
    blocks: Vec<Block>,
}

impl AlignedBuf {
    /// A buffer of `pages` zeroed pages.
    pub(crate) fn new(pages: usize) -> Self {
        AlignedBuf {
            blocks: vec![Block([0; PAGE_SIZE]); pages],
        }
    }

    /// The whole buffer as bytes.
    pub(crate) fn as_slice(&self) -> &[u8] {
        // SAFETY: `Block` is `repr(C)` around a byte array with size == alignment, so a
        // `Vec<Block>` is `len * PAGE_SIZE` contiguous, initialised bytes; the borrow of
        // `self` keeps them alive and unaliased by mutable borrows.
        unsafe {
            std::slice::from_raw_parts(
                self.blocks.as_ptr().cast::<u8>(),
                self.blocks.len() * PAGE_SIZE,
            )
        }
    }

    /// The whole buffer as mutable bytes.
    pub(crate) fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in `as_slice`; the mutable borrow of `self` makes this the only view.
        unsafe {
            std::slice::from_raw_parts_mut(
                self.blocks.as_mut_ptr().cast::<u8>(),
                self.blocks.len() * PAGE_SIZE,
            )
        }
    }

    /// Page `i` of the buffer.
    pub(crate) fn page(&self, i: usize) -> &[u8] {
        &self.blocks[i].0
    }

    /// Page `i` of the buffer, mutable.
    pub(crate) fn page_mut(&mut self, i: usize) -> &mut [u8] {
        &mut self.blocks[i].0
    }
}

/// Reads up to `buf.len()` bytes at `off`, retrying on short reads and `EINTR`; returns the
/// bytes read (less than `buf.len()` only at end of file).
pub(crate) fn pread_full(f: &File, buf: &mut [u8], off: u64) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match f.read_at(&mut buf[done..], off + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

/// Deallocates `[off, off+len)` keeping the file size (`FALLOC_FL_PUNCH_HOLE`). Returns
/// `Ok(false)` if the filesystem cannot punch holes.
pub(crate) fn punch_hole(f: &File, off: u64, len: u64) -> io::Result<bool> {
    let (Ok(o), Ok(l)) = (libc::off_t::try_from(off), libc::off_t::try_from(len)) else {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    };
    loop {
        // SAFETY: plain syscall on a descriptor owned by `f`, with integer arguments.
        let r = unsafe {
            libc::fallocate(
                f.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                o,
                l,
            )
        };
        if r == 0 {
            return Ok(true);
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) => return Ok(false),
            _ => return Err(e),
        }
    }
}

/// `lseek(SEEK_DATA)` / `lseek(SEEK_HOLE)`: `Ok(None)` when there is no more data (ENXIO).
pub(crate) fn seek(f: &File, off: u64, data: bool) -> io::Result<Option<u64>> {
    let Ok(o) = libc::off_t::try_from(off) else {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    };
    let whence = if data {
        libc::SEEK_DATA
    } else {
        libc::SEEK_HOLE
    };
    // SAFETY: plain syscall on a descriptor owned by `f`. Every user of the descriptor does
    // positioned I/O, so moving the file offset is harmless.
    let r = unsafe { libc::lseek(f.as_raw_fd(), o, whence) };
    if r < 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ENXIO) {
            return Ok(None);
        }
        return Err(e);
    }
    Ok(Some(r as u64))
}

/// Bytes available to unprivileged writers on the filesystem holding `f` (`fstatvfs`:
/// `f_bavail * f_frsize`).
pub(crate) fn available_bytes(f: &File) -> io::Result<u64> {
    // SAFETY: an all-zero `statvfs` is a valid value of this plain C struct.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: the descriptor is owned by `f` and `st` is a valid, writable statvfs.
    let r = unsafe { libc::fstatvfs(f.as_raw_fd(), &mut st) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((st.f_bavail as u64).saturating_mul(st.f_frsize as u64))
}

/// Bytes the file really occupies on disk (`st_blocks * 512`).
pub(crate) fn allocated_bytes(f: &File) -> u64 {
    use std::os::unix::fs::MetadataExt;
    f.metadata().map(|m| m.blocks() * 512).unwrap_or(0)
}

/// True if every byte is zero.
pub(crate) fn is_zero(b: &[u8]) -> bool {
    let (pre, words, post) =
        // SAFETY: any bit pattern is a valid u64; align_to only reinterprets the aligned middle.
        unsafe { b.align_to::<u64>() };
    pre.iter().all(|&x| x == 0) && words.iter().all(|&x| x == 0) && post.iter().all(|&x| x == 0)
}

/// Log at `$lvl` at most a few times per second from this callsite (peer-triggerable paths).
macro_rules! rl_log {
    ($lvl:ident, $($arg:tt)+) => {{
        static LAST: ::std::sync::atomic::AtomicU64 = ::std::sync::atomic::AtomicU64::new(0);
        let now = ::std::time::SystemTime::now()
            .duration_since(::std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        if LAST.swap(now, ::std::sync::atomic::Ordering::Relaxed) != now {
            ::tracing::$lvl!($($arg)+);
        }
    }};
}
pub(crate) use rl_log;
