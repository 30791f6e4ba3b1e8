//! RESP framing: the client request parser (Redis-exact, inline included) and the upstream
//! reply scanner (RESP2 and RESP3), plus the few encoders the proxy needs.
pub mod encode;
mod inline;
pub mod reply;
pub mod request;
pub mod value;
