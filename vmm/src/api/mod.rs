//! The control API: HTTP/1.1 + JSON on a Unix socket (docs/api.md).

pub mod client;
pub mod handler;
pub mod http;
pub mod registers;
pub mod routes;
pub mod server;
