//! Whole-tensor reads on the pool: [`gather`] into a caller's buffer (cast on the way), and
//! [`digest`] (XXH3-128 of a tensor's bytes, streamed through one window buffer).
//!
//! Both take a [`Source`] as [`crate::writer::write_shards`] does and fill windows with the same
//! kernels ([`fill_window`]), without writing files.

use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::mmap::FileCache;
use crate::plan::{prepare_source, Source};
use crate::pool::pool;
use crate::reshard::fill_window;
use crate::writer::MAX_WINDOW;
use rayon::prelude::*;

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
