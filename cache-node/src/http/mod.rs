//! HTTP details with no cache in them: Range, Content-Range and conditional-request parsing, and
//! `sendfile` for zero-copy bodies.

pub mod range;
pub mod sendfile;
