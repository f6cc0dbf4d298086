//! Source files: opening, memory mapping, and every bounds check on source chunks.
//!
//! This is the only module with mmap `unsafe`. A [`FileCache`] lives for one call: each source
//! path is opened and mapped once (read-only, shared) and handed out as an `Arc<SourceFile>`.
//! Empty files are not mapped.
//!
//! **Files that shrink under a conversion.** Reading a mapped page past the end of a file that
//! another process truncated raises `SIGBUS`, which would kill the process mid-write. Every
//! mapping is therefore registered with a `SIGBUS` guard (module `guard`): its handler, on a
//! fault inside a registered mapping, maps zero pages over the rest of that mapping (so the
//! access completes, reading zeros), marks the file as changed, and returns. Readers check
//! [`SourceFile::check_unchanged`] after each window they copy, so the conversion stops with a
//! `FormatError` naming the file, and the writer removes its temporary files. A fault anywhere
//! else goes to the handler that was installed before (Python's `faulthandler`, or the default
//! action). The handler is installed once, on the first mapping; a handler installed later by
//! another library replaces it (then a truncated source is again fatal). Kernel-side reads of a
//! truncated mapping (the `pwrite` fallback of range copies) fail with `EFAULT` instead, which
//! the writer reports the same way. The guard costs nothing on the copy path: no extra copy, no
//! per-window system call.
//!
//! Input files are untrusted, so [`check_chunk`] validates a chunk with checked arithmetic before
//! any byte is copied: the storage range lies in the file, the highest addressed element lies in
//! the storage, strides are non-negative, the box lies in the global shape.
//! [`crate::coverage::check_coverage`] then checks that the chunks of a tensor tile it exactly
//! (disjoint boxes whose element counts add up to the tensor's), naming a missing region.

use crate::error::{Error, Result};
use memmap2::{Mmap, MmapOptions};
use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// One opened (and, unless empty, mapped) source file.
#[derive(Debug)]
pub struct SourceFile {
    /// Path as given by the caller (used in error messages).
    pub path: PathBuf,
    /// The open file (used by `copy_file_range`).
    pub file: File,
    /// Length of the file in bytes when it was opened.
    pub len: u64,
    map: Option<Mmap>,
    slot: Option<&'static guard::Slot>,
}

impl Drop for SourceFile {
    fn drop(&mut self) {
        // Unregister before the mapping (a field) is unmapped.
        if let Some(s) = self.slot.take() {
            s.release();
        }
    }
}

impl SourceFile {
    /// Opens and maps `path`.
    pub fn open(path: &Path) -> Result<SourceFile> {
        // O_NONBLOCK: a FIFO or device named as a source never blocks the open
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(path)
            .map_err(|e| Error::io(path, e))?;
        let meta = file.metadata().map_err(|e| Error::io(path, e))?;
        if !meta.is_file() {
            return Err(Error::format(
                path,
                "not a regular file; refusing to read it",
            ));
        }
        let len = meta.len();
        let (map, slot) = if len == 0 {
            (None, None)
        } else {
            // SAFETY: the mapping is read-only; fastckpt never writes to source files. Another
            // process rewriting a source file while it is converted changes the bytes read (the
            // output is then wrong, never memory-unsafe: every access is bounds-checked against
            // `len` first); truncating it is caught by the SIGBUS guard registered below.
            let m = unsafe { MmapOptions::new().map(&file) }.map_err(|e| Error::io(path, e))?;
            let slot = guard::register(m.as_ptr() as usize, m.len());
            (Some(m), Some(slot))
        };
        Ok(SourceFile {
            path: path.to_path_buf(),
            file,
            len,
            map,
            slot,
        })
    }

    /// `Err` naming the file if it shrank while mapped (a read past its new end was caught by
    /// the SIGBUS guard, and read zeros); check after copying from [`SourceFile::bytes`].
    pub fn check_unchanged(&self) -> Result<()> {
        match self.slot {
            Some(s) if s.faulted() => Err(self.shrank()),
            _ => Ok(()),
        }
    }

    /// The error for a file that shrank while it was being read.
    pub fn shrank(&self) -> Error {
        Error::format(
            &self.path,
            format!(
                "the file shrank while it was being read (it had {} bytes; truncated or \
                 rewritten by another process?)",
                self.len
            ),
        )
    }

    /// The whole file as bytes (empty for an empty file).
    pub fn bytes(&self) -> &[u8] {
        self.map.as_deref().unwrap_or(&[])
    }
}

/// The SIGBUS guard (see the module header): a lock-free, grow-only table of registered
/// mappings, read by the signal handler.
pub(crate) mod guard {
    use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicUsize, Ordering};
    use std::sync::Once;

    const BLOCK: usize = 256;

    /// One registered mapping. `seq` is a sequence lock: odd while `start`/`len` change.
    #[derive(Debug)]
    pub struct Slot {
        used: AtomicBool,
        seq: AtomicUsize,
        start: AtomicUsize,
        len: AtomicUsize,
        faulted: AtomicBool,
    }

    impl Slot {
        const fn new() -> Self {
            Slot {
                used: AtomicBool::new(false),
                seq: AtomicUsize::new(0),
                start: AtomicUsize::new(0),
                len: AtomicUsize::new(0),
                faulted: AtomicBool::new(false),
            }
        }

        fn set(&self, start: usize, len: usize) {
            self.seq.fetch_add(1, Ordering::SeqCst);
            self.start.store(start, Ordering::SeqCst);
            self.len.store(len, Ordering::SeqCst);
            self.seq.fetch_add(1, Ordering::SeqCst);
        }

        /// Whether a read in this mapping faulted since it was registered.
        pub fn faulted(&self) -> bool {
            self.faulted.load(Ordering::SeqCst)
        }

        /// Unregisters the mapping (before it is unmapped).
        pub fn release(&self) {
            self.set(0, 0);
            self.faulted.store(false, Ordering::SeqCst);
            self.used.store(false, Ordering::SeqCst);
        }

        /// `(start, len)` if the slot holds a mapping, read consistently; signal-safe.
        fn read(&self) -> Option<(usize, usize)> {
            for _ in 0..4 {
                let a = self.seq.load(Ordering::SeqCst);
                if a % 2 == 1 {
                    continue;
                }
                let (s, l) = (
                    self.start.load(Ordering::SeqCst),
                    self.len.load(Ordering::SeqCst),
                );
                if self.seq.load(Ordering::SeqCst) == a {
                    return (s != 0).then_some((s, l));
                }
            }
            None
        }
    }

    struct Block {
        slots: [Slot; BLOCK],
        next: AtomicPtr<Block>,
    }

    static HEAD: Block = Block {
        slots: [const { Slot::new() }; BLOCK],
        next: AtomicPtr::new(std::ptr::null_mut()),
    };
    static INSTALL: Once = Once::new();
    static PAGE: AtomicUsize = AtomicUsize::new(4096);
    static PREV_ACTION: AtomicUsize = AtomicUsize::new(libc::SIG_DFL);
    static PREV_FLAGS: AtomicUsize = AtomicUsize::new(0);

    /// The blocks of the table (blocks are leaked: never freed, so the handler can walk them).
    fn blocks() -> impl Iterator<Item = &'static Block> {
        let mut b: Option<&'static Block> = Some(&HEAD);
        std::iter::from_fn(move || {
            let cur = b?;
            let next = cur.next.load(Ordering::SeqCst);
            // SAFETY: `next` is null or a leaked `Box<Block>` published by `register`, never
            // freed.
            b = unsafe { next.as_ref() };
            Some(cur)
        })
    }

    /// Registers the mapping `[start, start + len)`; installs the handler on first use.
    pub fn register(start: usize, len: usize) -> &'static Slot {
        INSTALL.call_once(install);
        loop {
            let mut last = &HEAD;
            for b in blocks() {
                for s in &b.slots {
                    if s.used
                        .compare_exchange(false, true, Ordering::SeqCst, Ordering::SeqCst)
                        .is_ok()
                    {
                        s.faulted.store(false, Ordering::SeqCst);
                        s.set(start, len);
                        return s;
                    }
                }
                last = b;
            }
            let fresh = Box::into_raw(Box::new(Block {
                slots: [const { Slot::new() }; BLOCK],
                next: AtomicPtr::new(std::ptr::null_mut()),
            }));
            if last
                .next
                .compare_exchange(
                    std::ptr::null_mut(),
                    fresh,
                    Ordering::SeqCst,
                    Ordering::SeqCst,
                )
                .is_err()
            {
                // SAFETY: `fresh` was never published; another thread appended a block first.
                drop(unsafe { Box::from_raw(fresh) });
            }
        }
    }

    fn install() {
        // SAFETY: plain libc calls on local, zero-initialised `sigaction` structs; the handler is
        // an `extern "C"` function with the SA_SIGINFO signature.
        unsafe {
            let page = libc::sysconf(libc::_SC_PAGESIZE);
            if page > 0 {
                PAGE.store(page as usize, Ordering::SeqCst);
            }
            let mut old: libc::sigaction = std::mem::zeroed();
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = handler
                as extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void)
                as usize;
            sa.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
            libc::sigemptyset(&mut sa.sa_mask);
            if libc::sigaction(libc::SIGBUS, &sa, &mut old) == 0 {
                PREV_ACTION.store(old.sa_sigaction, Ordering::SeqCst);
                PREV_FLAGS.store(old.sa_flags as usize, Ordering::SeqCst);
            }
        }
    }

    /// The SIGBUS handler. Only async-signal-safe work: atomics, `mmap`, `sigaction`.
    extern "C" fn handler(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
        // SAFETY: the kernel passes a valid `siginfo_t` to an SA_SIGINFO handler.
        let (code, addr) = unsafe { ((*info).si_code, (*info).si_addr() as usize) };
        if code > 0 {
            for b in blocks() {
                for s in &b.slots {
                    let Some((start, len)) = s.read() else {
                        continue;
                    };
                    if addr < start || addr - start >= len {
                        continue;
                    }
                    let page = PAGE.load(Ordering::SeqCst);
                    let from = addr & !(page - 1);
                    let end = (start + len).div_ceil(page) * page;
                    // SAFETY: `[from, end)` lies inside a live mapping of ours (registered until
                    // just before it is unmapped, and the faulting thread is reading it);
                    // replacing its pages past the file's new end with zero pages only changes
                    // what later reads of it return.
                    let r = unsafe {
                        libc::mmap(
                            from as *mut libc::c_void,
                            end - from,
                            libc::PROT_READ,
                            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                            -1,
                            0,
                        )
                    };
                    if r != libc::MAP_FAILED {
                        s.faulted.store(true, Ordering::SeqCst);
                        return;
                    }
                }
            }
        }
        // Not ours: hand it to the previous handler.
        let prev = PREV_ACTION.load(Ordering::SeqCst);
        let flags = PREV_FLAGS.load(Ordering::SeqCst) as libc::c_int;
        if prev == libc::SIG_DFL || prev == libc::SIG_IGN {
            // SAFETY: restores the default action; returning re-runs the faulting access (or
            // the pending raise), which then terminates the process as it would have.
            unsafe {
                let mut sa: libc::sigaction = std::mem::zeroed();
                sa.sa_sigaction = libc::SIG_DFL;
                libc::sigaction(libc::SIGBUS, &sa, std::ptr::null_mut());
            }
            if code <= 0 {
                // SAFETY: re-raise a signal sent by a process, now with the default action.
                unsafe { libc::raise(sig) };
            }
            return;
        }
        if flags & libc::SA_SIGINFO != 0 {
            // SAFETY: `prev` is the SA_SIGINFO handler that was installed before ours.
            let f: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
                unsafe { std::mem::transmute(prev) };
            f(sig, info, ctx);
        } else {
            // SAFETY: `prev` is the plain handler that was installed before ours.
            let f: extern "C" fn(libc::c_int) = unsafe { std::mem::transmute(prev) };
            f(sig);
        }
    }
}

/// Per-call cache of opened source files, keyed by path.
#[derive(Debug, Default)]
pub struct FileCache {
    files: HashMap<PathBuf, Arc<SourceFile>>,
}

impl FileCache {
    /// An empty cache.
    pub fn new() -> Self {
        Self::default()
    }

    /// Opens `path` once and returns the shared handle.
    pub fn open(&mut self, path: &Path) -> Result<Arc<SourceFile>> {
        if let Some(f) = self.files.get(path) {
            return Ok(f.clone());
        }
        let f = Arc::new(SourceFile::open(path)?);
        self.files.insert(path.to_path_buf(), f.clone());
        Ok(f)
    }
}

/// Geometry of one chunk, as checked by [`check_chunk`].
#[derive(Debug, Clone, Copy)]
pub struct ChunkGeom<'a> {
    /// Byte offset of the storage in the file.
    pub data_offset: u64,
    /// Byte length of the storage.
    pub data_len: u64,
    /// Offset of element (0, ..., 0) in the storage, in elements.
    pub storage_offset: u64,
    /// Strides in elements (checked non-negative).
    pub strides: &'a [i64],
    /// Position of the box in the global tensor.
    pub offsets: &'a [u64],
    /// Extent of the box.
    pub sizes: &'a [u64],
}

pub(crate) fn overflow(tensor: &str) -> Error {
    Error::shape(tensor, "chunk geometry overflows 64-bit arithmetic")
}

/// Number of elements of a shape, checked.
pub fn numel(tensor: &str, shape: &[u64]) -> Result<u64> {
    shape
        .iter()
        .try_fold(1u64, |a, &s| a.checked_mul(s))
        .ok_or_else(|| overflow(tensor))
}

/// Validates one chunk of `tensor` (global `shape`, element size `itemsize`) stored in `file`.
///
/// Returns the chunk's element count.
pub fn check_chunk(
    tensor: &str,
    shape: &[u64],
    itemsize: usize,
    file: &SourceFile,
    g: &ChunkGeom<'_>,
) -> Result<u64> {
    let nd = shape.len();
    if g.offsets.len() != nd || g.sizes.len() != nd || g.strides.len() != nd {
        return Err(Error::shape(
            tensor,
            format!(
                "chunk in {} has {} offsets, {} sizes and {} strides for a {}-d tensor",
                file.path.display(),
                g.offsets.len(),
                g.sizes.len(),
                g.strides.len(),
                nd
            ),
        ));
    }
    for k in 0..nd {
        if g.strides[k] < 0 {
            return Err(Error::shape(
                tensor,
                format!(
                    "chunk in {} has negative stride {} in dim {k}",
                    file.path.display(),
                    g.strides[k]
                ),
            ));
        }
        let end = g.offsets[k]
            .checked_add(g.sizes[k])
            .ok_or_else(|| overflow(tensor))?;
        if end > shape[k] {
            return Err(Error::shape(
                tensor,
                format!(
                    "chunk in {} spans [{}, {}) in dim {k}, outside the shape {:?}",
                    file.path.display(),
                    g.offsets[k],
                    end,
                    shape
                ),
            ));
        }
    }
    let end = g
        .data_offset
        .checked_add(g.data_len)
        .ok_or_else(|| overflow(tensor))?;
    if end > file.len {
        return Err(Error::format(
            &file.path,
            format!(
                "tensor '{tensor}' needs bytes [{}, {end}) but the file has {} bytes (truncated?)",
                g.data_offset, file.len
            ),
        ));
    }
    let n = numel(tensor, g.sizes)?;
    if n > 0 {
        let mut hi = g.storage_offset;
        for k in 0..nd {
            // strides checked non-negative above
            let step = (g.sizes[k] - 1)
                .checked_mul(g.strides[k] as u64)
                .ok_or_else(|| overflow(tensor))?;
            hi = hi.checked_add(step).ok_or_else(|| overflow(tensor))?;
        }
        let need = hi
            .checked_add(1)
            .and_then(|x| x.checked_mul(itemsize as u64))
            .ok_or_else(|| overflow(tensor))?;
        if need > g.data_len {
            return Err(Error::format(
                &file.path,
                format!(
                    "tensor '{tensor}': chunk at offsets {:?} needs {need} bytes of storage but \
                     its storage at byte {} has {} bytes",
                    g.offsets, g.data_offset, g.data_len
                ),
            ));
        }
    }
    Ok(n)
}
