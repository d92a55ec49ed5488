//! The management API over real HTTP, against a real engine in a temporary directory:
//! authentication, the error shape and status of bad input, and the happy path an operator
//! walks (group → volume → bookmark → history → rollback job), with the audit trail it leaves.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tidemark_link::LinkProfile;
use tidemark_site::replication::session::SessionConfig;
use tidemark_site::replication::{Replication, ReplicationConfig};

use serde_json::{json, Value};
use tidemark_engine::{Engine, EngineConfig, GroupOptions, SystemClock};
use tidemark_nbd::export::{ExportError, ExportProvider};
use tidemark_site::api::{self, ApiSettings, ApiState};
use tidemark_site::events::EventLog;
use tidemark_site::nbd_adapter::EngineExports;
use tidemark_site::token::ApiToken;

/// How long a test waits for a rollback job before it fails.
const JOB_WAIT_SECONDS: u64 = 60;

struct TestSite {
    addr: SocketAddr,
    engine: Arc<Engine>,
    token: String,
    agent: ureq::Agent,
    _runtime: tokio::runtime::Runtime,
    _dir: tempfile::TempDir,
}

impl TestSite {
    fn start() -> TestSite {
        let dir = tempfile::tempdir().expect("tempdir");
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let token = ApiToken::load_or_create(dir.path()).expect("token");
        let events = Arc::new(EventLog::open(dir.path(), 1 << 20).expect("event log"));
        let engine =
            Engine::open(EngineConfig::new(dir.path().join("engine"), events.clone()), Arc::new(SystemClock))
                .expect("engine");
        let listener = runtime.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).expect("bind");
        let addr = listener.local_addr().expect("addr");
        let replication = {
            let (engine, events, dir) = (engine.clone(), events.clone(), dir.path().to_path_buf());
            runtime
                .block_on(async move {
                    let config = ReplicationConfig {
                        listen: "127.0.0.1:0".parse().expect("addr"),
                        profile: LinkProfile::default(),
                        session: SessionConfig::default(),
                    };
                    Replication::start(engine, events, &dir, "test-site", config)
                })
                .expect("replication")
        };
        let state = ApiState::new(
            ApiSettings {
                site_name: "test-site".into(),
                api_listen: addr,
                nbd_listen: "127.0.0.1:10809".parse().expect("addr"),
                body_bytes_max: 64 << 10,
                jobs_finished_max: 8,
                group_defaults: GroupOptions::default(),
            },
            engine.clone(),
            events,
            token.clone(),
            replication,
        );
        let app = api::router(state);
        runtime.spawn(async move { axum::serve(listener, app).await });
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(30)))
            .build()
            .into();
        TestSite { addr, engine, token: token.secret().to_string(), agent, _runtime: runtime, _dir: dir }
    }

    /// Send a request with the right token.
    fn call(&self, method: &str, path: &str, body: Option<&str>) -> (u16, Value) {
        self.call_as(Some(&format!("Bearer {}", self.token)), method, path, body)
    }

    /// Send a request with this Authorization header (or none).
    fn call_as(
        &self,
        authorization: Option<&str>,
        method: &str,
        path: &str,
        body: Option<&str>,
    ) -> (u16, Value) {
        let url = format!("http://{}{}", self.addr, path);
        let result = match method {
            "GET" => with_auth(self.agent.get(&url), authorization).call(),
            "DELETE" => with_auth(self.agent.delete(&url), authorization).call(),
            "POST" => with_auth(self.agent.post(&url), authorization).send(body.unwrap_or("")),
            "PUT" => with_auth(self.agent.put(&url), authorization).send(body.unwrap_or("")),
            other => panic!("unsupported method {other}"),
        };
        let mut response = result.unwrap_or_else(|e| panic!("{method} {path}: {e}"));
        let status = response.status().as_u16();
        let text = response.body_mut().read_to_string().expect("body");
        let value = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text)
                .unwrap_or_else(|e| panic!("{method} {path}: body {text:?} is not JSON: {e}"))
        };
        (status, value)
    }

    /// Poll a job until it is no longer running, and return its last view.
    fn wait_for_job(&self, job: u64) -> Value {
        let deadline = Instant::now() + Duration::from_secs(JOB_WAIT_SECONDS);
        loop {
            let (status, view) = self.call("GET", &format!("/v1/jobs/{job}"), None);
            assert_eq!(status, 200, "{view}");
            if view["state"] != "running" {
                return view;
            }
            assert!(Instant::now() < deadline, "job still running: {view}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Assert an error status and that the body is `{"error": "..."}` containing `needle`.
    fn expect_error(&self, method: &str, path: &str, body: Option<&str>, status: u16, needle: &str) {
        let (got, value) = self.call(method, path, body);
        assert_eq!(got, status, "{method} {path} {body:?}: {value}");
        let message = value["error"].as_str().unwrap_or_else(|| panic!("no error message in {value}"));
        assert!(message.contains(needle), "{method} {path}: {message:?} lacks {needle:?}");
    }
}

fn with_auth<B>(request: ureq::RequestBuilder<B>, authorization: Option<&str>) -> ureq::RequestBuilder<B> {
    match authorization {
        Some(value) => request.header("Authorization", value),
        None => request,
    }
}

#[test]
fn requests_without_the_right_token_are_refused() {
    let site = TestSite::start();
    let (status, body) = site.call_as(None, "GET", "/v1/status", None);
    assert_eq!(status, 401, "{body}");
    assert!(body["error"].as_str().is_some_and(|m| m.contains("bearer token")), "{body}");

    let (status, body) = site.call_as(Some("Bearer not-the-token-at-all"), "GET", "/v1/groups", None);
    assert_eq!(status, 403, "{body}");
    assert!(body["error"].is_string());

    let (status, _) = site.call_as(Some(&format!("Basic {}", site.token)), "GET", "/v1/groups", None);
    assert_eq!(status, 401);

    // A refused change must not happen, and must leave an audit record.
    let (status, _) =
        site.call_as(Some("Bearer wrong-token-0000000000"), "POST", "/v1/groups", Some(r#"{"name":"g"}"#));
    assert_eq!(status, 403);
    let (status, groups) = site.call("GET", "/v1/groups", None);
    assert_eq!(status, 200);
    assert_eq!(groups, json!([]));
    let (_, events) = site.call("GET", "/v1/events", None);
    let denied =
        events.as_array().expect("events").iter().find(|e| e["result"] == "denied").expect("denied event");
    assert_eq!(denied["who"], "anonymous");
    assert_eq!(denied["status"], 403);

    let (status, body) = site.call("GET", "/v1/status", None);
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["site"], "test-site");
}

#[test]
fn bad_input_is_a_400_with_a_json_error() {
    let site = TestSite::start();
    site.expect_error("POST", "/v1/groups", Some(r#"{"name": "g""#), 400, "invalid request body");
    site.expect_error("POST", "/v1/groups", Some("not json"), 400, "invalid request body");
    site.expect_error("POST", "/v1/groups", None, 400, "JSON");
    site.expect_error(
        "POST",
        "/v1/groups",
        Some(r#"{"name":"g","colour":"red"}"#),
        400,
        "unknown field `colour`",
    );
    site.expect_error("POST", "/v1/groups", Some(r#"{"name":"bad/name"}"#), 400, "invalid group name");
    site.expect_error("POST", "/v1/groups", Some(r#"{"name":".hidden"}"#), 400, "must not start");
    site.expect_error(
        "POST",
        "/v1/groups",
        Some(r#"{"name":"g","journal_max":"lots"}"#),
        400,
        r#"invalid size "lots""#,
    );
    site.expect_error(
        "POST",
        "/v1/groups",
        Some(r#"{"name":"g","retention":"a while"}"#),
        400,
        "invalid duration",
    );

    let (status, _) = site.call("POST", "/v1/groups", Some(r#"{"name":"g"}"#));
    assert_eq!(status, 201);
    site.expect_error(
        "POST",
        "/v1/volumes",
        Some(r#"{"name":"v","group":"g","size":"10XB"}"#),
        400,
        "invalid size",
    );
    site.expect_error("POST", "/v1/volumes", Some(r#"{"name":"v","group":"g","size":-1}"#), 400, "negative");
    site.expect_error(
        "POST",
        "/v1/volumes",
        Some(r#"{"name":"v","group":"g","size":1000}"#),
        400,
        "whole number",
    );
    site.expect_error(
        "POST",
        "/v1/volumes",
        Some(r#"{"name":"v","group":"g","size":0}"#),
        400,
        "more than zero",
    );
    site.expect_error(
        "POST",
        "/v1/volumes",
        Some(r#"{"name":"v","group":"g","size":"1MiB","block_size":1000}"#),
        400,
        "block_size",
    );
    site.expect_error(
        "POST",
        "/v1/volumes",
        Some(r#"{"name":"v w","group":"g","size":"1MiB"}"#),
        400,
        "invalid volume name",
    );
    site.expect_error(
        "POST",
        "/v1/groups/g/rollback",
        Some(r#"{"to":"yesterday-ish"}"#),
        400,
        "invalid point",
    );
    site.expect_error("POST", "/v1/groups/g/rollback", Some("{}"), 400, "undo");
    site.expect_error(
        "POST",
        "/v1/groups/g/rollback",
        Some(r#"{"to":"latest","undo":true}"#),
        400,
        "not both",
    );
    site.expect_error(
        "POST",
        "/v1/images",
        Some(r#"{"group":"g","at":"seq:x","name":"i"}"#),
        400,
        "invalid point",
    );
    site.expect_error("GET", "/v1/events?since=last-tuesday", None, 400, "invalid time");
    site.expect_error("GET", "/v1/jobs/abc", None, 400, "");

    let huge = format!(r#"{{"name":"{}"}}"#, "x".repeat(100 << 10));
    let (status, body) = site.call("POST", "/v1/groups", Some(&huge));
    assert_eq!(status, 413, "{body}");
    assert!(body["error"].is_string());

    // None of the bad requests reached the engine.
    let (_, volumes) = site.call("GET", "/v1/volumes", None);
    assert_eq!(volumes, json!([]));
}

#[test]
fn unknown_objects_are_404_and_duplicates_409() {
    let site = TestSite::start();
    site.expect_error("GET", "/v1/groups/nope", None, 404, "nope");
    site.expect_error("GET", "/v1/volumes/nope", None, 404, "nope");
    site.expect_error("GET", "/v1/groups/nope/history", None, 404, "nope");
    site.expect_error("POST", "/v1/groups/nope/bookmarks", Some(r#"{"name":"b"}"#), 404, "nope");
    site.expect_error("POST", "/v1/groups/nope/rollback", Some(r#"{"to":"latest"}"#), 404, "nope");
    site.expect_error(
        "POST",
        "/v1/volumes",
        Some(r#"{"name":"v","group":"nope","size":"1MiB"}"#),
        404,
        "nope",
    );
    site.expect_error("DELETE", "/v1/images/nope", None, 404, "nope");
    site.expect_error("GET", "/v1/jobs/999", None, 404, "999");
    site.expect_error("GET", "/v1/no-such-route", None, 404, "no such API route");
    site.expect_error("PUT", "/v1/groups", Some("{}"), 405, "not allowed");

    let (status, _) = site.call("POST", "/v1/groups", Some(r#"{"name":"g"}"#));
    assert_eq!(status, 201);
    site.expect_error("POST", "/v1/groups", Some(r#"{"name":"g"}"#), 409, "already exists");
    let (status, _) = site.call("POST", "/v1/volumes", Some(r#"{"name":"v","group":"g","size":"1MiB"}"#));
    assert_eq!(status, 201);
    site.expect_error(
        "POST",
        "/v1/volumes",
        Some(r#"{"name":"v","group":"g","size":"1MiB"}"#),
        409,
        "already exists",
    );
}

#[test]
fn group_volume_bookmark_history_and_rollback() {
    let site = TestSite::start();
    let (status, group) =
        site.call("POST", "/v1/groups", Some(r#"{"name":"db","retention":"2h","journal_max":"1GiB"}"#));
    assert_eq!(status, 201, "{group}");
    assert_eq!(group["name"], "db");
    assert_eq!(group["retention_seconds"], 7200);
    assert_eq!(group["journal_max_bytes"], 1u64 << 30);

    let (status, volume) =
        site.call("POST", "/v1/volumes", Some(r#"{"name":"db-data","group":"db","size":"64MiB"}"#));
    assert_eq!(status, 201, "{volume}");
    assert_eq!(volume["size_bytes"], 64u64 << 20);
    assert_eq!(volume["block_size_bytes"], 4096);
    let (status, volume) = site.call(
        "POST",
        "/v1/volumes",
        Some(r#"{"name":"db-log","group":"db","size":8388608,"block_size":512}"#),
    );
    assert_eq!(status, 201, "{volume}");
    assert_eq!(volume["block_size_bytes"], 512);

    let (status, bookmark) =
        site.call("POST", "/v1/groups/db/bookmarks", Some(r#"{"name":"before-upgrade"}"#));
    assert_eq!(status, 201, "{bookmark}");
    assert_eq!(bookmark["name"], "before-upgrade");
    site.expect_error(
        "POST",
        "/v1/groups/db/bookmarks",
        Some(r#"{"name":"before-upgrade"}"#),
        409,
        "already exists",
    );

    let (status, shown) = site.call("GET", "/v1/groups/db", None);
    assert_eq!(status, 200);
    let mut volumes: Vec<&str> =
        shown["volumes"].as_array().expect("volumes").iter().filter_map(Value::as_str).collect();
    volumes.sort_unstable();
    assert_eq!(volumes, ["db-data", "db-log"]);

    let (status, history) = site.call("GET", "/v1/groups/db/history", None);
    assert_eq!(status, 200, "{history}");
    assert_eq!(history["group"], "db");
    assert_eq!(history["bookmarks"][0]["name"], "before-upgrade");
    let (_, bookmarks) = site.call("GET", "/v1/groups/db/bookmarks", None);
    assert_eq!(bookmarks.as_array().map(Vec::len), Some(1));

    let (status, resized) = site.call("POST", "/v1/volumes/db-data/resize", Some(r#"{"size":"128MiB"}"#));
    assert_eq!(status, 200, "{resized}");
    assert_eq!(resized["size_bytes"], 128u64 << 20);

    let (status, status_body) = site.call("GET", "/v1/status", None);
    assert_eq!(status, 200);
    assert_eq!(status_body["groups"], 1);
    assert_eq!(status_body["volumes"], 2);
    assert_eq!(status_body["groups_not_ok"], json!([]));

    // Roll back to the bookmark as a job, and watch it finish.
    let (status, started) =
        site.call("POST", "/v1/groups/db/rollback", Some(r#"{"to":"bookmark:before-upgrade"}"#));
    assert_eq!(status, 202, "{started}");
    let finished = site.wait_for_job(started["job"].as_u64().expect("job id"));
    assert_eq!(finished["state"], "done", "{finished}");
    assert!(finished["result"]["target"]["seq"].is_u64(), "{finished}");
    assert_eq!(finished["group"], "db");

    let (status, image) = site.call(
        "POST",
        "/v1/images",
        Some(r#"{"group":"db","at":"bookmark:before-upgrade","name":"test-restore"}"#),
    );
    assert_eq!(status, 201, "{image}");
    assert_eq!(image["mode"], "read-only");
    let (status, _) = site.call("DELETE", "/v1/images/test-restore", None);
    assert_eq!(status, 204);
    let (status, _) = site.call("DELETE", "/v1/volumes/db-log", None);
    assert_eq!(status, 204);
    site.expect_error("GET", "/v1/volumes/db-log", None, 404, "db-log");

    // Every change is in the audit trail, with who, what, the object and the result.
    let (status, events) = site.call("GET", "/v1/events", None);
    assert_eq!(status, 200);
    let events = events.as_array().expect("events");
    let audit = |action: &str, object: &str| {
        events
            .iter()
            .find(|e| e["source"] == "api" && e["action"] == action && e["object"] == object)
            .unwrap_or_else(|| panic!("no {action} {object} event in {events:?}"))
            .clone()
    };
    let created = audit("group.create", "db");
    assert_eq!(created["who"], "admin");
    assert_eq!(created["result"], "ok");
    assert_eq!(created["detail"]["retention"], "2h");
    assert_eq!(audit("volume.create", "db-data")["group"], "db");
    assert_eq!(audit("bookmark.create", "before-upgrade")["group"], "db");
    assert_eq!(audit("volume.resize", "db-data")["result"], "ok");
    assert_eq!(audit("volume.delete", "db-log")["status"], 204);
    assert_eq!(audit("image.create", "test-restore")["result"], "ok");
    assert_eq!(audit("image.delete", "test-restore")["result"], "ok");
    assert_eq!(audit("rollback.start", "db")["status"], 202);
    assert_eq!(audit("rollback.finish", "db")["result"], "ok");
    let duplicate = events
        .iter()
        .find(|e| e["action"] == "bookmark.create" && e["result"] == "failed")
        .expect("failed bookmark event");
    assert_eq!(duplicate["status"], 409);
    assert!(duplicate["message"].as_str().is_some_and(|m| m.contains("already exists")), "{duplicate}");

    // `since` filters: nothing is newer than the future.
    let (status, none) = site.call("GET", "/v1/events?since=2999-01-01T00:00:00Z", None);
    assert_eq!(status, 200);
    assert_eq!(none, json!([]));
    let (_, two) = site.call("GET", "/v1/events?limit=2", None);
    assert_eq!(two.as_array().map(Vec::len), Some(2));
}

#[test]
fn nbd_exports_serve_volume_data_and_a_rollback_restores_it() {
    let site = TestSite::start();
    assert_eq!(site.call("POST", "/v1/groups", Some(r#"{"name":"g"}"#)).0, 201);
    assert_eq!(site.call("POST", "/v1/volumes", Some(r#"{"name":"v","group":"g","size":"1MiB"}"#)).0, 201);
    let exports = EngineExports::new(site.engine.clone());
    let listed = exports.list();
    assert_eq!(listed.len(), 1);
    assert_eq!((listed[0].name.as_str(), listed[0].size_bytes, listed[0].read_only), ("v", 1 << 20, false));
    assert!(exports.open("nope").is_none());

    let volume = exports.open("v").expect("open v");
    let mut buf = vec![0u8; 4096];
    volume.write(0, &[0xAA; 4096], true).expect("write old data");
    volume.read(0, &mut buf).expect("read");
    assert!(buf.iter().all(|&b| b == 0xAA));
    assert_eq!(site.call("POST", "/v1/groups/g/bookmarks", Some(r#"{"name":"good"}"#)).0, 201);
    volume.write(0, &[0xBB; 4096], false).expect("write new data");
    volume.flush().expect("flush");

    // Out-of-range requests are NBD range errors, not I/O errors.
    let past_end = volume.read((1 << 20) - 512, &mut buf);
    assert!(
        matches!(past_end, Err(ExportError::OutOfRange { size_bytes, .. }) if size_bytes == 1 << 20),
        "{past_end:?}"
    );
    // Blocks never written are holes that read as zeroes.
    let extents = volume.block_status(512 << 10, 64 << 10).expect("block status");
    assert!(!extents.is_empty());
    assert!(extents.iter().all(|e| e.hole && e.zero), "{extents:?}");

    let (status, started) = site.call("POST", "/v1/groups/g/rollback", Some(r#"{"to":"bookmark:good"}"#));
    assert_eq!(status, 202, "{started}");
    let finished = site.wait_for_job(started["job"].as_u64().expect("job id"));
    assert_eq!(finished["state"], "done", "{finished}");
    volume.read(0, &mut buf).expect("read after rollback");
    assert!(buf.iter().all(|&b| b == 0xAA), "the rollback must bring back the bookmarked data");

    // Undo brings the newer data back.
    let (status, started) = site.call("POST", "/v1/groups/g/rollback", Some(r#"{"undo":true}"#));
    assert_eq!(status, 202, "{started}");
    assert_eq!(site.wait_for_job(started["job"].as_u64().expect("job id"))["state"], "done");
    volume.read(0, &mut buf).expect("read after undo");
    assert!(buf.iter().all(|&b| b == 0xBB), "undo must bring back the newer data");

    // A read-only image shows the bookmark and refuses writes with EPERM.
    let (status, image) =
        site.call("POST", "/v1/images", Some(r#"{"group":"g","at":"bookmark:good","name":"img"}"#));
    assert_eq!(status, 201, "{image}");
    let view = exports.open("img/v").expect("open image export");
    assert!(view.info().read_only);
    view.read(0, &mut buf).expect("read image");
    assert!(buf.iter().all(|&b| b == 0xAA));
    assert!(matches!(view.write(0, &[1; 4096], false), Err(ExportError::ReadOnly)));
}
