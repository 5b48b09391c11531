//! A strict DER reader with just enough X.509 for the edge (RFC 5280 §4.1): the DNS names of the
//! leaf's subjectAltName extension (§4.2.1.6), its validity's `notAfter` (§4.1.2.5), and the
//! hash of its signature algorithm (§4.1.1.2), which RFC 5929 §4.1 uses for
//! `tls-server-end-point`.
//!
//! The reader checks every length against the bytes left, refuses indefinite and non-minimal
//! lengths and high tag numbers (X.509 uses none), and insists that each structure it walks is
//! consumed exactly. It never indexes or panics, whatever the input.

use std::net::IpAddr;

use sha2::Digest;

const TAG_BOOLEAN: u8 = 0x01;
const TAG_INTEGER: u8 = 0x02;
const TAG_BIT_STRING: u8 = 0x03;
const TAG_OCTET_STRING: u8 = 0x04;
const TAG_OID: u8 = 0x06;
const TAG_UTC_TIME: u8 = 0x17;
const TAG_GENERALIZED_TIME: u8 = 0x18;
const TAG_SEQUENCE: u8 = 0x30;
/// `[0] EXPLICIT` (constructed, context-specific 0): the version, and the PSS hash algorithm.
const TAG_CONTEXT_0: u8 = 0xa0;
/// `[1] IMPLICIT BIT STRING`: issuerUniqueID.
const TAG_ISSUER_UID: u8 = 0x81;
/// `[2] IMPLICIT BIT STRING`: subjectUniqueID; also `[2] IMPLICIT IA5String` dNSName in a
/// GeneralName.
const TAG_CONTEXT_2_PRIMITIVE: u8 = 0x82;
/// `[3] EXPLICIT Extensions`.
const TAG_EXTENSIONS: u8 = 0xa3;
/// `iPAddress [7] IMPLICIT OCTET STRING` in a GeneralName.
const TAG_IP_ADDRESS: u8 = 0x87;

/// id-ce-subjectAltName, 2.5.29.17.
const OID_SUBJECT_ALT_NAME: &[u8] = &[0x55, 0x1d, 0x11];

/// Why a certificate could not be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DerError {
    /// A length runs past the end of its enclosing structure.
    #[error("truncated DER")]
    Truncated,
    /// Indefinite length (BER, not DER).
    #[error("indefinite length")]
    IndefiniteLength,
    /// A length encoded in more bytes than needed, or longer than 4 bytes.
    #[error("non-minimal or oversized length")]
    BadLength,
    /// A multi-byte tag number, which X.509 never uses.
    #[error("high tag number")]
    HighTagNumber,
    /// A different element than the structure requires.
    #[error("unexpected tag {found:#04x} (expected {expected:#04x})")]
    UnexpectedTag {
        /// The tag the structure requires here.
        expected: u8,
        /// The tag found.
        found: u8,
    },
    /// Bytes left over after a structure.
    #[error("trailing data")]
    TrailingData,
    /// The subjectAltName extension occurs twice.
    #[error("duplicate subjectAltName extension")]
    DuplicateSubjectAltName,
    /// A dNSName that is not IA5 (ASCII) text, or is empty.
    #[error("invalid dNSName")]
    InvalidDnsName,
    /// An iPAddress that is neither 4 nor 16 bytes long.
    #[error("invalid iPAddress")]
    InvalidIpAddress,
    /// A malformed UTCTime or GeneralizedTime.
    #[error("invalid time")]
    InvalidTime,
}

/// What the edge needs to know about a leaf certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct LeafInfo {
    /// The dNSName entries of subjectAltName, lower-cased, in certificate order. Wildcards keep
    /// their `*.` prefix.
    pub(super) dns_names: Vec<String>,
    /// The iPAddress entries of subjectAltName.
    pub(super) ip_addresses: Vec<IpAddr>,
    /// End of validity, in seconds since the Unix epoch.
    pub(super) not_after: i64,
    /// The hash `tls-server-end-point` uses for this certificate, or `None` when the signature
    /// algorithm has no single hash (Ed25519, Ed448) or is unknown.
    pub(super) end_point_hash: Option<EndPointHash>,
}

/// A hash function for `tls-server-end-point` (RFC 5929 §4.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum EndPointHash {
    Sha224,
    Sha256,
    Sha384,
    Sha512,
}

impl EndPointHash {
    pub(super) fn digest(self, data: &[u8]) -> Vec<u8> {
        match self {
            Self::Sha224 => sha2::Sha224::digest(data).to_vec(),
            Self::Sha256 => sha2::Sha256::digest(data).to_vec(),
            Self::Sha384 => sha2::Sha384::digest(data).to_vec(),
            Self::Sha512 => sha2::Sha512::digest(data).to_vec(),
        }
    }
}

/// A cursor over a sequence of DER elements.
struct Der<'a> {
    rest: &'a [u8],
}

impl<'a> Der<'a> {
    fn new(input: &'a [u8]) -> Self {
        Der { rest: input }
    }

    fn peek_tag(&self) -> Option<u8> {
        self.rest.first().copied()
    }

    /// Reads one element: its tag and its content bytes.
    fn any(&mut self) -> Result<(u8, &'a [u8]), DerError> {
        let (&tag, rest) = self.rest.split_first().ok_or(DerError::Truncated)?;
        if tag & 0x1f == 0x1f {
            return Err(DerError::HighTagNumber);
        }
        let (&first, rest) = rest.split_first().ok_or(DerError::Truncated)?;
        let (len, rest) = if first < 0x80 {
            (usize::from(first), rest)
        } else {
            let count = usize::from(first & 0x7f);
            if count == 0 {
                return Err(DerError::IndefiniteLength);
            }
            if count > 4 {
                return Err(DerError::BadLength);
            }
            let (bytes, rest) = rest.split_at_checked(count).ok_or(DerError::Truncated)?;
            if bytes.first() == Some(&0) {
                return Err(DerError::BadLength);
            }
            let len = bytes
                .iter()
                .fold(0usize, |acc, &b| (acc << 8) | usize::from(b));
            if len < 0x80 {
                return Err(DerError::BadLength);
            }
            (len, rest)
        };
        let (content, rest) = rest.split_at_checked(len).ok_or(DerError::Truncated)?;
        self.rest = rest;
        Ok((tag, content))
    }

    /// Reads one element that must carry `tag`.
    fn expect(&mut self, tag: u8) -> Result<&'a [u8], DerError> {
        let (found, content) = self.any()?;
        if found != tag {
            return Err(DerError::UnexpectedTag {
                expected: tag,
                found,
            });
        }
        Ok(content)
    }

    /// Reads the next element if it carries `tag`.
    fn optional(&mut self, tag: u8) -> Result<Option<&'a [u8]>, DerError> {
        if self.peek_tag() == Some(tag) {
            self.any().map(|(_, content)| Some(content))
        } else {
            Ok(None)
        }
    }

    fn finish(&self) -> Result<(), DerError> {
        if self.rest.is_empty() {
            Ok(())
        } else {
            Err(DerError::TrailingData)
        }
    }
}

/// Reads a DER-encoded X.509 certificate (RFC 5280 §4.1).
pub(super) fn parse_leaf(der: &[u8]) -> Result<LeafInfo, DerError> {
    let mut outer = Der::new(der);
    let certificate = outer.expect(TAG_SEQUENCE)?;
    outer.finish()?;

    // Certificate ::= SEQUENCE { tbsCertificate, signatureAlgorithm, signatureValue }
    let mut certificate = Der::new(certificate);
    let tbs = certificate.expect(TAG_SEQUENCE)?;
    let signature_algorithm = certificate.expect(TAG_SEQUENCE)?;
    certificate.expect(TAG_BIT_STRING)?;
    certificate.finish()?;

    let mut tbs = Der::new(tbs);
    tbs.optional(TAG_CONTEXT_0)?; // version
    tbs.expect(TAG_INTEGER)?; // serialNumber
    tbs.expect(TAG_SEQUENCE)?; // signature
    tbs.expect(TAG_SEQUENCE)?; // issuer
    let validity = tbs.expect(TAG_SEQUENCE)?;
    tbs.expect(TAG_SEQUENCE)?; // subject
    tbs.expect(TAG_SEQUENCE)?; // subjectPublicKeyInfo
    tbs.optional(TAG_ISSUER_UID)?;
    tbs.optional(TAG_CONTEXT_2_PRIMITIVE)?; // subjectUniqueID
    let extensions = tbs.optional(TAG_EXTENSIONS)?;
    tbs.finish()?;

    let mut validity = Der::new(validity);
    read_time(&mut validity)?; // notBefore
    let not_after = read_time(&mut validity)?;
    validity.finish()?;

    let names = match extensions {
        Some(extensions) => subject_alt_names(extensions)?,
        None => SubjectAltNames::default(),
    };

    Ok(LeafInfo {
        dns_names: names.dns,
        ip_addresses: names.ip,
        not_after,
        end_point_hash: end_point_hash(signature_algorithm)?,
    })
}

/// The names of a subjectAltName extension this module uses.
#[derive(Default)]
struct SubjectAltNames {
    dns: Vec<String>,
    ip: Vec<IpAddr>,
}

/// Walks `[3] EXPLICIT SEQUENCE OF Extension` and returns the names of 2.5.29.17.
fn subject_alt_names(extensions: &[u8]) -> Result<SubjectAltNames, DerError> {
    let mut wrapper = Der::new(extensions);
    let list = wrapper.expect(TAG_SEQUENCE)?;
    wrapper.finish()?;

    let mut names = None;
    let mut list = Der::new(list);
    while !list.rest.is_empty() {
        // Extension ::= SEQUENCE { extnID OID, critical BOOLEAN DEFAULT FALSE, extnValue OCTET STRING }
        let mut extension = Der::new(list.expect(TAG_SEQUENCE)?);
        let oid = extension.expect(TAG_OID)?;
        extension.optional(TAG_BOOLEAN)?;
        let value = extension.expect(TAG_OCTET_STRING)?;
        extension.finish()?;
        if oid == OID_SUBJECT_ALT_NAME {
            if names.is_some() {
                return Err(DerError::DuplicateSubjectAltName);
            }
            names = Some(general_names(value)?);
        }
    }
    Ok(names.unwrap_or_default())
}

/// `GeneralNames ::= SEQUENCE OF GeneralName`; keeps `dNSName [2] IA5String` and
/// `iPAddress [7] OCTET STRING`, skips the rest.
fn general_names(value: &[u8]) -> Result<SubjectAltNames, DerError> {
    let mut wrapper = Der::new(value);
    let list = wrapper.expect(TAG_SEQUENCE)?;
    wrapper.finish()?;

    let mut names = SubjectAltNames::default();
    let mut list = Der::new(list);
    while !list.rest.is_empty() {
        match list.any()? {
            (TAG_CONTEXT_2_PRIMITIVE, content) => {
                if content.is_empty() || !content.iter().all(|b| b.is_ascii_graphic()) {
                    return Err(DerError::InvalidDnsName);
                }
                let name = std::str::from_utf8(content).map_err(|_| DerError::InvalidDnsName)?;
                names.dns.push(name.to_ascii_lowercase());
            }
            (TAG_IP_ADDRESS, content) => {
                if let Ok(v4) = <[u8; 4]>::try_from(content) {
                    names.ip.push(IpAddr::from(v4));
                } else if let Ok(v6) = <[u8; 16]>::try_from(content) {
                    names.ip.push(IpAddr::from(v6));
                } else {
                    return Err(DerError::InvalidIpAddress);
                }
            }
            _ => {}
        }
    }
    Ok(names)
}

/// `Time ::= CHOICE { utcTime UTCTime, generalTime GeneralizedTime }` (RFC 5280 §4.1.2.5), as
/// seconds since the Unix epoch. DER requires the `Z` form with seconds.
fn read_time(der: &mut Der<'_>) -> Result<i64, DerError> {
    let (tag, content) = der.any()?;
    let (year, rest) = match tag {
        TAG_UTC_TIME => {
            let (yy, rest) = content.split_at_checked(2).ok_or(DerError::InvalidTime)?;
            let yy = digits(yy)?;
            // RFC 5280 §4.1.2.5.1: YY >= 50 is 19YY, else 20YY.
            (if yy >= 50 { 1900 + yy } else { 2000 + yy }, rest)
        }
        TAG_GENERALIZED_TIME => {
            let (yyyy, rest) = content.split_at_checked(4).ok_or(DerError::InvalidTime)?;
            (digits(yyyy)?, rest)
        }
        found => {
            return Err(DerError::UnexpectedTag {
                expected: TAG_UTC_TIME,
                found,
            });
        }
    };
    // MMDDHHMMSSZ
    let [m1, m2, d1, d2, h1, h2, n1, n2, s1, s2, b'Z'] = rest else {
        return Err(DerError::InvalidTime);
    };
    let month = digits(&[*m1, *m2])?;
    let day = digits(&[*d1, *d2])?;
    let hour = digits(&[*h1, *h2])?;
    let minute = digits(&[*n1, *n2])?;
    let second = digits(&[*s1, *s2])?;
    if !(1..=12).contains(&month)
        || day < 1
        || day > days_in_month(year, month)
        || hour > 23
        || minute > 59
        || second > 59
    {
        return Err(DerError::InvalidTime);
    }
    let days = days_from_civil(year, month, day);
    Ok(days * 86_400 + hour * 3_600 + minute * 60 + second)
}

fn digits(bytes: &[u8]) -> Result<i64, DerError> {
    bytes.iter().try_fold(0i64, |acc, &b| {
        if b.is_ascii_digit() {
            Ok(acc * 10 + i64::from(b - b'0'))
        } else {
            Err(DerError::InvalidTime)
        }
    })
}

fn days_in_month(year: i64, month: i64) -> i64 {
    match month {
        4 | 6 | 9 | 11 => 30,
        2 if (year % 4 == 0 && year % 100 != 0) || year % 400 == 0 => 29,
        2 => 28,
        _ => 31,
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let year_of_era = year - era * 400;
    let month_from_march = (month + 9) % 12;
    let day_of_year = (153 * month_from_march + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

// Signature algorithm OIDs (content bytes).
const RSA_PKCS1_PREFIX: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01]; // 1.2.840.113549.1.1
const ECDSA_SHA1: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x01]; // 1.2.840.10045.4.1
const ECDSA_SHA2_PREFIX: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03]; // 1.2.840.10045.4.3
const DSA_SHA1: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x38, 0x04, 0x03]; // 1.2.840.10040.4.3
const DSA_SHA2_PREFIX: &[u8] = &[0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x03]; // 2.16.840.1.101.3.4.3
const HASH_SHA2_PREFIX: &[u8] = &[0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02]; // 2.16.840.1.101.3.4.2
const HASH_SHA1: &[u8] = &[0x2b, 0x0e, 0x03, 0x02, 0x1a]; // 1.3.14.3.2.26
const HASH_MD5: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x02, 0x05]; // 1.2.840.113549.2.5

/// The hash RFC 5929 §4.1 prescribes for a certificate signed with `signature_algorithm` (an
/// AlgorithmIdentifier's content): the signature's own hash, except MD5 and SHA-1, which are
/// replaced by SHA-256. `None` for algorithms without a single hash (EdDSA) or unknown ones.
fn end_point_hash(signature_algorithm: &[u8]) -> Result<Option<EndPointHash>, DerError> {
    let mut algorithm = Der::new(signature_algorithm);
    let oid = algorithm.expect(TAG_OID)?;
    let parameters = algorithm.rest;

    if let Some(&[suffix]) = oid.strip_prefix(RSA_PKCS1_PREFIX) {
        return match suffix {
            4 | 5 => Ok(Some(EndPointHash::Sha256)), // md5WithRSA, sha1WithRSA
            10 => pss_hash(parameters),              // RSASSA-PSS
            11 => Ok(Some(EndPointHash::Sha256)),
            12 => Ok(Some(EndPointHash::Sha384)),
            13 => Ok(Some(EndPointHash::Sha512)),
            14 => Ok(Some(EndPointHash::Sha224)),
            _ => Ok(None),
        };
    }
    if oid == ECDSA_SHA1 || oid == DSA_SHA1 {
        return Ok(Some(EndPointHash::Sha256));
    }
    if let Some(&[suffix]) = oid
        .strip_prefix(ECDSA_SHA2_PREFIX)
        .or_else(|| oid.strip_prefix(DSA_SHA2_PREFIX))
    {
        return Ok(sha2_by_suffix(suffix));
    }
    Ok(None)
}

/// The SHA-2 member numbered by the last arc of 2.16.840.1.101.3.4.3.x / 1.2.840.10045.4.3.x.
fn sha2_by_suffix(suffix: u8) -> Option<EndPointHash> {
    match suffix {
        1 => Some(EndPointHash::Sha224),
        2 => Some(EndPointHash::Sha256),
        3 => Some(EndPointHash::Sha384),
        4 => Some(EndPointHash::Sha512),
        _ => None,
    }
}

/// `RSASSA-PSS-params ::= SEQUENCE { hashAlgorithm [0] HashAlgorithm DEFAULT sha1, ... }`
/// (RFC 4055 §3.1).
fn pss_hash(parameters: &[u8]) -> Result<Option<EndPointHash>, DerError> {
    let mut wrapper = Der::new(parameters);
    let params = wrapper.expect(TAG_SEQUENCE)?;
    wrapper.finish()?;
    let mut params = Der::new(params);
    let Some(hash_algorithm) = params.optional(TAG_CONTEXT_0)? else {
        return Ok(Some(EndPointHash::Sha256)); // the SHA-1 default
    };
    let mut explicit = Der::new(hash_algorithm);
    let mut identifier = Der::new(explicit.expect(TAG_SEQUENCE)?);
    explicit.finish()?;
    let oid = identifier.expect(TAG_OID)?;
    if oid == HASH_SHA1 || oid == HASH_MD5 {
        return Ok(Some(EndPointHash::Sha256));
    }
    // SHA-2 hash OIDs number 224 as 4: 1 = SHA-256, 2 = SHA-384, 3 = SHA-512, 4 = SHA-224.
    Ok(match oid.strip_prefix(HASH_SHA2_PREFIX) {
        Some(&[1]) => Some(EndPointHash::Sha256),
        Some(&[2]) => Some(EndPointHash::Sha384),
        Some(&[3]) => Some(EndPointHash::Sha512),
        Some(&[4]) => Some(EndPointHash::Sha224),
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn generate(
        alg: &'static rcgen::SignatureAlgorithm,
        names: &[&str],
    ) -> rustls_pki_types::CertificateDer<'static> {
        let key = rcgen::KeyPair::generate_for(alg).unwrap();
        let params =
            rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        params.self_signed(&key).unwrap().der().clone()
    }

    #[test]
    fn reads_dns_names_and_ip_addresses() {
        let der = generate(
            &rcgen::PKCS_ECDSA_P256_SHA256,
            &[
                "Example.ORG",
                "*.example.org",
                "127.0.0.1",
                "::1",
                "xmpp.example.net",
            ],
        );
        let info = parse_leaf(&der).unwrap();
        assert_eq!(
            info.dns_names,
            ["example.org", "*.example.org", "xmpp.example.net"]
        );
        assert_eq!(
            info.ip_addresses,
            [
                "127.0.0.1".parse::<IpAddr>().unwrap(),
                "::1".parse().unwrap()
            ]
        );
        assert_eq!(info.end_point_hash, Some(EndPointHash::Sha256));
        // rcgen's default notAfter is 4096-01-01T00:00:00Z.
        assert_eq!(info.not_after, days_from_civil(4096, 1, 1) * 86_400);
    }

    #[test]
    fn hash_follows_the_signature_algorithm() {
        let p384 = parse_leaf(&generate(&rcgen::PKCS_ECDSA_P384_SHA384, &["a.test"])).unwrap();
        assert_eq!(p384.end_point_hash, Some(EndPointHash::Sha384));
        let ed25519 = parse_leaf(&generate(&rcgen::PKCS_ED25519, &["a.test"])).unwrap();
        assert_eq!(ed25519.end_point_hash, None);
    }

    fn algorithm(oid: &[u8], params: &[u8]) -> Vec<u8> {
        let mut out = vec![TAG_OID, oid.len() as u8];
        out.extend_from_slice(oid);
        out.extend_from_slice(params);
        out
    }

    #[test]
    fn rsa_and_legacy_algorithms_map_per_rfc_5929() {
        let null = [0x05, 0x00];
        let rsa = |n: u8| algorithm(&[RSA_PKCS1_PREFIX, &[n]].concat(), &null);
        assert_eq!(end_point_hash(&rsa(4)), Ok(Some(EndPointHash::Sha256)));
        assert_eq!(end_point_hash(&rsa(5)), Ok(Some(EndPointHash::Sha256)));
        assert_eq!(end_point_hash(&rsa(11)), Ok(Some(EndPointHash::Sha256)));
        assert_eq!(end_point_hash(&rsa(12)), Ok(Some(EndPointHash::Sha384)));
        assert_eq!(end_point_hash(&rsa(13)), Ok(Some(EndPointHash::Sha512)));
        assert_eq!(end_point_hash(&rsa(14)), Ok(Some(EndPointHash::Sha224)));
        assert_eq!(
            end_point_hash(&algorithm(ECDSA_SHA1, &[])),
            Ok(Some(EndPointHash::Sha256))
        );
        assert_eq!(
            end_point_hash(&algorithm(&[ECDSA_SHA2_PREFIX, &[4]].concat(), &[])),
            Ok(Some(EndPointHash::Sha512))
        );
        assert_eq!(
            end_point_hash(&algorithm(&[0x2b, 0x65, 0x71], &[])),
            Ok(None)
        ); // Ed448
    }

    #[test]
    fn pss_reads_the_hash_parameter() {
        let pss_oid = [RSA_PKCS1_PREFIX, &[10]].concat();
        // SEQUENCE { [0] { SEQUENCE { OID sha384, NULL } } }
        let sha384 = [HASH_SHA2_PREFIX, &[2]].concat();
        let mut hash_id = vec![TAG_SEQUENCE, (sha384.len() + 4) as u8, TAG_OID, 9];
        hash_id.extend_from_slice(&sha384);
        hash_id.extend_from_slice(&[0x05, 0x00]);
        let mut explicit = vec![TAG_CONTEXT_0, hash_id.len() as u8];
        explicit.extend_from_slice(&hash_id);
        let mut params = vec![TAG_SEQUENCE, explicit.len() as u8];
        params.extend_from_slice(&explicit);
        assert_eq!(
            end_point_hash(&algorithm(&pss_oid, &params)),
            Ok(Some(EndPointHash::Sha384))
        );
        // Absent hashAlgorithm means SHA-1, which becomes SHA-256.
        assert_eq!(
            end_point_hash(&algorithm(&pss_oid, &[TAG_SEQUENCE, 0])),
            Ok(Some(EndPointHash::Sha256))
        );
    }

    #[test]
    fn refuses_non_der_lengths() {
        assert_eq!(
            Der::new(&[0x30, 0x80, 0, 0]).any(),
            Err(DerError::IndefiniteLength)
        );
        assert_eq!(
            Der::new(&[0x30, 0x81, 0x05]).any(),
            Err(DerError::BadLength)
        );
        assert_eq!(
            Der::new(&[0x30, 0x82, 0x00, 0x80]).any(),
            Err(DerError::BadLength)
        );
        assert_eq!(
            Der::new(&[0x1f, 0x01, 0x00]).any(),
            Err(DerError::HighTagNumber)
        );
        assert_eq!(
            Der::new(&[0x30, 0x03, 0x00]).any(),
            Err(DerError::Truncated)
        );
    }

    #[test]
    fn times_convert_to_unix_seconds() {
        let utc = |s: &str| {
            let mut bytes = vec![TAG_UTC_TIME, s.len() as u8];
            bytes.extend_from_slice(s.as_bytes());
            read_time(&mut Der::new(&bytes))
        };
        assert_eq!(utc("700101000000Z"), Ok(0));
        assert_eq!(utc("491231235959Z"), Ok(2_524_607_999));
        assert_eq!(utc("000229120000Z"), Ok(951_825_600));
        assert_eq!(utc("010229120000Z"), Err(DerError::InvalidTime));
        assert_eq!(utc("700101000000+0100"), Err(DerError::InvalidTime));
        let mut generalized = vec![TAG_GENERALIZED_TIME, 15];
        generalized.extend_from_slice(b"20380119031408Z");
        assert_eq!(read_time(&mut Der::new(&generalized)), Ok(2_147_483_648));
    }

    #[test]
    fn every_truncation_and_trailing_byte_is_refused() {
        let der = generate(&rcgen::PKCS_ECDSA_P256_SHA256, &["a.test"]);
        for len in 0..der.len() {
            assert!(parse_leaf(&der[..len]).is_err(), "prefix of {len} bytes");
        }
        let mut longer = der.to_vec();
        longer.push(0);
        assert_eq!(parse_leaf(&longer), Err(DerError::TrailingData));
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = parse_leaf(&bytes);
        }

        #[test]
        fn mutated_certificates_never_panic(position in 0usize..1024, value in any::<u8>()) {
            let der = generate(&rcgen::PKCS_ECDSA_P256_SHA256, &["a.test", "*.b.test"]);
            let mut bytes = der.to_vec();
            let len = bytes.len();
            if let Some(b) = bytes.get_mut(position % len) {
                *b = value;
            }
            let _ = parse_leaf(&bytes);
        }
    }
}
