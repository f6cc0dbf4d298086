//! Moving bytes into the output files: range copies, and the syscalls around them.
//!
//! [`copy_range`] copies one contiguous source range (a work item of at most 32 MiB, see
//! `writer.rs`) to an offset of an output file, by the first of three paths that the call's copy
//! mode still allows:
//! 1. **`splice` through a pipe** ([`VIA_SPLICE`], the default): source → a pipe grown to 1 MiB →
//!    output. Source page-cache pages go into the pipe by reference, then one kernel copy into the
//!    output; zero user-space copies. That beats `copy_file_range`, whose in-kernel loop goes
//!    through a 64 KiB pipe: into one output file 0.78× `cp` against 1.3× (`benches/README.md`).
//! 2. **`copy_file_range`** ([`VIA_CFR`]): when the kernel refuses a splice (`EXDEV`, `EINVAL`,
//!    `ENOSYS`, `EOPNOTSUPP`/`ENOTSUP`, `EBADF`: [`is_fallback_errno`]), when a splice into the
//!    output moves nothing, or when the pipe cannot grow to 256 KiB (a user over
//!    `pipe-user-pages-soft`). Only bytes that reached the output count as copied; the rest of
//!    the range goes this way.
//! 3. **`pwrite` from the source mapping** ([`VIA_PWRITE`]): when `copy_file_range` is refused
//!    too (the same error numbers); then checks that the source did not change while mapped.
//!
//! The mode is one `AtomicU8` per call, shared by its workers: it starts at [`first_copy_mode`]
//! and only steps down, so after the first refusal the rest of the call goes straight to the
//! fallback. `FASTCKPT_COPY=copy_file_range` or `FASTCKPT_COPY=pwrite` starts a call lower (for
//! benchmarks, and as an escape hatch on odd filesystems); any other value, or none, means splice.
//! A source that ends before the range does is a format error ("truncated?").
//!
//! Around the copies, on the output files: [`preallocate`] reserves a file's final size
//! (`fallocate`) and [`sync_range`] starts writeback of a finished range
//! (`sync_file_range(WRITE)`, only a hint).

use crate::error::{Error, Result};
use crate::mmap::SourceFile;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicU8, Ordering};

/// Whether error `e` means the kernel refuses a copy path here (rather than a failed copy): the
/// call steps down to the next path.
fn is_fallback_errno(e: i32) -> bool {
    e == libc::EXDEV
        || e == libc::EINVAL
        || e == libc::ENOSYS
        || e == libc::EOPNOTSUPP
        || e == libc::EBADF
        || e == libc::ENOTSUP
}

/// How range copies move bytes; a call starts with [`VIA_SPLICE`] and steps down, for the rest of
/// the call, when the kernel refuses one.
pub(crate) const VIA_SPLICE: u8 = 0;
/// `copy_file_range`.
pub(crate) const VIA_CFR: u8 = 1;
/// `pwrite` from the source mapping.
pub(crate) const VIA_PWRITE: u8 = 2;

/// The copy path a call starts with: [`VIA_SPLICE`], unless `FASTCKPT_COPY` names another
/// (`copy_file_range` or `pwrite`; for benchmarks and as an escape hatch on odd filesystems).
pub(crate) fn first_copy_mode() -> u8 {
    match std::env::var("FASTCKPT_COPY").as_deref().map(str::trim) {
        Ok("copy_file_range") => VIA_CFR,
        Ok("pwrite") => VIA_PWRITE,
        _ => VIA_SPLICE,
    }
}

/// Pipe capacity asked for the splice path (Linux's default `pipe-max-size`).
const PIPE_BYTES: usize = 1 << 20;
/// Below this capacity (a user over `pipe-user-pages-soft` gets one page) splicing loses to
/// `copy_file_range`.
const MIN_PIPE_BYTES: usize = 256 << 10;

/// A pipe used to splice one range: read end, write end, capacity in bytes.
struct Pipe {
    r: OwnedFd,
    w: OwnedFd,
    cap: usize,
}

impl Pipe {
    /// A pipe grown to [`PIPE_BYTES`] (or 256 KiB), `None` when that is not possible.
    fn new() -> Option<Pipe> {
        let mut fds = [0 as libc::c_int; 2];
        // SAFETY: `fds` is a live array of two ints the kernel fills.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            return None;
        }
        // SAFETY: both descriptors were just created and are owned by nobody else.
        let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        for want in [PIPE_BYTES, MIN_PIPE_BYTES] {
            // SAFETY: plain fcntl on an owned descriptor.
            let got =
                unsafe { libc::fcntl(w.as_raw_fd(), libc::F_SETPIPE_SZ, want as libc::c_int) };
            if got >= MIN_PIPE_BYTES as libc::c_int {
                return Some(Pipe {
                    r,
                    w,
                    cap: got as usize,
                });
            }
        }
        None
    }
}

/// Result of one `splice` call: bytes moved, or the error.
fn splice_once(
    fd_in: libc::c_int,
    off_in: Option<u64>,
    fd_out: libc::c_int,
    off_out: Option<u64>,
    len: usize,
) -> std::io::Result<usize> {
    let mut oi = off_in.unwrap_or(0) as libc::loff_t;
    let mut oo = off_out.unwrap_or(0) as libc::loff_t;
    let pi: *mut libc::loff_t = if off_in.is_some() {
        &mut oi
    } else {
        std::ptr::null_mut()
    };
    let po: *mut libc::loff_t = if off_out.is_some() {
        &mut oo
    } else {
        std::ptr::null_mut()
    };
    loop {
        // SAFETY: the descriptors are open for the duration of the call (borrowed by the
        // caller), and each offset pointer is null or points to a live local.
        let r = unsafe { libc::splice(fd_in, pi, fd_out, po, len, libc::SPLICE_F_MOVE) };
        if r >= 0 {
            return Ok(r as usize);
        }
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::EINTR) {
            return Err(err);
        }
    }
}

/// Moves bytes of `src` to `dst` through a pipe: `splice` source → pipe (page references),
/// pipe → output (one kernel copy). Advances the offsets and `len` by what reached `dst`; when
/// the kernel refuses (or no big pipe can be had) it steps `mode` down and returns early, and
/// the caller copies the rest another way (bytes left in the dropped pipe are copied again).
fn splice_range(
    src: &SourceFile,
    src_off: &mut u64,
    dst: &File,
    dst_path: &Path,
    dst_off: &mut u64,
    len: &mut u64,
    mode: &AtomicU8,
) -> Result<()> {
    let Some(pipe) = Pipe::new() else {
        mode.fetch_max(VIA_CFR, Ordering::Relaxed);
        return Ok(());
    };
    let step_down = |e: &std::io::Error| {
        let refused = e.raw_os_error().is_some_and(is_fallback_errno);
        if refused {
            mode.fetch_max(VIA_CFR, Ordering::Relaxed);
        }
        refused
    };
    while *len > 0 {
        let want = (*len).min(pipe.cap as u64) as usize;
        let src_fd = src.file.as_raw_fd();
        let mut left = match splice_once(src_fd, Some(*src_off), pipe.w.as_raw_fd(), None, want) {
            Ok(0) => return Err(truncated(src, *src_off)),
            Ok(n) => n,
            Err(e) if step_down(&e) => return Ok(()),
            Err(e) => return Err(Error::io(&src.path, e)),
        };
        while left > 0 {
            let dst_fd = dst.as_raw_fd();
            match splice_once(pipe.r.as_raw_fd(), None, dst_fd, Some(*dst_off), left) {
                Ok(0) => {
                    mode.fetch_max(VIA_CFR, Ordering::Relaxed);
                    return Ok(());
                }
                Ok(m) => {
                    *src_off += m as u64;
                    *dst_off += m as u64;
                    *len -= m as u64;
                    left -= m;
                }
                Err(e) if step_down(&e) => return Ok(()),
                Err(e) => return Err(Error::io(dst_path, e)),
            }
        }
    }
    Ok(())
}

fn truncated(src: &SourceFile, at: u64) -> Error {
    Error::format(
        &src.path,
        format!("file ended at byte {at} while it was being copied (truncated?)"),
    )
}

/// Copies `len` bytes of `src` at `src_off` to `dst` at `dst_off`: with `splice` through a pipe,
/// `copy_file_range` or `pwrite` from the mapping, the first that `mode` still allows.
pub(crate) fn copy_range(
    src: &SourceFile,
    mut src_off: u64,
    dst: &File,
    dst_path: &Path,
    mut dst_off: u64,
    mut len: u64,
    mode: &AtomicU8,
) -> Result<()> {
    if mode.load(Ordering::Relaxed) == VIA_SPLICE {
        splice_range(
            src,
            &mut src_off,
            dst,
            dst_path,
            &mut dst_off,
            &mut len,
            mode,
        )?;
    }
    while len > 0 && mode.load(Ordering::Relaxed) <= VIA_CFR {
        let mut off_in = src_off as libc::loff_t;
        let mut off_out = dst_off as libc::loff_t;
        let want = len.min(1 << 30) as usize;
        // SAFETY: both descriptors are open for the duration of the call (borrowed `File`s), and
        // the offset pointers point to live locals the kernel updates.
        let r = unsafe {
            libc::copy_file_range(
                src.file.as_raw_fd(),
                &mut off_in,
                dst.as_raw_fd(),
                &mut off_out,
                want,
                0,
            )
        };
        if r < 0 {
            let err = std::io::Error::last_os_error();
            let code = err.raw_os_error().unwrap_or(0);
            if code == libc::EINTR {
                continue;
            }
            if is_fallback_errno(code) {
                mode.fetch_max(VIA_PWRITE, Ordering::Relaxed);
                break;
            }
            return Err(Error::io(dst_path, err));
        }
        if r == 0 {
            return Err(truncated(src, src_off));
        }
        src_off += r as u64;
        dst_off += r as u64;
        len -= r as u64;
    }
    if len > 0 {
        let (a, b) = (src_off as usize, (src_off + len) as usize);
        dst.write_all_at(&src.bytes()[a..b], dst_off)
            .map_err(|e| match e.raw_os_error() {
                // the kernel read past the end of a source that shrank under its mapping
                Some(libc::EFAULT) => src.shrank(),
                _ => Error::io(dst_path, e),
            })?;
        src.check_unchanged()?;
    }
    Ok(())
}

/// Starts writeback of `len` bytes of `f` at `off` (`sync_file_range(WRITE)`); a filesystem
/// without it is not an error.
pub(crate) fn sync_range(f: &File, path: &Path, off: u64, len: u64) -> Result<()> {
    // SAFETY: plain syscall on a borrowed open descriptor.
    let r = unsafe {
        libc::sync_file_range(
            f.as_raw_fd(),
            off as libc::off64_t,
            len as libc::off64_t,
            libc::SYNC_FILE_RANGE_WRITE,
        )
    };
    if r < 0 {
        let err = std::io::Error::last_os_error();
        // Not every filesystem supports it; it is only a hint.
        if matches!(
            err.raw_os_error(),
            Some(libc::ENOSYS | libc::EINVAL | libc::EOPNOTSUPP)
        ) {
            return Ok(());
        }
        return Err(Error::io(path, err));
    }
    Ok(())
}

/// Reserves `len` bytes for `f`, so that a full disk is an `ENOSPC` error here and not later.
///
/// Linux `fallocate(2)` rather than `posix_fallocate(3)`: where the filesystem cannot preallocate
/// (NFS < 4.2, some FUSE), glibc's emulation writes one byte per block, which is very slow on
/// remote mounts; there the file is only extended, and a full disk surfaces as `ENOSPC` from the
/// positioned writes instead (never SIGBUS: nothing is written through a mapping).
pub(crate) fn preallocate(f: &File, path: &Path, len: u64) -> Result<()> {
    if len == 0 {
        return Ok(());
    }
    loop {
        // SAFETY: plain syscall on a borrowed open descriptor.
        let r = unsafe { libc::fallocate(f.as_raw_fd(), 0, 0, len as libc::off_t) };
        if r == 0 {
            return Ok(());
        }
        let err = std::io::Error::last_os_error();
        match err.raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::EOPNOTSUPP | libc::ENOSYS | libc::EINVAL) => {
                return f.set_len(len).map_err(|e| Error::io(path, e));
            }
            _ => return Err(Error::io(path, err)),
        }
    }
}
