//! GitLab's Kaniko job, unchanged, run by kiln's own executor-debug image.
//!
//! This is what "rename the binary" means for the most common Kaniko user:
//! the job script from GitLab's documentation ("Use kaniko to build Docker
//! images": credentials written to `/kaniko/.docker/config.json`, the
//! registry's private CA appended to `/kaniko/ssl/certs/ca-certificates.crt`,
//! `/kaniko/executor` with Kaniko's flags) runs with `/busybox/sh` inside
//! the image `deploy/build-images.sh` makes, against a Distribution registry
//! with htpasswd auth and a self-signed CA. The image must land and run, and
//! a second run of the same job in a fresh pod must be all cache hits from
//! `--cache-repo`.
//!
//! The "pod" is a throwaway root: the image's rootfs unpacked with umoci,
//! entered with `unshare -m -p -f` and `chroot` (with /proc, /dev and a
//! tmpfs /tmp, as a container runtime gives a container), so nothing the
//! job does reaches this machine's own root.
//!
//! The images come from `KILN_EXECUTOR_IMAGES` (the directory
//! `build-images.sh --oci-layout DIR` wrote; `scripts/test-all.sh` builds
//! them first). Without it the test passes as skipped, unless
//! `KILN_REQUIRE_IMAGES` is set (CI), where a missing image is a failure.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use kiln_e2e::{Registry, RegistryAuth, push_busybox, run};

const USER: &str = "gitlab-ci-token";
const PASSWORD: &str = "job-token-0123";

/// GitLab's job script, as its documentation writes it (plus `set -e`,
/// which GitLab's runner applies to every script line).
const JOB: &str = r#"set -e
mkdir -p /kaniko/.docker
echo "{\"auths\":{\"${CI_REGISTRY}\":{\"auth\":\"$(printf "%s:%s" "${CI_REGISTRY_USER}" "${CI_REGISTRY_PASSWORD}" | base64 | tr -d '\n')\"}}}" > /kaniko/.docker/config.json
cat "${CI_SERVER_TLS_CA_FILE}" >> /kaniko/ssl/certs/ca-certificates.crt
/kaniko/executor --context "${CI_PROJECT_DIR}" --dockerfile "${CI_PROJECT_DIR}/Dockerfile" --destination "${IMAGE}:${TAG}" --cache=true --cache-repo "${CACHE_REPO}" --snapshot-mode=redo --use-new-run
"#;

/// The executor-debug image's layout and tag, or None when the test is to
/// be skipped.
fn executor_debug_image() -> Option<(PathBuf, String)> {
    let Some(dir) = std::env::var_os("KILN_EXECUTOR_IMAGES") else {
        if std::env::var_os("KILN_REQUIRE_IMAGES").is_some() {
            panic!("KILN_REQUIRE_IMAGES is set but KILN_EXECUTOR_IMAGES is not");
        }
        eprintln!(
            "!!!!! skipped: set KILN_EXECUTOR_IMAGES to the directory of \
             `deploy/build-images.sh --oci-layout DIR` (scripts/test-all.sh does) !!!!!"
        );
        return None;
    };
    let layout = PathBuf::from(dir).join("executor-debug");
    let index: serde_json::Value = serde_json::from_slice(
        &fs::read(layout.join("index.json")).expect("executor-debug index.json"),
    )
    .expect("index.json is JSON");
    let tag = index["manifests"][0]["annotations"]["org.opencontainers.image.ref.name"]
        .as_str()
        .expect("the executor-debug layout has a tag")
        .to_string();
    Some((layout, tag))
}

/// A fresh "pod": the image's rootfs, the project checked out in it.
struct Pod {
    _bundle: tempfile::TempDir,
    rootfs: PathBuf,
    env: Vec<String>,
}

impl Pod {
    fn new(layout: &Path, tag: &str, project: &Path, ca: &Path) -> Pod {
        let bundle = tempfile::tempdir().unwrap();
        let dir = bundle.path().join("bundle");
        run(Command::new("umoci")
            .args(["unpack", "--image", &format!("{}:{tag}", layout.display())])
            .arg(&dir))
        .unwrap();
        let rootfs = dir.join("rootfs");
        for d in ["proc", "dev", "tmp", "builds/group/project"] {
            fs::create_dir_all(rootfs.join(d)).unwrap();
        }
        for entry in fs::read_dir(project).unwrap() {
            let entry = entry.unwrap();
            fs::copy(
                entry.path(),
                rootfs.join("builds/group/project").join(entry.file_name()),
            )
            .unwrap();
        }
        // GitLab writes the server's CA to a file and names it in this variable.
        fs::copy(ca, rootfs.join("builds/ca.crt")).unwrap();
        let config: serde_json::Value =
            serde_json::from_slice(&fs::read(dir.join("config.json")).unwrap()).unwrap();
        let env = config["process"]["env"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default();
        Pod {
            _bundle: bundle,
            rootfs,
            env,
        }
    }

    /// Runs the job script in the pod; returns (success, combined output).
    fn run_job(&self, variables: &[(&str, String)]) -> (bool, String) {
        let mut env = self.env.clone();
        env.extend(variables.iter().map(|(k, v)| format!("{k}={v}")));
        // Mounts live in the job's own mount namespace and vanish with it.
        // The rootfs is a mount point of its own, as a container runtime
        // makes it (kiln makes `/` private in its step namespaces).
        let setup = r#"set -e
mount --make-rprivate /
mount --rbind "$1" "$1"
mount -t proc proc "$1/proc"
mount --rbind /dev "$1/dev"
mount -t tmpfs tmpfs "$1/tmp"
root=$1; shift
exec chroot "$root" "$@""#;
        let out = Command::new("unshare")
            .args(["-m", "-p", "-f", "--kill-child", "sh", "-c", setup, "sh"])
            .arg(&self.rootfs)
            .args(["/busybox/env", "-i"])
            .args(&env)
            .args(["/busybox/sh", "-c", JOB])
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    }
}

#[test]
fn gitlab_kaniko_job_runs_unchanged_in_kilns_image_and_rebuilds_from_the_cache_repo() {
    let Some((layout, tag)) = executor_debug_image() else {
        return;
    };
    let registry = Registry::start_tls(RegistryAuth::basic(USER, PASSWORD)).unwrap();
    let work = tempfile::tempdir().unwrap();
    push_busybox(&registry, work.path(), "base/busybox:1", &[]).unwrap();

    let project = work.path().join("project");
    fs::create_dir_all(&project).unwrap();
    fs::write(project.join("hello.txt"), "hello from the project\n").unwrap();
    fs::write(
        project.join("Dockerfile"),
        format!(
            "FROM {}/base/busybox:1\n\
             RUN echo built-in-ci > /built.txt\n\
             COPY hello.txt /srv/hello.txt\n\
             RUN cat /srv/hello.txt /built.txt > /srv/both.txt\n\
             CMD [\"cat\", \"/srv/both.txt\"]\n",
            registry.host()
        ),
    )
    .unwrap();

    let image = format!("{}/group/project", registry.host());
    let variables = [
        ("CI_REGISTRY", registry.host()),
        ("CI_REGISTRY_USER", USER.to_string()),
        ("CI_REGISTRY_PASSWORD", PASSWORD.to_string()),
        ("CI_PROJECT_DIR", "/builds/group/project".to_string()),
        ("CI_SERVER_TLS_CA_FILE", "/builds/ca.crt".to_string()),
        ("IMAGE", image.clone()),
        ("TAG", "v1".to_string()),
        ("CACHE_REPO", format!("{image}/cache")),
    ];

    let first = Pod::new(&layout, &tag, &project, &registry.ca_certificate());
    let (ok, log) = first.run_job(&variables);
    assert!(ok, "first job failed:\n{log}");
    drop(first);

    // The image landed, with the layers the steps made.
    let inspect = registry.skopeo_inspect("group/project:v1").unwrap();
    assert_eq!(
        inspect["Layers"].as_array().map(Vec::len),
        Some(4),
        "{inspect}"
    );
    // And it runs: buildah (chroot isolation, private vfs storage) prints
    // what the Dockerfile's steps wrote.
    let output = run_image_with_buildah(&registry, "group/project:v1");
    assert_eq!(output, "hello from the project\nbuilt-in-ci\n");

    // A fresh pod (no local state at all) builds the same job from the cache repo.
    let second = Pod::new(&layout, &tag, &project, &registry.ca_certificate());
    let (ok, log) = second.run_job(&variables);
    assert!(ok, "second job failed:\n{log}");
    assert!(log.contains("3 cached, 0 run"), "expected all hits:\n{log}");
    let again = registry.skopeo_inspect("group/project:v1").unwrap();
    assert_eq!(again["Layers"], inspect["Layers"]);
}

fn run_image_with_buildah(registry: &Registry, repo_tag: &str) -> String {
    let store = tempfile::tempdir().unwrap();
    let root = store.path().join("root");
    let runroot = store.path().join("runroot");
    let buildah = |args: &[&str]| {
        let mut cmd = Command::new("buildah");
        cmd.arg("--root")
            .arg(&root)
            .arg("--runroot")
            .arg(&runroot)
            .args(["--storage-driver", "vfs"])
            .args(args);
        run(&mut cmd).unwrap()
    };
    let creds = format!("{USER}:{PASSWORD}");
    let container = buildah(&[
        "from",
        "--quiet",
        "--tls-verify=false",
        "--creds",
        &creds,
        &format!("docker://{}", registry.reference(repo_tag)),
    ]);
    let container = container.trim().to_string();
    let out = buildah(&[
        "run",
        "--isolation",
        "chroot",
        &container,
        "--",
        "cat",
        "/srv/both.txt",
    ]);
    buildah(&["rm", &container]);
    out
}
