//! Bounds checks on the boxes Python describes, read back through `gather` and the cast window:
//! missing, overlapping or out-of-shape chunks, bad strides, short or vanished files.

use super::{gather_vec, global_bytes, simple_source};
use crate::dtype::DType;
use crate::error::Error;
use crate::gather::gather;
use crate::mmap::FileCache;
use crate::plan::{prepare_source, Chunk, Source};
use crate::reshard::fill_window;

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
