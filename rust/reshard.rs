//! Copy kernels: the part of a tensor's chunks that falls inside a window of destination elements,
//! from mapped source bytes into a `&mut [u8]` window, with the dtype cast fused in.
//!
//! A window is a range `[w0, w1)` of the tensor's C-order element indices. For each chunk, the
//! first run reaching the window is found by binary search (destination positions grow with the
//! run index), then runs are copied until the window ends: contiguous runs with one `memcpy` (or
//! one cast call), strided runs element by element.

use crate::dtype::CastFn;
use crate::error::Result;
use crate::plan::{BoxCopy, TensorPlan};

/// How elements move: plain copy of `size` bytes, or a cast.
#[derive(Clone, Copy)]
pub struct Kernel {
    /// Source item size in bytes.
    pub src_size: usize,
    /// Destination item size in bytes.
    pub dst_size: usize,
    /// Cast, or `None` for a byte copy.
    pub cast: Option<CastFn>,
}

impl Kernel {
    /// Copies `n` contiguous elements.
    #[inline]
    fn contiguous(&self, src: &[u8], dst: &mut [u8]) {
        match self.cast {
            None => dst.copy_from_slice(src),
            Some(f) => f(src, dst),
        }
    }

    /// Copies `n` elements with element strides `ss` (source) and `ds` (destination).
    #[inline]
    fn strided(&self, src: &[u8], ss: usize, dst: &mut [u8], ds: usize, n: usize) {
        let (a, b) = (self.src_size, self.dst_size);
        for t in 0..n {
            let s = &src[t * ss * a..t * ss * a + a];
            let d = &mut dst[t * ds * b..t * ds * b + b];
            match self.cast {
                None => d.copy_from_slice(s),
                Some(f) => f(s, d),
            }
        }
    }
}

/// Copies the part of `c` inside `[w0, w1)` into `dst` (`dst[0]` is element `w0`).
///
/// `src` is the whole source file; the chunk's bounds were validated when it was planned.
pub fn copy_box_window(c: &BoxCopy, k: &Kernel, src: &[u8], w0: u64, w1: u64, dst: &mut [u8]) {
    if c.dst_end <= w0 || c.dst_elem >= w1 {
        return;
    }
    let (len, ds, ss) = c.inner;
    let last_of = |j: u64| c.run_start(j).0 + (len - 1) * ds;
    // First run whose last element reaches w0.
    let (mut lo, mut hi) = (0u64, c.n_runs);
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        if last_of(mid) < w0 {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    let base = c.data_offset as usize;
    let (a, b) = (k.src_size, k.dst_size);
    // Odometer over the outer multi-index, starting at run `lo`.
    let nd = c.outer.len();
    let mut idx = vec![0u64; nd];
    {
        let mut j = lo;
        for d in (0..nd).rev() {
            idx[d] = j % c.outer[d].0;
            j /= c.outer[d].0;
        }
    }
    let (mut d0, mut s0) = c.run_start(lo);
    let mut j = lo;
    while j < c.n_runs && d0 < w1 {
        // element range of this run inside the window
        let t_lo = if d0 >= w0 { 0 } else { (w0 - d0).div_ceil(ds) };
        let t_hi = len.min((w1 - d0).div_ceil(ds));
        if t_lo < t_hi {
            let n = (t_hi - t_lo) as usize;
            let s_off = base + (s0 + t_lo * ss) as usize * a;
            let d_off = (d0 + t_lo * ds - w0) as usize * b;
            if ds == 1 && ss == 1 {
                k.contiguous(&src[s_off..s_off + n * a], &mut dst[d_off..d_off + n * b]);
            } else {
                let s_end = s_off + ((n - 1) * ss as usize + 1) * a;
                let d_end = d_off + ((n - 1) * ds as usize + 1) * b;
                k.strided(
                    &src[s_off..s_end],
                    ss as usize,
                    &mut dst[d_off..d_end],
                    ds as usize,
                    n,
                );
            }
        }
        j += 1;
        if j >= c.n_runs {
            break;
        }
        // advance the odometer
        let mut d = nd;
        loop {
            d -= 1;
            let (n, dst_stride, src_stride) = c.outer[d];
            idx[d] += 1;
            if idx[d] < n {
                d0 += dst_stride;
                s0 += src_stride;
                break;
            }
            idx[d] = 0;
            d0 -= (n - 1) * dst_stride;
            s0 -= (n - 1) * src_stride;
        }
    }
}

/// Fills `dst` with elements `[w0, w0 + dst.len() / out_size)` of tensor `t`, cast to its output
/// dtype. The chunks tile the tensor (checked when planned), so every byte of `dst` is written.
///
/// `Err` (naming the file) when a source file shrank while it was read: the window then holds
/// zeros in place of the missing bytes and must be discarded.
pub fn fill_window(t: &TensorPlan, w0: u64, dst: &mut [u8]) -> Result<()> {
    let k = Kernel {
        src_size: t.src_dtype.size(),
        dst_size: t.out_dtype.size(),
        cast: crate::dtype::cast_fn(t.src_dtype, t.out_dtype).expect("cast checked at planning"),
    };
    let w1 = w0 + (dst.len() / k.dst_size) as u64;
    for c in &t.copies {
        copy_box_window(c, &k, c.file.bytes(), w0, w1, dst);
    }
    for c in &t.copies {
        c.file.check_unchanged()?;
    }
    Ok(())
}
