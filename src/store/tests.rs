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

fn logged(c: &Connection) -> rusqlite::Result<i64> {
    c.query_row("SELECT count(*) FROM turn_log", [], |r| r.get(0))
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
    assert_eq!(s.write(sessions::fold).await.unwrap(), 2);
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
    assert_eq!(s.write(sessions::fold).await.unwrap(), 2);
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
    assert_eq!(
        s.write(sessions::fold).await.unwrap(),
        0,
        "nothing left to fold"
    );
    assert_eq!(s.read(sessions::count).await.unwrap(), 0);
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
    // A turn logged by a gateway that was killed before folding it.
    {
        let c = Connection::open(dir.path().join(DB_FILE)).unwrap();
        c.execute(
            "INSERT INTO turn_log (session_id, seq, message, run_id, created_at)
             VALUES ('a', 1, '{\"late\":1}', NULL, 2)",
            [],
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
}
