//! The buffers TLS connections borrow while bytes flow, kept in one bounded pool.
//!
//! An idle connection holds no ciphertext buffer: [`super::TlsStream`] takes one from here to
//! read or write, and gives it back as soon as it is drained. Only a record that arrived in
//! part (its rest not read yet) or ciphertext the socket did not take keeps a buffer on the
//! connection, and only until that completes.
//!
//! Every pooled buffer has the capacity of the largest TLS record on the wire, so any record
//! fits one. The pool keeps at most [`MAX_POOLED`] free buffers: when it is empty a new one is
//! allocated, and a buffer given back to a full pool is freed, so the pool never holds more
//! than `MAX_POOLED × BUF_LEN` bytes (about 1.2 MiB) however many connections there are.

use parking_lot::Mutex;

/// The largest TLS record on the wire: a 5-byte header and 2^14 + 2048 bytes of ciphertext
/// (RFC 5246 §6.2.3; TLS 1.3 allows less, RFC 8446 §5.2).
pub(crate) const BUF_LEN: usize = 5 + 16_384 + 2_048;

/// Free buffers kept for reuse.
pub(crate) const MAX_POOLED: usize = 64;

static POOL: Mutex<Vec<Vec<u8>>> = Mutex::new(Vec::new());

/// An empty buffer with capacity [`BUF_LEN`].
pub(crate) fn take() -> Vec<u8> {
    POOL.lock()
        .pop()
        .unwrap_or_else(|| Vec::with_capacity(BUF_LEN))
}

/// Gives a buffer back. One that grew beyond [`BUF_LEN`] (a long handshake message) is freed,
/// so the pool only ever holds buffers of one size.
pub(crate) fn give(mut buf: Vec<u8>) {
    if buf.capacity() != BUF_LEN {
        return;
    }
    buf.clear();
    let mut pool = POOL.lock();
    if pool.len() < MAX_POOLED {
        pool.push(buf);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_come_back_empty_and_the_pool_is_bounded() {
        let mut buf = take();
        assert_eq!(buf.capacity(), BUF_LEN);
        buf.extend_from_slice(b"ciphertext");
        give(buf);
        let again = take();
        assert!(again.is_empty());
        assert_eq!(again.capacity(), BUF_LEN);

        // A grown buffer is not kept.
        let mut grown = again;
        grown.reserve(BUF_LEN + 1);
        give(grown);

        let many: Vec<_> = (0..MAX_POOLED + 8).map(|_| take()).collect();
        for buf in many {
            give(buf);
        }
        assert!(POOL.lock().len() <= MAX_POOLED);
    }
}
