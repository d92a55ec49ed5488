//! Deployment files checked by the tools that will read them: the systemd unit by
//! `systemd-analyze verify`, the compose file by `docker-compose config` (which validates it
//! against the compose schema without a container engine), and the Containerfile against the
//! workspace it builds. The example configurations they use are loaded by the site's own config
//! tests (`shipped_examples_parse`).

use std::path::{Path, PathBuf};
use std::process::Command;

use tidemark_tests::{binary, run_ok, tool};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

#[test]
fn the_systemd_unit_passes_systemd_analyze_verify() {
    let unit = std::fs::read_to_string(repo().join("deploy/systemd/tidemark.service")).expect("read unit");
    // verify checks that ExecStart's program exists: point it at the binary under test.
    let exec = "/usr/local/bin/tidemark serve --config /etc/tidemark/tidemark.toml";
    assert!(unit.contains(&format!("ExecStart={exec}")), "the unit runs `{exec}`");
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("tidemark.service");
    let built = binary();
    std::fs::write(&path, unit.replace("/usr/local/bin/tidemark", built.to_str().expect("utf8")))
        .expect("write unit");
    let out =
        Command::new(tool("systemd-analyze")).arg("verify").arg(&path).output().expect("systemd-analyze");
    let report = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(
        out.status.success() && report.trim().is_empty(),
        "systemd-analyze verify ({}):\n{report}",
        out.status
    );
    // The hardening the unit promises.
    for line in [
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "CapabilityBoundingSet=",
        "StateDirectory=tidemark",
        "RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX",
        "SystemCallFilter=@system-service",
        "MemoryDenyWriteExecute=yes",
    ] {
        assert!(unit.lines().any(|l| l == line), "the unit lacks {line}");
    }
    // The config it names keeps its data where the unit lets it write.
    let config = std::fs::read_to_string(repo().join("deploy/systemd/tidemark.toml")).expect("config");
    assert!(config.contains("data_dir = \"/var/lib/tidemark\""), "deploy/systemd/tidemark.toml: data_dir");
}

#[test]
fn the_compose_file_is_valid_and_its_mounts_exist() {
    let compose = repo().join("deploy/compose.yaml");
    let out = run_ok("docker-compose", &["--file", compose.to_str().expect("utf8"), "config", "--quiet"]);
    assert!(out.trim().is_empty(), "{out}");
    // Every relative bind mount names a file or directory of the repository.
    let text = std::fs::read_to_string(&compose).expect("compose");
    let parsed: serde_yaml::Value = serde_yaml::from_str(&text).expect("compose YAML");
    let services = parsed["services"].as_mapping().expect("services");
    for name in ["site-a", "site-b", "prometheus", "grafana"] {
        assert!(services.contains_key(name), "compose lacks service {name}");
    }
    let mut mounts = 0;
    for (name, service) in services {
        for volume in service["volumes"].as_sequence().into_iter().flatten() {
            let source = volume.as_str().expect("short volume syntax").split(':').next().expect("source");
            if source.starts_with('.') {
                let path = repo().join("deploy").join(source);
                assert!(path.exists(), "service {name:?} mounts {source}, which does not exist");
                mounts += 1;
            }
        }
    }
    assert!(mounts >= 6, "expected the site configs, Prometheus and Grafana files to be mounted");
}

#[test]
fn the_containerfile_builds_the_binary_this_workspace_has() {
    let root = repo();
    let text = std::fs::read_to_string(root.join("deploy/Containerfile")).expect("Containerfile");
    let cargo = std::fs::read_to_string(root.join("crates/tidemark-cli/Cargo.toml")).expect("cli manifest");
    assert!(cargo.contains("name = \"tidemark-cli\"") && cargo.contains("name = \"tidemark\""));
    assert!(text.contains("cargo build --release --locked -p tidemark-cli --bin tidemark"), "build command");
    assert!(text.contains("target/release/tidemark"), "the binary's path");
    assert_eq!(
        text.lines().filter(|l| l.starts_with("FROM ")).count(),
        2,
        "a build stage and a runtime stage"
    );
    assert!(text.lines().any(|l| l.starts_with("USER tidemark")), "runs unprivileged");
    // Its default command is a valid `serve` command line.
    let cmd = text.lines().find_map(|l| l.strip_prefix("CMD ")).expect("CMD");
    let args: Vec<String> = serde_json::from_str(cmd).expect("CMD in exec form");
    let out = Command::new(binary()).args(&args).arg("--help").output().expect("tidemark");
    assert!(out.status.success(), "`tidemark {}` is not a valid command line", args.join(" "));
    for flag in args.iter().filter(|a| a.starts_with("--")) {
        assert!(String::from_utf8_lossy(&out.stdout).contains(flag.as_str()), "serve has no {flag}");
    }
    // The build context leaves out build output and site data.
    let ignore = std::fs::read_to_string(root.join(".dockerignore")).expect(".dockerignore");
    assert!(ignore.lines().any(|l| l == "target/"), ".dockerignore must exclude target/");
}
