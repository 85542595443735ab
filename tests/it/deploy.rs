//! The deployment files agree with the binary: the systemd unit verifies, the Kubernetes config
//! parses and matches its manifests, the Dockerfile keeps its promises.

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;

use mvrefresh::config::Config;

fn read(path: &str) -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(path))
        .unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// The number after `key:` on the first line that has it.
fn yaml_number(text: &str, key: &str) -> u64 {
    text.lines()
        .find_map(|l| l.trim().strip_prefix(&format!("{key}:")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {key} in the manifest"))
}

#[test]
fn systemd_unit_verifies() {
    let unit = read("systemd/mvrefresh.service")
        .replace("/usr/local/bin/mvrefresh", env!("CARGO_BIN_EXE_mvrefresh"));
    for required in [
        "Type=notify",
        "WatchdogSec=",
        "Restart=on-failure",
        "EnvironmentFile=",
        "DynamicUser=yes",
        "ProtectSystem=strict",
        "NoNewPrivileges=yes",
        "PrivateTmp=yes",
        "CapabilityBoundingSet=",
        "SystemCallFilter=@system-service",
    ] {
        assert!(unit.contains(required), "the unit lacks {required}");
    }
    let dir = std::env::temp_dir().join(format!("mvrefresh-unit-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("mvrefresh.service");
    std::fs::write(&path, unit).unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .expect("systemd-analyze (package systemd; scripts/test installs it)");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "systemd-analyze verify failed:\n{said}"
    );
    assert!(
        !said.contains("mvrefresh.service"),
        "systemd-analyze verify complained:\n{said}"
    );
}

#[test]
fn kubernetes_config_and_manifests_agree() {
    let env = HashMap::from([(
        "MVREFRESH_DATABASE_URL".to_owned(),
        "postgres://mvrefresh@postgres:5432/app".to_owned(),
    )]);
    let config = Config::from_str_with_env(
        &read("deploy/kubernetes/config.toml"),
        Path::new("deploy/kubernetes/config.toml"),
        &env,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let addr = config.http.address().expect("the admin server is on");
    assert!(
        addr.ip().is_unspecified(),
        "probes need {addr} on every interface"
    );
    // Listening on every interface needs the admin token, which the Secret provides.
    let problem = config
        .http
        .exposure_problem()
        .expect("no token: the daemon refuses to serve on every interface");
    assert!(problem.contains("MVREFRESH_ADMIN_TOKEN"), "{problem}");
    let deadline = config.refresh.shutdown_deadline.as_secs();
    for manifest in [
        "deploy/kubernetes/deployment.yaml",
        "deploy/kubernetes/sidecar.yaml",
    ] {
        let text = read(manifest);
        let grace = yaml_number(&text, "terminationGracePeriodSeconds");
        assert!(
            grace > deadline,
            "{manifest}: terminationGracePeriodSeconds {grace} must exceed shutdown_deadline {deadline}s"
        );
        assert!(
            text.contains(&format!("containerPort: {}", addr.port())),
            "{manifest}"
        );
        assert!(
            text.contains("path: /healthz") && text.contains("path: /readyz"),
            "{manifest}"
        );
        assert!(text.contains("secretRef: {name: mvrefresh}"), "{manifest}");
        assert!(text.contains("runAsNonRoot: true"), "{manifest}");
        // The CA named by sslrootcert in the config is mounted where the URL says.
        assert!(text.contains("mountPath: /etc/mvrefresh/ca"), "{manifest}");
        assert!(
            text.contains("\"--config\", \"/etc/mvrefresh/config/config.toml\""),
            "{manifest}"
        );
        assert!(text.contains("requests:"), "{manifest}");
    }
    assert!(read("deploy/kubernetes/config.toml").contains("sslrootcert=/etc/mvrefresh/ca/ca.crt"));
    assert!(read("deploy/kubernetes/secret.example.yaml")
        .contains("sslrootcert=/etc/mvrefresh/ca/ca.crt"));
    let deployment = read("deploy/kubernetes/deployment.yaml");
    assert_eq!(yaml_number(&deployment, "replicas"), 2);
    let sidecar = read("deploy/kubernetes/sidecar.yaml");
    let init = sidecar
        .split("initContainers:")
        .nth(1)
        .and_then(|rest| rest.split("\n      containers:").next())
        .expect("an initContainers section");
    assert!(init.contains("restartPolicy: Always"), "a native sidecar");
    assert!(read("deploy/kubernetes/kustomization.yaml").contains("config.toml"));
}

/// `stringData` of the example Secret, as the environment it becomes.
fn example_secret() -> HashMap<String, String> {
    read("deploy/kubernetes/secret.example.yaml")
        .split("stringData:")
        .nth(1)
        .expect("a stringData section")
        .lines()
        .filter_map(|l| l.trim().split_once(": "))
        .map(|(k, v)| (k.to_owned(), v.trim_matches('"').to_owned()))
        .collect()
}

#[test]
fn the_example_secret_is_refused_until_its_placeholders_are_replaced() {
    let load = |env: &HashMap<String, String>| {
        Config::from_str_with_env(
            &read("deploy/kubernetes/config.toml"),
            Path::new("deploy/kubernetes/config.toml"),
            env,
        )
    };
    let mut env = example_secret();
    assert_eq!(env.len(), 4, "{env:?}");
    for (var, what) in [
        ("MVREFRESH_ADMIN_TOKEN", "token"),
        ("MVREFRESH_ALERT_SECRET", "secret"),
    ] {
        assert_eq!(env[var], "CHANGE-ME");
        let msg = load(&env)
            .err()
            .unwrap_or_else(|| panic!("the placeholder {var} is accepted"))
            .to_string();
        assert!(msg.contains(var), "{msg}");
        assert!(msg.contains("placeholder"), "{msg}");
        assert!(
            msg.contains(&format!("generate a {what} with `openssl rand -hex 32`")),
            "{msg}"
        );
        // What `openssl rand -hex 32` makes.
        env.insert(var.to_owned(), "a1".repeat(32));
    }
    // The CA file the example URL names exists only in the pod.
    env.insert(
        "MVREFRESH_DATABASE_URL".to_owned(),
        "postgres://mvrefresh@postgres:5432/app".to_owned(),
    );
    let config = load(&env).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(config.http.exposure_problem(), None);
    assert!(read("deploy/kubernetes/secret.example.yaml").contains("openssl rand -hex 32"));
}

#[test]
fn dockerfile_is_multistage_locked_and_non_root() {
    let docker = read("Dockerfile");
    assert_eq!(
        docker.matches("\nFROM ").count() + usize::from(docker.starts_with("FROM ")),
        2
    );
    assert!(docker.contains("--locked"));
    // The base images are arguments whose defaults stay the official images.
    assert!(docker.contains("ARG BUILD_IMAGE=rust:"), "{docker}");
    assert!(docker.contains("ARG RUNTIME_IMAGE=debian:"), "{docker}");
    assert!(docker.contains("COPY --from=build"));
    assert!(docker.contains("COPY sql"));
    assert!(!docker.contains("HEALTHCHECK"));
    assert!(docker.contains("EXPOSE 9187"));
    let user = docker
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("USER "))
        .expect("a USER line");
    assert!(
        !user.trim().starts_with("root") && !user.trim().starts_with("0"),
        "{user}"
    );
}

/// The alerting rules load in Prometheus's own checker, and their unit tests
/// (`deploy/prometheus/mvrefresh-alerts.test.yml`: each alert fires on the series pattern it is
/// meant for and stays quiet on its neighbours) pass in `promtool test rules`.
#[test]
fn promtool_checks_the_alert_rules_and_runs_their_unit_tests() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/prometheus");
    for args in [
        &["check", "rules", "mvrefresh-alerts.yml"][..],
        &["test", "rules", "mvrefresh-alerts.test.yml"][..],
    ] {
        let out = Command::new("promtool")
            .args(args)
            .current_dir(&dir)
            .output()
            .expect("promtool (package prometheus; scripts/test installs it)");
        assert!(
            out.status.success(),
            "promtool {} failed:\n{}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// Every manifest, and the ConfigMap the kustomization generates from `config.toml` (rendered
/// here: kustomize is not packaged for Debian), validates strictly against the Kubernetes API's
/// schemas (`kubernetes-validate`, offline; `scripts/test` installs it).
#[test]
fn kubernetes_manifests_validate_against_the_api_schemas() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/kubernetes");
    let generated =
        std::env::temp_dir().join(format!("mvrefresh-configmap-{}.json", std::process::id()));
    let configmap = serde_json::json!({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "mvrefresh-config"},
        "data": {"config.toml": read("deploy/kubernetes/config.toml")},
    });
    std::fs::write(&generated, configmap.to_string()).unwrap();
    let files = ["deployment.yaml", "sidecar.yaml", "secret.example.yaml"];
    // On PATH, or where scripts/test installs it.
    let installed = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("target/tools/kubernetes-validate/bin/kubernetes-validate");
    let program = if installed.exists() {
        installed.into_os_string()
    } else {
        "kubernetes-validate".into()
    };
    let out = Command::new(program)
        .arg("--strict")
        .args(files)
        .arg(&generated)
        .current_dir(&dir)
        .output()
        .expect("kubernetes-validate (PyPI; scripts/test installs it into target/tools)");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = std::fs::remove_file(&generated);
    assert!(out.status.success(), "kubernetes-validate failed:\n{said}");
    assert_eq!(said.matches(" passed for resource ").count(), 4, "{said}");
    assert!(!said.contains("WARN") && !said.contains("ERROR"), "{said}");
}
