//! The base64 text of `<auth/>`, `<challenge/>`, `<response/>` and `<success/>` (RFC 6120 §6.4.2).

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;

use crate::PayloadError;

/// Decodes the text content of `<auth/>` or `<response/>`.
///
/// An absent or empty element means "no data"; a single `=` means "empty data" (RFC 6120
/// §6.4.2); both give an empty vector. Anything that is not strict, padded base64 is
/// `incorrect-encoding`.
pub fn decode_payload(text: &str) -> Result<Vec<u8>, PayloadError> {
    if text.is_empty() || text == "=" {
        return Ok(Vec::new());
    }
    STANDARD
        .decode(text)
        .map_err(|_| PayloadError::IncorrectEncoding)
}

/// Encodes bytes as the text content of `<challenge/>` or `<success/>`; empty data is `=`.
pub fn encode_payload(data: &[u8]) -> String {
    if data.is_empty() {
        return "=".to_owned();
    }
    STANDARD.encode(data)
}
