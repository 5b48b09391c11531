//! What SASL channel binding needs from a handshake, caught while rustls runs it.
//!
//! rustls's unbuffered server connection (which lets an idle connection hold no buffer) has
//! neither `export_keying_material` nor `server_name`. The two things channel binding needs
//! are caught instead at the moment rustls produces them, during the synchronous
//! `process_tls_records` calls of one connection's handshake:
//!
//! - the certificate the resolver chose, for `tls-server-end-point` (RFC 5929 §4.1): the
//!   resolver calls [`served`] with that certificate's end-point hash;
//! - the TLS 1.3 exporter master secret, for `tls-exporter` (RFC 9266): rustls hands it to the
//!   config's [`KeyLog`] under the label `EXPORTER_SECRET` ([`ExporterSecretLog`]), and
//!   [`exporter`] derives the keying material from it as RFC 8446 §7.5 defines.
//!
//! [`during`] makes one connection's [`Captured`] the current one for the length of one
//! synchronous call, through a thread-local slot; outside such a call (any other use of the
//! server configurations) the resolver and the key log record nothing. The secret is kept only
//! until the handshake's exporter value is derived, then wiped.

use std::cell::RefCell;
use std::sync::atomic::{Ordering, compiler_fence};

use rustls::KeyLog;
use rustls::Tls13CipherSuite;
use rustls::crypto::tls13::{HkdfExpander, OkmBlock, OutputLengthError};

/// The label under which rustls logs the TLS 1.3 exporter master secret (the NSS key log
/// format).
const EXPORTER_SECRET: &str = "EXPORTER_SECRET";

/// The largest secret: the output of SHA-512, the longest hash of a TLS 1.3 suite.
const MAX_SECRET: usize = 64;

/// A TLS 1.3 exporter master secret, wiped on drop.
pub(crate) struct Secret {
    bytes: [u8; MAX_SECRET],
    len: usize,
}

impl Secret {
    fn new(secret: &[u8]) -> Option<Secret> {
        let len = secret.len();
        let mut bytes = [0u8; MAX_SECRET];
        bytes.get_mut(..len)?.copy_from_slice(secret);
        Some(Secret { bytes, len })
    }

    fn as_bytes(&self) -> &[u8] {
        &self.bytes[..self.len]
    }
}

impl Drop for Secret {
    fn drop(&mut self) {
        self.bytes.fill(0);
        compiler_fence(Ordering::SeqCst);
    }
}

/// What one handshake revealed so far.
#[derive(Default)]
pub(crate) struct Captured {
    /// The `tls-server-end-point` data of the certificate the resolver chose last (a
    /// HelloRetryRequest makes it choose twice); `None` for an EdDSA or unknown signature.
    pub(crate) end_point: Option<Vec<u8>>,
    /// The TLS 1.3 exporter master secret.
    pub(crate) exporter_secret: Option<Secret>,
}

impl std::fmt::Debug for Captured {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Captured")
            .field("end_point", &self.end_point.is_some())
            .field("exporter_secret", &self.exporter_secret.is_some())
            .finish()
    }
}

thread_local! {
    static CURRENT: RefCell<Option<Captured>> = const { RefCell::new(None) };
}

/// Runs `f` (one synchronous step of a handshake) with `captured` as the connection whose
/// handshake the resolver and the key log report to.
pub(crate) fn during<R>(captured: &mut Captured, f: impl FnOnce() -> R) -> R {
    CURRENT.with(|slot| *slot.borrow_mut() = Some(std::mem::take(captured)));
    let result = f();
    *captured = CURRENT
        .with(|slot| slot.borrow_mut().take())
        .unwrap_or_default();
    result
}

fn with_current(f: impl FnOnce(&mut Captured)) {
    CURRENT.with(|slot| {
        if let Ok(mut slot) = slot.try_borrow_mut()
            && let Some(captured) = slot.as_mut()
        {
            f(captured);
        }
    });
}

/// The resolver chose the certificate whose end-point data is `end_point`.
pub(crate) fn served(end_point: Option<&[u8]>) {
    with_current(|captured| captured.end_point = end_point.map(<[u8]>::to_vec));
}

/// The key log of the edge's server configurations: it keeps the exporter master secret of
/// the handshake being captured and ignores every other secret.
#[derive(Debug)]
pub(crate) struct ExporterSecretLog;

impl KeyLog for ExporterSecretLog {
    fn log(&self, label: &str, _client_random: &[u8], secret: &[u8]) {
        if label == EXPORTER_SECRET {
            with_current(|captured| captured.exporter_secret = Secret::new(secret));
        }
    }

    fn will_log(&self, label: &str) -> bool {
        label == EXPORTER_SECRET
            && CURRENT.with(|slot| slot.try_borrow().is_ok_and(|s| s.is_some()))
    }
}

/// The TLS 1.3 exporter (RFC 8446 §7.5) over `secret`, the exporter master secret:
/// `HKDF-Expand-Label(Derive-Secret(secret, label, ""), "exporter", Hash(context), out.len())`.
pub(crate) fn exporter(
    suite: &Tls13CipherSuite,
    secret: &Secret,
    label: &[u8],
    context: &[u8],
    out: &mut [u8],
) -> Result<(), OutputLengthError> {
    let hash = suite.common.hash_provider;
    let hkdf = suite.hkdf_provider;
    let mut derived = [0u8; MAX_SECRET];
    let derived = derived
        .get_mut(..hash.output_len())
        .ok_or(OutputLengthError)?;
    let empty = hash.hash(&[]);
    let expander = hkdf.expander_for_okm(&OkmBlock::new(secret.as_bytes()));
    expand_label(&*expander, label, empty.as_ref(), derived)?;
    let expander = hkdf.expander_for_okm(&OkmBlock::new(derived));
    derived.fill(0);
    expand_label(&*expander, b"exporter", hash.hash(context).as_ref(), out)
}

/// `HKDF-Expand-Label` (RFC 8446 §7.1).
fn expand_label(
    expander: &dyn HkdfExpander,
    label: &[u8],
    context: &[u8],
    out: &mut [u8],
) -> Result<(), OutputLengthError> {
    const PREFIX: &[u8] = b"tls13 ";
    let length = u16::try_from(out.len()).map_err(|_| OutputLengthError)?;
    let label_len = u8::try_from(PREFIX.len() + label.len()).map_err(|_| OutputLengthError)?;
    let context_len = u8::try_from(context.len()).map_err(|_| OutputLengthError)?;
    expander.expand_slice(
        &[
            &length.to_be_bytes(),
            &[label_len],
            PREFIX,
            label,
            &[context_len],
            context,
        ],
        out,
    )
}
