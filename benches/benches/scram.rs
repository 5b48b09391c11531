//! The server side of a SCRAM-SHA-256 exchange (RFC 5802 §3, RFC 7677) with stored keys, as
//! the edge runs it for every login: parse the client-first-message, build the
//! server-first-message from the stored salt and iteration count, then check the client's
//! proof against `StoredKey` and compute the server signature. No PBKDF2 runs: that is the
//! client's work (and done once per password, at registration, on the server).
//!
//! For scale, the same run times deriving the stored keys from a password at 4096 iterations
//! (what registration and a PLAIN login cost, and what a server storing plaintext would pay
//! per SCRAM login).
//!
//! The exchange uses a fixed server nonce so the client's final message can be computed once
//! outside the timed loop (a fresh nonce would put the client's HMACs into the measurement);
//! the server's work is the same for any nonce.
//!
//! `cargo bench -p starling-benches --bench scram`

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use criterion::{Criterion, criterion_group, criterion_main};
use starling_benches::load::sasl::{Mechanism as ClientMechanism, SaltCache, ScramClient};
use starling_sasl::{
    ChannelBindingInfo, HashAlgo, Mechanism, SaslServer, ScramCredentials, Step, derive_credentials,
};

const USER: &str = "device-4711";
const PASSWORD: &str = "correct horse battery staple";
const DOMAIN: &str = "example.org";
const SERVER_NONCE: &str = "3rfcNHYJY1ZVvWVs7j";

/// The stored keys, the client's two messages, and the server that checks them.
struct Exchange {
    server: SaslServer,
    credentials: ScramCredentials,
    client_first: Vec<u8>,
    client_final: Vec<u8>,
}

fn exchange() -> Exchange {
    let salt = starling_sasl::new_salt().expect("salt");
    let credentials =
        derive_credentials(HashAlgo::Sha256, PASSWORD, &salt, 4096).expect("credentials");
    let server = SaslServer::new(b"bench fake-salt key".to_vec());
    let cache = SaltCache::default();
    let mut client = ScramClient::new(ClientMechanism::ScramSha256, USER, PASSWORD, &cache);
    let client_first = B64.decode(client.client_first()).expect("base64");
    let challenge = match run_to_challenge(&server, &credentials, &client_first) {
        Step::Challenge { data, .. } => data,
        other => panic!("expected a challenge, got {other:?}"),
    };
    let client_final = B64
        .decode(
            client
                .client_final(&B64.encode(challenge))
                .expect("client final"),
        )
        .expect("base64");
    Exchange {
        server,
        credentials,
        client_first,
        client_final,
    }
}

fn run_to_challenge(server: &SaslServer, creds: &ScramCredentials, first: &[u8]) -> Step {
    match server.start(
        Mechanism::ScramSha256,
        &ChannelBindingInfo::none(),
        Some(DOMAIN),
        first,
    ) {
        Step::NeedCredentials(need) => {
            need.with_credentials_and_nonce(Some(creds.clone()), SERVER_NONCE)
        }
        other => other,
    }
}

impl Exchange {
    /// One whole server-side exchange; panics unless it succeeds.
    fn verify(&self) -> usize {
        let next = match run_to_challenge(&self.server, &self.credentials, &self.client_first) {
            Step::Challenge { next, .. } => next,
            other => panic!("expected a challenge, got {other:?}"),
        };
        match next.client_final(&self.client_final) {
            Step::Success {
                additional_data, ..
            } => additional_data.map_or(0, |d| d.len()),
            other => panic!("expected success, got {other:?}"),
        }
    }
}

fn scram(c: &mut Criterion) {
    let ex = exchange();
    assert!(ex.verify() > 0);
    let mut group = c.benchmark_group("scram-sha-256");
    group.bench_function("server-exchange-stored-keys", |b| b.iter(|| ex.verify()));
    let salt = ex.credentials.salt.clone();
    group.bench_function("derive-keys-pbkdf2-4096", |b| {
        b.iter(|| derive_credentials(HashAlgo::Sha256, PASSWORD, &salt, 4096).expect("derive"))
    });
    group.finish();
}

criterion_group!(benches, scram);
criterion_main!(benches);
