//! The safetensors writer.
//!
//! [`write_shards`] plans everything first (validation, headers, offsets), then:
//! 1. creates each output as a hidden sibling temporary file, preallocates it (`fallocate`) to its
//!    final size (a full disk is a clean `ENOSPC` error; nothing is ever written through a writable
//!    mapping, so no SIGBUS) and `pwrite`s its header at offset 0;
//! 2. runs the work items on the pool, threads spread over files first (one writer per file while
//!    there are files enough; see `choose_queue`), each file's items in order:
//!    - *range copies*: a tensor with no cast whose chunks are each one contiguous range, split in
//!      pieces of ≤ 32 MiB, each moved by the kernel: `splice` through a 1 MiB pipe (zero
//!      user-space copies), stepping down to `copy_file_range`, then to `pwrite` from the source
//!      mapping, when the kernel refuses (the copy paths, their fallbacks and the `FASTCKPT_COPY`
//!      override are in `copy.rs`);
//!    - *windows*: any other tensor, in windows of ≤ 16 MiB of output bytes gathered (and cast)
//!      into a reused buffer, then written with one `pwrite`;
//! 3. with `fsync`, starts writeback of each finished range (`sync_file_range(WRITE)`), and
//!    fsyncs each file once at the end; then renames the temporary files into place (and fsyncs
//!    the directory).
//!
//! Anonymous memory is the window buffers: at most one per thread, 64 MiB in all.
//! Workers check the cancel flag between items and add finished bytes to the progress counter.

use crate::copy::{copy_range, first_copy_mode, preallocate, sync_range};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::mmap::FileCache;
use crate::plan::{layout_file, prepare_source, FileLayout, Source, TensorMeta, TensorPlan};
use crate::pool::{pool, Progress};
use crate::reshard::fill_window;
use rayon::prelude::*;
use rayon::ThreadPool;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

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

/// An output file being written: its temporary name, its final name, the open file.
struct OutFile {
    tmp: PathBuf,
    path: PathBuf,
    file: File,
}

/// One work item: a range copy or a window, of one tensor of one output file.
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

/// Refuses an output name that is not a plain file name.
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
    // The cache lives as long as the call: it keeps every source file it opened open.
    let mut cache = FileCache::new();
    let (plans, layouts) = plan_files(shards, &mut cache)?;
    let pool = pool(opts.num_threads)?;
    let window = window_bytes(pool.current_num_threads());
    let (items, total) = work_items(&plans, &layouts, window);
    progress.total.store(total, Ordering::Relaxed);
    let outs = create_outputs(dir, shards, &layouts)?;
    let copier = Copier::new(&plans, &outs, progress, opts.fsync, window);
    let result = copier.run_all(&pool, items);
    drop(copier); // frees the window buffers before the fsyncs
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
        remove_temporaries(&outs);
        return Err(e);
    }
    Ok(Staged {
        outs,
        dir: dir.to_path_buf(),
        fsync: opts.fsync,
        total,
    })
}

/// Validates the file names and every tensor's sources, and lays out each file (header, data
/// offsets): the tensor plans and the layout of each file, in the order of `shards`.
fn plan_files(
    shards: &[ShardSpec],
    cache: &mut FileCache,
) -> Result<(Vec<Vec<TensorPlan>>, Vec<FileLayout>)> {
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
            tp.push(prepare_source(src, *out, cache)?);
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
    Ok((plans, layouts))
}

/// The work items of each file, in data order, and the total of tensor bytes: range copies for
/// the tensors that are raw contiguous ranges, windows of at most `window` output bytes for the
/// others.
fn work_items(
    plans: &[Vec<TensorPlan>],
    layouts: &[FileLayout],
    window: usize,
) -> (Vec<Vec<Work>>, u64) {
    let mut items: Vec<Vec<Work>> = (0..plans.len()).map(|_| Vec::new()).collect();
    let mut total = 0u64;
    for (fi, (tp, lay)) in plans.iter().zip(layouts).enumerate() {
        let data_start = lay.header.len() as u64;
        for &(ti, begin, end) in &lay.order {
            let t = &tp[ti];
            total += end - begin;
            let base = data_start + begin;
            if t.is_raw_contiguous() {
                push_ranges(&mut items[fi], fi, ti, t, base);
            } else {
                push_windows(&mut items[fi], fi, ti, t, base, window);
            }
        }
    }
    (items, total)
}

/// Adds the range copies of tensor `ti` of file `fi`, whose data starts at `base`: each chunk in
/// pieces of at most [`MAX_RANGE`] bytes.
fn push_ranges(items: &mut Vec<Work>, fi: usize, ti: usize, t: &TensorPlan, base: u64) {
    let sz = t.src_dtype.size() as u64;
    for (ci, c) in t.copies.iter().enumerate() {
        let len = c.inner.0 * sz;
        let src0 = c.data_offset + c.src_elem * sz;
        let dst0 = base + c.dst_elem * sz;
        let mut o = 0;
        while o < len {
            let n = (len - o).min(MAX_RANGE);
            items.push(Work::Range {
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
}

/// Adds the windows of tensor `ti` of file `fi`, whose data starts at `base`: at most `window`
/// output bytes each (at least one element).
fn push_windows(
    items: &mut Vec<Work>,
    fi: usize,
    ti: usize,
    t: &TensorPlan,
    base: u64,
    window: usize,
) {
    let osz = t.out_dtype.size() as u64;
    let per = (window as u64 / osz).max(1);
    let mut e0 = 0;
    while e0 < t.numel {
        let e1 = (e0 + per).min(t.numel);
        items.push(Work::Window {
            file: fi,
            tensor: ti,
            e0,
            e1,
            dst_off: base + e0 * osz,
        });
        e0 = e1;
    }
}

/// Creates the temporary file of every shard, preallocated and with its header written; on an
/// error removes the ones already created.
fn create_outputs(
    dir: &Path,
    shards: &[ShardSpec],
    layouts: &[FileLayout],
) -> Result<Vec<OutFile>> {
    let mut outs: Vec<OutFile> = Vec::with_capacity(shards.len());
    for (s, lay) in shards.iter().zip(layouts) {
        if let Err(e) = create_output(dir, &s.file_name, lay, &mut outs) {
            remove_temporaries(&outs);
            return Err(e);
        }
    }
    Ok(outs)
}

/// Creates `.NAME.fastckpt-tmp` in `dir` and adds it to `outs` (so that it is removed with the
/// others if what follows fails), then preallocates it and writes its header.
fn create_output(dir: &Path, name: &str, lay: &FileLayout, outs: &mut Vec<OutFile>) -> Result<()> {
    let path = dir.join(name);
    let tmp = dir.join(format!(".{name}.fastckpt-tmp"));
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&tmp)
        .map_err(|e| Error::io(&path, e))?;
    outs.push(OutFile { tmp, path, file });
    let o = outs.last().expect("just pushed");
    preallocate(&o.file, &o.path, lay.file_len)?;
    o.file
        .write_all_at(&lay.header, 0)
        .map_err(|e| Error::io(&o.path, e))
}

/// Removes the temporary files of `outs` (errors ignored).
fn remove_temporaries(outs: &[OutFile]) {
    for o in outs {
        let _ = std::fs::remove_file(&o.tmp);
    }
}

/// What the workers of one [`stage_shards`] call share while they run the work items.
struct Copier<'a> {
    plans: &'a [Vec<TensorPlan>],
    outs: &'a [OutFile],
    progress: &'a Progress,
    /// Start writeback of each finished range.
    fsync: bool,
    /// The call's copy path (`copy.rs`): it steps down when the kernel refuses one.
    mode: AtomicU8,
    bufs: Buffers,
    /// Test hook (documented in docs/SECURITY.md): a pause before each work item, so that fault
    /// tests can truncate a source or kill the process while a conversion copies.
    test_delay: Option<Duration>,
}

impl<'a> Copier<'a> {
    fn new(
        plans: &'a [Vec<TensorPlan>],
        outs: &'a [OutFile],
        progress: &'a Progress,
        fsync: bool,
        window: usize,
    ) -> Self {
        Copier {
            plans,
            outs,
            progress,
            fsync,
            mode: AtomicU8::new(first_copy_mode()),
            bufs: Buffers::new(window),
            test_delay: std::env::var("FASTCKPT_TEST_ITEM_DELAY_MS")
                .ok()
                .and_then(|v| v.parse::<u64>().ok())
                .map(Duration::from_millis),
        }
    }

    /// Runs every item on the pool's threads, each thread taking files as [`choose_queue`]
    /// picks them. The first error cancels the call (the other workers stop between items) and
    /// is returned; else `Cancelled` if the caller cancelled.
    fn run_all(&self, pool: &ThreadPool, items: Vec<Vec<Work>>) -> Result<()> {
        let first_err: Mutex<Option<Error>> = Mutex::new(None);
        let queues: Vec<FileQueue> = items.into_iter().map(FileQueue::new).collect();
        let pick = Mutex::new(());
        let nthreads = pool.current_num_threads();
        pool.scope(|s| {
            for _ in 0..nthreads {
                s.spawn(|_| self.worker(&queues, &pick, &first_err));
            }
        });
        let first = first_err.lock().unwrap_or_else(|p| p.into_inner()).take();
        match first {
            Some(e) => Err(e),
            None => self.progress.check(),
        }
    }

    /// One thread: runs the items of the queue it is given, in order, until none is left or
    /// the call is cancelled.
    fn worker(&self, queues: &[FileQueue], pick: &Mutex<()>, first_err: &Mutex<Option<Error>>) {
        let progress = self.progress;
        while let Some(q) = choose_queue(queues, pick) {
            while let Some(w) = q.next() {
                match self.run(w) {
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
    }

    /// Runs one work item, then (with `fsync`) starts writeback of what it wrote and counts its
    /// bytes as done.
    fn run(&self, w: &Work) -> Result<()> {
        if let Some(d) = self.test_delay {
            std::thread::sleep(d);
        }
        self.progress.check()?;
        let (fi, off, len) = match *w {
            Work::Range {
                file,
                tensor,
                copy,
                src_off,
                dst_off,
                len,
            } => {
                let c = &self.plans[file][tensor].copies[copy];
                let o = &self.outs[file];
                copy_range(&c.file, src_off, &o.file, &o.path, dst_off, len, &self.mode)?;
                (file, dst_off, len)
            }
            Work::Window {
                file,
                tensor,
                e0,
                e1,
                dst_off,
            } => {
                let n = self.write_window(file, tensor, e0, e1, dst_off)?;
                (file, dst_off, n)
            }
        };
        if self.fsync {
            let o = &self.outs[fi];
            sync_range(&o.file, &o.path, off, len)?;
        }
        self.progress.add(len);
        Ok(())
    }

    /// Gathers (and casts) elements `[e0, e1)` of a tensor into a window buffer and writes them
    /// at `dst_off` of its file; returns the bytes written.
    fn write_window(
        &self,
        file: usize,
        tensor: usize,
        e0: u64,
        e1: u64,
        dst_off: u64,
    ) -> Result<u64> {
        let t = &self.plans[file][tensor];
        let n = ((e1 - e0) * t.out_dtype.size() as u64) as usize;
        let mut buf = self.bufs.take();
        if let Err(e) = fill_window(t, e0, &mut buf[..n]) {
            self.bufs.put(buf);
            return Err(e);
        }
        let o = &self.outs[file];
        let r = o.file.write_all_at(&buf[..n], dst_off);
        self.bufs.put(buf);
        r.map_err(|e| Error::io(&o.path, e))?;
        Ok(n as u64)
    }
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
                remove_temporaries(&outs[i..]);
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
        remove_temporaries(&self.outs);
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
