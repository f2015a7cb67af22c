use super::*;

fn open() -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().unwrap();
    let s = Store::open(dir.path()).unwrap();
    (dir, s)
}

#[tokio::test]
async fn migrations_set_the_schema_version_and_reopen_cleanly() {
    let (dir, s) = open();
    s.close();
    let s = Store::open(dir.path()).unwrap();
    let v: i64 = s
        .read(|c| c.pragma_query_value(None, "user_version", |r| r.get(0)))
        .await
        .unwrap();
    assert_eq!(v, SCHEMA_VERSION);
}

#[test]
fn a_newer_schema_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    {
        let c = Connection::open(dir.path().join(DB_FILE)).unwrap();
        c.pragma_update(None, "user_version", SCHEMA_VERSION + 1)
            .unwrap();
    }
    let e = Store::open(dir.path()).unwrap_err();
    assert!(matches!(e, StoreError::SchemaTooNew { .. }), "{e}");
    assert!(e.to_string().contains("newer"), "{e}");
}

#[tokio::test]
async fn writes_are_visible_to_readers_after_commit() {
    let (_d, s) = open();
    s.write(|c| {
        sessions::append(
            c,
            "s1",
            &["{\"role\":\"user\",\"content\":\"hi\"}".into()],
            None,
            1,
        )
    })
    .await
    .unwrap();
    s.write(|c| {
        sessions::append(
            c,
            "s1",
            &["{\"role\":\"assistant\",\"content\":\"hi\"}".into()],
            None,
            2,
        )
    })
    .await
    .unwrap();
    let h = s.read(|c| sessions::history(c, "s1", 100)).await.unwrap();
    assert_eq!(h.len(), 2);
    assert!(h[1].contains("assistant"));
    let row = s.read(|c| sessions::get(c, "s1")).await.unwrap().unwrap();
    assert_eq!(row.messages, 2);
    assert_eq!(row.updated_at, 2);
}

#[tokio::test]
async fn a_failing_job_does_not_undo_its_batch_neighbours() {
    let (_d, s) = open();
    let mut waits = Vec::new();
    for i in 0..50 {
        let st = s.clone();
        waits.push(tokio::spawn(async move {
            st.write(move |c| {
                if i == 25 {
                    c.execute("INSERT INTO nowhere VALUES (1)", [])?;
                }
                sessions::append(c, &format!("s{i}"), &["{}".into()], None, 1)
            })
            .await
        }));
    }
    let mut failed = 0;
    for w in waits {
        if w.await.unwrap().is_err() {
            failed += 1;
        }
    }
    assert_eq!(failed, 1);
    let n = s.read(sessions::count).await.unwrap();
    assert_eq!(n, 49);
}

#[tokio::test]
async fn detached_writes_commit_in_order_before_a_later_awaited_write() {
    let (_d, s) = open();
    for i in 0..10 {
        s.write_detached("test", move |c| {
            sessions::append(c, "s", &[format!("{{\"n\":{i}}}")], None, 1)
        });
    }
    s.write(|_| Ok(())).await.unwrap();
    let h = s.read(|c| sessions::history(c, "s", 100)).await.unwrap();
    assert_eq!(h.len(), 10);
    assert_eq!(h[9], "{\"n\":9}");
}

#[tokio::test]
async fn history_limit_keeps_the_latest_messages() {
    let (_d, s) = open();
    let msgs: Vec<String> = (0..5).map(|i| format!("{{\"n\":{i}}}")).collect();
    s.write(move |c| sessions::append(c, "s", &msgs, None, 1))
        .await
        .unwrap();
    let h = s.read(|c| sessions::history(c, "s", 2)).await.unwrap();
    assert_eq!(h, vec!["{\"n\":3}".to_string(), "{\"n\":4}".to_string()]);
    assert!(s.write(|c| sessions::delete(c, "s")).await.unwrap());
    assert!(s.read(|c| sessions::get(c, "s")).await.unwrap().is_none());
    let h = s.read(|c| sessions::history(c, "s", 2)).await.unwrap();
    assert!(h.is_empty(), "messages go with their session");
}

#[tokio::test]
async fn a_new_database_is_built_aside_and_renamed_into_place() {
    let dir = tempfile::tempdir().unwrap();
    // What a crash during an earlier first start would have left.
    std::fs::write(dir.path().join("gateway.db.new"), b"half-written").unwrap();
    std::fs::write(dir.path().join("gateway.db.new-journal"), b"stale").unwrap();
    let s = Store::open(dir.path()).unwrap();
    assert!(!dir.path().join("gateway.db.new").exists());
    assert!(!dir.path().join("gateway.db.new-journal").exists());
    let (mode, version): (String, i64) = s
        .read(|c| {
            Ok((
                c.pragma_query_value(None, "journal_mode", |r| r.get(0))?,
                c.pragma_query_value(None, "user_version", |r| r.get(0))?,
            ))
        })
        .await
        .unwrap();
    assert_eq!((mode.as_str(), version), ("wal", SCHEMA_VERSION));
    s.write(|c| sessions::append(c, "s", &["{}".into()], None, 1))
        .await
        .unwrap();
    s.close();
    let s = Store::open(dir.path()).unwrap();
    assert_eq!(
        s.read(sessions::count).await.unwrap(),
        1,
        "kept across a reopen"
    );
}

/// Messages in the turn log, both tables.
fn logged(c: &Connection) -> rusqlite::Result<i64> {
    c.query_row(
        "SELECT (SELECT count(*) FROM turn_log_0) + (SELECT count(*) FROM turn_log_1)",
        [],
        |r| r.get(0),
    )
}

/// Messages in the history (a reader's connection has it attached).
fn in_history(c: &Connection) -> rusqlite::Result<i64> {
    c.query_row("SELECT count(*) FROM history.messages", [], |r| r.get(0))
}

#[tokio::test]
async fn reads_see_the_same_session_before_and_after_the_log_is_folded() {
    let d = tempfile::tempdir().unwrap();
    let s = Store::open_folding(d.path(), None).unwrap();
    // Two turns of a session folded, then two more still in the log.
    for (i, now) in [(0, 10), (1, 20)] {
        let m = vec![format!("{{\"n\":{i}}}")];
        s.write(move |c| sessions::append(c, "s", &m, None, now))
            .await
            .unwrap();
    }
    assert_eq!(s.fold().await.unwrap(), 2);
    let m: Vec<String> = (2..4).map(|i| format!("{{\"n\":{i}}}")).collect();
    let first = s
        .write(move |c| sessions::append_at(c, "s", &m, Some("run"), 30))
        .await
        .unwrap();
    assert_eq!(first, 2, "numbering goes on from the folded messages");
    let read = |s: Store| async move {
        s.read(|c| {
            Ok((
                sessions::get(c, "s")?.map(|r| (r.created_at, r.updated_at, r.messages)),
                sessions::history(c, "s", 3)?,
                sessions::count(c)?,
                logged(c)?,
            ))
        })
        .await
        .unwrap()
    };
    let (row, history, count, in_log) = read(s.clone()).await;
    assert_eq!(in_log, 2, "the last turn is still in the log");
    assert_eq!(row, Some((10, 30, 4)));
    assert_eq!(history, ["{\"n\":1}", "{\"n\":2}", "{\"n\":3}"]);
    assert_eq!(count, 1);
    assert_eq!(s.fold().await.unwrap(), 2);
    let after = read(s.clone()).await;
    assert_eq!(
        after,
        (row, history, count, 0),
        "a fold changes nothing a reader sees"
    );
    let listed = s.read(|c| sessions::list(c, 10, 0)).await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!((listed[0].messages, listed[0].updated_at), (4, 30));
}

#[tokio::test]
async fn a_session_only_in_the_log_is_found_and_deleted() {
    let d = tempfile::tempdir().unwrap();
    let s = Store::open_folding(d.path(), None).unwrap();
    s.write(|c| sessions::append(c, "new", &["{}".into(), "{}".into()], None, 5))
        .await
        .unwrap();
    let row = s.read(|c| sessions::get(c, "new")).await.unwrap().unwrap();
    assert_eq!((row.created_at, row.updated_at, row.messages), (5, 5, 2));
    assert!(s.write(|c| sessions::delete(c, "new")).await.unwrap());
    assert!(s.read(|c| sessions::get(c, "new")).await.unwrap().is_none());
    assert_eq!(s.fold().await.unwrap(), 0, "nothing left to fold");
    assert_eq!(s.read(sessions::count).await.unwrap(), 0);
}

/// Well past checkpoint::PAGES pages of WAL, in commits of their own, none waiting: 2 ×
/// PAGES messages of session `big`.
async fn fill_wal(s: &Store) {
    let page = "x".repeat(3000);
    for i in 0..(2 * checkpoint::PAGES) {
        let m = vec![format!("{{\"n\":{i},\"pad\":\"{page}\"}}")];
        s.write(move |c| sessions::append(c, "big", &m, None, i64::from(i)))
            .await
            .unwrap();
    }
}

#[tokio::test]
async fn a_long_wal_file_is_kept_while_commits_come_and_cut_once_quiet() {
    let dir = tempfile::tempdir().unwrap();
    let s = Store::open(dir.path()).unwrap();
    let wal = dir.path().join(format!("{DB_FILE}-wal"));
    let size = || std::fs::metadata(&wal).map_or(0, |m| m.len());
    fill_wal(&s).await;
    let long = size();
    assert!(
        long > u64::from(checkpoint::PAGES.unsigned_abs()) * 4096,
        "WAL of {long} bytes"
    );
    // Commits every 100 ms for three times the quiet spell: the file is not cut meanwhile
    // (each commit's pages are written where the file has room).
    let until = std::time::Instant::now() + 3 * checkpoint::QUIET;
    let mut i = 0;
    while std::time::Instant::now() < until {
        i += 1;
        s.write(move |c| sessions::append(c, "small", &["{}".into()], None, i))
            .await
            .unwrap();
        assert!(size() >= long, "the WAL file was cut while commits came");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Quiet: it is cut to nothing, and nothing is lost.
    let end = std::time::Instant::now() + checkpoint::QUIET + Duration::from_secs(10);
    while size() > 0 {
        assert!(
            std::time::Instant::now() < end,
            "the WAL file kept {} bytes once quiet",
            size()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (big, small) = s
        .read(|c| Ok((sessions::get(c, "big")?, sessions::get(c, "small")?)))
        .await
        .unwrap();
    assert_eq!(
        big.map(|r| r.messages),
        Some(i64::from(2 * checkpoint::PAGES))
    );
    assert_eq!(small.map(|r| r.messages), Some(i));
    // The next commit writes a new one.
    s.write(|c| sessions::append(c, "small", &["{}".into()], None, 0))
        .await
        .unwrap();
    assert!(size() > 0);
    s.close();
}

#[tokio::test]
async fn a_long_wal_is_checkpointed_beside_the_writer_and_commits_go_on() {
    let dir = tempfile::tempdir().unwrap();
    // No fold: the log keeps the messages in gateway.db.
    let s = Store::open_folding(dir.path(), None).unwrap();
    let db = dir.path().join(DB_FILE);
    let size = |p: &Path| std::fs::metadata(p).map_or(0, |m| m.len());
    let before = size(&db);
    let checkpoints = || {
        let text = crate::metrics::encode(false).unwrap();
        text.lines()
            .find_map(|l| l.strip_prefix("hermes_gateway_store_checkpoint_duration_seconds_count "))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap()
    };
    let done_before = checkpoints();
    fill_wal(&s).await;
    // The pages reach the database file without a close or a fold, checkpointed by the
    // checkpoint thread (the only one that counts them).
    let end = std::time::Instant::now() + Duration::from_secs(10);
    while size(&db) < before + 1_000 * 4096 || checkpoints() == done_before {
        assert!(
            std::time::Instant::now() < end,
            "the database file stayed at {} bytes",
            size(&db)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let n = s
        .read(|c| sessions::get(c, "big"))
        .await
        .unwrap()
        .map(|r| r.messages);
    assert_eq!(n, Some(i64::from(2 * checkpoint::PAGES)));
    // And it stops with the writer.
    s.close();
}

#[tokio::test]
async fn the_writer_folds_the_log_by_itself_and_at_open() {
    let dir = tempfile::tempdir().unwrap();
    let s = Store::open(dir.path()).unwrap();
    s.write(|c| sessions::append(c, "a", &["{}".into()], None, 1))
        .await
        .unwrap();
    // Idle, the writer folds within FOLD_EVERY.
    let end = std::time::Instant::now() + Duration::from_secs(5);
    while s.read(logged).await.unwrap() > 0 {
        assert!(std::time::Instant::now() < end, "the log was not folded");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    s.close();
    // A turn logged by a gateway that was killed before folding it (as `append` logs it).
    {
        let c = Connection::open(dir.path().join(DB_FILE)).unwrap();
        c.execute_batch(
            "INSERT INTO turn_log_1 (session_id, seq, message, run_id, created_at)
             VALUES ('a', 1, '{\"late\":1}', NULL, 2);
             INSERT INTO turn_log_next_1 (session_id, next, first, created_at, updated_at)
             VALUES ('a', 2, 1, 2, 2);",
        )
        .unwrap();
    }
    let s = Store::open(dir.path()).unwrap();
    let (in_log, history) = s
        .read(|c| Ok((logged(c)?, sessions::history(c, "a", 10)?)))
        .await
        .unwrap();
    assert_eq!(in_log, 0, "folded at open");
    assert_eq!(history, ["{}", "{\"late\":1}"]);
    let row = s.read(|c| sessions::get(c, "a")).await.unwrap().unwrap();
    assert_eq!((row.messages, row.created_at, row.updated_at), (2, 1, 2));
}

#[tokio::test]
async fn numbering_goes_on_across_folds_and_starts_over_after_a_delete() {
    let d = tempfile::tempdir().unwrap();
    let s = Store::open_folding(d.path(), None).unwrap();
    let append = |s: &Store, n: usize| {
        let s = s.clone();
        async move {
            let m: Vec<String> = (0..n).map(|i| format!("{{\"i\":{i}}}")).collect();
            s.write_unguarded(move |c| sessions::append_at(c, "s", &m, None, 1))
                .await
                .unwrap()
        }
    };
    assert_eq!(append(&s, 2).await, 0);
    assert_eq!(append(&s, 2).await, 2, "numbering goes on within the log");
    let (stored, history) = s.read(|c| sessions::recent(c, "s", 3)).await.unwrap();
    assert_eq!((stored, history.len()), (4, 3), "read from the log");
    assert_eq!(s.fold().await.unwrap(), 4);
    assert_eq!(append(&s, 1).await, 4, "and on from the folded messages");
    let (stored, history) = s.read(|c| sessions::recent(c, "s", 10)).await.unwrap();
    assert_eq!(stored, 5);
    assert_eq!(history.len(), 5, "log and folded messages together");
    assert!(s.write(|c| sessions::delete(c, "s")).await.unwrap());
    assert_eq!(
        s.read(|c| sessions::recent(c, "s", 10)).await.unwrap(),
        (0, Vec::new())
    );
    assert_eq!(append(&s, 1).await, 0, "a deleted session starts over");
    let next: Vec<(String, i64)> = s
        .read(|c| {
            c.prepare(
                "SELECT session_id, next FROM turn_log_next_0
                 UNION ALL SELECT session_id, next FROM turn_log_next_1",
            )?
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect()
        })
        .await
        .unwrap();
    assert_eq!(next, [("s".to_string(), 1)]);
    assert_eq!(s.fold().await.unwrap(), 1);
    let left: i64 = s
        .read(|c| {
            c.query_row(
                "SELECT (SELECT count(*) FROM turn_log_next_0)
                     + (SELECT count(*) FROM turn_log_next_1)",
                [],
                |r| r.get(0),
            )
        })
        .await
        .unwrap();
    assert_eq!(left, 0, "a fold empties the log's index of sessions too");
}

/// Keeps the writer busy with a job of 200 ms, and returns once it runs: jobs queued now
/// share the next batch.
async fn occupy_writer(s: &Store) -> tokio::task::JoinHandle<Result<(), StoreError>> {
    let busy = tokio::spawn({
        let s = s.clone();
        async move {
            s.write(|_| {
                std::thread::sleep(Duration::from_millis(200));
                Ok(())
            })
            .await
        }
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    busy
}

/// Appends one message to session `id`, awaited on a task of its own.
fn spawn_append(s: &Store, id: &'static str) -> tokio::task::JoinHandle<Result<(), StoreError>> {
    let s = s.clone();
    tokio::spawn(async move {
        s.write(move |c| sessions::append(c, id, &["{}".into()], None, 1))
            .await
    })
}

#[tokio::test]
async fn an_unguarded_failure_rolls_back_its_commit_and_the_jobs_behind_it_run_next() {
    let d = tempfile::tempdir().unwrap();
    let s = Store::open_folding(d.path(), None).unwrap();
    // The three jobs below queue up meanwhile: they share one batch.
    let busy = occupy_writer(&s).await;
    let before = spawn_append(&s, "before");
    let failing = tokio::spawn({
        let s = s.clone();
        async move {
            s.write_unguarded(|c| {
                sessions::append(c, "failing", &["{}".into()], None, 1)?;
                c.execute("INSERT INTO nowhere VALUES (1)", [])?;
                Ok(())
            })
            .await
        }
    });
    let behind = spawn_append(&s, "behind");
    busy.await.unwrap().unwrap();
    let before = before.await.unwrap();
    assert!(
        matches!(&before, Err(StoreError::Commit(m)) if m.contains("rolled back")),
        "a job of the rolled-back commit is told so: {before:?}"
    );
    assert!(matches!(failing.await.unwrap(), Err(StoreError::Sqlite(_))));
    behind
        .await
        .unwrap()
        .expect("a job queued behind the failure runs in the next commit");
    let found = s
        .read(|c| {
            Ok((
                sessions::get(c, "before")?.is_some(),
                sessions::get(c, "failing")?.is_some(),
                sessions::get(c, "behind")?.is_some(),
            ))
        })
        .await
        .unwrap();
    assert_eq!(found, (false, false, true));
}

#[tokio::test]
async fn unguarded_then_and_detached_jobs_share_their_commit_s_fate() {
    let d = tempfile::tempdir().unwrap();
    let s = Store::open_folding(d.path(), None).unwrap();
    let busy = occupy_writer(&s).await;
    let acted = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let then = tokio::spawn({
        let (s, acted) = (s.clone(), acted.clone());
        async move {
            s.write_then_unguarded(
                |c| sessions::append(c, "then", &["{}".into()], None, 1),
                move |()| acted.store(true, std::sync::atomic::Ordering::SeqCst),
            )
            .await
        }
    });
    tokio::time::sleep(Duration::from_millis(20)).await;
    // Without a savepoint, its failure undoes the whole commit, `then`'s write with it.
    s.write_detached_unguarded("a failing update", |c| {
        c.execute("UPDATE nowhere SET x = 1", []).map(|_| ())
    });
    let behind = spawn_append(&s, "behind");
    busy.await.unwrap().unwrap();
    let then = then.await.unwrap();
    assert!(
        matches!(&then, Err(StoreError::Commit(m)) if m.contains("rolled back")),
        "{then:?}"
    );
    assert!(
        !acted.load(std::sync::atomic::Ordering::SeqCst),
        "nothing acts on a write that did not commit"
    );
    behind.await.unwrap().expect("the next commit goes on");
    let found = s
        .read(|c| {
            Ok((
                sessions::get(c, "then")?.is_some(),
                sessions::get(c, "behind")?.is_some(),
            ))
        })
        .await
        .unwrap();
    assert_eq!(found, (false, true));
}

/// A connection on the history with `gateway.db` attached, as the folder has.
fn folding(dir: &Path) -> Connection {
    open_history(&dir.join(HISTORY_FILE), &dir.join(DB_FILE)).unwrap()
}

#[tokio::test]
async fn a_fold_cut_short_after_the_history_s_commit_is_done_again_without_a_double() {
    let d = tempfile::tempdir().unwrap();
    let s = Store::open_folding(d.path(), None).unwrap();
    s.write(|c| sessions::append(c, "s", &["{\"n\":0}".into(), "{\"n\":1}".into()], None, 1))
        .await
        .unwrap();
    // The fold's first two steps, and a crash before the writer empties the log.
    let table = s.write(sessions::flip).await.unwrap();
    let (moved, _) = sessions::fold_into_history(&mut folding(d.path()), table).unwrap();
    assert_eq!(moved, 2);
    let (in_log, stored, history) = s
        .read(|c| Ok((logged(c)?, in_history(c)?, sessions::history(c, "s", 10)?)))
        .await
        .unwrap();
    assert_eq!((in_log, stored), (2, 2), "in both files at once");
    assert_eq!(history, ["{\"n\":0}", "{\"n\":1}"], "and read once");
    drop(s);
    // The next open folds the log again: the copies already there are kept, not doubled.
    let s = Store::open_folding(d.path(), None).unwrap();
    let (in_log, stored, row) = s
        .read(|c| Ok((logged(c)?, in_history(c)?, sessions::get(c, "s")?)))
        .await
        .unwrap();
    assert_eq!((in_log, stored), (0, 2));
    assert_eq!(row.map(|r| r.messages), Some(2));
    s.close();
}

#[tokio::test]
async fn messages_leave_gateway_db_for_the_history_file_at_close() {
    let d = tempfile::tempdir().unwrap();
    let s = Store::open_folding(d.path(), None).unwrap();
    s.write(|c| sessions::append(c, "s", &["{}".into(), "{}".into()], None, 1))
        .await
        .unwrap();
    s.close();
    let main = Connection::open(d.path().join(DB_FILE)).unwrap();
    assert_eq!(logged(&main).unwrap(), 0, "the log is folded at close");
    let has_messages: bool = main
        .query_row(
            "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE name = 'messages')",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert!(!has_messages, "gateway.db keeps no messages table");
    let history = Connection::open(d.path().join(HISTORY_FILE)).unwrap();
    let n: i64 = history
        .query_row(
            "SELECT count(*) FROM messages WHERE session_id = 's'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(n, 2);
}

#[tokio::test]
async fn a_session_deleted_and_begun_again_under_its_id_keeps_only_its_new_messages() {
    let d = tempfile::tempdir().unwrap();
    let s = Store::open_folding(d.path(), None).unwrap();
    let old: Vec<String> = (0..3).map(|i| format!("{{\"old\":{i}}}")).collect();
    s.write(move |c| sessions::append(c, "s", &old, None, 1))
        .await
        .unwrap();
    assert_eq!(s.fold().await.unwrap(), 3);
    assert!(s.write(|c| sessions::delete(c, "s")).await.unwrap());
    // Deleted, its history not yet: nothing of it is read.
    let read = |s: Store| async move {
        s.read(|c| {
            Ok((
                sessions::history(c, "s", 10)?,
                sessions::recent(c, "s", 10)?,
                sessions::history_until(c, "s", 3, 10)?,
            ))
        })
        .await
        .unwrap()
    };
    let none: Vec<String> = Vec::new();
    assert_eq!(
        read(s.clone()).await,
        (none.clone(), (0, none.clone()), none)
    );
    let new: Vec<String> = (0..2).map(|i| format!("{{\"new\":{i}}}")).collect();
    let first = s
        .write_unguarded({
            let new = new.clone();
            move |c| sessions::append_at(c, "s", &new, None, 5)
        })
        .await
        .unwrap();
    assert_eq!(first, 0, "begun again from 0");
    let expect = (new.clone(), (2, new.clone()), new.clone());
    assert_eq!(read(s.clone()).await, expect, "before the fold");
    assert_eq!(s.fold().await.unwrap(), 2);
    assert_eq!(read(s.clone()).await, expect, "after it");
    let stored = s.read(in_history).await.unwrap();
    assert_eq!(stored, 2, "the old messages are gone from the history");
    s.close();
    let s = Store::open_folding(d.path(), None).unwrap();
    assert_eq!(read(s.clone()).await, expect, "after a reopen");
}

#[tokio::test]
async fn a_fold_that_fails_leaves_the_log_and_is_tried_again_while_idle() {
    let d = tempfile::tempdir().unwrap();
    let s = Store::open(d.path()).unwrap();
    // The history refuses every insert, as a full disk would.
    let outside = Connection::open(d.path().join(HISTORY_FILE)).unwrap();
    outside
        .execute_batch(
            "CREATE TRIGGER refuse BEFORE INSERT ON messages BEGIN SELECT RAISE(ABORT, 'refused'); END;",
        )
        .unwrap();
    s.write(|c| sessions::append(c, "s", &["{\"n\":0}".into(), "{\"n\":1}".into()], None, 1))
        .await
        .unwrap();
    // Two periods and more: folds were tried and failed, the turn is still stored.
    tokio::time::sleep(3 * FOLD_EVERY).await;
    let (in_log, history) = s
        .read(|c| Ok((logged(c)?, sessions::history(c, "s", 10)?)))
        .await
        .unwrap();
    assert_eq!(in_log, 2, "the log is kept");
    assert_eq!(history, ["{\"n\":0}", "{\"n\":1}"]);
    // The history writes again; no turn comes, and the log is folded all the same.
    outside.execute_batch("DROP TRIGGER refuse").unwrap();
    let end = std::time::Instant::now() + Duration::from_secs(10);
    while s.read(logged).await.unwrap() > 0 {
        assert!(
            std::time::Instant::now() < end,
            "the fold was not tried again"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(s.read(in_history).await.unwrap(), 2);
    s.close();
}

#[tokio::test]
async fn the_list_merges_logged_sessions_with_their_folded_rows_and_pages_through_ties() {
    let d = tempfile::tempdir().unwrap();
    let s = Store::open_folding(d.path(), None).unwrap();
    // `old`, created at 1 and folded; then 6 newer sessions, 4 of them at the same time.
    s.write(|c| sessions::append(c, "old", &["{}".into()], None, 1))
        .await
        .unwrap();
    for (id, at) in [
        ("n1", 10),
        ("n2", 20),
        ("t1", 30),
        ("t2", 30),
        ("t3", 30),
        ("t4", 30),
    ] {
        s.write(move |c| sessions::append(c, id, &["{}".into()], None, at))
            .await
            .unwrap();
    }
    assert_eq!(s.fold().await.unwrap(), 7);
    assert_eq!(s.fold().await.unwrap(), 0);
    // `old` gets a turn: it is logged, and its folded row ranks last.
    s.write(|c| sessions::append(c, "old", &["{}".into()], None, 40))
        .await
        .unwrap();
    let page = |limit: u32, offset: u32| {
        let s = s.clone();
        async move {
            s.read(move |c| sessions::list(c, limit, offset))
                .await
                .unwrap()
                .into_iter()
                .map(|r| (r.id, r.created_at, r.updated_at, r.messages))
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(
        page(1, 0).await,
        [("old".to_string(), 1, 40, 2)],
        "created when it was, not at its logged turn"
    );
    // Pages of 2 list every session once, ties in id order.
    let mut all = Vec::new();
    for offset in (0..8).step_by(2) {
        all.extend(page(2, offset).await.into_iter().map(|r| r.0));
    }
    assert_eq!(all, ["old", "t1", "t2", "t3", "t4", "n2", "n1"]);
}

#[tokio::test]
async fn commits_go_on_while_the_history_is_locked_and_the_fold_waits() {
    let d = tempfile::tempdir().unwrap();
    let s = Store::open_folding(d.path(), None).unwrap();
    s.write(|c| sessions::append(c, "a", &["{}".into()], None, 1))
        .await
        .unwrap();
    // Another connection holds the history's write lock, as a long fold would.
    let outside = Connection::open(d.path().join(HISTORY_FILE)).unwrap();
    outside.execute_batch("BEGIN IMMEDIATE").unwrap();
    let fold = tokio::spawn({
        let s = s.clone();
        async move { s.fold().await }
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    // Turns commit meanwhile: the writer never waits for the history.
    let began = std::time::Instant::now();
    for i in 0..20 {
        let m = vec![format!("{{\"i\":{i}}}")];
        s.write(move |c| sessions::append(c, "b", &m, None, 2))
            .await
            .unwrap();
    }
    assert!(
        began.elapsed() < Duration::from_secs(2),
        "commits waited {:?} for the history's lock",
        began.elapsed()
    );
    assert!(!fold.is_finished(), "the fold waits for the history's lock");
    // Everything is read meanwhile, from the log.
    let (a, b) = s
        .read(|c| Ok((sessions::recent(c, "a", 50)?, sessions::recent(c, "b", 50)?)))
        .await
        .unwrap();
    assert_eq!((a.0, a.1.len(), b.0, b.1.len()), (1, 1, 20, 20));
    outside.execute_batch("COMMIT").unwrap();
    assert_eq!(
        fold.await.unwrap().unwrap(),
        1,
        "it moves the table it left"
    );
    assert_eq!(s.fold().await.unwrap(), 20, "then the other one");
    let (in_log, stored) = s.read(|c| Ok((logged(c)?, in_history(c)?))).await.unwrap();
    assert_eq!((in_log, stored), (0, 21));
}

/// Appends, deletes, folds and every step of a fold alone (a fold cut short), in a random
/// order: after each, every session reads as a plain list of its messages would.
#[tokio::test]
async fn any_mix_of_appends_deletes_and_fold_steps_reads_every_session_right() {
    use std::collections::BTreeMap;
    let d = tempfile::tempdir().unwrap();
    let s = Store::open_folding(d.path(), None).unwrap();
    let mut history = folding(d.path());
    let mut model: BTreeMap<&'static str, Vec<String>> = BTreeMap::new();
    let ids = ["a", "b", "c"];
    // A small xorshift: the same sequence on every run, many interleavings in one.
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move |n: u64| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x % n
    };
    // The table the last flip left, and the deletions its copy applied.
    let mut left: Option<(usize, Option<Option<i64>>)> = None;
    for step in 0..600 {
        let id = ids[next(3) as usize];
        match next(10) {
            0..=3 => {
                let k = 1 + next(3) as usize;
                let held = model.entry(id).or_default();
                let m: Vec<String> = (0..k)
                    .map(|i| format!("{{\"{id}\":{},\"step\":{step}}}", held.len() + i))
                    .collect();
                held.extend(m.iter().cloned());
                s.write_unguarded(move |c| sessions::append_at(c, id, &m, None, step))
                    .await
                    .unwrap();
            }
            4 => {
                let existed = s.write(move |c| sessions::delete(c, id)).await.unwrap();
                assert_eq!(
                    existed,
                    model.remove(id).is_some(),
                    "step {step}: delete {id}"
                );
            }
            5 => left = Some((s.write(sessions::flip).await.unwrap(), None)),
            6 => {
                if let Some((table, copied)) = &mut left {
                    let (_, deletes) = sessions::fold_into_history(&mut history, *table).unwrap();
                    *copied = Some(deletes);
                }
            }
            7 => {
                if let Some((table, Some(deletes))) = left.take() {
                    s.write(move |c| sessions::clear_folded(c, table, deletes))
                        .await
                        .unwrap();
                }
            }
            _ => {
                s.fold().await.unwrap();
                left = None;
            }
        }
        for id in ids {
            let (row, recent, until) = s
                .read(move |c| {
                    Ok((
                        sessions::get(c, id)?.map(|r| r.messages),
                        sessions::recent(c, id, 4)?,
                        sessions::history_until(c, id, 3, 2)?,
                    ))
                })
                .await
                .unwrap();
            let want = model.get(id).cloned().unwrap_or_default();
            let n = want.len();
            assert_eq!(
                row,
                model.get(id).map(|m| m.len() as i64),
                "step {step}: session {id}"
            );
            assert_eq!(recent.0, n as i64, "step {step}: count of {id}");
            assert_eq!(
                recent.1,
                want[n.saturating_sub(4)..],
                "step {step}: last of {id}"
            );
            assert_eq!(
                until,
                want[n.min(1)..n.min(3)],
                "step {step}: {id} as it was at 3"
            );
        }
        let count = s.read(sessions::count).await.unwrap();
        assert_eq!(count, model.len() as i64, "step {step}: sessions");
    }
    s.close();
    let s = Store::open_folding(d.path(), None).unwrap();
    for (id, want) in &model {
        let id = *id;
        let got = s
            .read(move |c| sessions::history(c, id, 1000))
            .await
            .unwrap();
        assert_eq!(&got, want, "{id} after a reopen");
    }
}

#[tokio::test]
async fn a_version_3_database_with_an_unfolded_log_upgrades_without_losing_a_message() {
    let dir = tempfile::tempdir().unwrap();
    // What a release of schema 3 left when it was killed mid-run: a folded message and
    // two logged ones.
    {
        let c = Connection::open(dir.path().join(DB_FILE)).unwrap();
        for sql in &migrations::MAIN[..3] {
            c.execute_batch(sql).unwrap();
        }
        c.execute_batch(
            "INSERT INTO sessions (id, created_at, updated_at, messages) VALUES ('old', 1, 1, 1);
             INSERT INTO messages (session_id, seq, message, run_id, created_at)
                 VALUES ('old', 0, '{\"n\":0}', NULL, 1);
             INSERT INTO turn_log (session_id, seq, message, run_id, created_at)
                 VALUES ('old', 1, '{\"n\":1}', NULL, 2), ('old', 2, '{\"n\":2}', NULL, 3);
             PRAGMA user_version = 3;",
        )
        .unwrap();
    }
    let s = Store::open_folding(dir.path(), None).unwrap();
    let (version, history, row) = s
        .read(|c| {
            Ok((
                c.pragma_query_value(None, "user_version", |r| r.get::<_, i64>(0))?,
                sessions::recent(c, "old", 10)?,
                sessions::get(c, "old")?,
            ))
        })
        .await
        .unwrap();
    assert_eq!(version, SCHEMA_VERSION);
    assert_eq!(
        history,
        (
            3,
            vec!["{\"n\":0}".into(), "{\"n\":1}".into(), "{\"n\":2}".into()]
        )
    );
    // Its times, which migration 11 took from the log for the fold at open.
    let row = row.expect("the session");
    assert_eq!((row.created_at, row.updated_at, row.messages), (1, 3, 3));
    let (in_log, stored) = s.read(|c| Ok((logged(c)?, in_history(c)?))).await.unwrap();
    assert_eq!((in_log, stored), (0, 3), "all in history.db");
    let first = s
        .write_unguarded(|c| sessions::append_at(c, "old", &["{}".into()], None, 4))
        .await
        .unwrap();
    assert_eq!(first, 3);
}

#[tokio::test]
async fn a_read_that_straddles_a_fold_reads_each_message_once() {
    let d = tempfile::tempdir().unwrap();
    let s = Store::open_folding(d.path(), None).unwrap();
    s.write(|c| sessions::append(c, "s", &["{\"n\":0}".into(), "{\"n\":1}".into()], None, 1))
        .await
        .unwrap();
    let (mid_tx, mid_rx) = std::sync::mpsc::channel::<()>();
    let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
    let reader = std::thread::spawn({
        let s = s.clone();
        move || {
            s.read_blocking(|c| {
                let in_log = logged(c)?;
                mid_tx.send(()).unwrap();
                go_rx.recv().unwrap();
                // Its snapshot of the history is taken now, after the whole fold.
                Ok((in_log, in_history(c)?, sessions::history(c, "s", 10)?))
            })
            .unwrap()
        }
    });
    tokio::task::spawn_blocking(move || mid_rx.recv().unwrap())
        .await
        .unwrap();
    // The fold (the history's commit, then the log emptied) between the reader's reads.
    assert_eq!(s.fold().await.unwrap(), 2);
    go_tx.send(()).unwrap();
    let (in_log, in_history, history) = reader.join().unwrap();
    assert_eq!(
        (in_log, in_history),
        (2, 2),
        "the log as it was before the fold, the history after it"
    );
    assert_eq!(history, ["{\"n\":0}", "{\"n\":1}"], "each message once");
}

/// A delivery in `state`, last updated at `updated_at`, with a finished run and an event.
fn delivery_with_run(c: &Connection, id: &str, state: &str, updated_at: i64) {
    let run_id = format!("run_{id}");
    runs::insert(
        c,
        &runs::RunRow {
            id: run_id.clone(),
            session_id: None,
            status: runs::RunStatus::Completed,
            model: "m".into(),
            input: "[]".into(),
            output: Some("ok".into()),
            error: None,
            idempotency_key: None,
            request: None,
            attempt: 1,
            created_at: updated_at,
            started_at: Some(updated_at),
            finished_at: Some(updated_at),
        },
    )
    .unwrap();
    let ev = runs::EventRow {
        seq: 1,
        kind: "run.completed".into(),
        data: "{}".into(),
    };
    runs::append_event(c, &run_id, &ev, updated_at).unwrap();
    deliveries::insert(
        c,
        &deliveries::DeliveryRow {
            id: id.into(),
            route: "r".into(),
            source_id: id.into(),
            event: "e".into(),
            state: state.into(),
            prompt: "p".into(),
            session_id: None,
            run_id,
            target: r#"{"type":"log"}"#.into(),
            result: None,
            attempts: 1,
            last_error: None,
            next_attempt_at: None,
            received_at: updated_at,
            updated_at,
            progress: 0,
        },
    )
    .unwrap();
}

#[tokio::test]
async fn pruning_removes_ended_deliveries_older_than_the_cutoff_with_their_runs() {
    let (_d, s) = open();
    s.write(|c| {
        delivery_with_run(c, "old-delivered", "delivered", 1_000);
        delivery_with_run(c, "old-failed", "failed", 2_000);
        delivery_with_run(c, "old-failed-2", "failed", 2_500);
        delivery_with_run(c, "old-pending", "pending", 1_000);
        delivery_with_run(c, "old-received", "received", 1_000);
        delivery_with_run(c, "new-delivered", "delivered", 9_000);
        Ok(())
    })
    .await
    .unwrap();
    // Two per commit: the caller loops until a commit prunes fewer than asked.
    let first = s.write(|c| deliveries::prune(c, 5_000, 2)).await.unwrap();
    let second = s.write(|c| deliveries::prune(c, 5_000, 2)).await.unwrap();
    assert_eq!((first, second), (2, 1));
    let left = |sql: &'static str| {
        s.read(move |c| {
            let mut st = c.prepare(sql)?;
            st.query_map([], |r| r.get::<_, String>(0))?
                .collect::<rusqlite::Result<Vec<_>>>()
        })
    };
    assert_eq!(
        left("SELECT id FROM deliveries ORDER BY id").await.unwrap(),
        ["new-delivered", "old-pending", "old-received"]
    );
    assert_eq!(
        left("SELECT id FROM runs ORDER BY id").await.unwrap(),
        ["run_new-delivered", "run_old-pending", "run_old-received"]
    );
    assert_eq!(
        left("SELECT DISTINCT run_id FROM run_events ORDER BY run_id")
            .await
            .unwrap(),
        ["run_new-delivered", "run_old-pending", "run_old-received"]
    );
    assert_eq!(
        s.write(|c| deliveries::prune(c, 5_000, 2)).await.unwrap(),
        0
    );
}

#[tokio::test]
async fn finished_api_runs_are_pruned_past_the_cutoff_and_a_deliverys_run_is_not() {
    let (_d, s) = open();
    s.write(|c| {
        let run = |id: &str, status: runs::RunStatus, finished: Option<i64>| {
            runs::insert(
                c,
                &runs::RunRow {
                    id: id.into(),
                    session_id: None,
                    status,
                    model: "m".into(),
                    input: "[]".into(),
                    output: None,
                    error: None,
                    idempotency_key: None,
                    request: None,
                    attempt: 1,
                    created_at: 500,
                    started_at: Some(500),
                    finished_at: finished,
                },
            )?;
            let ev = runs::EventRow {
                seq: 1,
                kind: "run.started".into(),
                data: "{}".into(),
            };
            runs::append_event(c, id, &ev, 500)
        };
        run("old-completed", runs::RunStatus::Completed, Some(1_000))?;
        run("old-failed", runs::RunStatus::Failed, Some(2_000))?;
        run("old-cancelled", runs::RunStatus::Cancelled, Some(3_000))?;
        run("still-running", runs::RunStatus::Running, None)?;
        run("new-completed", runs::RunStatus::Completed, Some(9_000))?;
        // A delivery's run, old and finished: it goes with its delivery, not here.
        delivery_with_run(c, "kept", "pending", 1_000);
        Ok(())
    })
    .await
    .unwrap();
    let first = s
        .write(|c| runs::prune_finished(c, 5_000, 2))
        .await
        .unwrap();
    let second = s
        .write(|c| runs::prune_finished(c, 5_000, 2))
        .await
        .unwrap();
    let third = s
        .write(|c| runs::prune_finished(c, 5_000, 2))
        .await
        .unwrap();
    assert_eq!((first, second, third), (2, 1, 0));
    let left = |sql: &'static str| {
        s.read(move |c| {
            let mut st = c.prepare(sql)?;
            st.query_map([], |r| r.get::<_, String>(0))?
                .collect::<rusqlite::Result<Vec<_>>>()
        })
    };
    let kept = ["new-completed", "run_kept", "still-running"];
    assert_eq!(left("SELECT id FROM runs ORDER BY id").await.unwrap(), kept);
    assert_eq!(
        left("SELECT DISTINCT run_id FROM run_events ORDER BY run_id")
            .await
            .unwrap(),
        kept
    );
}

#[tokio::test]
async fn responses_are_pruned_oldest_first_up_to_the_cutoff() {
    use super::responses::{self, ResponseRow};
    let dir = tempfile::tempdir().unwrap();
    let s = Store::open(dir.path()).unwrap();
    let row = |id: &str, at: i64| ResponseRow {
        id: id.into(),
        session_id: "s".into(),
        session_end: 2,
        previous_response_id: None,
        conversation: None,
        model: "m".into(),
        instructions: None,
        input: "[]".into(),
        output: "o".into(),
        usage: None,
        metadata: None,
        created_at: at,
    };
    for (id, at) in [("resp_a", 10), ("resp_b", 20), ("resp_c", 30)] {
        let r = row(id, at);
        s.write(move |c| responses::insert(c, &r)).await.unwrap();
    }
    assert_eq!(s.write(|c| responses::prune(c, 5)).await.unwrap(), 0);
    assert_eq!(s.write(|c| responses::prune(c, 25)).await.unwrap(), 2);
    let left = s.read(|c| responses::get(c, "resp_c")).await.unwrap();
    assert_eq!(left.map(|r| r.created_at), Some(30));
    assert!(
        s.read(|c| responses::get(c, "resp_b"))
            .await
            .unwrap()
            .is_none()
    );
    assert_eq!(s.write(|c| responses::prune(c, 99)).await.unwrap(), 1);
    assert!(
        s.write(|c| responses::delete(c, "resp_c"))
            .await
            .is_ok_and(|d| !d)
    );
}

/// A database locked by another process (past the busy timeout) fails each write with an
/// "unavailable" error, whatever the kind of write; reads go on; the store is degraded
/// until a commit that writes succeeds.
#[tokio::test]
async fn a_locked_database_degrades_the_store_until_a_commit_writes_again() {
    let (dir, s) = open();
    s.write(|c| c.execute_batch("CREATE TABLE scratch(x)"))
        .await
        .unwrap();
    assert_eq!(s.degraded(), None);
    let outside = Connection::open(dir.path().join(DB_FILE)).unwrap();
    outside.execute_batch("BEGIN EXCLUSIVE").unwrap();

    let insert = |c: &Connection| c.execute("INSERT INTO scratch VALUES (1)", []);
    let (guarded, unguarded) = tokio::join!(s.write(insert), s.write_unguarded(insert));
    for e in [guarded.unwrap_err(), unguarded.unwrap_err()] {
        assert!(e.is_unavailable(), "{e}");
        assert!(matches!(e, StoreError::Unavailable(_)), "{e:?}");
        assert!(e.to_string().contains("locked"), "{e}");
    }
    assert_eq!(s.degraded().as_deref(), Some("database is locked"));
    let n: i64 = s
        .read(|c| c.query_row("SELECT count(*) FROM scratch", [], |r| r.get(0)))
        .await
        .unwrap();
    assert_eq!(n, 0, "nothing was stored");

    outside.execute_batch("ROLLBACK").unwrap();
    // A commit that writes nothing proves nothing.
    s.write(|c| c.query_row("SELECT count(*) FROM scratch", [], |r| r.get::<_, i64>(0)))
        .await
        .unwrap();
    assert!(s.degraded().is_some());
    s.write(insert).await.unwrap();
    assert_eq!(s.degraded(), None);
}
