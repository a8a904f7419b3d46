//! The claim, rescue and compare-and-set rules of the job queue, table-driven in the style of
//! River's rescuer tests, on SQLite and PostgreSQL.

use std::time::Duration;

use medrelay::clock::now_millis;
use medrelay::crypto::WrappedKey;
use medrelay::db::{Db, DbError, InsertCaps, JobRow, NewJob, SlotKind};
use medrelay::ids::{JobId, LeaseToken, UserId, UserPrefix};
use medrelay::model::{DeletionReason, JobError, JobStatus};

use crate::harness;

const LEASE: Duration = Duration::from_secs(60);

async fn sqlite() -> (Db, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let db = Db::connect(&format!("sqlite://{}", dir.path().join("q.db").display()))
        .await
        .unwrap();
    (db, dir)
}

async fn postgres() -> (Db, String) {
    let (url, name) = harness::fresh_postgres().await;
    (Db::connect(&url).await.unwrap(), name)
}

/// A lease token by name.
fn lease(name: &str) -> LeaseToken {
    LeaseToken::from_raw(name)
}

/// A fresh job id, `label-uuid`.
fn new_id(label: &str) -> JobId {
    JobId::from_raw(format!("{label}-{}", uuid::Uuid::new_v4()))
}

async fn insert(db: &Db, id: &JobId) {
    db.insert_job(&job(id.clone(), "u", "p")).await.unwrap();
}

/// A queued PDF job of `user` (with `prefix`), due now.
fn job(id: JobId, user: &str, prefix: &str) -> NewJob {
    let now = now_millis();
    NewJob {
        id,
        user_id: UserId::from_raw(user),
        user_prefix: UserPrefix::from_raw(prefix),
        media_type: "application/pdf",
        size_bytes: 1,
        max_attempts: 4,
        idempotency_key: None,
        document_key: WrappedKey {
            kid: "k".into(),
            bytes: vec![0; 60],
        },
        push_token: None,
        now,
        created_at: now,
        expires_at: now + 3_600_000,
    }
}

/// Puts a job into a given state directly (what a crashed or concurrent worker left).
async fn set(db: &Db, id: &JobId, assignments: &str) {
    let sql = format!("UPDATE jobs SET {assignments} WHERE id = $1");
    match db {
        Db::Sqlite(p, ..) => sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(id)
            .execute(p)
            .await
            .map(|_| ()),
        Db::Postgres(p, ..) => sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(id)
            .execute(p)
            .await
            .map(|_| ()),
    }
    .unwrap();
}

/// The worker's periodic rescue of lapsed leases, then a claim.
async fn rescue_and_claim(db: &Db, lease: &LeaseToken, limit: i64) -> Result<Vec<JobRow>, DbError> {
    db.rescue_lost_leases().await?;
    db.claim(lease, LEASE, limit).await
}

fn error() -> JobError {
    JobError {
        code: "processing-unavailable".into(),
        message: "m".into(),
        retryable: true,
    }
}

/// One row of the table: a job left in some state, and what the rescue must do with it.
struct Case {
    name: &'static str,
    /// SQL assignments applied after a first claim (lease times are relative to now, in ms).
    state: fn(i64) -> String,
    claimed_again: bool,
    failed_as_exhausted: bool,
}

async fn rescue_table(db: &Db) {
    let cases = [
        Case {
            name: "lease just before the horizon",
            state: |now| format!("lease_until = {}", now + 1_000),
            claimed_again: false,
            failed_as_exhausted: false,
        },
        Case {
            name: "lease just after the horizon",
            state: |now| format!("lease_until = {}", now - 1),
            claimed_again: true,
            failed_as_exhausted: false,
        },
        Case {
            name: "expired lease at max attempts",
            state: |now| format!("lease_until = {}, attempts = 4", now - 1),
            claimed_again: false,
            failed_as_exhausted: true,
        },
        Case {
            name: "live lease at max attempts",
            state: |now| format!("lease_until = {}, attempts = 4", now + 1_000),
            claimed_again: false,
            failed_as_exhausted: false,
        },
        Case {
            name: "already completed",
            state: |now| {
                format!(
                    "status = 'succeeded', lease_token = NULL, lease_until = {}",
                    now - 1
                )
            },
            claimed_again: false,
            failed_as_exhausted: false,
        },
        Case {
            name: "already failed",
            state: |_| "status = 'failed', lease_token = NULL, lease_until = NULL".into(),
            claimed_again: false,
            failed_as_exhausted: false,
        },
        Case {
            name: "already cancelled",
            state: |now| format!("deleted_at = {now}, lease_until = {}", now - 1),
            claimed_again: false,
            failed_as_exhausted: false,
        },
        Case {
            name: "retry due",
            state: |now| {
                format!(
                    "status = 'retry_scheduled', lease_token = NULL, lease_until = NULL, run_at = {}",
                    now - 1
                )
            },
            claimed_again: true,
            failed_as_exhausted: false,
        },
        Case {
            name: "retry not yet due",
            state: |now| {
                format!(
                    "status = 'retry_scheduled', lease_token = NULL, lease_until = NULL, run_at = {}",
                    now + 1_000
                )
            },
            claimed_again: false,
            failed_as_exhausted: false,
        },
        Case {
            name: "expired lifetime",
            state: |now| format!("lease_until = {}, expires_at = {}", now - 1, now - 1),
            claimed_again: false,
            failed_as_exhausted: false,
        },
    ];
    for case in cases {
        let id = new_id("job");
        insert(db, &id).await;
        let first = db.claim(&lease("first"), LEASE, 100).await.unwrap();
        assert!(
            first.iter().any(|r| r.id == id),
            "{}: first claim",
            case.name
        );
        let before = db.get_job_by_id(&id).await.unwrap().unwrap();
        set(db, &id, &(case.state)(now_millis())).await;

        let exhausted = db.fail_exhausted(&error()).await.unwrap();
        assert_eq!(
            exhausted.iter().any(|r| r.id == id),
            case.failed_as_exhausted,
            "{}: exhausted",
            case.name
        );
        let again = rescue_and_claim(db, &lease("rescuer"), 100).await.unwrap();
        let rescued = again.iter().find(|r| r.id == id);
        assert_eq!(
            rescued.is_some(),
            case.claimed_again,
            "{}: claimed again",
            case.name
        );
        if let Some(row) = rescued {
            assert_eq!(
                row.attempts,
                before.attempts + 1,
                "{}: a rescue counts as an attempt",
                case.name
            );
            assert_eq!(row.lease_token, Some(lease("rescuer")));
            // The first worker is late: none of its writes change anything now.
            assert!(
                !db.complete(
                    &id,
                    &lease("first"),
                    b"late",
                    &WrappedKey {
                        kid: "k".into(),
                        bytes: vec![0; 60]
                    }
                )
                .await
                .unwrap(),
                "{}",
                case.name
            );
            assert!(
                !db.fail(&id, &lease("first"), &error(), false)
                    .await
                    .unwrap(),
                "{}",
                case.name
            );
            assert!(
                !db.schedule_retry(&id, &lease("first"), now_millis())
                    .await
                    .unwrap(),
                "{}",
                case.name
            );
            assert!(
                !db.heartbeat(&id, &lease("first"), LEASE).await.unwrap(),
                "{}",
                case.name
            );
            assert!(
                db.complete(
                    &id,
                    &lease("rescuer"),
                    b"r",
                    &WrappedKey {
                        kid: "k".into(),
                        bytes: vec![0; 60]
                    }
                )
                .await
                .unwrap(),
                "{}",
                case.name
            );
        }
        if case.failed_as_exhausted {
            let row = db.get_job_by_id(&id).await.unwrap().unwrap();
            assert_eq!(row.status, JobStatus::Failed, "{}", case.name);
            assert!(
                row.document_dek.is_none(),
                "{}: the document key is destroyed",
                case.name
            );
        }
        // Clean slate for the next case.
        set(db, &id, &format!("deleted_at = {}", now_millis())).await;
    }
}

/// riverqueue/river#1302: a rescuer that read the job before the worker completed it must not
/// overwrite the completion.
async fn completion_racing_a_rescue(db: &Db) {
    let id = new_id("race");
    insert(db, &id).await;
    assert_eq!(
        db.claim(&lease("worker"), LEASE, 10).await.unwrap().len(),
        1
    );
    // The lease runs out while the worker is still busy...
    set(db, &id, &format!("lease_until = {}", now_millis() - 1)).await;
    // ...and the worker completes just before the rescuer's claim statement runs.
    let key = WrappedKey {
        kid: "k".into(),
        bytes: vec![0; 60],
    };
    assert!(
        db.complete(&id, &lease("worker"), b"done", &key)
            .await
            .unwrap(),
        "the lease holder may still finish"
    );
    let rescued = rescue_and_claim(db, &lease("rescuer"), 10).await.unwrap();
    assert!(
        rescued.iter().all(|r| r.id != id),
        "a completed job is never rescued"
    );
    assert!(
        db.fail_exhausted(&error())
            .await
            .unwrap()
            .iter()
            .all(|r| r.id != id)
    );
    let row = db.get_job_by_id(&id).await.unwrap().unwrap();
    assert_eq!(row.status, JobStatus::Succeeded);
    assert_eq!(row.attempts, 1);

    // The other order: the rescuer claims first; the late worker's completion is refused.
    let id = new_id("race");
    insert(db, &id).await;
    db.claim(&lease("worker"), LEASE, 10).await.unwrap();
    set(db, &id, &format!("lease_until = {}", now_millis() - 1)).await;
    assert_eq!(
        rescue_and_claim(db, &lease("rescuer"), 10)
            .await
            .unwrap()
            .len(),
        1
    );
    assert!(
        !db.complete(&id, &lease("worker"), b"late", &key)
            .await
            .unwrap()
    );
    let row = db.get_job_by_id(&id).await.unwrap().unwrap();
    assert_eq!(row.status, JobStatus::Processing);
    assert_eq!(row.lease_token, Some(lease("rescuer")));
    assert_eq!(row.attempts, 2);
}

/// A job whose attempts died twice without a word (two lost leases) is not handed to a third
/// worker: it fails as an unmanaged failure, which queues a purge of its user.
async fn a_job_that_lost_its_lease_twice_is_not_claimed_a_third_time(db: &Db) {
    let id = new_id("poison");
    insert(db, &id).await;
    assert_eq!(db.claim(&lease("first"), LEASE, 10).await.unwrap().len(), 1);
    // The first worker dies: its lease runs out, a second worker rescues the job.
    set(db, &id, &format!("lease_until = {}", now_millis() - 1)).await;
    let rescued = rescue_and_claim(db, &lease("second"), 10).await.unwrap();
    assert_eq!(rescued.len(), 1);
    assert_eq!(rescued[0].lost_leases, 1);
    assert_eq!(rescued[0].attempts, 2);
    // Nothing is poisoned while the second worker's lease is live.
    assert!(db.fail_poisoned(&error()).await.unwrap().is_empty());
    // The second worker dies too: no third worker gets it.
    set(db, &id, &format!("lease_until = {}", now_millis() - 1)).await;
    assert!(
        rescue_and_claim(db, &lease("third"), 10)
            .await
            .unwrap()
            .iter()
            .all(|r| r.id != id),
        "a poison pill is never claimed a third time"
    );
    let poisoned = db.fail_poisoned(&error()).await.unwrap();
    assert_eq!(poisoned.len(), 1);
    assert_eq!(poisoned[0].id, id);
    let row = db.get_job_by_id(&id).await.unwrap().unwrap();
    assert_eq!(row.status, JobStatus::Failed);
    assert!(row.unmanaged_at.is_some(), "marked unmanaged");
    assert!(row.document_dek.is_none(), "the document key is destroyed");
    assert_eq!(row.attempts, 2);
    // The database queued a purge of the user.
    let purges = db.purges().await.unwrap();
    assert!(
        purges
            .iter()
            .any(|p| p.job_id.as_ref() == Some(&id) && p.user_prefix.as_str() == "p"),
        "{purges:?}"
    );
    // A lost lease that a graceful hand-back never produced is not counted for queued jobs.
    let fresh = new_id("fresh");
    insert(db, &fresh).await;
    let claimed = db.claim(&lease("fourth"), LEASE, 10).await.unwrap();
    let row = claimed.iter().find(|r| r.id == fresh).unwrap();
    assert_eq!(row.lost_leases, 0);
    set(db, &fresh, &format!("deleted_at = {}", now_millis())).await;
}

/// Two claimers at once never get the same job.
async fn concurrent_claims_never_share_a_job(db: &Db) {
    let mut ids = Vec::new();
    for _ in 0..40 {
        let id = new_id("c");
        insert(db, &id).await;
        ids.push(id);
    }
    let (a, b, c) = (lease("a"), lease("b"), lease("c"));
    let (a, b, c) = tokio::join!(
        db.claim(&a, LEASE, 20),
        db.claim(&b, LEASE, 20),
        db.claim(&c, LEASE, 20)
    );
    let mut seen = std::collections::HashSet::new();
    for row in a.unwrap().into_iter().chain(b.unwrap()).chain(c.unwrap()) {
        assert!(seen.insert(row.id.clone()), "{} claimed twice", row.id);
        assert_eq!(row.attempts, 1);
    }
    assert_eq!(seen.len(), 40);
}

/// Many claimers at once, each asking for what it has free slots for, never get more rows
/// than they asked for, and never the same row (the PostgreSQL claim picks its rows once).
async fn many_claimers_never_hold_more_than_their_free_slots(db: &Db) {
    let mut ids = std::collections::HashSet::new();
    for _ in 0..300 {
        let id = new_id("m");
        insert(db, &id).await;
        ids.insert(id);
    }
    let claimers = (0..12).map(|i| async move {
        let token = lease(&format!("claimer-{i}"));
        let slots = 1 + (i % 4) as i64;
        let mut got = Vec::new();
        loop {
            let rows = db.claim(&token, LEASE, slots).await.unwrap();
            assert!(
                rows.len() as i64 <= slots,
                "asked for {slots}, claimed {}",
                rows.len()
            );
            if rows.is_empty() {
                return got;
            }
            got.extend(rows.into_iter().map(|r| r.id));
        }
    });
    let mut seen = std::collections::HashSet::new();
    for id in futures::future::join_all(claimers)
        .await
        .into_iter()
        .flatten()
    {
        assert!(seen.insert(id.clone()), "{id} claimed twice");
    }
    // (Jobs an earlier case left due may be claimed too.)
    assert!(ids.is_subset(&seen), "every due job claimed once");
}

/// Tombstones (ids, times, reason) stay a day, then go.
async fn tombstones_last_a_day(db: &Db) {
    let (old, fresh) = (new_id("old"), new_id("fresh"));
    for id in [&old, &fresh] {
        insert(db, id).await;
        assert!(
            db.tombstone_job_of(&UserId::from_raw("u"), id, DeletionReason::Expired)
                .await
                .unwrap()
                .is_some()
        );
        let row = db.get_job_by_id(id).await.unwrap().unwrap();
        assert!(row.document_dek.is_none() && row.result.is_none() && row.error_message.is_none());
        assert_eq!(
            row.owner, "p",
            "a tombstone keeps the opaque prefix, not the user id"
        );
        assert!(row.user_id().is_none());
    }
    // A reason written by a newer version reads as a deletion instead of failing the read
    // (one such row must not stop the sweeper).
    set(db, &fresh, "deleted_reason = 'from-a-newer-version'").await;
    let row = db.get_job_by_id(&fresh).await.unwrap().unwrap();
    assert_eq!(row.deleted_reason, Some(DeletionReason::DeletedByUser));
    let day = 24 * 3600 * 1000;
    set(
        db,
        &old,
        &format!("deleted_at = {}", now_millis() - day - 1000),
    )
    .await;
    db.drop_tombstones(now_millis() - day).await.unwrap();
    assert!(db.get_job_by_id(&old).await.unwrap().is_none());
    assert!(db.get_job_by_id(&fresh).await.unwrap().is_some());
    // Deleting again is a no-op, not an error.
    assert!(
        db.tombstone_job_of(
            &UserId::from_raw("u"),
            &fresh,
            DeletionReason::DeletedByUser
        )
        .await
        .unwrap()
        .is_none()
    );
}

/// Runs a statement as it is (bulk rows for a plan test).
async fn raw(db: &Db, sql: &str) {
    let sql = sql.to_owned();
    match db {
        Db::Sqlite(p, ..) => sqlx::query(sqlx::AssertSqlSafe(sql))
            .execute(p)
            .await
            .map(|_| ()),
        Db::Postgres(p, ..) => sqlx::query(sqlx::AssertSqlSafe(sql))
            .execute(p)
            .await
            .map(|_| ()),
    }
    .unwrap();
}

/// The claim costs the same at any backlog: with 10,000 finished jobs inside the TTL, 10,000
/// jobs queued for later and 10,000 under a live lease, both databases read the claim from
/// the `jobs_waiting` index in order, stop at the LIMIT, and sort nothing.
async fn the_claim_reads_only_waiting_jobs_in_index_order(db: &Db) {
    let now = now_millis();
    for (status, run_at, lease_until) in [
        ("succeeded", now - 1_000, "NULL".to_owned()),
        ("queued", now + 600_000, "NULL".to_owned()),
        ("processing", now - 1_000, (now + 600_000).to_string()),
    ] {
        let columns = "id, user_id, user_prefix, status, media_type, size_bytes, attempts, \
                       max_attempts, run_at, lease_until, created_at, updated_at, expires_at";
        let values = format!(
            "'bulk-{status}-' || n, 'u-' || (n % 500), 'p-' || (n % 500), '{status}', 'application/pdf', 1, 1, 4, {run_at}, \
             {lease_until}, {now}, {now}, {}",
            now + 3_600_000
        );
        raw(
            db,
            &match db {
                Db::Sqlite(..) => format!(
                    "WITH RECURSIVE series(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM series \
                     WHERE n < 10000) INSERT INTO jobs ({columns}) SELECT {values} FROM series"
                ),
                Db::Postgres(..) => format!(
                    "INSERT INTO jobs ({columns}) SELECT {values} \
                     FROM generate_series(1, 10000) AS series(n)"
                ),
            },
        )
        .await;
    }
    raw(db, "ANALYZE").await;
    let plan = db.explain_claim().await.unwrap().join("\n");
    assert!(plan.contains("jobs_waiting"), "the claim's plan:\n{plan}");
    match db {
        Db::Sqlite(..) => assert!(
            !plan.contains("TEMP B-TREE") && !plan.contains("SCAN jobs"),
            "the claim's plan:\n{plan}"
        ),
        Db::Postgres(..) => assert!(
            !plan.contains("Sort") && !plan.contains("Seq Scan") && plan.contains("Limit"),
            "the claim's plan:\n{plan}"
        ),
    }
    // The caller's list reads its user's jobs through an index, not the table.
    let plan = db.explain_list_jobs().await.unwrap().join("\n");
    assert!(
        plan.contains("jobs_idempotency"),
        "the list's plan:\n{plan}"
    );
    assert!(
        !plan.contains("SCAN jobs") && !plan.contains("Seq Scan"),
        "the list's plan:\n{plan}"
    );
    // And it claims the one due job among them.
    let due = new_id("due");
    insert(db, &due).await;
    let claimed = db.claim(&lease("backlog"), LEASE, 10).await.unwrap();
    assert_eq!(
        claimed.iter().map(|r| &r.id).collect::<Vec<_>>(),
        vec![&due]
    );
    raw(db, "DELETE FROM jobs WHERE id LIKE 'bulk-%'").await;
}

/// The insert checks the user's caps itself: active jobs and recent uploads, each plus the
/// user's other uploads in flight; the upload's own slot is not counted and goes with the
/// insert; a refusal writes nothing and reports the usage the insert saw.
async fn the_insert_checks_the_caps(db: &Db) {
    let now = now_millis();
    let caps = InsertCaps {
        since: now - 3_600_000,
        active_jobs: 2,
        uploads_per_window: 3,
    };
    let user = format!("caps-{}", uuid::Uuid::new_v4().simple());
    let prefix = UserPrefix::from_raw(user.as_str());
    let insert = |own: Option<&'static str>| {
        let job = job(new_id(&user), &user, &user);
        async move {
            db.insert_job_admitted(&job, own, caps, |usage| *usage)
                .await
                .unwrap()
        }
    };
    assert!(insert(None).await.is_ok());
    assert!(insert(None).await.is_ok());
    // Two active jobs: the third is refused, and the refusal says so.
    let refused = insert(None).await.unwrap_err();
    assert_eq!((refused.active_jobs, refused.recent_uploads), (2, 2));
    assert_eq!(
        db.list_jobs(&UserId::from_raw(user.as_str()), 100)
            .await
            .unwrap()
            .len(),
        2
    );
    // One ends: room for one more active job, and its upload is the window's third.
    let claimed = db.claim(&lease("caps"), LEASE, 100).await.unwrap();
    let mine = claimed.iter().find(|r| r.user_prefix == prefix).unwrap();
    db.fail(&mine.id, &lease("caps"), &error(), false)
        .await
        .unwrap();
    // Another upload of the user's is in flight: it counts as the job it is about to become.
    let take = |id: &'static str| {
        let prefix = prefix.clone();
        async move {
            db.take_slot(
                &prefix,
                id,
                SlotKind::Upload,
                now,
                now + 60_000,
                now - 3_600_000,
                |_| Ok::<(), ()>(()),
            )
            .await
            .unwrap()
            .unwrap();
        }
    };
    take("other-upload").await;
    assert!(insert(None).await.is_err(), "1 active + 1 in flight");
    // The upload's own slot does not count against it, and goes with its insert.
    take("own-upload").await;
    db.release_slot("other-upload").await.unwrap();
    assert!(insert(Some("own-upload")).await.is_ok());
    let usage = db
        .usage(&prefix, SlotKind::Upload, now_millis(), now - 3_600_000)
        .await
        .unwrap();
    assert_eq!((usage.slots, usage.recent_uploads), (0, 3));
    // The window is full (3 uploads, one of them failed): refused, even with no job active.
    let refused = insert(None).await.unwrap_err();
    assert_eq!(refused.recent_uploads, 3);
    // A refusal writes nothing: the upload's own slot stays, for its owner to release.
    take("refused-upload").await;
    let refused = insert(Some("refused-upload")).await.unwrap_err();
    assert_eq!((refused.slots, refused.recent_uploads), (0, 3));
    let usage = db
        .usage(&prefix, SlotKind::Upload, now_millis(), now - 3_600_000)
        .await
        .unwrap();
    assert_eq!((usage.slots, usage.recent_uploads), (1, 3));
}

/// Opens half of `pool`'s connections at once and lets them go back.
async fn warm<DB: sqlx::Database>(pool: &sqlx::Pool<DB>) {
    let half = pool.options().get_max_connections() / 2;
    let conns = futures::future::try_join_all((0..half).map(|_| pool.acquire())).await;
    drop(conns.expect("half of the pool's connections"));
}

/// 24 uploads of one user reach the insert at once: exactly the cap's worth get in. Each
/// insert's counts must see every job committed before it got the user's lock (on
/// PostgreSQL a single statement would count from a snapshot taken before it waited).
async fn concurrent_inserts_stop_at_the_cap(db: &Db) {
    let now = now_millis();
    let caps = InsertCaps {
        since: now - 3_600_000,
        active_jobs: 5,
        uploads_per_window: 120,
    };
    let user = format!("race-{}", uuid::Uuid::new_v4().simple());
    // Connections open first, so that the inserts do run side by side (half of the pool: the
    // rest may sit in held slots, db/held.rs).
    match db {
        Db::Sqlite(p, ..) => warm(p).await,
        Db::Postgres(p, ..) => warm(p).await,
    }
    let inserts = (0..24).map(|_| {
        let job = job(new_id(&user), &user, &user);
        async move {
            db.insert_job_admitted(&job, None, caps, |usage| *usage)
                .await
        }
    });
    let outcomes = futures::future::join_all(inserts).await;
    let admitted = outcomes.iter().filter(|o| matches!(o, Ok(Ok(_)))).count();
    let refused: Vec<_> = outcomes
        .iter()
        .filter_map(|o| match o {
            Ok(Err(usage)) => Some(usage.active_jobs),
            _ => None,
        })
        .collect();
    assert_eq!((admitted, refused.len()), (5, 19), "{outcomes:?}");
    assert!(refused.iter().all(|active| *active == 5), "{refused:?}");
    let listed = db
        .list_jobs(&UserId::from_raw(user.as_str()), 100)
        .await
        .unwrap();
    assert_eq!(listed.len(), 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_insert_checks_the_caps_on_sqlite() {
    let (db, _dir) = sqlite().await;
    the_insert_checks_the_caps(&db).await;
    concurrent_inserts_stop_at_the_cap(&db).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_insert_checks_the_caps_on_postgres() {
    let (db, name) = postgres().await;
    the_insert_checks_the_caps(&db).await;
    concurrent_inserts_stop_at_the_cap(&db).await;
    db.close().await;
    harness::drop_postgres(&name).await;
}

/// On PostgreSQL an insert that waits for the user's lock counts the job committed by the
/// transaction that held it: the counts read after the lock, not from a snapshot taken before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_insert_waiting_for_the_users_lock_counts_what_committed_meanwhile() {
    let (db, name) = postgres().await;
    let Db::Postgres(pool, ..) = &db else {
        unreachable!()
    };
    let now = now_millis();
    let caps = InsertCaps {
        since: now - 3_600_000,
        active_jobs: 1,
        uploads_per_window: 120,
    };
    let user = format!("waiter-{}", uuid::Uuid::new_v4().simple());
    // Another instance holds the user's lock and inserts the user's one allowed job.
    let mut holder = pool.begin().await.unwrap();
    sqlx::query("INSERT INTO user_limits (user_prefix) VALUES ($1) ON CONFLICT DO NOTHING")
        .bind(&user)
        .execute(&mut *holder)
        .await
        .unwrap();
    sqlx::query("SELECT 1 FROM user_limits WHERE user_prefix = $1 FOR UPDATE")
        .bind(&user)
        .execute(&mut *holder)
        .await
        .unwrap();
    sqlx::query(
        "INSERT INTO jobs (id, user_id, user_prefix, status, media_type, size_bytes, attempts, \
         max_attempts, run_at, created_at, updated_at, expires_at) \
         VALUES ($1, $2, $2, 'queued', 'application/pdf', 1, 0, 4, $3, $3, $3, $3 + 3600000)",
    )
    .bind(new_id(&user))
    .bind(&user)
    .bind(now)
    .execute(&mut *holder)
    .await
    .unwrap();
    let waiter = {
        let (db, job) = (db.clone(), job(new_id(&user), &user, &user));
        tokio::spawn(async move {
            db.insert_job_admitted(&job, None, caps, |usage| *usage)
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !waiter.is_finished(),
        "the insert did not wait for the user's lock"
    );
    holder.commit().await.unwrap();
    let refused = waiter.await.unwrap().unwrap().unwrap_err();
    assert_eq!(refused.active_jobs, 1);
    db.close().await;
    harness::drop_postgres(&name).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_claim_plan_holds_on_sqlite() {
    let (db, _dir) = sqlite().await;
    the_claim_reads_only_waiting_jobs_in_index_order(&db).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_claim_plan_holds_on_postgres() {
    let (db, name) = postgres().await;
    the_claim_reads_only_waiting_jobs_in_index_order(&db).await;
    db.close().await;
    harness::drop_postgres(&name).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rescue_rules_hold_on_sqlite() {
    let (db, _dir) = sqlite().await;
    rescue_table(&db).await;
    completion_racing_a_rescue(&db).await;
    a_job_that_lost_its_lease_twice_is_not_claimed_a_third_time(&db).await;
    concurrent_claims_never_share_a_job(&db).await;
    many_claimers_never_hold_more_than_their_free_slots(&db).await;
    tombstones_last_a_day(&db).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rescue_rules_hold_on_postgres() {
    let (db, name) = postgres().await;
    rescue_table(&db).await;
    completion_racing_a_rescue(&db).await;
    a_job_that_lost_its_lease_twice_is_not_claimed_a_third_time(&db).await;
    concurrent_claims_never_share_a_job(&db).await;
    many_claimers_never_hold_more_than_their_free_slots(&db).await;
    tombstones_last_a_day(&db).await;
    db.close().await;
    harness::drop_postgres(&name).await;
}

/// The pool skips sqlx's ping before every statement (issue #14) but still pings a connection
/// that sat idle: one the database cut meanwhile is replaced, not handed to a statement.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_cut_while_idle_is_replaced_before_use() {
    let (db, name) = postgres().await;
    let id = JobId::new();
    let (user, prefix) = (UserId::from_raw("u"), UserPrefix::from_raw("p"));
    assert!(db.get_job_by_id(&id).await.unwrap().is_none());
    // A poll's read runs on a connection held out of the pool (db/held.rs): cut that too.
    assert!(
        db.get_job_or_tombstone(&user, &prefix, &id)
            .await
            .unwrap()
            .is_none()
    );
    // Every backend of the database goes: the held one too (it may be the pool's only one).
    assert!(
        harness::terminate_backends(&name).await >= 1,
        "no connection was found to cut"
    );
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    for _ in 0..3 {
        db.get_job_by_id(&id)
            .await
            .expect("a statement after the database cut an idle connection");
        db.get_job_or_tombstone(&user, &prefix, &id)
            .await
            .expect("a held statement after the database cut an idle connection");
    }
    // Cut while busy (no idle ping): each cut connection fails the one statement that meets
    // it and is then closed, so the reads recover within the pool's 16 connections.
    harness::terminate_backends(&name).await;
    let mut failed = 0;
    while db.get_job_or_tombstone(&user, &prefix, &id).await.is_err() {
        failed += 1;
        assert!(failed <= 16, "reads did not recover after a cut");
    }
    for _ in 0..3 {
        db.get_job_or_tombstone(&user, &prefix, &id)
            .await
            .expect("a held statement after the cut connections were closed");
    }
    db.close().await;
    harness::drop_postgres(&name).await;
}

/// The next notification's ids, within 5 s.
async fn next(notes: &mut medrelay::db::JobNotifications) -> Vec<JobId> {
    tokio::time::timeout(Duration::from_secs(5), notes.recv())
        .await
        .expect("a notification within 5 s")
        .unwrap()
}

/// What reaches other instances on PostgreSQL: the database announces every change but an
/// insert (nobody can follow a job before its 202), a claim and a success; those two the
/// instance that made them announces itself, several ids to a NOTIFY (issue #14).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_database_announces_every_change_but_inserts_claims_and_successes() {
    let (db, name) = postgres().await;
    // A job whose upload carried a push token (set before anyone listens).
    let done = new_id("done");
    insert(&db, &done).await;
    set(
        &db,
        &done,
        "push_token = 'sealed', push_kek = 'k', push_dek = 'wrapped'",
    )
    .await;
    let mut notes = db.listen().await.unwrap().expect("PostgreSQL listens");
    let key = WrappedKey {
        kid: "k".into(),
        bytes: vec![0; 60],
    };
    // Claimed, succeeded and its push token taken: nothing from the database.
    let claimed = db.claim(&lease("w"), LEASE, 1).await.unwrap();
    assert_eq!(claimed.len(), 1);
    assert!(db.complete(&done, &lease("w"), b"r", &key).await.unwrap());
    assert!(db.take_push_token(&done).await.unwrap());
    // Inserted, claimed, then retried and deleted: each of those two is announced.
    let retried = new_id("retried");
    insert(&db, &retried).await;
    assert_eq!(db.claim(&lease("w"), LEASE, 1).await.unwrap().len(), 1);
    assert!(
        db.schedule_retry(&retried, &lease("w"), now_millis() + 60_000)
            .await
            .unwrap()
    );
    db.tombstone_job(&retried, DeletionReason::DeletedByUser)
        .await
        .unwrap()
        .expect("a live job to delete");
    // An instance's own batch.
    let other = new_id("other");
    db.announce(&[done.clone(), other.clone()]).await.unwrap();

    let ids = |ids: Vec<JobId>| {
        ids.iter()
            .map(|id| id.as_str().to_owned())
            .collect::<Vec<_>>()
    };
    let (retried, done, other) = (retried.as_str(), done.as_str(), other.as_str());
    assert_eq!(ids(next(&mut notes).await), [retried], "the retry");
    assert_eq!(ids(next(&mut notes).await), [retried], "the delete");
    assert_eq!(ids(next(&mut notes).await), [done, other], "the batch");
    // The listener holds a connection of the pool, which closing waits for.
    drop(notes);
    db.close().await;
    harness::drop_postgres(&name).await;
}
