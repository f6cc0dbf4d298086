//! Unit tests of the core (no Python), by topic: the shard planner and header bytes (`plan`),
//! casts (`casts`), bounds checks on described boxes (`gather`), a property test that splitting a
//! tensor into random boxes (random layouts) and writing it back gives the original bytes
//! (`roundtrip`), writer, pool and range-copy tests on temporary files (`writer`), and hostile
//! input that must never panic (`hostile`).
//!
//! This module holds the fixture builders the topic modules share: tensors stored as boxes in
//! temporary files, and reading them back.

mod casts;
mod gather;
mod hostile;
mod plan;
mod roundtrip;
mod writer;

use crate::dtype::DType;
use crate::error::Error;
use crate::gather::gather;
use crate::plan::{Chunk, Source};
use std::io::Write;
use std::path::Path;

/// Appends `data` to `f` at a 64-byte aligned offset; returns the offset.
fn append(f: &mut std::fs::File, data: &[u8]) -> u64 {
    let len = f.metadata().unwrap().len();
    let off = len.div_ceil(64) * 64;
    f.write_all(&vec![0u8; (off - len) as usize]).unwrap();
    f.write_all(data).unwrap();
    off
}

fn row_major(sizes: &[u64]) -> Vec<i64> {
    let mut s = vec![1i64; sizes.len()];
    for k in (0..sizes.len().saturating_sub(1)).rev() {
        s[k] = s[k + 1] * sizes[k + 1] as i64;
    }
    s
}

/// Global C-order bytes of a tensor whose element i is `i` as u16 (2-byte items).
fn global_bytes(shape: &[u64]) -> Vec<u8> {
    let n: u64 = shape.iter().product();
    (0..n)
        .flat_map(|i| (i as u16 ^ 0x5A5A).to_le_bytes())
        .collect()
}

/// Stores box (`offsets`, `sizes`) of the u16 tensor of `shape` into `f` with dims laid out in
/// the order `perm` (outermost first) after `pad` filler elements; returns the chunk.
fn store_box(
    f: &mut std::fs::File,
    path: &Path,
    shape: &[u64],
    offsets: &[u64],
    sizes: &[u64],
    perm: &[usize],
    pad: u64,
) -> Chunk {
    let nd = shape.len();
    let mut strides = vec![0i64; nd];
    let mut acc = 1i64;
    for &k in perm.iter().rev() {
        strides[k] = acc;
        acc *= sizes[k] as i64;
    }
    let n: u64 = sizes.iter().product();
    let gstr = row_major(shape);
    let mut storage = vec![0xEEEEu16; (pad + n) as usize];
    for lin in 0..n {
        let (mut rem, mut s, mut g) = (lin, pad as i64, 0i64);
        for k in (0..nd).rev() {
            let i = rem % sizes[k];
            rem /= sizes[k];
            s += i as i64 * strides[k];
            g += (offsets[k] + i) as i64 * gstr[k];
        }
        storage[s as usize] = g as u16 ^ 0x5A5A;
    }
    let bytes: Vec<u8> = storage.iter().flat_map(|v| v.to_le_bytes()).collect();
    let off = append(f, &bytes);
    Chunk {
        path: path.to_path_buf(),
        data_offset: off,
        data_len: bytes.len() as u64,
        storage_offset: pad,
        strides,
        offsets: offsets.to_vec(),
        sizes: sizes.to_vec(),
    }
}

fn simple_source(dir: &Path, name: &str, shape: &[u64], cuts0: &[u64]) -> Source {
    let path = dir.join(format!("{name}.bin"));
    let mut f = std::fs::File::create(&path).unwrap();
    let perm: Vec<usize> = (0..shape.len()).collect();
    let mut chunks = Vec::new();
    for w in cuts0.windows(2) {
        let mut offsets = vec![0; shape.len()];
        let mut sizes = shape.to_vec();
        if !shape.is_empty() {
            offsets[0] = w[0];
            sizes[0] = w[1] - w[0];
        }
        chunks.push(store_box(&mut f, &path, shape, &offsets, &sizes, &perm, 0));
    }
    Source {
        name: name.into(),
        dtype: DType::BF16,
        shape: shape.to_vec(),
        chunks,
    }
}

fn gather_vec(src: &Source) -> Result<Vec<u8>, Error> {
    let n: u64 = src.shape.iter().product();
    let mut out = vec![0u8; n as usize * 2];
    gather(src, DType::BF16, &mut out, Some(2))?;
    Ok(out)
}
