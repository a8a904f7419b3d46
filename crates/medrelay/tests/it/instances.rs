//! Several instances on one PostgreSQL database and one bucket: what one instance does reaches
//! the work of every other within a second.

use std::time::{Duration, Instant};

use crate::claude_mock::{Mock, Reply, extraction};
use crate::fixtures::text_pdf;
use crate::harness::{drop_postgres, eventually, fresh_bucket, fresh_postgres};
use crate::server::Server;

/// One PostgreSQL database, one bucket, shared keys and a Claude mock that answers after
/// `answer_after`: what the instances of one deployment share.
struct Deployment {
    url: String,
    name: String,
    storage: String,
    base: String,
}

impl Deployment {
    async fn new(answer_after: Duration) -> (Deployment, Mock) {
        let (url, name) = fresh_postgres().await;
        let storage = format!("s3://{}/medrelay", fresh_bucket().await);
        let mut slow = Reply::ok(extraction("read by Claude"));
        slow.delay = answer_after;
        let (mock, base) = Mock::start(vec![], Some(slow)).await;
        let deployment = Deployment {
            url,
            name,
            storage,
            base,
        };
        (deployment, mock)
    }

    /// An instance of the deployment, with `more` settings of its own.
    fn start(&self, more: &[(&str, &str)]) -> Server {
        let mut envs = vec![
            ("MEDRELAY_DATABASE_URL", self.url.as_str()),
            ("MEDRELAY_STORAGE_URL", self.storage.as_str()),
            (
                "MEDRELAY_MASTER_KEY",
                "k1:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
            ),
            (
                "MEDRELAY_JWT_SECRET",
                "a-test-secret-of-at-least-thirty-two-bytes",
            ),
            ("MEDRELAY_PROCESSOR", "anthropic"),
            ("ANTHROPIC_BASE_URL", self.base.as_str()),
            ("ANTHROPIC_API_KEY", "sk-ant-test"),
        ];
        envs.extend_from_slice(more);
        Server::start(&envs)
    }

    async fn drop(self) {
        drop_postgres(&self.name).await;
    }
}

/// A worker-only instance listens too: a job deleted through another instance while its
/// Claude call is in flight stops at once, and no further call is made for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delete_elsewhere_stops_the_attempt_on_a_worker_only_instance() {
    let (deployment, mock) = Deployment::new(Duration::from_secs(20)).await;
    let with_roles = |roles: &'static str| {
        deployment.start(&[
            ("MEDRELAY_ROLES", roles),
            ("MEDRELAY_ADMIN_LISTEN", "127.0.0.1:0"),
        ])
    };
    let api = with_roles("api");
    let worker = with_roles("worker");
    let http = reqwest::Client::new();
    let alice = api.token("alice");
    let job = api.upload(&alice, text_pdf(&["Discharge summary"])).await;
    let id = job["id"].as_str().unwrap();
    // The worker's call to Claude is in flight.
    eventually(Duration::from_secs(20), "a call in flight", || async {
        (mock.calls().len() == 1)
            .then_some(())
            .ok_or("no call yet".to_owned())
    })
    .await;
    assert_eq!(worker.metric("medrelay_jobs_running_here").await, 1.0);

    let deleted = http
        .delete(format!("{}/v1/jobs/{id}", api.addr))
        .bearer_auth(&alice)
        .send()
        .await
        .unwrap();
    assert_eq!(deleted.status(), 204);
    let answered = Instant::now();
    eventually(Duration::from_secs(5), "the attempt stopped", || async {
        let running = worker.metric("medrelay_jobs_running_here").await;
        (running == 0.0).then_some(()).ok_or(running.to_string())
    })
    .await;
    assert!(
        answered.elapsed() < Duration::from_millis(1500),
        "stopped {:?} after the delete was answered",
        answered.elapsed()
    );
    // Nothing more reaches Claude for it.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(mock.calls().len(), 1);
    drop((api, worker));
    deployment.drop().await;
}

/// One clock: instances whose own clocks are three minutes off either way agree on the
/// database's. A slow worker's lease is not stolen by a worker whose clock runs ahead, and a
/// job stored through a fast instance is not expired early by its sweeper.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skewed_instances_steal_no_lease_and_expire_nothing_early() {
    let (deployment, mock) = Deployment::new(Duration::from_secs(30)).await;
    let start = |roles: &'static str, skew: &'static str| {
        deployment.start(&[
            ("MEDRELAY_ROLES", roles),
            ("MEDRELAY_CLOCK_SKEW_MS", skew),
            ("MEDRELAY_TEMP_TTL", "2m"),
            ("MEDRELAY_LEASE", "6s"),
            ("MEDRELAY_SWEEP_INTERVAL", "500ms"),
        ])
    };
    // The API and the sweeper run three minutes ahead: to their own clock, a job is past its
    // two-minute TTL the moment it is stored.
    let ahead = start("api,sweeper", "180000");
    // The first worker runs three minutes behind: to its own clock, its leases end long ago.
    let behind = start("worker", "-180000");
    let alice = ahead.token("alice");
    let job = ahead.upload(&alice, text_pdf(&["Lab report"])).await;
    let id = job["id"].as_str().unwrap().to_owned();
    let at = |field: &str| {
        time::OffsetDateTime::parse(
            job[field].as_str().unwrap(),
            &time::format_description::well_known::Rfc3339,
        )
        .unwrap()
    };
    let real_now = medrelay::clock::now();
    assert!(
        (at("created_at") - real_now).whole_seconds().abs() < 10,
        "created on the shared clock, not three minutes ahead: {job}"
    );
    assert_eq!((at("expires_at") - at("created_at")).whole_seconds(), 120);
    eventually(
        Duration::from_secs(20),
        "the slow worker's call",
        || async {
            (mock.calls().len() == 1)
                .then_some(())
                .ok_or("no call yet".to_owned())
        },
    )
    .await;
    // A second worker, three minutes ahead, joins while the first one's call is in flight.
    let ahead_worker = start("worker", "180000");
    tokio::time::sleep(Duration::from_secs(8)).await;
    assert_eq!(mock.calls().len(), 1, "a second worker stole the lease");
    let seen = ahead.job(&alice, &id).await;
    assert_eq!(seen["status"], "processing", "not expired early: {seen}");
    assert_eq!(seen["attempts"], 1, "{seen}");
    // Its document is still stored: the fast sweeper judged its age on the shared clock.
    let store = medrelay::store::Store::open(&deployment.storage).unwrap();
    let objects = store.list_all().await.unwrap();
    assert!(
        objects.iter().any(|(key, _)| key.as_ref().contains(&id)),
        "the document was swept early: {objects:?}"
    );
    drop((ahead, behind, ahead_worker));
    deployment.drop().await;
}
