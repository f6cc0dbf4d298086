//! Error type of the fastckpt core.
//!
//! One `thiserror` enum for every failure the core reports on purpose. It carries no pyo3 types;
//! `py.rs` holds the only conversion to Python exceptions:
//!
//! | variant | Python |
//! |---|---|
//! | [`Error::Io`] | `OSError(errno, strerror, filename)`, so `FileNotFoundError`, `PermissionError`, ... |
//! | [`Error::Format`], [`Error::UnknownDtype`] | `FormatError` |
//! | [`Error::Shape`] | `ShapeError` |
//! | [`Error::Plan`], [`Error::Cancelled`] | `FastckptError` |
//!
//! Messages are lowercase and name the file and, where there is one, the tensor.

use std::path::{Path, PathBuf};

/// Every error of the fastckpt core.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An operating-system error on `path` (open, map, write, fallocate, fsync, rename, ...).
    #[error("{}: {source}", path.display())]
    Io {
        /// The file the failing operation was about.
        path: PathBuf,
        /// The operating-system error.
        #[source]
        source: std::io::Error,
    },
    /// A source file is not what its description says (truncated, out of bounds, ...).
    #[error("{}: {msg}", path.display())]
    Format {
        /// The offending source file.
        path: PathBuf,
        /// What is wrong, naming the tensor.
        msg: String,
    },
    /// A dtype name that fastckpt does not know.
    #[error("unknown dtype '{0}'")]
    UnknownDtype(String),
    /// Shapes, chunk geometry, coverage or byte sizes disagree.
    #[error("tensor '{tensor}': {msg}")]
    Shape {
        /// The tensor name.
        tensor: String,
        /// What is wrong.
        msg: String,
    },
    /// The request itself is invalid (duplicate names, unsupported cast, bad file name, ...).
    #[error("{0}")]
    Plan(String),
    /// The operation was cancelled (progress callback raised, or Ctrl-C).
    #[error("cancelled")]
    Cancelled,
}

/// Result alias of the fastckpt core.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Builds an [`Error::Io`] for `path`.
    pub fn io(path: impl AsRef<Path>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.as_ref().to_path_buf(),
            source,
        }
    }

    /// Builds an [`Error::Format`] for `path`.
    pub fn format(path: impl AsRef<Path>, msg: impl Into<String>) -> Self {
        Error::Format {
            path: path.as_ref().to_path_buf(),
            msg: msg.into(),
        }
    }

    /// Builds an [`Error::Shape`] for `tensor`.
    pub fn shape(tensor: impl Into<String>, msg: impl Into<String>) -> Self {
        Error::Shape {
            tensor: tensor.into(),
            msg: msg.into(),
        }
    }
}
