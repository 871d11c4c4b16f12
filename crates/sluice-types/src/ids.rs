//! Identifiers.

use uuid::Uuid;

/// A new request id: a UUIDv7, so ids sort by creation time.
pub fn new_request_id() -> Uuid {
    Uuid::now_v7()
}

/// Seconds since the Unix epoch, for OpenAI's `created` fields.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
