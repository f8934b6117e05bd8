//! `--cache-repo` end to end: real `kiln-executor` processes with fresh
//! local state sharing one layer cache kept in a repository of a real
//! Distribution registry (plain, and with htpasswd auth), checked through
//! the build reports, the registry's tag list, its access log and its
//! storage.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Output;

use kiln_e2e::RegistryAuth;
use kiln_e2e::cache_repo::Request;
use kiln_e2e::world::{BuildWorld, executor_build};

const CACHE: &str = "team/cache";

/// Six filesystem steps, so a lookup per step would be six requests.
const DOCKERFILE: &str = "FROM BASE\n\
    COPY a.txt /a.txt\n\
    RUN echo one > /one\n\
    RUN echo two > /two\n\
    COPY b.txt /b.txt\n\
    RUN cat /a.txt /b.txt > /ab\n\
    RUN echo six > /six\n";

/// The shared setup ([`BuildWorld`]: a registry with busybox, a work
/// directory) plus a `DOCKER_CONFIG` with the registry's credentials.
struct Env {
    world: BuildWorld,
    docker_config: PathBuf,
}

impl std::ops::Deref for Env {
    type Target = BuildWorld;

    fn deref(&self) -> &BuildWorld {
        &self.world
    }
}

impl Env {
    fn new(auth: RegistryAuth) -> Self {
        let world = BuildWorld::start(auth).unwrap();
        let docker_config = world.registry.docker_config_dir(world.work.path()).unwrap();
        Env {
            world,
            docker_config,
        }
    }

    fn context(&self, name: &str, b: &str) -> PathBuf {
        self.world
            .context(name, DOCKERFILE, &[("a.txt", "alpha\n"), ("b.txt", b)])
    }

    fn state(&self, name: &str) -> PathBuf {
        self.world.state(name)
    }

    /// One build with the state directory `state` (fresh unless reused),
    /// pushing to `dest`; the cache is `--cache-repo` unless `extra` says
    /// otherwise.
    fn build(
        &self,
        ctx: &Path,
        state: &Path,
        dest: &str,
        extra: &[&str],
    ) -> (Output, serde_json::Value) {
        let dest = self.registry.reference(dest);
        let cache = self.registry.reference(CACHE);
        let mut args = vec!["--destination", &dest, "--cache-repo", &cache];
        args.extend_from_slice(extra);
        executor_build(&self.registry, ctx, state, &args, |cmd| {
            cmd.env("DOCKER_CONFIG", &self.docker_config);
        })
    }

    fn build_ok(
        &self,
        ctx: &Path,
        state: &Path,
        dest: &str,
        extra: &[&str],
    ) -> (String, serde_json::Value) {
        let (out, report) = self.build(ctx, state, dest, extra);
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "build failed:\n{stderr}");
        (stderr, report)
    }

    /// The registry's requests from `since` (an earlier `requests().len()`).
    fn requests_since(&self, since: usize) -> Vec<Request> {
        self.registry.requests().split_off(since)
    }

    fn cache_tags(&self) -> Vec<String> {
        self.registry.tags(CACHE).unwrap()
    }
}

/// The manifest GETs of the cache repository: the lookup's requests.
fn lookup_requests(requests: &[Request]) -> Vec<&Request> {
    requests
        .iter()
        .filter(|r| r.method == "GET" && r.path.starts_with(&format!("/v2/{CACHE}/manifests/")))
        .collect()
}

/// Requests that change the cache repository.
fn cache_writes(requests: &[Request]) -> Vec<&Request> {
    requests
        .iter()
        .filter(|r| {
            r.path.starts_with(&format!("/v2/{CACHE}/"))
                && matches!(r.method.as_str(), "PUT" | "POST" | "PATCH" | "DELETE")
        })
        .collect()
}

fn cache_of(report: &serde_json::Value) -> Vec<String> {
    report["steps"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["cache"] != "none")
        .map(|s| s["cache"].as_str().unwrap().to_string())
        .collect()
}

/// A cold build fills the repository; a second executor with fresh local
/// state is all hits and makes the same image; its lookup is one manifest
/// answer for six steps. Pushing to another repository of the same
/// registry, it mounts the layers from the cache repository instead of
/// downloading them; a third, writing a tarball, downloads them from there.
fn second_build_is_all_hits_from_the_repository(auth: RegistryAuth) {
    let env = Env::new(auth);
    let ctx = env.context("app", "bravo\n");
    let (_, first) = env.build_ok(&ctx, &env.state("one"), "app:v1", &[]);
    assert_eq!(cache_of(&first), ["miss"; 6], "{first}");
    let tags = env.cache_tags();
    assert!(tags.len() >= 6, "one tag per step at least: {tags:?}");
    assert!(tags.iter().all(|t| t.starts_with("kiln-")), "{tags:?}");
    for step in first["steps"].as_array().unwrap() {
        if let Some(key) = step["key"].as_str() {
            assert!(
                tags.contains(&format!("kiln-{key}")),
                "{key} not in {tags:?}"
            );
        }
    }

    let since = env.registry.requests().len();
    let (_, second) = env.build_ok(&ctx, &env.state("two"), "copy:v1", &[]);
    assert_eq!(cache_of(&second), ["hit"; 6], "{second}");
    assert_eq!(second["image"]["digest"], first["image"]["digest"]);
    let requests = env.requests_since(since);
    let lookup = lookup_requests(&requests);
    let answered: Vec<_> = lookup.iter().filter(|r| r.status == 200).collect();
    assert_eq!(
        answered.len(),
        1,
        "one manifest answers the whole build: {lookup:?}"
    );
    assert!(
        lookup.len() <= 2,
        "at most an auth challenge besides it: {lookup:?}"
    );
    assert_eq!(
        cache_writes(&requests),
        Vec::<&Request>::new(),
        "nothing new to write"
    );
    assert_eq!(env.cache_tags(), tags);
    assert_eq!(second["summary"]["bytes_downloaded"], 0, "{second}");
    let mounted = requests
        .iter()
        .filter(|r| {
            r.method == "POST"
                && r.path.starts_with("/v2/copy/blobs/uploads/?mount=")
                && r.path.ends_with(&format!("from={CACHE}"))
                && r.status == 201
        })
        .count();
    assert!(
        mounted >= 6,
        "layers mounted from the cache repository: {requests:?}"
    );

    let since = env.registry.requests().len();
    let tarball = env.work.path().join("image.tar");
    let tar_path = tarball.to_str().unwrap();
    let (_, third) = env.build_ok(
        &ctx,
        &env.state("three"),
        "copy:v1",
        &["--no-push", "--tar-path", tar_path],
    );
    assert_eq!(cache_of(&third), ["hit"; 6], "{third}");
    assert_eq!(third["image"]["digest"], first["image"]["digest"]);
    assert!(third["summary"]["bytes_downloaded"].as_u64().unwrap() > 0);
    let requests = env.requests_since(since);
    let layer_gets = requests
        .iter()
        .filter(|r| {
            r.method == "GET"
                && r.path.starts_with(&format!("/v2/{CACHE}/blobs/"))
                && r.status == 200
        })
        .count();
    assert!(
        layer_gets >= 6,
        "layers come from the cache repository: {requests:?}"
    );
}

#[test]
fn a_fresh_executor_is_all_hits_from_the_cache_repository_in_one_request() {
    second_build_is_all_hits_from_the_repository(RegistryAuth::None);
}

#[test]
fn the_cache_repository_behind_htpasswd_uses_the_push_credentials() {
    second_build_is_all_hits_from_the_repository(RegistryAuth::basic("ci", "s3cret"));
}

#[test]
fn a_changed_step_in_the_middle_hits_the_prefix_and_rebuilds_the_rest() {
    let env = Env::new(RegistryAuth::None);
    let ctx = env.context("app", "bravo\n");
    env.build_ok(&ctx, &env.state("one"), "app:v1", &[]);
    let changed = env.context("changed", "charlie\n");
    let since = env.registry.requests().len();
    let (_, second) = env.build_ok(&changed, &env.state("two"), "app:v2", &[]);
    assert_eq!(
        cache_of(&second),
        ["hit", "hit", "hit", "miss", "miss", "miss"],
        "{second}"
    );
    let requests = env.requests_since(since);
    let lookup = lookup_requests(&requests);
    assert_eq!(
        lookup.iter().map(|r| r.status).collect::<Vec<_>>(),
        [200, 404],
        "the first key's tag, then the changed step's (absent): {lookup:?}"
    );
    // The image is the one a build without any cache makes.
    let (_, uncached) = env.build_ok(
        &changed,
        &env.state("uncached"),
        "app:uncached",
        &["--cache=false"],
    );
    assert_eq!(second["image"]["digest"], uncached["image"]["digest"]);
    // The new steps are in the cache now: a third build is all hits.
    let (_, third) = env.build_ok(&changed, &env.state("three"), "app:v3", &[]);
    assert_eq!(cache_of(&third), ["hit"; 6], "{third}");
}

#[test]
fn no_push_cache_reads_the_cache_but_writes_nothing() {
    let env = Env::new(RegistryAuth::None);
    let ctx = env.context("app", "bravo\n");
    let since = env.registry.requests().len();
    let (_, cold) = env.build_ok(&ctx, &env.state("cold"), "app:v0", &["--no-push-cache"]);
    assert_eq!(cache_of(&cold), ["miss"; 6]);
    assert_eq!(env.cache_tags(), Vec::<String>::new(), "no tags");
    assert_eq!(
        cache_writes(&env.requests_since(since)),
        Vec::<&Request>::new()
    );

    env.build_ok(&ctx, &env.state("one"), "app:v1", &[]);
    let tags = env.cache_tags();
    assert!(!tags.is_empty());
    let changed = env.context("changed", "charlie\n");
    let since = env.registry.requests().len();
    let (_, second) = env.build_ok(
        &changed,
        &env.state("two"),
        "app:v2",
        &["--no-push-cache=true"],
    );
    assert_eq!(
        cache_of(&second),
        ["hit", "hit", "hit", "miss", "miss", "miss"]
    );
    assert_eq!(env.cache_tags(), tags, "no new tags");
    assert_eq!(
        cache_writes(&env.requests_since(since)),
        Vec::<&Request>::new()
    );
}

#[test]
fn a_corrupted_layer_in_the_cache_repository_is_rejected_and_rebuilt() {
    let env = Env::new(RegistryAuth::None);
    let ctx = env.context("app", "bravo\n");
    let (_, first) = env.build_ok(&ctx, &env.state("one"), "app:v1", &[]);
    // The layer of `RUN cat /a.txt /b.txt > /ab`: same size, other bytes,
    // so only the digest can tell.
    let step = first["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["instruction"].as_str().is_some_and(|i| i.contains("/ab")))
        .unwrap();
    let layer = step["layer"].as_str().unwrap();
    let file = env.registry.blob_file(layer);
    let mut bytes = fs::read(&file).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0xff;
    fs::write(&file, &bytes).unwrap();

    // A tarball needs every layer's bytes (a push to this registry would
    // mount the blob without reading it).
    let tarball = env.work.path().join("image.tar");
    let (stderr, second) = env.build_ok(
        &ctx,
        &env.state("two"),
        "other:v1",
        &["--no-push", "--tar-path", tarball.to_str().unwrap()],
    );
    let cache = cache_of(&second);
    assert_eq!(
        cache[4], "miss",
        "the step with the corrupt layer ran: {second}"
    );
    assert!(
        stderr.contains(layer),
        "the warning names the layer:\n{stderr}"
    );
    // Never a wrong layer: the image is the first build's, byte for byte.
    assert_eq!(second["image"]["digest"], first["image"]["digest"]);
}

#[test]
fn a_multi_stage_build_is_answered_by_one_manifest_too() {
    let env = Env::new(RegistryAuth::None);
    let dir = env.work.path().join("multi");
    fs::create_dir_all(&dir).unwrap();
    let base = env.registry.reference("library/busybox:latest");
    fs::write(
        dir.join("Dockerfile"),
        format!(
            "FROM {base} AS build\nRUN echo built > /artifact\nRUN echo more >> /artifact\n\
             FROM {base}\nCOPY --from=build /artifact /artifact\nRUN cat /artifact > /copy\n"
        ),
    )
    .unwrap();
    let (_, first) = env.build_ok(&dir, &env.state("one"), "multi:v1", &[]);
    assert_eq!(cache_of(&first), ["miss"; 4], "{first}");
    let since = env.registry.requests().len();
    let (_, second) = env.build_ok(&dir, &env.state("two"), "multi:v2", &[]);
    assert_eq!(cache_of(&second), ["hit"; 4], "{second}");
    assert_eq!(second["image"]["digest"], first["image"]["digest"]);
    let requests = env.requests_since(since);
    let lookup = lookup_requests(&requests);
    assert_eq!(
        lookup.len(),
        1,
        "the first stage's first tag holds the second stage's entries: {lookup:?}"
    );
}
