//! One error type for the library, with the kinds the C ABI maps to `mr_result` codes.

use std::fmt;

/// What went wrong, in the categories of the C ABI's `mr_result`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum ErrorKind {
    InvalidArgument = 1,
    System = 2,
    Timeout = 3,
    /// A remote rank or relay failed, disconnected, or reported an error.
    Remote = 4,
    Auth = 5,
    Aborted = 6,
    Verify = 7,
    Internal = 8,
}

impl ErrorKind {
    pub const fn name(self) -> &'static str {
        match self {
            ErrorKind::InvalidArgument => "invalid argument",
            ErrorKind::System => "system error",
            ErrorKind::Timeout => "timed out",
            ErrorKind::Remote => "remote error",
            ErrorKind::Auth => "authentication failed",
            ErrorKind::Aborted => "aborted",
            ErrorKind::Verify => "verification failed",
            ErrorKind::Internal => "internal error",
        }
    }

    pub fn from_u8(v: u8) -> ErrorKind {
        match v {
            1 => ErrorKind::InvalidArgument,
            2 => ErrorKind::System,
            3 => ErrorKind::Timeout,
            4 => ErrorKind::Remote,
            5 => ErrorKind::Auth,
            6 => ErrorKind::Aborted,
            7 => ErrorKind::Verify,
            _ => ErrorKind::Internal,
        }
    }
}

/// An error with its kind and a message that names the peer, op and byte counts involved.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Error {
    pub kind: ErrorKind,
    pub message: String,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Error {
        Error {
            kind,
            message: message.into(),
        }
    }
    pub fn invalid(message: impl Into<String>) -> Error {
        Error::new(ErrorKind::InvalidArgument, message)
    }
    pub fn remote(message: impl Into<String>) -> Error {
        Error::new(ErrorKind::Remote, message)
    }
    pub fn timeout(message: impl Into<String>) -> Error {
        Error::new(ErrorKind::Timeout, message)
    }
    pub fn internal(message: impl Into<String>) -> Error {
        Error::new(ErrorKind::Internal, message)
    }
    pub fn auth(message: impl Into<String>) -> Error {
        Error::new(ErrorKind::Auth, message)
    }
    pub fn aborted(message: impl Into<String>) -> Error {
        Error::new(ErrorKind::Aborted, message)
    }
    /// A system error from an `io::Error`, with what we were doing when it happened.
    pub fn io(context: impl fmt::Display, err: std::io::Error) -> Error {
        let kind = match err.kind() {
            std::io::ErrorKind::TimedOut => ErrorKind::Timeout,
            std::io::ErrorKind::ConnectionReset
            | std::io::ErrorKind::ConnectionAborted
            | std::io::ErrorKind::BrokenPipe
            | std::io::ErrorKind::UnexpectedEof => ErrorKind::Remote,
            _ => ErrorKind::System,
        };
        Error::new(kind, format!("{context}: {err}"))
    }
    /// Prefix the message with more context, keeping the kind.
    pub fn context(mut self, context: impl fmt::Display) -> Error {
        self.message = format!("{context}: {}", self.message);
        self
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.kind.name(), self.message)
    }
}

impl std::error::Error for Error {}
