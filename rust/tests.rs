//! Unit tests of the core (no Python): planner, header bytes, casts, bounds checks, a property
//! test that splitting a tensor into random boxes (random layouts) and writing it back gives the
//! original bytes, and writer tests on temporary files.

use crate::dtype::{cast_fn, f32_to_bf16_bits, DType};
use crate::error::Error;
use crate::gather::{digest, gather};
use crate::mmap::FileCache;
use crate::plan::{layout_file, plan_shards, prepare_source, Chunk, Source, TensorMeta};
use crate::pool::Progress;
use crate::reshard::fill_window;
use crate::writer::{write_shards, ShardSpec, WriteOptions};
use proptest::prelude::*;
use std::io::Write;
use std::path::{Path, PathBuf};

// ---------------------------------------------------------------- planner

#[test]
fn plan_shards_cases() {
    assert!(plan_shards(&[], 10).is_empty());
    // exact limit fits in one shard
    assert_eq!(plan_shards(&[4, 6], 10), vec![vec![0, 1]]);
    assert_eq!(plan_shards(&[4, 7], 10), vec![vec![0], vec![1]]);
    // oversized tensor gets its own shard, before the one being filled
    assert_eq!(
        plan_shards(&[3, 20, 4, 5], 10),
        vec![vec![1], vec![0, 2], vec![3]]
    );
    assert_eq!(plan_shards(&[20], 10), vec![vec![0]]);
    // exactly the limit is not oversized
    assert_eq!(plan_shards(&[10, 10, 0], 10), vec![vec![0], vec![1, 2]]);
    assert_eq!(plan_shards(&[0, 0], 0), vec![vec![0, 1]]);
    // empty tensors share one storage key in the hub's splitter: later ones join the first's shard
    assert_eq!(
        plan_shards(&[4, 4, 0, 4, 0], 4),
        vec![vec![0], vec![1, 2, 4], vec![3]]
    );
    assert_eq!(plan_shards(&[0, 8, 0], 4), vec![vec![1], vec![0, 2]]);
}

fn meta<'a>(name: &'a str, dtype: DType, shape: &'a [u64]) -> TensorMeta<'a> {
    TensorMeta { name, dtype, shape }
}

#[test]
fn header_bytes_match_safetensors() {
    let lay = layout_file(&[meta("a", DType::F32, &[2, 3])]).unwrap();
    let json =
        br#"{"__metadata__":{"format":"pt"},"a":{"dtype":"F32","shape":[2,3],"data_offsets":[0,24]}}"#;
    let padded = json.len().div_ceil(8) * 8;
    let mut want = (padded as u64).to_le_bytes().to_vec();
    want.extend_from_slice(json);
    want.resize(8 + padded, b' ');
    assert_eq!(lay.header, want);
    assert_eq!(lay.file_len, 8 + padded as u64 + 24);
    assert_eq!(lay.order, vec![(0, 0, 24)]);
}

#[test]
fn header_order_rank_then_name() {
    let ts = [
        meta("b", DType::BF16, &[2]),
        meta("a", DType::BF16, &[1]),
        meta("B", DType::BF16, &[1]),
        meta("z", DType::Bool, &[3]),
        meta("m", DType::I64, &[]),
        meta("layers.10", DType::F32, &[0, 4]),
        meta("layers.2", DType::F32, &[1]),
        meta("é", DType::U8, &[1]),
    ];
    let lay = layout_file(&ts).unwrap();
    let names: Vec<&str> = lay.order.iter().map(|o| ts[o.0].name).collect();
    assert_eq!(
        names,
        ["m", "layers.10", "layers.2", "B", "a", "b", "é", "z"]
    );
    let text = std::str::from_utf8(&lay.header[8..]).unwrap();
    assert!(text.contains(r#""m":{"dtype":"I64","shape":[],"data_offsets":[0,8]}"#));
    assert!(text.contains(r#""layers.10":{"dtype":"F32","shape":[0,4],"data_offsets":[8,8]}"#));
    assert!(text.contains("\"é\""));
    assert_eq!(lay.header.len() % 8, 0);
    assert!(layout_file(&[meta("x", DType::F32, &[1]), meta("x", DType::F32, &[1])]).is_err());
}

// ---------------------------------------------------------------- casts

fn cast1(from: DType, to: DType, src: &[u8]) -> Vec<u8> {
    let f = cast_fn(from, to).unwrap().unwrap();
    let mut out = vec![0u8; src.len() / from.size() * to.size()];
    f(src, &mut out);
    out
}

#[test]
fn casts_bit_exact() {
    // f32 -> bf16: round to nearest even, NaN canonical
    assert_eq!(f32_to_bf16_bits(1.0), 0x3F80);
    assert_eq!(f32_to_bf16_bits(f32::from_bits(0x3F80_8000)), 0x3F80); // tie to even (down)
    assert_eq!(f32_to_bf16_bits(f32::from_bits(0x3F81_8000)), 0x3F82); // tie to even (up)
    assert_eq!(f32_to_bf16_bits(f32::from_bits(0x3F80_8001)), 0x3F81);
    assert_eq!(f32_to_bf16_bits(f32::INFINITY), 0x7F80);
    assert_eq!(f32_to_bf16_bits(f32::from_bits(0x7F7F_FFFF)), 0x7F80); // overflow to inf
    assert_eq!(f32_to_bf16_bits(f32::from_bits(0xFFA0_0001)), 0x7FC0);
    assert_eq!(f32_to_bf16_bits(-0.0), 0x8000);
    // f32 -> f16 (torch / F16C): overflow, NaN payload kept and quieted
    let h = |x: u32| cast1(DType::F32, DType::F16, &x.to_le_bytes());
    assert_eq!(h(65520f32.to_bits()), 0x7C00u16.to_le_bytes());
    assert_eq!(h(65519f32.to_bits()), 0x7BFFu16.to_le_bytes());
    assert_eq!(h(0x7FA0_0001), 0x7F00u16.to_le_bytes());
    assert_eq!(h(0xFFC0_0000), 0xFE00u16.to_le_bytes());
    assert_eq!(h(1e-8f32.to_bits()), 0u16.to_le_bytes());
    // f64 -> bf16 / f16 goes through f32 (double rounding), as torch does
    let x = 1.0f64 + 2f64.powi(-8) + 2f64.powi(-40);
    assert_eq!(
        cast1(DType::F64, DType::BF16, &x.to_le_bytes()),
        0x3F80u16.to_le_bytes()
    );
    let y = 1.0f64 + 2f64.powi(-11) + 2f64.powi(-40);
    assert_eq!(
        cast1(DType::F64, DType::F16, &y.to_le_bytes()),
        0x3C00u16.to_le_bytes()
    );
    // widening is exact
    assert_eq!(
        cast1(DType::BF16, DType::F32, &0x4780u16.to_le_bytes()),
        65536f32.to_le_bytes()
    );
    assert_eq!(
        cast1(DType::F16, DType::F64, &0x7BFFu16.to_le_bytes()),
        65504f64.to_le_bytes()
    );
    assert_eq!(
        cast1(DType::BF16, DType::F16, &0x4780u16.to_le_bytes()),
        0x7C00u16.to_le_bytes()
    );
    // refused casts
    assert!(cast_fn(DType::I64, DType::F32).is_err());
    assert!(cast_fn(DType::F32, DType::Bool).is_err());
    assert!(cast_fn(DType::F8E4M3, DType::BF16).is_err());
    assert!(cast_fn(DType::I64, DType::I64).unwrap().is_none());
    assert!(matches!(DType::parse("F7"), Err(Error::UnknownDtype(_))));
    assert!(DType::parse("F4").is_err());
    assert_eq!(DType::parse("F8_E4M3").unwrap().size(), 1);
}

// ---------------------------------------------------------------- helpers

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

// ---------------------------------------------------------------- bounds checks

/// A source truncated after it was planned (mapped) and before it is read: the SIGBUS guard
/// turns the fault into an error naming the file, and the cast window is not used.
#[test]
fn source_truncated_while_mapped() {
    let dir = tempfile::tempdir().unwrap();
    // 4 pages of bf16 elements, so the truncation leaves whole mapped pages past the end
    let src = simple_source(dir.path(), "t", &[64, 128], &[0, 64]);
    let path = src.chunks[0].path.clone();
    let plan = prepare_source(&src, DType::F32, &mut FileCache::new()).unwrap();
    let mut out = vec![0u8; 64 * 128 * 4];
    fill_window(&plan, 0, &mut out).unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(0)
        .unwrap();
    let err = fill_window(&plan, 0, &mut out).unwrap_err();
    assert!(matches!(err, Error::Format { .. }), "{err}");
    assert!(err.to_string().contains("t.bin"), "{err}");
    assert!(err.to_string().contains("shrank"), "{err}");
    // a mapping made after the guard fired is guarded afresh
    std::fs::write(&path, vec![0u8; 64 * 128 * 2]).unwrap();
    let plan2 = prepare_source(&src, DType::F32, &mut FileCache::new()).unwrap();
    fill_window(&plan2, 0, &mut out).unwrap();
}

#[test]
fn bounds_errors() {
    let dir = tempfile::tempdir().unwrap();
    let src = simple_source(dir.path(), "t", &[8, 4], &[0, 3, 8]);
    assert_eq!(gather_vec(&src).unwrap(), global_bytes(&[8, 4]));

    // missing chunk
    let mut s = src.clone();
    s.chunks.pop();
    assert!(matches!(gather_vec(&s), Err(Error::Shape { .. })));
    // overlapping chunk (same count)
    let mut s = src.clone();
    s.chunks[1].offsets[0] = 2;
    s.chunks[1].sizes[0] = 5;
    s.chunks[0].sizes[0] = 3;
    let e = gather_vec(&s).unwrap_err();
    assert!(e.to_string().contains("overlap"), "{e}");
    // duplicated chunk
    let mut s = src.clone();
    s.chunks.push(s.chunks[0].clone());
    assert!(matches!(gather_vec(&s), Err(Error::Shape { .. })));
    // box outside the shape
    let mut s = src.clone();
    s.chunks[1].sizes[0] = 6;
    assert!(matches!(gather_vec(&s), Err(Error::Shape { .. })));
    // negative stride
    let mut s = src.clone();
    s.chunks[0].strides[1] = -1;
    assert!(matches!(gather_vec(&s), Err(Error::Shape { .. })));
    // wrong rank of offsets
    let mut s = src.clone();
    s.chunks[0].offsets.pop();
    assert!(matches!(gather_vec(&s), Err(Error::Shape { .. })));
    // storage too short for the strides
    let mut s = src.clone();
    s.chunks[0].data_len -= 2;
    let e = gather_vec(&s).unwrap_err();
    assert!(matches!(e, Error::Format { .. }), "{e}");
    // huge stride overflows
    let mut s = src.clone();
    s.chunks[0].strides[0] = i64::MAX;
    assert!(gather_vec(&s).is_err());
    // truncated file
    let path = s.chunks[1].path.clone();
    let full = std::fs::metadata(&path).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(full - 10)
        .unwrap();
    let e = gather_vec(&src).unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, Error::Format { .. }));
    assert!(msg.contains("t.bin") && msg.contains("tensor 't'") && msg.contains("truncated?"));
    // missing file
    let mut s = src.clone();
    s.chunks[0].path = dir.path().join("nope.distcp");
    let e = gather_vec(&s).unwrap_err();
    assert!(
        matches!(e, Error::Io { ref source, .. } if source.kind() == std::io::ErrorKind::NotFound)
    );
    // wrong output length
    let mut out = vec![0u8; 3];
    assert!(gather(&src, DType::BF16, &mut out, None).is_err());
}

#[test]
fn empty_file_and_empty_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("empty.bin");
    std::fs::File::create(&path).unwrap();
    let chunk = Chunk {
        path: path.clone(),
        data_offset: 0,
        data_len: 0,
        storage_offset: 0,
        strides: vec![4, 1],
        offsets: vec![0, 0],
        sizes: vec![0, 4],
    };
    let src = Source {
        name: "e".into(),
        dtype: DType::BF16,
        shape: vec![0, 4],
        chunks: vec![chunk.clone()],
    };
    assert!(gather_vec(&src).unwrap().is_empty());
    let mut s = src.clone();
    s.shape = vec![1, 4];
    s.chunks[0].sizes = vec![1, 4];
    assert!(matches!(gather_vec(&s), Err(Error::Format { .. })));
}

// ---------------------------------------------------------------- property test

/// A random tensor shape (0–3 dims), a grid split, and per-chunk layout choices.
/// shape, cut points per dim, per-chunk (dim order, padding), cast or not.
type Case = (Vec<u64>, Vec<Vec<u64>>, Vec<(Vec<usize>, u64)>, bool);

fn case() -> impl Strategy<Value = Case> {
    prop::collection::vec(0u64..7, 0..4)
        .prop_flat_map(|shape| {
            let cuts: Vec<_> = shape
                .iter()
                .map(|&n| prop::collection::vec(0..=n, 0..3))
                .collect();
            let nd = shape.len();
            let layouts = prop::collection::vec(
                (
                    Just((0..nd).collect::<Vec<usize>>()).prop_shuffle(),
                    0u64..3,
                ),
                64,
            );
            (Just(shape), cuts, layouts, any::<bool>())
        })
        .prop_map(|(shape, cuts, layouts, cast)| {
            let cuts = shape
                .iter()
                .zip(cuts)
                .map(|(&n, mut c)| {
                    c.push(0);
                    c.push(n);
                    c.sort_unstable();
                    c.dedup();
                    c
                })
                .collect();
            (shape, cuts, layouts, cast)
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, failure_persistence: None, ..ProptestConfig::default() })]
    #[test]
    fn split_and_write_back_is_identity((shape, cuts, layouts, cast) in case()) {
        let dir = tempfile::tempdir().unwrap();
        let paths: Vec<PathBuf> = (0..2).map(|i| dir.path().join(format!("__{i}_0.distcp"))).collect();
        let mut files: Vec<_> = paths.iter().map(|p| std::fs::File::create(p).unwrap()).collect();
        // all boxes of the grid
        let mut boxes = vec![(vec![], vec![])];
        for c in &cuts {
            let mut next = Vec::new();
            for (o, s) in &boxes {
                for w in c.windows(2) {
                    let (mut o2, mut s2): (Vec<u64>, Vec<u64>) = (o.clone(), s.clone());
                    o2.push(w[0]);
                    s2.push(w[1] - w[0]);
                    next.push((o2, s2));
                }
            }
            boxes = next;
        }
        let mut chunks = Vec::new();
        for (i, (o, s)) in boxes.iter().enumerate() {
            let (perm, pad) = &layouts[i % layouts.len()];
            let fi = i % 2;
            chunks.push(store_box(&mut files[fi], &paths[fi], &shape, o, s, perm, *pad));
        }
        chunks.reverse();
        let src = Source { name: "w".into(), dtype: DType::BF16, shape: shape.clone(), chunks };
        let want = global_bytes(&shape);
        prop_assert_eq!(&gather_vec(&src).unwrap(), &want);
        // windows of every small size: runs cut at arbitrary element boundaries
        let plan = prepare_source(&src, DType::BF16, &mut FileCache::new()).unwrap();
        let numel = want.len() / 2;
        for per in [1usize, 2, 3, 5, 7, 16] {
            let mut got = vec![0u8; want.len()];
            let mut e0 = 0;
            while e0 < numel {
                let e1 = (e0 + per).min(numel);
                fill_window(&plan, e0 as u64, &mut got[e0 * 2..e1 * 2]).unwrap();
                e0 = e1;
            }
            prop_assert_eq!(&got, &want);
        }
        prop_assert_eq!(digest(&src).unwrap(), xxhash_rust::xxh3::xxh3_128(&want));

        // write it (optionally cast to F32) next to a contiguous copy, compare the data region
        let out_dtype = if cast { DType::F32 } else { DType::BF16 };
        let contiguous = simple_source(dir.path(), "c", &shape, &[0, shape.first().copied().unwrap_or(1)]);
        let out = dir.path().join("out");
        std::fs::create_dir(&out).unwrap();
        let spec = ShardSpec { file_name: "m.safetensors".into(),
            tensors: vec![(src.clone(), out_dtype), (contiguous, DType::BF16)] };
        let n = write_shards(&out, &[spec], &WriteOptions { num_threads: Some(2), fsync: false },
            &Progress::new()).unwrap();
        let bytes = std::fs::read(out.join("m.safetensors")).unwrap();
        let hlen = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        let data = &bytes[8 + hlen..];
        prop_assert_eq!(n as usize, data.len());
        let want_w: Vec<u8> = if cast {
            want.chunks(2).flat_map(|b| half::bf16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32().to_le_bytes()).collect()
        } else { want.clone() };
        // F32 sorts before BF16; with equal dtypes 'c' < 'w'
        if cast {
            prop_assert_eq!(&data[..want_w.len()], &want_w[..]);
            prop_assert_eq!(&data[want_w.len()..], &want[..]);
        } else {
            prop_assert_eq!(&data[..want.len()], &want[..]);
            prop_assert_eq!(&data[want.len()..], &want[..]);
        }
    }
}

// ---------------------------------------------------------------- writer

#[test]
fn writer_files_and_fsync() {
    let dir = tempfile::tempdir().unwrap();
    let a = simple_source(dir.path(), "a", &[300, 7], &[0, 100, 300]);
    let b = simple_source(dir.path(), "b", &[5], &[0, 5]);
    let out = dir.path().join("out");
    std::fs::create_dir(&out).unwrap();
    let specs = vec![
        ShardSpec {
            file_name: "model-00001-of-00002.safetensors".into(),
            tensors: vec![(a.clone(), DType::BF16), (b.clone(), DType::F32)],
        },
        ShardSpec {
            file_name: "model-00002-of-00002.safetensors".into(),
            tensors: vec![],
        },
    ];
    let prog = Progress::new();
    let n = write_shards(
        &out,
        &specs,
        &WriteOptions {
            num_threads: Some(3),
            fsync: true,
        },
        &prog,
    )
    .unwrap();
    assert_eq!(n, 300 * 7 * 2 + 5 * 4);
    assert_eq!(prog.get(), (n, n));
    let mut names: Vec<_> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "model-00001-of-00002.safetensors",
            "model-00002-of-00002.safetensors"
        ]
    );
    let bytes = std::fs::read(out.join("model-00001-of-00002.safetensors")).unwrap();
    let hlen = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header = std::str::from_utf8(&bytes[8..8 + hlen]).unwrap();
    assert!(header.starts_with(
        r#"{"__metadata__":{"format":"pt"},"b":{"dtype":"F32","shape":[5],"data_offsets":[0,20]},"a":{"dtype":"BF16""#
    ));
    let data = &bytes[8 + hlen..];
    assert_eq!(&data[20..], &global_bytes(&[300, 7])[..]);
    let empty = std::fs::read(out.join("model-00002-of-00002.safetensors")).unwrap();
    assert_eq!(&empty[8..], br#"{"__metadata__":{"format":"pt"}}"#);

    // cancelled: nothing is left behind
    let out2 = dir.path().join("out2");
    std::fs::create_dir(&out2).unwrap();
    let prog = Progress::new();
    prog.cancel();
    let e = write_shards(&out2, &specs, &WriteOptions::default(), &prog).unwrap_err();
    assert!(matches!(e, Error::Cancelled));
    assert_eq!(std::fs::read_dir(&out2).unwrap().count(), 0);

    // bad file names and duplicate files are refused
    let bad = vec![ShardSpec {
        file_name: "../x.safetensors".into(),
        tensors: vec![],
    }];
    assert!(write_shards(&out2, &bad, &WriteOptions::default(), &Progress::new()).is_err());
    let dup = vec![specs[1].clone(), specs[1].clone()];
    assert!(write_shards(&out2, &dup, &WriteOptions::default(), &Progress::new()).is_err());
    // missing directory is an Io error
    let e = write_shards(
        &dir.path().join("nope"),
        &specs[1..],
        &WriteOptions::default(),
        &Progress::new(),
    )
    .unwrap_err();
    assert!(matches!(e, Error::Io { .. }));
}

#[test]
fn pool_sizing() {
    assert_eq!(crate::pool::resolve_threads(Some(3)), 3);
    let p = crate::pool::pool(Some(2)).unwrap();
    assert_eq!(p.current_num_threads(), 2);
    let q = crate::pool::pool(Some(2)).unwrap();
    assert!(std::sync::Arc::ptr_eq(&p, &q));
    assert_eq!(crate::pool::pool(Some(1)).unwrap().current_num_threads(), 1);
}

// ---------------------------------------------------------------------------------------------
// hostile input: the pickle scan and the planner never panic, whatever the bytes

mod hostile {
    use crate::dtype::DType;
    use crate::mmap::FileCache;
    use crate::pickle_scan::scan_pickle;
    use crate::plan::{plan_shards, prepare_source, Chunk, Source};
    use proptest::prelude::*;
    use std::io::Write;

    fn refused(data: &[u8], needle: &str) {
        let err = scan_pickle(data, 100).expect_err("refused");
        assert!(err.contains(needle), "{err}");
    }

    #[test]
    fn scan_accepts_plain_pickles() {
        // protocol 2: {'a': (1, [2.0]), 'b': None}, with memo puts and gets
        let data = b"\x80\x02}q\x00(X\x01\x00\x00\x00aq\x01K\x01]q\x02G@\x00\x00\x00\x00\x00\x00\x00a\x86q\x03X\x01\x00\x00\x00bq\x04Nu.";
        scan_pickle(data, 100).expect("plain pickle");
        // protocol 0 text opcodes, a global, REDUCE and BUILD onto the result
        scan_pickle(b"cbuiltins\nset\n((lp0\ntRp1\n(dp2\nb.", 100).expect("text pickle");
    }

    #[test]
    fn scan_refuses_bombs_and_deep_nesting() {
        refused(b"\x80\x02Nr\x00\xe1\xf5\x05.", "memo index");
        refused(
            b"\x80\x04\x8e\x00\x00\x00\x60\x00\x00\x00\x00abc.",
            "past the end",
        );
        let mut deep = b"\x80\x02}N".to_vec();
        deep.extend(std::iter::repeat_n(b'\x85', 1_000_000));
        deep.extend(b"Ns.");
        refused(&deep, "nested deeper than 100");
        refused(b"\x80\x02ctorch\nFloatStorage\n}b.", "BUILD onto a global");
        refused(b"\x80\x02\x82\x01.", "unsupported opcode");
        refused(b"\x80\x02N", "no STOP");
        refused(b"\x80\x02a.", "stack underflow");
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 2000, failure_persistence: None, ..ProptestConfig::default() })]

        #[test]
        fn scan_never_panics(data in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = scan_pickle(&data, 8);
        }

        #[test]
        fn scan_never_panics_on_mutated_pickles(
            flips in proptest::collection::vec((0usize..96, any::<u8>()), 0..6),
            cut in 0usize..96,
        ) {
            let mut data = b"\x80\x02}q\x00(X\x01\x00\x00\x00aq\x01K\x01]q\x02G@\x00\x00\x00\x00\x00\x00\x00a\x86q\x03X\x01\x00\x00\x00bq\x04Nu.".to_vec();
            for (at, b) in flips {
                let k = at % data.len();
                data[k] = b;
            }
            data.truncate(cut.max(1));
            let _ = scan_pickle(&data, 8);
        }

        #[test]
        fn plan_shards_any_sizes(sizes in proptest::collection::vec(any::<u64>(), 0..40), limit in any::<u64>()) {
            let plan = plan_shards(&sizes, limit.max(1));
            let mut seen: Vec<usize> = plan.iter().flatten().copied().collect();
            seen.sort_unstable();
            prop_assert_eq!(seen, (0..sizes.len()).collect::<Vec<_>>());
        }

        #[test]
        fn planner_refuses_or_accepts_any_geometry(
            shape in proptest::collection::vec(0u64..6, 0..3),
            chunks in proptest::collection::vec(
                (0u64..80, 0u64..80, 0u64..8,
                 proptest::collection::vec(-3i64..20, 0..3),
                 proptest::collection::vec(0u64..6, 0..3),
                 proptest::collection::vec(0u64..6, 0..3)),
                0..4),
        ) {
            let mut f = tempfile::NamedTempFile::new().expect("tmp");
            f.write_all(&[7u8; 64]).expect("write");
            let src = Source {
                name: "t".into(),
                dtype: DType::F32,
                shape,
                chunks: chunks
                    .into_iter()
                    .map(|(off, len, so, strides, offsets, sizes)| Chunk {
                        path: f.path().to_path_buf(),
                        data_offset: off,
                        data_len: len,
                        storage_offset: so,
                        strides,
                        offsets,
                        sizes,
                    })
                    .collect(),
            };
            let mut cache = FileCache::default();
            let _ = prepare_source(&src, DType::BF16, &mut cache);
        }
    }
}

// ---------------------------------------------------------------- range copies

/// Every way of copying a range (splice through a pipe, `copy_file_range`, `pwrite` from the
/// mapping) gives the same bytes, at unaligned offsets and over several pipe fills; a source
/// that ends early is a format error, not a short file.
#[test]
fn range_copy_modes_agree() {
    use crate::copy::{copy_range, VIA_CFR, VIA_PWRITE, VIA_SPLICE};
    use crate::mmap::SourceFile;
    use std::sync::atomic::AtomicU8;
    let dir = tempfile::tempdir().unwrap();
    let src_path = dir.path().join("src.bin");
    let n: usize = (3 << 20) + 12_345;
    let data: Vec<u8> = (0..n as u64 + 777)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(&src_path, &data).unwrap();
    let src = SourceFile::open(&src_path).unwrap();
    for mode in [VIA_SPLICE, VIA_CFR, VIA_PWRITE] {
        let out = dir.path().join(format!("out{mode}.bin"));
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&out)
            .unwrap();
        let m = AtomicU8::new(mode);
        copy_range(&src, 777, &f, &out, 13_704, n as u64, &m).unwrap();
        let got = std::fs::read(&out).unwrap();
        assert_eq!(got.len(), 13_704 + n);
        assert!(got[..13_704].iter().all(|&b| b == 0));
        assert!(got[13_704..] == data[777..], "mode {mode}");
    }
    for mode in [VIA_SPLICE, VIA_CFR] {
        let out = dir.path().join("short.bin");
        let f = std::fs::File::create(&out).unwrap();
        let m = AtomicU8::new(mode);
        let e = copy_range(&src, 777, &f, &out, 0, n as u64 + 4096, &m).unwrap_err();
        assert!(e.to_string().contains("truncated"), "{e}");
    }
}
