//! `fastckpt._core`: the thin Python adapter (feature `python`).
//!
//! Each function extracts its arguments into owned Rust values, releases the GIL
//! (`Python::detach`), runs the plain Rust function and converts the result. The only conversion
//! from [`Error`] to `PyErr` lives here ([`to_pyerr`]).
//!
//! `write_shards` runs the work on a scoped thread while the calling thread, GIL released, waits in
//! ~100 ms steps; at each step it re-attaches to call `progress(done, total)` and
//! `check_signals()`. An exception from either sets the cancel flag; the worker stops between
//! work items, is joined, its temporary files are removed, and the Python exception is re-raised.
//! The final progress call comes before the files are renamed into place.

use crate::dtype::DType;
use crate::error::Error;
use crate::plan::{Chunk, Source};
use crate::pool::Progress;
use crate::writer::{self, ShardSpec, WriteOptions};
use pyo3::buffer::PyUntypedBuffer;
use pyo3::create_exception;
use pyo3::exceptions::{PyException, PyOSError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyTuple};
use std::path::PathBuf;
use std::sync::mpsc;
use std::time::Duration;

create_exception!(
    fastckpt._core,
    FastckptError,
    PyException,
    "Base class of every error fastckpt raises on purpose."
);
create_exception!(
    fastckpt._core,
    FormatError,
    FastckptError,
    "A source file is not what its format says (corrupt, truncated, unsupported variant)."
);
create_exception!(
    fastckpt._core,
    MappingError,
    FastckptError,
    "A tensor name cannot be mapped, or a requested tensor does not exist."
);
create_exception!(
    fastckpt._core,
    ShapeError,
    FastckptError,
    "Shapes, chunk coverage or byte sizes disagree."
);

/// Converts a core error into the matching Python exception.
fn to_pyerr(e: Error) -> PyErr {
    match e {
        Error::Io { path, source } => match source.raw_os_error() {
            Some(code) => {
                let text = std::io::Error::from_raw_os_error(code).to_string();
                let strerror = match text.rfind(" (os error ") {
                    Some(i) => text[..i].to_owned(),
                    None => text,
                };
                PyOSError::new_err((code, strerror, path.display().to_string()))
            }
            None => PyOSError::new_err(format!("{}: {source}", path.display())),
        },
        e @ (Error::Format { .. } | Error::UnknownDtype(_)) => FormatError::new_err(e.to_string()),
        e @ Error::Shape { .. } => ShapeError::new_err(e.to_string()),
        e @ (Error::Plan(_) | Error::Cancelled) => FastckptError::new_err(e.to_string()),
    }
}

/// The `Chunk` tuple.
#[derive(FromPyObject)]
struct PyChunk(PathBuf, u64, u64, u64, Vec<i64>, Vec<u64>, Vec<u64>);

/// The `Source` tuple.
#[derive(FromPyObject)]
struct PySource(String, String, Vec<u64>, Vec<PyChunk>);

impl PySource {
    fn into_source(self) -> Result<Source, Error> {
        let PySource(name, dtype, shape, chunks) = self;
        let dtype = DType::parse(&dtype)?;
        let chunks = chunks
            .into_iter()
            .map(
                |PyChunk(path, data_offset, data_len, so, strides, offsets, sizes)| Chunk {
                    path,
                    data_offset,
                    data_len,
                    storage_offset: so,
                    strides,
                    offsets,
                    sizes,
                },
            )
            .collect();
        Ok(Source {
            name,
            dtype,
            shape,
            chunks,
        })
    }
}

/// Item size in bytes of a safetensors dtype name; `FormatError` if unknown.
/// Refuses a pickle whose loading could exhaust memory or the C stack (see `pickle_scan.rs`).
#[pyfunction]
fn scan_pickle(data: &[u8], max_depth: u64) -> PyResult<()> {
    crate::pickle_scan::scan_pickle(data, max_depth).map_err(FormatError::new_err)
}

#[pyfunction]
fn dtype_size(dtype: &str) -> PyResult<usize> {
    DType::parse(dtype).map(DType::size).map_err(to_pyerr)
}

/// The first region of `shape` no box covers, as (offsets, sizes); None when they tile it.
#[pyfunction]
#[allow(clippy::type_complexity)]
fn first_gap(shape: Vec<u64>, boxes: Vec<(Vec<u64>, Vec<u64>)>) -> Option<(Vec<u64>, Vec<u64>)> {
    let views: Vec<(&[u64], &[u64])> = boxes
        .iter()
        .filter(|(o, s)| o.len() == shape.len() && s.len() == shape.len())
        .map(|(o, s)| (&o[..], &s[..]))
        .collect();
    let refs: Vec<_> = views.iter().collect();
    crate::coverage::first_gap(&shape, &refs)
}

/// Split tensors (byte sizes, in key order) into shards, as huggingface_hub does.
#[pyfunction]
fn plan_shards(py: Python<'_>, sizes: Vec<u64>, max_shard_size: u64) -> Vec<Vec<usize>> {
    py.detach(|| crate::plan::plan_shards(&sizes, max_shard_size))
}

/// Calls `progress(done, total)` if given, then checks for signals (Ctrl-C).
fn poll(py: Python<'_>, cb: Option<&Py<PyAny>>, prog: &Progress) -> PyResult<()> {
    if let Some(cb) = cb {
        let (done, total) = prog.get();
        cb.call1(py, (done, total))?;
    }
    py.check_signals()
}

/// Write safetensors files into an existing `directory` (see `_core.pyi`).
#[pyfunction]
#[pyo3(signature = (directory, shards, *, num_threads=None, fsync=true, progress=None))]
fn write_shards(
    py: Python<'_>,
    directory: PathBuf,
    shards: Vec<(String, Vec<(PySource, String)>)>,
    num_threads: Option<usize>,
    fsync: bool,
    progress: Option<Py<PyAny>>,
) -> PyResult<u64> {
    let mut specs = Vec::with_capacity(shards.len());
    for (file_name, tensors) in shards {
        let mut ts = Vec::with_capacity(tensors.len());
        for (src, out) in tensors {
            let out = DType::parse(&out).map_err(to_pyerr)?;
            ts.push((src.into_source().map_err(to_pyerr)?, out));
        }
        specs.push(ShardSpec {
            file_name,
            tensors: ts,
        });
    }
    let opts = WriteOptions { num_threads, fsync };
    let prog = Progress::new();
    let cb = progress.as_ref();
    let r: Result<u64, PyErr> = py.detach(|| {
        std::thread::scope(|s| {
            let (tx, rx) = mpsc::channel();
            let (specs, prog, dir) = (&specs, &prog, &directory);
            s.spawn(move || {
                let r = writer::stage_shards(dir, specs, &opts, prog);
                let _ = tx.send(r);
            });
            let mut py_err: Option<PyErr> = None;
            loop {
                match rx.recv_timeout(Duration::from_millis(100)) {
                    Ok(r) => {
                        if let Some(e) = py_err {
                            return Err(e); // dropping a staged result removes its files
                        }
                        let staged = r.map_err(to_pyerr)?;
                        // The last progress call comes before the files are put in place, so
                        // that an exception from it still cancels the write.
                        Python::attach(|py| poll(py, cb, prog))?;
                        return staged.commit().map_err(to_pyerr);
                    }
                    Err(mpsc::RecvTimeoutError::Timeout) => {
                        if py_err.is_none() {
                            if let Err(e) = Python::attach(|py| poll(py, cb, prog)) {
                                prog.cancel();
                                py_err = Some(e);
                            }
                        }
                    }
                    Err(mpsc::RecvTimeoutError::Disconnected) => {
                        // The worker panicked; leaving the scope re-raises its panic.
                        return Err(FastckptError::new_err("internal error: worker panicked"));
                    }
                }
            }
        })
    });
    r
}

/// Copy one whole tensor, in C order and cast to `out_dtype`, into the writable buffer `out`.
#[pyfunction]
fn gather(
    py: Python<'_>,
    source: PySource,
    out_dtype: &str,
    out: &Bound<'_, PyAny>,
) -> PyResult<()> {
    let src = source.into_source().map_err(to_pyerr)?;
    let out_dtype = DType::parse(out_dtype).map_err(to_pyerr)?;
    let buf = PyUntypedBuffer::get(out)?;
    if buf.readonly() {
        return Err(PyValueError::new_err(
            "gather: the output buffer is read-only",
        ));
    }
    if !buf.is_c_contiguous() {
        return Err(PyValueError::new_err(
            "gather: the output buffer is not C-contiguous",
        ));
    }
    let len = buf.len_bytes();
    let ptr = buf.buf_ptr() as usize;
    let r = py.detach(move || {
        let out: &mut [u8] = if len == 0 {
            &mut []
        } else {
            // SAFETY: `buf` (a held Py_buffer of a writable, C-contiguous exporter) keeps the
            // `len` bytes at `ptr` alive and in place until it is released below, after this
            // closure returns. Python code touching the same memory concurrently from another
            // thread races as it would with any GIL-free numpy operation.
            unsafe { std::slice::from_raw_parts_mut(ptr as *mut u8, len) }
        };
        crate::gather::gather(&src, out_dtype, out, None)
    });
    buf.release(py);
    r.map_err(to_pyerr)
}

/// 16-byte XXH3-128 digest (big-endian) of the tensor's bytes in C order (its own dtype).
#[pyfunction]
fn digest<'py>(py: Python<'py>, source: PySource) -> PyResult<Bound<'py, PyBytes>> {
    let src = source.into_source().map_err(to_pyerr)?;
    let d = py
        .detach(|| crate::gather::digest(&src))
        .map_err(to_pyerr)?;
    Ok(PyBytes::new(py, &d.to_be_bytes()))
}

/// The extension module.
#[pymodule(gil_used = false)]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add("FastckptError", py.get_type::<FastckptError>())?;
    m.add("FormatError", py.get_type::<FormatError>())?;
    m.add("MappingError", py.get_type::<MappingError>())?;
    m.add("ShapeError", py.get_type::<ShapeError>())?;
    m.add_function(wrap_pyfunction!(dtype_size, m)?)?;
    m.add_function(wrap_pyfunction!(scan_pickle, m)?)?;
    m.add_function(wrap_pyfunction!(plan_shards, m)?)?;
    m.add_function(wrap_pyfunction!(first_gap, m)?)?;
    m.add_function(wrap_pyfunction!(write_shards, m)?)?;
    m.add_function(wrap_pyfunction!(gather, m)?)?;
    m.add_function(wrap_pyfunction!(digest, m)?)?;
    // The argument shapes of the stub (`Chunk`, `Source`) are plain tuples at runtime.
    let tuple = py.get_type::<PyTuple>();
    m.setattr("Chunk", &tuple)?;
    m.setattr("Source", &tuple)?;
    // `add` records names in `__all__`; the stub declares none, so keep the module without it.
    if m.hasattr("__all__")? {
        m.delattr("__all__")?;
    }
    Ok(())
}
