//! Source files: opening, memory mapping, and every bounds check on source chunks.
//!
//! This is the only module with mmap `unsafe`. A [`FileCache`] lives for one call: each source
//! path is opened and mapped once (read-only, shared) and handed out as an `Arc<SourceFile>`.
//! Empty files are not mapped.
//!
//! Input files are untrusted, so [`check_chunk`] validates a chunk with checked arithmetic before
//! any byte is copied: the storage range lies in the file, the highest addressed element lies in
//! the storage, strides are non-negative, the box lies in the global shape. [`check_coverage`]
//! then checks that the chunks of a tensor tile it exactly (disjoint boxes whose element counts add
//! up to the tensor's).

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
        let map = if len == 0 {
            None
        } else {
            // SAFETY: the mapping is read-only and private to this process; fastckpt never
            // writes to source files. Another process truncating or rewriting a source file
            // while it is converted is outside the contract (as for safetensors' own mmap
            // loading): a truncation would raise SIGBUS, not memory unsafety in safe code we
            // could prevent. Every access is bounds-checked against `len` first.
            let m = unsafe { MmapOptions::new().map(&file) }.map_err(|e| Error::io(path, e))?;
            Some(m)
        };
        Ok(SourceFile {
            path: path.to_path_buf(),
            file,
            len,
            map,
        })
    }

    /// The whole file as bytes (empty for an empty file).
    pub fn bytes(&self) -> &[u8] {
        self.map.as_deref().unwrap_or(&[])
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

fn overflow(tensor: &str) -> Error {
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

/// Checks that boxes (`offsets`, `sizes`) of `tensor` tile `shape`: the element counts add up
/// to the tensor's and no two non-empty boxes overlap (pairwise for up to 4096 boxes).
pub fn check_coverage(tensor: &str, shape: &[u64], boxes: &[(&[u64], &[u64])]) -> Result<()> {
    let total = numel(tensor, shape)?;
    let mut sum = 0u64;
    for (_, s) in boxes {
        sum = sum
            .checked_add(numel(tensor, s)?)
            .ok_or_else(|| overflow(tensor))?;
    }
    let nonempty: Vec<_> = boxes
        .iter()
        .filter(|(_, s)| s.iter().all(|&x| x > 0))
        .collect();
    if nonempty.len() <= 4096 {
        for (i, a) in nonempty.iter().enumerate() {
            for b in &nonempty[i + 1..] {
                let overlap = (0..shape.len()).all(|k| {
                    let (a0, a1) = (a.0[k], a.0[k] + a.1[k]);
                    let (b0, b1) = (b.0[k], b.0[k] + b.1[k]);
                    a0 < b1 && b0 < a1
                });
                if overlap {
                    return Err(Error::shape(
                        tensor,
                        format!(
                            "chunks at offsets {:?} (sizes {:?}) and {:?} (sizes {:?}) overlap",
                            a.0, a.1, b.0, b.1
                        ),
                    ));
                }
            }
        }
    }
    if sum != total {
        return Err(Error::shape(
            tensor,
            format!(
                "chunks hold {sum} elements but the shape {shape:?} has {total} \
                 (missing or overlapping chunks)"
            ),
        ));
    }
    Ok(())
}
