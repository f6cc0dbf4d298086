//! The safetensors writer, and whole-tensor gather / digest.
//!
//! [`write_shards`] plans everything first (validation, headers, offsets), then:
//! 1. creates each output as a hidden sibling temporary file, preallocates it (`fallocate`) to its
//!    final size (a full disk is a clean `ENOSPC` error; nothing is ever written through a writable
//!    mapping, so no SIGBUS) and `pwrite`s its header at offset 0;
//! 2. runs the work items on the pool, threads spread over files first (one writer per file while
//!    there are files enough; see `choose_queue`), each file's items in order:
//!    - *range copies*: a tensor with no cast whose chunks are each one contiguous range, split in
//!      pieces of ≤ 32 MiB, moved with `splice` through a 1 MiB pipe (source page-cache pages go
//!      into the pipe by reference, then one kernel copy into the output; zero user-space
//!      copies). That beats `copy_file_range`, whose in-kernel loop goes through a 64 KiB pipe:
//!      into one output file 0.78× `cp` against 1.3× (`benches/README.md`). When the kernel
//!      refuses (`EXDEV`, `EINVAL`, `ENOSYS`, `EOPNOTSUPP`, `EBADF`) or the pipe cannot grow to
//!      256 KiB, the call falls back to `copy_file_range`, then to `pwrite` from the source
//!      mapping;
//!    - *windows*: any other tensor, in windows of ≤ 16 MiB of output bytes gathered (and cast)
//!      into a reused buffer, then written with one `pwrite`;
//! 3. with `fsync`, starts writeback of each finished range (`sync_file_range(WRITE)`), and
//!    fsyncs each file once at the end; then renames the temporary files into place (and fsyncs
//!    the directory).
//!
//! Anonymous memory is the window buffers: at most one per thread, 64 MiB in all.
//! Workers check the cancel flag between items and add finished bytes to the progress counter.

use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::mmap::{FileCache, SourceFile};
use crate::plan::{layout_file, prepare_source, Source, TensorMeta, TensorPlan};
use crate::pool::{pool, Progress};
use crate::reshard::fill_window;
use rayon::prelude::*;
use std::fs::{File, OpenOptions};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::Mutex;

/// Total budget of window buffers, shared by all threads.
pub const BUFFER_BUDGET: usize = 64 << 20;
/// Largest window.
pub const MAX_WINDOW: usize = 16 << 20;
/// Largest range copied by one work item.
pub const MAX_RANGE: u64 = 32 << 20;

/// One output file: its name in the directory and its tensors with their output dtypes.
#[derive(Debug, Clone)]
pub struct ShardSpec {
    /// File name (no directory part).
    pub file_name: String,
    /// Tensors and output dtypes.
    pub tensors: Vec<(Source, DType)>,
}

/// Options of [`write_shards`].
#[derive(Debug, Clone, Copy, Default)]
pub struct WriteOptions {
    /// Thread count (`None`: `FASTCKPT_NUM_THREADS` or the CPU count).
    pub num_threads: Option<usize>,
    /// Early writeback and one fsync per file, plus the directory.
    pub fsync: bool,
}

/// Window size in bytes for `threads` threads: the buffer budget split among them, between
/// 1 MiB and [`MAX_WINDOW`].
pub fn window_bytes(threads: usize) -> usize {
    (BUFFER_BUDGET / threads.max(1)).clamp(1 << 20, MAX_WINDOW)
}

/// Reusable window buffers of one call.
struct Buffers {
    size: usize,
    free: Mutex<Vec<Vec<u8>>>,
}

impl Buffers {
    fn new(size: usize) -> Self {
        Buffers {
            size,
            free: Mutex::new(Vec::new()),
        }
    }
    fn take(&self) -> Vec<u8> {
        let b = self.free.lock().unwrap_or_else(|e| e.into_inner()).pop();
        b.unwrap_or_else(|| vec![0u8; self.size])
    }
    fn put(&self, b: Vec<u8>) {
        self.free.lock().unwrap_or_else(|e| e.into_inner()).push(b);
    }
}

struct OutFile {
    tmp: PathBuf,
    path: PathBuf,
    file: File,
}

enum Work {
    /// Copy `len` bytes from `src_off` of chunk `copy`'s file to `dst_off` of the output.
    Range {
        file: usize,
        tensor: usize,
        copy: usize,
        src_off: u64,
        dst_off: u64,
        len: u64,
    },
    /// Gather elements `[e0, e1)` of a tensor and write them at `dst_off`.
    Window {
        file: usize,
        tensor: usize,
        e0: u64,
        e1: u64,
        dst_off: u64,
    },
}

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
fn first_copy_mode() -> u8 {
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

fn sync_range(f: &File, path: &Path, off: u64, len: u64) -> Result<()> {
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
fn preallocate(f: &File, path: &Path, len: u64) -> Result<()> {
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

fn check_file_name(name: &str) -> Result<()> {
    if name.is_empty() || name == "." || name == ".." || name.contains('/') || name.contains('\0') {
        return Err(Error::Plan(format!(
            "invalid output file name '{name}': it must be a plain file name"
        )));
    }
    Ok(())
}

/// The work items of one output file, taken in order by the threads working on that file.
struct FileQueue {
    items: Vec<Work>,
    next: AtomicUsize,
    active: AtomicUsize,
}

impl FileQueue {
    fn new(items: Vec<Work>) -> Self {
        FileQueue {
            items,
            next: AtomicUsize::new(0),
            active: AtomicUsize::new(0),
        }
    }
    fn remaining(&self) -> usize {
        self.items
            .len()
            .saturating_sub(self.next.load(Ordering::SeqCst))
    }
    fn next(&self) -> Option<&Work> {
        self.items.get(self.next.fetch_add(1, Ordering::SeqCst))
    }
}

/// Picks the file a free thread works on next: one with items left and the fewest threads on it
/// (most items left among those). Concurrent buffered writes to one file serialise on its inode
/// lock, so threads spread over files first ("one writer per output shard") and share a file
/// only when no other has work left.
fn choose_queue<'a>(queues: &'a [FileQueue], pick: &Mutex<()>) -> Option<&'a FileQueue> {
    let _guard = pick.lock().unwrap_or_else(|p| p.into_inner());
    let q = queues
        .iter()
        .filter(|q| q.remaining() > 0)
        .min_by_key(|q| {
            (
                q.active.load(Ordering::SeqCst),
                std::cmp::Reverse(q.remaining()),
            )
        })?;
    q.active.fetch_add(1, Ordering::SeqCst);
    Some(q)
}

/// Plans and writes every file of [`write_shards`] under a hidden temporary name in `dir`
/// (`.NAME.fastckpt-tmp`), fsynced when asked; the caller commits or drops the result.
pub fn stage_shards(
    dir: &Path,
    shards: &[ShardSpec],
    opts: &WriteOptions,
    progress: &Progress,
) -> Result<Staged> {
    // ---- plan ----
    let mut cache = FileCache::new();
    let mut names = std::collections::HashSet::new();
    let mut plans: Vec<Vec<TensorPlan>> = Vec::with_capacity(shards.len());
    let mut layouts = Vec::with_capacity(shards.len());
    for s in shards {
        check_file_name(&s.file_name)?;
        if !names.insert(s.file_name.as_str()) {
            return Err(Error::Plan(format!(
                "output file '{}' is listed twice",
                s.file_name
            )));
        }
        let mut tp = Vec::with_capacity(s.tensors.len());
        for (src, out) in &s.tensors {
            tp.push(prepare_source(src, *out, &mut cache)?);
        }
        let metas: Vec<TensorMeta<'_>> = tp
            .iter()
            .map(|t| TensorMeta {
                name: &t.name,
                dtype: t.out_dtype,
                shape: &t.shape,
            })
            .collect();
        layouts.push(layout_file(&metas)?);
        plans.push(tp);
    }
    let pool = pool(opts.num_threads)?;
    let window = window_bytes(pool.current_num_threads());

    // ---- work items ----
    let mut items: Vec<Vec<Work>> = (0..plans.len()).map(|_| Vec::new()).collect();
    let mut total = 0u64;
    for (fi, (tp, lay)) in plans.iter().zip(&layouts).enumerate() {
        let data_start = lay.header.len() as u64;
        for &(ti, begin, end) in &lay.order {
            let t = &tp[ti];
            total += end - begin;
            let base = data_start + begin;
            if t.is_raw_contiguous() {
                let sz = t.src_dtype.size() as u64;
                for (ci, c) in t.copies.iter().enumerate() {
                    let len = c.inner.0 * sz;
                    let src0 = c.data_offset + c.src_elem * sz;
                    let dst0 = base + c.dst_elem * sz;
                    let mut o = 0;
                    while o < len {
                        let n = (len - o).min(MAX_RANGE);
                        items[fi].push(Work::Range {
                            file: fi,
                            tensor: ti,
                            copy: ci,
                            src_off: src0 + o,
                            dst_off: dst0 + o,
                            len: n,
                        });
                        o += n;
                    }
                }
            } else {
                let osz = t.out_dtype.size() as u64;
                let per = (window as u64 / osz).max(1);
                let mut e0 = 0;
                while e0 < t.numel {
                    let e1 = (e0 + per).min(t.numel);
                    items[fi].push(Work::Window {
                        file: fi,
                        tensor: ti,
                        e0,
                        e1,
                        dst_off: base + e0 * osz,
                    });
                    e0 = e1;
                }
            }
        }
    }
    progress.total.store(total, Ordering::Relaxed);

    // ---- create outputs ----
    let mut outs: Vec<OutFile> = Vec::with_capacity(shards.len());
    let cleanup = |outs: &[OutFile]| {
        for o in outs {
            let _ = std::fs::remove_file(&o.tmp);
        }
    };
    for (s, lay) in shards.iter().zip(&layouts) {
        let path = dir.join(&s.file_name);
        let tmp = dir.join(format!(".{}.fastckpt-tmp", s.file_name));
        let r = (|| {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(&tmp)
                .map_err(|e| Error::io(&path, e))?;
            Ok(file)
        })();
        let file = match r {
            Ok(f) => f,
            Err(e) => {
                cleanup(&outs);
                return Err(e);
            }
        };
        outs.push(OutFile { tmp, path, file });
        let o = outs.last().expect("just pushed");
        let r = preallocate(&o.file, &o.path, lay.file_len).and_then(|_| {
            o.file
                .write_all_at(&lay.header, 0)
                .map_err(|e| Error::io(&o.path, e))
        });
        if let Err(e) = r {
            cleanup(&outs);
            return Err(e);
        }
    }

    // ---- copy ----
    let mode = AtomicU8::new(first_copy_mode());
    let bufs = Buffers::new(window);
    // Test hook (documented in docs/SECURITY.md): a pause before each work item, so that fault
    // tests can truncate a source or kill the process while a conversion copies.
    let test_delay = std::env::var("FASTCKPT_TEST_ITEM_DELAY_MS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .map(std::time::Duration::from_millis);
    let run = |w: &Work| -> Result<()> {
        if let Some(d) = test_delay {
            std::thread::sleep(d);
        }
        progress.check()?;
        let (fi, off, len) = match *w {
            Work::Range {
                file,
                tensor,
                copy,
                src_off,
                dst_off,
                len,
            } => {
                let c = &plans[file][tensor].copies[copy];
                let o = &outs[file];
                copy_range(&c.file, src_off, &o.file, &o.path, dst_off, len, &mode)?;
                (file, dst_off, len)
            }
            Work::Window {
                file,
                tensor,
                e0,
                e1,
                dst_off,
            } => {
                let t = &plans[file][tensor];
                let n = ((e1 - e0) * t.out_dtype.size() as u64) as usize;
                let mut buf = bufs.take();
                if let Err(e) = fill_window(t, e0, &mut buf[..n]) {
                    bufs.put(buf);
                    return Err(e);
                }
                let o = &outs[file];
                let r = o.file.write_all_at(&buf[..n], dst_off);
                bufs.put(buf);
                r.map_err(|e| Error::io(&o.path, e))?;
                (file, dst_off, n as u64)
            }
        };
        if opts.fsync {
            let o = &outs[fi];
            sync_range(&o.file, &o.path, off, len)?;
        }
        progress.add(len);
        Ok(())
    };
    let first_err: Mutex<Option<Error>> = Mutex::new(None);
    let queues: Vec<FileQueue> = items.into_iter().map(FileQueue::new).collect();
    let pick = Mutex::new(());
    let worker = || {
        while let Some(q) = choose_queue(&queues, &pick) {
            while let Some(w) = q.next() {
                match run(w) {
                    Ok(()) => {}
                    Err(Error::Cancelled) => break,
                    Err(e) => {
                        // Keep the first real error; the other workers stop with `Cancelled`.
                        progress.cancel();
                        let mut slot = first_err.lock().unwrap_or_else(|p| p.into_inner());
                        if slot.is_none() {
                            *slot = Some(e);
                        }
                        break;
                    }
                }
            }
            q.active.fetch_sub(1, Ordering::SeqCst);
            if progress.cancel.load(Ordering::Relaxed) {
                break;
            }
        }
    };
    let nthreads = pool.current_num_threads();
    pool.scope(|s| {
        for _ in 0..nthreads {
            s.spawn(|_| worker());
        }
    });
    let result = match first_err.lock().unwrap_or_else(|p| p.into_inner()).take() {
        Some(e) => Err(e),
        None => progress.check(),
    };
    drop(bufs);
    let result = result.and_then(|_| {
        if opts.fsync {
            pool.install(|| {
                outs.par_iter()
                    .try_for_each(|o| o.file.sync_all().map_err(|e| Error::io(&o.path, e)))
            })?;
        }
        Ok(())
    });
    if let Err(e) = result {
        cleanup(&outs);
        return Err(e);
    }
    Ok(Staged {
        outs,
        dir: dir.to_path_buf(),
        fsync: opts.fsync,
        total,
    })
}

/// Files written by [`stage_shards`] under temporary names, not yet in place.
///
/// [`Staged::commit`] renames them into place; dropping a `Staged` removes them.
pub struct Staged {
    outs: Vec<OutFile>,
    dir: PathBuf,
    fsync: bool,
    total: u64,
}

impl Staged {
    /// Tensor bytes written.
    pub fn total(&self) -> u64 {
        self.total
    }

    /// Renames every file into place (then, with `fsync`, fsyncs the directory); returns the
    /// number of tensor bytes written.
    pub fn commit(mut self) -> Result<u64> {
        let outs = std::mem::take(&mut self.outs);
        for (i, o) in outs.iter().enumerate() {
            if let Err(e) = std::fs::rename(&o.tmp, &o.path) {
                for o in &outs[i..] {
                    let _ = std::fs::remove_file(&o.tmp);
                }
                return Err(Error::io(&o.path, e));
            }
        }
        if self.fsync {
            let d = File::open(&self.dir).map_err(|e| Error::io(&self.dir, e))?;
            d.sync_all().map_err(|e| Error::io(&self.dir, e))?;
        }
        Ok(self.total)
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        for o in &self.outs {
            let _ = std::fs::remove_file(&o.tmp);
        }
    }
}

/// Writes safetensors files into the existing directory `dir` (see `_core.pyi`):
/// [`stage_shards`], then [`Staged::commit`].
///
/// Returns the number of tensor bytes written. On error or cancellation, the temporary files are
/// removed and no final file is created or replaced.
pub fn write_shards(
    dir: &Path,
    shards: &[ShardSpec],
    opts: &WriteOptions,
    progress: &Progress,
) -> Result<u64> {
    stage_shards(dir, shards, opts, progress)?.commit()
}

/// Copies tensor `src`, in C order and cast to `out_dtype`, into `out`, which must hold exactly
/// `numel · out_dtype.size()` bytes. Runs on the pool.
pub fn gather(
    src: &Source,
    out_dtype: DType,
    out: &mut [u8],
    num_threads: Option<usize>,
) -> Result<()> {
    let mut cache = FileCache::new();
    let t = prepare_source(src, out_dtype, &mut cache)?;
    if out.len() as u64 != t.out_bytes() {
        return Err(Error::shape(
            &t.name,
            format!(
                "output buffer has {} bytes but the tensor needs {} ({} elements of {})",
                out.len(),
                t.out_bytes(),
                t.numel,
                out_dtype
            ),
        ));
    }
    if out.is_empty() {
        return Ok(());
    }
    let pool = pool(num_threads)?;
    let osz = out_dtype.size();
    // Every window is written straight into `out`, so no buffer is needed: use big windows.
    let per = (MAX_WINDOW / osz).max(1);
    pool.install(|| {
        out.par_chunks_mut(per * osz)
            .enumerate()
            .try_for_each(|(i, w)| fill_window(&t, (i * per) as u64, w))
    })
}

/// XXH3-128 of tensor `src`'s bytes in C order (its own dtype), streamed through windows.
pub fn digest(src: &Source) -> Result<u128> {
    let mut cache = FileCache::new();
    let t = prepare_source(src, src.dtype, &mut cache)?;
    let sz = t.out_dtype.size();
    let per = (MAX_WINDOW / sz).max(1) as u64;
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    let mut buf = Vec::new();
    let mut e0 = 0;
    while e0 < t.numel {
        let e1 = (e0 + per).min(t.numel);
        let n = ((e1 - e0) as usize) * sz;
        if buf.len() < n {
            buf.resize(n, 0);
        }
        fill_window(&t, e0, &mut buf[..n])?;
        h.update(&buf[..n]);
        e0 = e1;
    }
    Ok(h.digest128())
}
