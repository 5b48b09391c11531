//! Behaviour of the store through its traits, on the redb implementation.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use starling_sasl::{HashAlgo, ScramCredentials, derive_credentials, verify_plain_password};

use crate::*;

/// A directory under the system temp dir, removed with everything in it on drop.
struct TempDir {
    path: PathBuf,
}

impl TempDir {
    fn new(tag: &str) -> TempDir {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let path = std::env::temp_dir().join(format!(
            "starling-store-{tag}-{}-{}-{nanos}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&path).unwrap();
        TempDir { path }
    }

    fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

fn store() -> RedbStore {
    RedbStore::open_in_memory().unwrap()
}

fn user(local: &str) -> BareUser {
    BareUser::new("capulet.example", local)
}

/// Credentials for all three hashes, with few iterations to keep tests fast.
fn all_creds(password: &str) -> Vec<ScramCredentials> {
    HashAlgo::ALL
        .into_iter()
        .map(|h| derive_credentials(h, password, b"salt-for-tests!!", 8).unwrap())
        .collect()
}

fn item(jid: &str, subscription: &str) -> RosterItem {
    RosterItem {
        jid: jid.into(),
        name: Some(format!("name of {jid}")),
        subscription: subscription.into(),
        ask: false,
        groups: vec!["Friends".into()],
    }
}

#[tokio::test]
async fn account_lifecycle() {
    let s = store();
    let juliet = user("juliet");
    assert!(!s.exists(&juliet).await.unwrap());
    assert_eq!(
        s.credentials(&juliet, HashAlgo::Sha256).await.unwrap(),
        None
    );

    s.create(&juliet, all_creds("r0meo")).await.unwrap();
    assert!(s.exists(&juliet).await.unwrap());
    assert_eq!(
        s.create(&juliet, all_creds("x")).await,
        Err(StoreError::Conflict)
    );
    for hash in HashAlgo::ALL {
        let c = s.credentials(&juliet, hash).await.unwrap().unwrap();
        assert_eq!(c.hash, hash);
        assert!(verify_plain_password(&c, "r0meo"));
    }

    // Password change replaces every hash; a partial set leaves the others absent.
    s.set_credentials(&juliet, all_creds("balcony"))
        .await
        .unwrap();
    let c = s
        .credentials(&juliet, HashAlgo::Sha512)
        .await
        .unwrap()
        .unwrap();
    assert!(verify_plain_password(&c, "balcony"));
    assert!(!verify_plain_password(&c, "r0meo"));
    let only_256 = derive_credentials(HashAlgo::Sha256, "nurse", b"0123456789abcdef", 8).unwrap();
    s.set_credentials(&juliet, vec![only_256.clone()])
        .await
        .unwrap();
    assert_eq!(
        s.credentials(&juliet, HashAlgo::Sha256).await.unwrap(),
        Some(only_256)
    );
    assert_eq!(s.credentials(&juliet, HashAlgo::Sha1).await.unwrap(), None);

    s.delete(&juliet).await.unwrap();
    assert!(!s.exists(&juliet).await.unwrap());
    assert_eq!(s.delete(&juliet).await, Err(StoreError::NotFound));
    assert_eq!(
        s.set_credentials(&juliet, all_creds("x")).await,
        Err(StoreError::NotFound)
    );
}

#[tokio::test]
async fn malformed_credentials_are_refused() {
    let s = store();
    let mut bad = all_creds("pw");
    bad[0].server_key.clear();
    assert!(matches!(
        s.create(&user("juliet"), bad).await,
        Err(StoreError::InvalidInput(_))
    ));
    assert!(!s.exists(&user("juliet")).await.unwrap());
}

#[tokio::test]
async fn list_and_count_by_domain() {
    let s = store();
    // Domains and localparts that prefix each other must not leak into one another.
    for (domain, local) in [
        ("capulet.example", "juliet"),
        ("capulet.example", "nurse"),
        ("capulet.example", "jul"),
        ("capulet.examples", "tybalt"),
        ("capulet.exampl", "lady"),
        ("montague.example", "romeo"),
    ] {
        s.create(&BareUser::new(domain, local), all_creds("pw"))
            .await
            .unwrap();
    }
    assert_eq!(
        s.list("capulet.example").await.unwrap(),
        vec!["jul", "juliet", "nurse"]
    );
    assert_eq!(s.count("capulet.example").await.unwrap(), 3);
    assert_eq!(s.count("montague.example").await.unwrap(), 1);
    assert_eq!(
        s.list("verona.example").await.unwrap(),
        Vec::<String>::new()
    );
    assert_eq!(s.count("verona.example").await.unwrap(), 0);
}

#[tokio::test]
async fn roster_items_and_versions() {
    let s = store();
    let juliet = user("juliet");
    assert_eq!(s.roster(&juliet).await.unwrap(), Roster::default());
    assert_eq!(
        s.set_roster_item(&juliet, item("romeo@montague.example", "none"))
            .await,
        Err(StoreError::NotFound)
    );

    s.create(&juliet, all_creds("pw")).await.unwrap();
    assert_eq!(
        s.set_roster_item(&juliet, item("romeo@montague.example", "none"))
            .await
            .unwrap(),
        1
    );
    assert_eq!(
        s.set_roster_item(&juliet, item("nurse@capulet.example", "both"))
            .await
            .unwrap(),
        2
    );
    let mut romeo = item("romeo@montague.example", "both");
    romeo.ask = true;
    romeo.groups = vec![];
    romeo.name = None;
    assert_eq!(s.set_roster_item(&juliet, romeo.clone()).await.unwrap(), 3);

    let roster = s.roster(&juliet).await.unwrap();
    assert_eq!(roster.version, 3);
    assert_eq!(
        roster.items,
        vec![item("nurse@capulet.example", "both"), romeo.clone()]
    );
    assert_eq!(
        s.roster_item(&juliet, "romeo@montague.example")
            .await
            .unwrap(),
        Some(romeo)
    );
    assert_eq!(s.roster_item(&juliet, "tybalt@x").await.unwrap(), None);

    assert_eq!(
        s.remove_roster_item(&juliet, "nurse@capulet.example")
            .await
            .unwrap(),
        4
    );
    assert_eq!(
        s.remove_roster_item(&juliet, "nurse@capulet.example").await,
        Err(StoreError::NotFound)
    );
    let roster = s.roster(&juliet).await.unwrap();
    assert_eq!((roster.version, roster.items.len()), (4, 1));

    // Another user whose localpart extends juliet's sees none of her items.
    let julietta = user("julietta");
    s.create(&julietta, all_creds("pw")).await.unwrap();
    assert_eq!(s.roster(&julietta).await.unwrap(), Roster::default());
}

#[tokio::test]
async fn offline_queue_with_quota() {
    let s = store();
    let juliet = user("juliet");
    assert_eq!(
        s.push_offline(&juliet, Bytes::from_static(b"<message/>"), 10)
            .await,
        Err(StoreError::NotFound)
    );
    s.create(&juliet, all_creds("pw")).await.unwrap();
    assert_eq!(s.pop_offline(&juliet).await.unwrap(), Vec::<Bytes>::new());

    let messages: Vec<Bytes> = (0..12)
        .map(|i| Bytes::from(format!("<message id='{i}'/>")))
        .collect();
    for m in &messages {
        s.push_offline(&juliet, m.clone(), 12).await.unwrap();
    }
    assert_eq!(s.count_offline(&juliet).await.unwrap(), 12);
    assert_eq!(
        s.push_offline(&juliet, Bytes::from_static(b"<message/>"), 12)
            .await,
        Err(StoreError::QuotaExceeded)
    );
    assert_eq!(s.count_offline(&juliet).await.unwrap(), 12);

    assert_eq!(s.pop_offline(&juliet).await.unwrap(), messages);
    assert_eq!(s.count_offline(&juliet).await.unwrap(), 0);
    assert_eq!(s.pop_offline(&juliet).await.unwrap(), Vec::<Bytes>::new());

    // The quota counts again from empty.
    s.push_offline(&juliet, Bytes::from_static(b"<a/>"), 1)
        .await
        .unwrap();
    assert_eq!(
        s.push_offline(&juliet, Bytes::from_static(b"<b/>"), 1)
            .await,
        Err(StoreError::QuotaExceeded)
    );
    assert_eq!(
        s.pop_offline(&juliet).await.unwrap(),
        vec![Bytes::from_static(b"<a/>")]
    );
}

#[tokio::test]
async fn private_xml_by_namespace() {
    let s = store();
    let juliet = user("juliet");
    let ns = "storage:bookmarks";
    assert_eq!(
        s.set_private_xml(&juliet, ns, Bytes::from_static(b"<storage/>"))
            .await,
        Err(StoreError::NotFound)
    );
    s.create(&juliet, all_creds("pw")).await.unwrap();
    assert_eq!(s.private_xml(&juliet, ns).await.unwrap(), None);
    s.set_private_xml(
        &juliet,
        ns,
        Bytes::from_static(b"<storage xmlns='storage:bookmarks'/>"),
    )
    .await
    .unwrap();
    s.set_private_xml(&juliet, "x:other", Bytes::from_static(b"<o/>"))
        .await
        .unwrap();
    s.set_private_xml(
        &juliet,
        ns,
        Bytes::from_static(b"<storage xmlns='storage:bookmarks'><c/></storage>"),
    )
    .await
    .unwrap();
    assert_eq!(
        s.private_xml(&juliet, ns).await.unwrap().as_deref(),
        Some(&b"<storage xmlns='storage:bookmarks'><c/></storage>"[..])
    );
    assert_eq!(
        s.private_xml(&juliet, "x:other").await.unwrap().as_deref(),
        Some(&b"<o/>"[..])
    );
    assert_eq!(s.private_xml(&juliet, "x:none").await.unwrap(), None);
}

#[tokio::test]
async fn vcard_get_set() {
    let s = store();
    let juliet = user("juliet");
    assert_eq!(
        s.set_vcard(&juliet, Bytes::from_static(b"<vCard/>")).await,
        Err(StoreError::NotFound)
    );
    s.create(&juliet, all_creds("pw")).await.unwrap();
    assert_eq!(s.vcard(&juliet).await.unwrap(), None);
    s.set_vcard(&juliet, Bytes::from_static(b"<vCard xmlns='vcard-temp'/>"))
        .await
        .unwrap();
    s.set_vcard(
        &juliet,
        Bytes::from_static(b"<vCard xmlns='vcard-temp'><FN>J</FN></vCard>"),
    )
    .await
    .unwrap();
    assert_eq!(
        s.vcard(&juliet).await.unwrap().as_deref(),
        Some(&b"<vCard xmlns='vcard-temp'><FN>J</FN></vCard>"[..])
    );
}

async fn fill(s: &RedbStore, u: &BareUser) {
    s.create(u, all_creds("pw")).await.unwrap();
    s.set_roster_item(u, item("romeo@montague.example", "both"))
        .await
        .unwrap();
    s.set_roster_item(u, item("nurse@capulet.example", "from"))
        .await
        .unwrap();
    s.push_offline(u, Bytes::from_static(b"<message/>"), 10)
        .await
        .unwrap();
    s.set_private_xml(u, "storage:bookmarks", Bytes::from_static(b"<storage/>"))
        .await
        .unwrap();
    s.set_vcard(u, Bytes::from_static(b"<vCard/>"))
        .await
        .unwrap();
    s.set_last_unavailable(u, last(1, "gone")).await.unwrap();
}

fn last(stamp_ms: u64, status: &str) -> LastPresence {
    LastPresence {
        stanza: Bytes::from(format!(
            "<presence type='unavailable' from='x@capulet.example/r'><status>{status}</status></presence>"
        )),
        stamp_ms,
    }
}

#[tokio::test]
async fn last_unavailable_presence_is_replaced_and_needs_an_account() {
    let s = store();
    let juliet = user("juliet");
    assert_eq!(s.last_unavailable(&juliet).await.unwrap(), None);
    assert!(matches!(
        s.set_last_unavailable(&juliet, last(1, "a")).await,
        Err(StoreError::NotFound)
    ));
    s.create(&juliet, all_creds("pw")).await.unwrap();
    s.set_last_unavailable(&juliet, last(1_700_000_000_123, "first"))
        .await
        .unwrap();
    let stored = last(u64::MAX, "second");
    s.set_last_unavailable(&juliet, stored.clone())
        .await
        .unwrap();
    assert_eq!(s.last_unavailable(&juliet).await.unwrap(), Some(stored));
    assert_eq!(s.last_unavailable(&user("romeo")).await.unwrap(), None);
}

#[tokio::test]
async fn deleting_an_account_deletes_all_its_data() {
    let s = store();
    let juliet = user("juliet");
    // Neighbours in key order on both sides must survive.
    let jul = user("jul");
    let julietta = user("julietta");
    fill(&s, &jul).await;
    let per_user = s.total_rows().unwrap();
    fill(&s, &juliet).await;
    fill(&s, &julietta).await;
    assert_eq!(s.total_rows().unwrap(), 3 * per_user);

    s.delete(&juliet).await.unwrap();
    assert_eq!(s.total_rows().unwrap(), 2 * per_user);
    assert_eq!(s.roster(&juliet).await.unwrap(), Roster::default());
    assert_eq!(s.count_offline(&juliet).await.unwrap(), 0);
    assert_eq!(s.pop_offline(&juliet).await.unwrap(), Vec::<Bytes>::new());
    assert_eq!(
        s.private_xml(&juliet, "storage:bookmarks").await.unwrap(),
        None
    );
    assert_eq!(s.vcard(&juliet).await.unwrap(), None);
    assert_eq!(s.last_unavailable(&juliet).await.unwrap(), None);
    for other in [&jul, &julietta] {
        assert_eq!(s.roster(other).await.unwrap().items.len(), 2);
        assert_eq!(s.count_offline(other).await.unwrap(), 1);
        assert!(s.vcard(other).await.unwrap().is_some());
    }

    // A new account of the same name starts empty.
    s.create(&juliet, all_creds("pw")).await.unwrap();
    assert_eq!(s.roster(&juliet).await.unwrap(), Roster::default());
}

#[tokio::test]
async fn reopening_the_file_keeps_data() {
    let dir = TempDir::new("reopen");
    let file = dir.path().join("starling.redb");
    let juliet = user("juliet");
    {
        let s = RedbStore::open(&file).unwrap();
        fill(&s, &juliet).await;
    }
    let s = RedbStore::open(&file).unwrap();
    assert!(s.exists(&juliet).await.unwrap());
    let c = s
        .credentials(&juliet, HashAlgo::Sha1)
        .await
        .unwrap()
        .unwrap();
    assert!(verify_plain_password(&c, "pw"));
    let roster = s.roster(&juliet).await.unwrap();
    assert_eq!((roster.version, roster.items.len()), (2, 2));
    assert_eq!(s.count_offline(&juliet).await.unwrap(), 1);
    assert_eq!(
        s.private_xml(&juliet, "storage:bookmarks")
            .await
            .unwrap()
            .as_deref(),
        Some(&b"<storage/>"[..])
    );
    assert_eq!(
        s.vcard(&juliet).await.unwrap().as_deref(),
        Some(&b"<vCard/>"[..])
    );
    // Written last by `fill`, without waiting for the disk: closing the database made it
    // durable.
    assert_eq!(
        s.last_unavailable(&juliet).await.unwrap(),
        Some(last(1, "gone"))
    );
}

#[tokio::test]
async fn a_newer_schema_is_refused() {
    let dir = TempDir::new("schema");
    let file = dir.path().join("starling.redb");
    RedbStore::open(&file).unwrap().set_schema(99).unwrap();
    assert!(matches!(
        RedbStore::open(&file),
        Err(StoreError::Corrupt(_))
    ));
}

#[tokio::test]
async fn corrupt_records_are_reported() {
    let s = store();
    let juliet = user("juliet");
    s.put_raw_account(&juliet, &[42, 0, 1]).unwrap();
    assert!(matches!(
        s.credentials(&juliet, HashAlgo::Sha256).await,
        Err(StoreError::Corrupt(_))
    ));
}

#[tokio::test]
async fn concurrent_creates_of_one_account_exactly_one_wins() {
    let dir = TempDir::new("race");
    let s = Arc::new(RedbStore::open(dir.path().join("starling.redb")).unwrap());
    let creds = all_creds("pw");
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..16 {
        let s = s.clone();
        let creds = creds.clone();
        tasks.spawn(async move { s.create(&user("juliet"), creds).await });
    }
    let mut ok = 0;
    let mut conflict = 0;
    while let Some(result) = tasks.join_next().await {
        match result.unwrap() {
            Ok(()) => ok += 1,
            Err(StoreError::Conflict) => conflict += 1,
            Err(e) => panic!("unexpected error {e}"),
        }
    }
    assert_eq!((ok, conflict), (1, 15));
}

#[tokio::test]
async fn usable_as_trait_objects() {
    let all: Arc<dyn Store> = Arc::new(store());
    let accounts: Arc<dyn AccountStore> = all.clone();
    let offline: Arc<dyn OfflineStore> = all.clone();
    accounts
        .create(&user("juliet"), all_creds("pw"))
        .await
        .unwrap();
    offline
        .push_offline(&user("juliet"), Bytes::from_static(b"<m/>"), 5)
        .await
        .unwrap();
    assert_eq!(all.count_offline(&user("juliet")).await.unwrap(), 1);
    assert_eq!(user("juliet").to_string(), "juliet@capulet.example");
}
