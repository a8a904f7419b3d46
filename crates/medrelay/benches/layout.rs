//! Storage layout: per-user prefixes against one shared folder (docs/adr/storage-layout.md).
//!
//! For each store (the local folder, and S3 when AWS_ENDPOINT_URL names one, e.g. moto):
//! writes `TOTAL` small objects of which `USER` belong to one user, then measures
//! - purging that user: per-user layout `delete_prefix(user)`; shared layout either listing
//!   everything and filtering by the user's job ids, or deleting the user's keys taken from the
//!   database rows;
//! - a sweep's listing of every object (the same for both layouts).
//!
//! Run: `cargo bench -p medrelay --bench layout` (MEDRELAY_LAYOUT_TOTAL overrides 100000).

use std::collections::HashSet;
use std::time::Instant;

use bytes::Bytes;
use futures::StreamExt;
use medrelay::store::Store;
use object_store::path::Path;

const USER: usize = 1_000;

async fn fill(store: &Store, keys: &[String]) {
    futures::stream::iter(keys.iter().cloned())
        .for_each_concurrent(32, |key| async move {
            store
                .put(&Path::from(key), Bytes::from_static(b"0123456789abcdef"))
                .await
                .unwrap();
        })
        .await;
}

async fn measure(name: &str, url: &str, total: usize) {
    let store = Store::open(url).unwrap();
    let user = "u0000000000000000000000000000001";
    let ids: Vec<String> = (0..total).map(|i| format!("{i:08}-job")).collect();
    // Per-user layout: the user's jobs under its prefix, the others under 500 other users.
    let per_user: Vec<String> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| {
            if i < USER {
                format!("a/{user}/{id}/document")
            } else {
                format!("a/v{:031}/{id}/document", i % 500)
            }
        })
        .collect();
    let shared: Vec<String> = ids.iter().map(|id| format!("b/{id}")).collect();
    let started = Instant::now();
    fill(&store, &per_user).await;
    fill(&store, &shared).await;
    let fill_time = started.elapsed();

    let started = Instant::now();
    let listed = store.list_all().await.unwrap().len();
    let list_all = started.elapsed();

    let started = Instant::now();
    let deleted = store
        .delete_prefix(&format!("a/{user}").into())
        .await
        .unwrap();
    let per_user_purge = started.elapsed();
    assert_eq!(deleted as usize, USER);

    // Shared folder without an index: list everything, keep the user's job ids, delete those.
    let mine: HashSet<String> = ids[..USER].iter().map(|id| format!("b/{id}")).collect();
    let started = Instant::now();
    let all = store.list_all().await.unwrap();
    let targets: Vec<Path> = all
        .into_iter()
        .map(|(p, _)| p)
        .filter(|p| mine.contains(p.as_ref()))
        .collect();
    futures::stream::iter(targets.iter())
        .for_each_concurrent(32, |p| async { store.delete(p).await.unwrap() })
        .await;
    let shared_list_purge = started.elapsed();
    assert_eq!(targets.len(), USER);

    // Shared folder with the keys from the job rows: no listing, one delete per object.
    fill(
        &store,
        &ids[..USER]
            .iter()
            .map(|id| format!("b/{id}"))
            .collect::<Vec<_>>(),
    )
    .await;
    let started = Instant::now();
    futures::stream::iter(ids[..USER].iter())
        .for_each_concurrent(32, |id| {
            let store = &store;
            async move { store.delete(&Path::from(format!("b/{id}"))).await.unwrap() }
        })
        .await;
    let shared_keyed_purge = started.elapsed();

    println!(
        "| {name} | {total} | {listed} | {:.2} s | {:.3} s (1.00) | {:.3} s ({:.2}) | {:.3} s ({:.2}) | {:.3} s |",
        fill_time.as_secs_f64(),
        per_user_purge.as_secs_f64(),
        shared_list_purge.as_secs_f64(),
        shared_list_purge.as_secs_f64() / per_user_purge.as_secs_f64(),
        shared_keyed_purge.as_secs_f64(),
        shared_keyed_purge.as_secs_f64() / per_user_purge.as_secs_f64(),
        list_all.as_secs_f64()
    );
    store.delete_prefix(&"a".into()).await.unwrap();
    store.delete_prefix(&"b".into()).await.unwrap();
}

fn main() {
    let total: usize = std::env::var("MEDRELAY_LAYOUT_TOTAL")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    println!(
        "| store | objects per layout | listed in a sweep | fill | per-user purge | shared: list + filter | shared: keys from rows | sweep listing |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    let dir = tempfile::tempdir().unwrap();
    runtime.block_on(measure(
        "local folder",
        &format!("file://{}", dir.path().display()),
        total,
    ));
    if let Ok(endpoint) = std::env::var("AWS_ENDPOINT_URL") {
        let bucket = format!("layout-{}", uuid::Uuid::new_v4().simple());
        runtime.block_on(async {
            reqwest::Client::new()
                .put(format!("{endpoint}/{bucket}"))
                .send()
                .await
                .unwrap();
        });
        runtime.block_on(measure("S3 (moto)", &format!("s3://{bucket}"), total));
    }
}
