//! Interoperability with real NBD clients: `nbdinfo` (libnbd-bin) and `qemu-io` (qemu-utils).
//!
//! These tests fail, rather than skip, when a tool is missing: the CI script installs both, and
//! a silently skipped interoperability test would prove nothing.

mod common;

use std::process::Output;

use common::*;
use serde_json::Value;
use tidemark_nbd::Export;

/// Run `program` with `args`, failing the test if it cannot be started or takes too long.
async fn run(program: &str, package: &str, args: &[&str]) -> Output {
    let mut command = tokio::process::Command::new(program);
    command.args(args).kill_on_drop(true);
    let output = within(program, command.output())
        .await
        .unwrap_or_else(|error| panic!("cannot run {program} ({error}); install the {package} package"));
    eprintln!(
        "$ {program} {}\n{}{}",
        args.join(" "),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

async fn nbdinfo(args: &[&str]) -> Value {
    let output = run("nbdinfo", "libnbd-bin", args).await;
    assert!(output.status.success(), "nbdinfo failed: {:?}", output.status);
    serde_json::from_slice(&output.stdout).expect("nbdinfo --json prints JSON")
}

async fn qemu_io(args: &[&str]) -> (bool, String) {
    let output = run("qemu-io", "qemu-utils", args).await;
    let text =
        format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    (output.status.success(), text)
}

fn uri(server: &TestServer, name: &str) -> String {
    format!("nbd://{}/{name}", server.addr)
}

#[tokio::test]
async fn nbdinfo_sees_every_capability_and_base_allocation() {
    let server = TestServer::standard().await;
    let info = nbdinfo(&["--json", &uri(&server, "disk")]).await;
    assert_eq!(info["protocol"], "newstyle-fixed");
    assert_eq!(info["structured"], true);
    let export = &info["exports"][0];
    assert_eq!(export["export-name"], "disk");
    assert_eq!(export["export-size"], DISK_BYTES);
    assert_eq!(export["description"], "memory export disk");
    for capability in [
        "can_flush",
        "can_fua",
        "can_trim",
        "can_zero",
        "can_fast_zero",
        "can_multi_conn",
        "can_cache",
        "can_df",
    ] {
        assert_eq!(export[capability], true, "{capability}");
    }
    assert_eq!(export["is_read_only"], false);
    assert_eq!(export["is_rotational"], false);
    assert_eq!(export["block_size_minimum"], 1);
    assert_eq!(export["block_size_preferred"], 4096);
    assert_eq!(export["block_size_maximum"], 32 << 20);
    assert_eq!(export["contexts"], serde_json::json!(["base:allocation"]));
    server.stop().await.unwrap();
}

#[tokio::test]
async fn nbdinfo_lists_every_export_with_its_own_flags() {
    let server = TestServer::standard().await;
    let info = nbdinfo(&["--list", "--json", &uri(&server, "")]).await;
    let exports = info["exports"].as_array().expect("exports array");
    let names: Vec<&str> = exports.iter().map(|export| export["export-name"].as_str().unwrap()).collect();
    assert_eq!(names, ["disk", "image"]);
    let image = &exports[1];
    assert_eq!(image["is_read_only"], true);
    assert_eq!(image["can_trim"], false);
    assert_eq!(image["can_zero"], false);
    assert_eq!(image["contexts"], serde_json::json!(["base:allocation"]));
    server.stop().await.unwrap();
}

#[tokio::test]
async fn nbdinfo_maps_allocated_data_and_holes() {
    let server = TestServer::standard().await;
    let disk = server.provider.export("disk");
    disk.write(0, &[1; 65536], false).unwrap();
    disk.write(1 << 20, &[2; 4096], false).unwrap();
    let map = nbdinfo(&["--map", "--json", &uri(&server, "disk")]).await;
    let extents: Vec<(u64, u64, u64)> = map
        .as_array()
        .expect("map array")
        .iter()
        .map(|extent| {
            (
                extent["offset"].as_u64().unwrap(),
                extent["length"].as_u64().unwrap(),
                extent["type"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        extents,
        vec![
            (0, 65536, 0),
            (65536, (1 << 20) - 65536, 3),
            (1 << 20, 4096, 0),
            ((1 << 20) + 4096, DISK_BYTES - (1 << 20) - 4096, 3),
        ]
    );
    server.stop().await.unwrap();
}

#[tokio::test]
async fn qemu_io_writes_and_reads_back_a_pattern() {
    let server = TestServer::standard().await;
    let disk_uri = uri(&server, "disk");
    let (ok, output) =
        qemu_io(&["-f", "raw", "-c", "write -P 0xab 0 64k", "-c", "read -P 0xab 0 64k", &disk_uri]).await;
    assert!(ok, "qemu-io failed:\n{output}");
    assert!(output.contains("wrote 65536/65536 bytes at offset 0"), "{output}");
    assert!(output.contains("read 65536/65536 bytes at offset 0"), "{output}");
    assert!(!output.contains("Pattern verification failed"), "{output}");
    let disk = server.provider.export("disk");
    assert_eq!(disk.contents(0, 65536), vec![0xab; 65536]);

    // The same check against the wrong pattern must fail, or the check above proves nothing.
    let (ok, output) = qemu_io(&["-f", "raw", "-c", "read -P 0xcd 0 64k", &disk_uri]).await;
    assert!(!ok);
    assert!(output.contains("Pattern verification failed"), "{output}");
    server.stop().await.unwrap();
}

#[tokio::test]
async fn qemu_io_uses_zeroes_discard_fua_flush_and_parallel_writes() {
    let server = TestServer::standard().await;
    let disk = server.provider.export("disk");
    let (ok, output) = qemu_io(&[
        "-f",
        "raw",
        "-c",
        "write -P 0xab 0 256k",
        "-c",
        "write -z 64k 64k",
        "-c",
        "discard 128k 64k",
        "-c",
        "write -f -P 0x11 192k 4k",
        "-c",
        "aio_write -P 0x21 256k 4k",
        "-c",
        "aio_write -P 0x22 260k 4k",
        "-c",
        "aio_flush",
        "-c",
        "flush",
        "-c",
        "read -P 0xab 0 64k",
        "-c",
        "read -P 0 64k 128k",
        "-c",
        "read -P 0x11 192k 4k",
        "-c",
        "read -P 0x22 260k 4k",
        &uri(&server, "disk"),
    ])
    .await;
    assert!(ok, "qemu-io failed:\n{output}");
    assert!(!output.contains("Pattern verification failed"), "{output}");
    assert!(!disk.is_allocated(128 << 10), "discard punched a hole");
    assert!(disk.is_allocated(64 << 10), "write -z without -u keeps blocks allocated");
    assert!(disk.fua_calls.load(std::sync::atomic::Ordering::SeqCst) >= 1);
    assert!(disk.flushes.load(std::sync::atomic::Ordering::SeqCst) >= 1);
    assert_eq!(disk.contents(256 << 10, 4096), vec![0x21; 4096]);
    server.stop().await.unwrap();
}

#[tokio::test]
async fn qemu_io_respects_a_read_only_export() {
    let server = TestServer::standard().await;
    let image_uri = uri(&server, "image");
    let (ok, output) = qemu_io(&["-f", "raw", "-c", "write -P 0xab 0 4k", &image_uri]).await;
    assert!(!ok, "opening a read-only export for writing must fail:\n{output}");
    let (ok, output) = qemu_io(&["-r", "-f", "raw", "-c", "read -P 0 0 64k", &image_uri]).await;
    assert!(ok, "qemu-io failed:\n{output}");
    server.stop().await.unwrap();
}
