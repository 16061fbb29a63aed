//! What every Bruno crate shares, with no transport and no storage in it:
//!
//! - [`ErrorCode`]: the small fixed set of failure codes (metric labels, DLQ
//!   headers, push-mode status codes), and the one rule that says which are
//!   permanent ([`ErrorCode::is_permanent`]);
//! - [`Classify`]: implemented once by each library error type, so a
//!   failure's code is decided where the error is defined and never
//!   re-derived by a service;
//! - [`Secret`]: a string that redacts itself in `Debug` and `Display`.
#![forbid(unsafe_code)]

mod secret;

pub use secret::Secret;

/// The small fixed set of failure codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// The message is not a valid CloudEvent.
    InvalidEvent,
    /// The event's data does not match its type's payload, or can never be
    /// processed (a row for another embedder, a text over the limit).
    InvalidPayload,
    /// The event's type is not one this part handles.
    UnknownType,
    /// A dependency answered something unusable; the same request would get
    /// the same answer (a misconfigured model server, say).
    BadResponse,
    /// A dependency (LLM, store, broker) failed or is unreachable.
    Dependency,
    /// Something took too long.
    Timeout,
    /// A bug: a panic or an unexpected state.
    Internal,
}

impl ErrorCode {
    /// Every code.
    pub const ALL: [ErrorCode; 7] = [
        Self::InvalidEvent,
        Self::InvalidPayload,
        Self::UnknownType,
        Self::BadResponse,
        Self::Dependency,
        Self::Timeout,
        Self::Internal,
    ];

    /// The wire and label form.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::InvalidEvent => "invalid_event",
            Self::InvalidPayload => "invalid_payload",
            Self::UnknownType => "unknown_type",
            Self::BadResponse => "bad_response",
            Self::Dependency => "dependency",
            Self::Timeout => "timeout",
            Self::Internal => "internal",
        }
    }

    /// Parse the wire form.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.as_str() == s)
    }

    /// The one rule: a failure no later attempt can fix is permanent (dead
    /// letter at once, HTTP 4xx in push mode); everything else is worth
    /// another attempt.
    pub fn is_permanent(self) -> bool {
        match self {
            Self::InvalidEvent | Self::InvalidPayload | Self::UnknownType | Self::BadResponse => {
                true
            }
            Self::Dependency | Self::Timeout | Self::Internal => false,
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An error that knows its own nature. Each library error type implements
/// it once; the worker runtime turns any such error into a handler failure
/// with that code, so services write `?` and never map codes by hand.
pub trait Classify: std::error::Error {
    /// The failure code of this error.
    fn code(&self) -> ErrorCode;

    /// True when no later attempt can succeed.
    fn is_permanent(&self) -> bool {
        self.code().is_permanent()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_input_and_bad_answers_are_permanent_everything_else_is_retried() {
        let permanent: Vec<_> = ErrorCode::ALL
            .into_iter()
            .filter(|c| c.is_permanent())
            .collect();
        assert_eq!(
            permanent,
            [
                ErrorCode::InvalidEvent,
                ErrorCode::InvalidPayload,
                ErrorCode::UnknownType,
                ErrorCode::BadResponse
            ]
        );
    }

    #[test]
    fn codes_round_trip() {
        for code in ErrorCode::ALL {
            assert_eq!(ErrorCode::parse(code.as_str()), Some(code));
        }
        assert_eq!(ErrorCode::parse("nope"), None);
    }
}
