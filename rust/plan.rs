//! Planning: shard assignment, safetensors file layout, and chunk → copy decomposition.
//!
//! Every format reduces to boxes of a global tensor stored somewhere in a file ([`Chunk`]), so one
//! planner serves DCP, torch.save and Megatron sources alike:
//!
//! - [`plan_shards`] splits tensors into output files as huggingface_hub does;
//! - [`layout_file`] orders a file's tensors (dtype rank descending, then name), assigns data
//!   offsets and renders the header exactly as safetensors does;
//! - [`prepare_source`] validates a tensor's chunks (through `mmap.rs`) and normalises each chunk
//!   into a [`BoxCopy`]: size-1 dims dropped, adjacent dims merged where both the destination and
//!   the source are contiguous across them, so `Shard(0)` becomes one run and `Shard(1)` one run
//!   per row. Non-row-major sources (a transposed chunk) keep a strided inner dimension.

use crate::coverage::check_coverage;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::mmap::{check_chunk, numel, ChunkGeom, FileCache, SourceFile};
use std::path::PathBuf;
use std::sync::Arc;

/// One stored box of a tensor (the `Chunk` tuple of `_core.pyi`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    /// Source file.
    pub path: PathBuf,
    /// Byte offset of the storage in the file.
    pub data_offset: u64,
    /// Byte length of the storage.
    pub data_len: u64,
    /// Offset of the box's first element in the storage, in elements.
    pub storage_offset: u64,
    /// Strides in elements.
    pub strides: Vec<i64>,
    /// Position of the box in the global tensor.
    pub offsets: Vec<u64>,
    /// Extent of the box.
    pub sizes: Vec<u64>,
}

/// One global tensor and the chunks that tile it (the `Source` tuple of `_core.pyi`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Source {
    /// Tensor name.
    pub name: String,
    /// Stored dtype.
    pub dtype: DType,
    /// Global shape.
    pub shape: Vec<u64>,
    /// Chunks.
    pub chunks: Vec<Chunk>,
}

/// Splits tensors of the given byte sizes into shards, as huggingface_hub's
/// `split_state_dict_into_shards_factory` does.
///
/// Greedy in input order; a tensor larger than `max_shard_size` gets its own shard, appended
/// before the shard still being filled; a shard may reach exactly the limit. The splitter groups
/// tensors by storage `(device, data_ptr, nbytes)`, and every empty tensor has the same one, so
/// empty tensors after the first are left out of the greedy pass and appended to its shard.
pub fn plan_shards(sizes: &[u64], max_shard_size: u64) -> Vec<Vec<usize>> {
    let first_empty = sizes.iter().position(|&s| s == 0);
    let mut shards = Vec::new();
    let mut current = Vec::new();
    let mut current_size = 0u64;
    for (i, &size) in sizes.iter().enumerate() {
        if size == 0 && first_empty.is_some_and(|f| f < i) {
            continue;
        }
        if size > max_shard_size {
            shards.push(vec![i]);
            continue;
        }
        if current_size.saturating_add(size) > max_shard_size {
            shards.push(std::mem::take(&mut current));
            current_size = 0;
        }
        current.push(i);
        current_size += size;
    }
    if !current.is_empty() {
        shards.push(current);
    }
    if let Some(f) = first_empty {
        let later = (f + 1..sizes.len()).filter(|&i| sizes[i] == 0);
        if let Some(shard) = shards.iter_mut().find(|s| s.contains(&f)) {
            shard.extend(later);
        }
    }
    shards
}

/// What a file's header needs to know about one tensor.
#[derive(Debug, Clone, Copy)]
pub struct TensorMeta<'a> {
    /// Tensor name.
    pub name: &'a str,
    /// Output dtype.
    pub dtype: DType,
    /// Shape.
    pub shape: &'a [u64],
}

/// Layout of one safetensors file.
#[derive(Debug, Clone)]
pub struct FileLayout {
    /// The first `8 + N` bytes of the file: little-endian `N`, then the padded JSON header.
    pub header: Vec<u8>,
    /// Per tensor, in data order: (index into the input list, begin, end) relative to the data
    /// buffer, which starts at `header.len()`.
    pub order: Vec<(usize, u64, u64)>,
    /// Total file length.
    pub file_len: u64,
}

/// Largest header safetensors readers accept.
pub const MAX_HEADER: usize = 100_000_000;

/// Orders `tensors` as safetensors does (dtype rank descending, then name byte-wise ascending),
/// assigns data offsets and renders the header (`{"__metadata__":{"format":"pt"}, ...}`, compact,
/// space-padded to a multiple of 8).
pub fn layout_file(tensors: &[TensorMeta<'_>]) -> Result<FileLayout> {
    let mut idx: Vec<usize> = (0..tensors.len()).collect();
    idx.sort_by(|&a, &b| {
        let (ta, tb) = (&tensors[a], &tensors[b]);
        tb.dtype
            .rank()
            .cmp(&ta.dtype.rank())
            .then_with(|| ta.name.as_bytes().cmp(tb.name.as_bytes()))
    });
    for w in idx.windows(2) {
        if tensors[w[0]].name == tensors[w[1]].name {
            return Err(Error::Plan(format!(
                "tensor '{}' appears twice in one file",
                tensors[w[0]].name
            )));
        }
    }
    let mut map = serde_json::Map::new();
    let mut meta = serde_json::Map::new();
    meta.insert("format".into(), "pt".into());
    map.insert("__metadata__".into(), meta.into());
    let mut order = Vec::with_capacity(idx.len());
    let mut off = 0u64;
    for &i in &idx {
        let t = &tensors[i];
        if t.name == "__metadata__" {
            return Err(Error::Plan(
                "a tensor cannot be named '__metadata__'".into(),
            ));
        }
        let n = numel(t.name, t.shape)?;
        let end = n
            .checked_mul(t.dtype.size() as u64)
            .and_then(|b| b.checked_add(off))
            .ok_or_else(|| Error::shape(t.name, "byte size overflows 64 bits"))?;
        let mut e = serde_json::Map::new();
        e.insert("dtype".into(), t.dtype.name().into());
        e.insert("shape".into(), t.shape.to_vec().into());
        e.insert("data_offsets".into(), vec![off, end].into());
        map.insert(t.name.to_owned(), e.into());
        order.push((i, off, end));
        off = end;
    }
    let mut json = serde_json::to_vec(&serde_json::Value::Object(map))
        .map_err(|e| Error::Plan(format!("cannot render header: {e}")))?;
    let padded = json.len().div_ceil(8) * 8;
    json.resize(padded, b' ');
    if json.len() > MAX_HEADER {
        return Err(Error::Plan(format!(
            "header of {} bytes exceeds the safetensors limit of {MAX_HEADER}",
            json.len()
        )));
    }
    let mut header = Vec::with_capacity(8 + json.len());
    header.extend_from_slice(&(json.len() as u64).to_le_bytes());
    header.extend_from_slice(&json);
    let file_len = (header.len() as u64)
        .checked_add(off)
        .ok_or_else(|| Error::Plan("file size overflows 64 bits".into()))?;
    Ok(FileLayout {
        header,
        order,
        file_len,
    })
}

/// One dimension of a normalised copy: `(count, destination stride, source stride)`, strides in
/// elements.
pub type Dim = (u64, u64, u64);

/// One chunk normalised into nested runs.
///
/// Elements: for each multi-index `j` over `outer` (row-major) and `t < inner.0`, source element
/// `src_elem + Σ j_k·outer[k].2 + t·inner.2` goes to tensor element
/// `dst_elem + Σ j_k·outer[k].1 + t·inner.1`. Destination positions increase strictly in that
/// order.
#[derive(Debug, Clone)]
pub struct BoxCopy {
    /// The source file.
    pub file: Arc<SourceFile>,
    /// Byte offset of the storage in the file (validated).
    pub data_offset: u64,
    /// First source element (storage offset), in elements of the source dtype.
    pub src_elem: u64,
    /// First destination element (C-order index into the tensor).
    pub dst_elem: u64,
    /// Outer dimensions, outermost first (empty for a single run).
    pub outer: Vec<Dim>,
    /// Innermost dimension.
    pub inner: Dim,
    /// Number of runs (product of outer counts).
    pub n_runs: u64,
    /// One past the last destination element.
    pub dst_end: u64,
}

impl BoxCopy {
    /// Whether the chunk is one run, contiguous in source and destination.
    pub fn is_contiguous(&self) -> bool {
        self.outer.is_empty() && self.inner.1 == 1 && self.inner.2 == 1
    }

    /// Destination element of the first element of run `j` and the source element it comes
    /// from.
    pub fn run_start(&self, mut j: u64) -> (u64, u64) {
        let (mut d, mut s) = (self.dst_elem, self.src_elem);
        for &(n, ds, ss) in self.outer.iter().rev() {
            let i = j % n;
            j /= n;
            d += i * ds;
            s += i * ss;
        }
        (d, s)
    }
}

/// A validated tensor, ready to copy.
#[derive(Debug, Clone)]
pub struct TensorPlan {
    /// Tensor name.
    pub name: String,
    /// Stored dtype.
    pub src_dtype: DType,
    /// Output dtype.
    pub out_dtype: DType,
    /// Global shape.
    pub shape: Vec<u64>,
    /// Element count.
    pub numel: u64,
    /// Non-empty chunks, normalised.
    pub copies: Vec<BoxCopy>,
}

impl TensorPlan {
    /// Output byte size.
    pub fn out_bytes(&self) -> u64 {
        self.numel * self.out_dtype.size() as u64
    }

    /// Whether every chunk can be copied as raw bytes in one contiguous range.
    pub fn is_raw_contiguous(&self) -> bool {
        self.src_dtype == self.out_dtype && self.copies.iter().all(BoxCopy::is_contiguous)
    }
}

/// Normalises a validated chunk of a tensor of `shape` into a [`BoxCopy`]; `None` if empty.
fn normalise(shape: &[u64], c: &Chunk, file: Arc<SourceFile>, n: u64) -> Result<Option<BoxCopy>> {
    if n == 0 {
        return Ok(None);
    }
    let nd = shape.len();
    // C-order strides of the global tensor; products of a shape whose numel fits u64.
    let mut gstr = vec![1u64; nd];
    for k in (0..nd.saturating_sub(1)).rev() {
        gstr[k] = gstr[k + 1] * shape[k + 1];
    }
    let dst_elem: u64 = (0..nd).map(|k| c.offsets[k] * gstr[k]).sum();
    let mut dims: Vec<Dim> = Vec::with_capacity(nd);
    for ((&n, &g), &s) in c.sizes.iter().zip(&gstr).zip(&c.strides) {
        if n != 1 {
            dims.push((n, g, s as u64));
        }
    }
    // Merge from the inside out.
    let mut merged: Vec<Dim> = Vec::with_capacity(dims.len());
    for d in dims.into_iter().rev() {
        if let Some(last) = merged.last_mut() {
            let (ni, di, si) = *last;
            if d.1 == ni * di && d.2 == ni * si {
                *last = (d.0 * ni, di, si);
                continue;
            }
        }
        merged.push(d);
    }
    merged.reverse();
    // Every kept dim has a count of at least 2, so a single element leaves no dims.
    let inner = merged.pop().unwrap_or((1, 1, 1));
    let outer = merged;
    let n_runs: u64 = outer.iter().map(|d| d.0).product();
    let last = outer
        .iter()
        .chain(std::iter::once(&inner))
        .map(|&(n, ds, _)| (n - 1) * ds)
        .sum::<u64>();
    Ok(Some(BoxCopy {
        file,
        data_offset: c.data_offset,
        src_elem: c.storage_offset,
        dst_elem,
        outer,
        inner,
        n_runs,
        dst_end: dst_elem + last + 1,
    }))
}

/// Validates `src` (every chunk's bounds, and exact coverage) and normalises its chunks.
pub fn prepare_source(src: &Source, out_dtype: DType, cache: &mut FileCache) -> Result<TensorPlan> {
    crate::dtype::cast_fn(src.dtype, out_dtype).map_err(|e| match e {
        Error::Plan(m) => Error::Plan(format!("tensor '{}': {m}", src.name)),
        e => e,
    })?;
    let total = numel(&src.name, &src.shape)?;
    total
        .checked_mul(src.dtype.size().max(out_dtype.size()) as u64)
        .ok_or_else(|| Error::shape(&src.name, "byte size overflows 64 bits"))?;
    let mut copies = Vec::with_capacity(src.chunks.len());
    for c in &src.chunks {
        let file = cache.open(&c.path)?;
        let g = ChunkGeom {
            data_offset: c.data_offset,
            data_len: c.data_len,
            storage_offset: c.storage_offset,
            strides: &c.strides,
            offsets: &c.offsets,
            sizes: &c.sizes,
        };
        let n = check_chunk(&src.name, &src.shape, src.dtype.size(), &file, &g)?;
        if let Some(bc) = normalise(&src.shape, c, file, n)? {
            copies.push(bc);
        }
    }
    let boxes: Vec<(&[u64], &[u64])> = src
        .chunks
        .iter()
        .map(|c| (c.offsets.as_slice(), c.sizes.as_slice()))
        .collect();
    check_coverage(&src.name, &src.shape, &boxes)?;
    copies.sort_by_key(|c| c.dst_elem);
    Ok(TensorPlan {
        name: src.name.clone(),
        src_dtype: src.dtype,
        out_dtype,
        shape: src.shape.clone(),
        numel: total,
        copies,
    })
}
