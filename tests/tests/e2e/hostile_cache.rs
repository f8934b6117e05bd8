//! The cache never fails a build, also after the lookup: real executor
//! processes against a hostile cache server (see `kiln_e2e::hostile`) that
//! answers the lookup with real entries, then dies, stalls, truncates,
//! corrupts or sends an endless stream when the layer is fetched. Each hit
//! whose bytes cannot be had becomes a miss: the step runs, one warning is
//! printed, and the executor does not upload over the server's entry.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Output;

use kiln_e2e::hostile::{BlobAnswer, HostileCache, LookupAnswer};
use kiln_e2e::world::{BuildWorld, executor_build};
use kiln_e2e::{CacheServer, Registry, RegistryAuth};

const DOCKERFILE: &str = "FROM BASE\nRUN echo one > /one\nRUN cat /one > /two\n";

/// A registry with busybox, a context, and what a real cache server
/// recorded for line 2 after a warm build: its key, entry and layer bytes.
/// The shared setup ([`BuildWorld`]: a registry with busybox, a work
/// directory) after one warm build through a real cache server, with what
/// the lying caches answer.
struct World {
    world: BuildWorld,
    ctx: PathBuf,
    key: String,
    entry: String,
    layer_digest: String,
    layer: Vec<u8>,
    base_layer: String,
    /// Line 3's key, entry, layer digest and bytes.
    line3: (String, String, String, Vec<u8>),
}

impl World {
    fn new() -> World {
        let world = BuildWorld::start(RegistryAuth::None).unwrap();
        let ctx = world.context("ctx", DOCKERFILE, &[]);
        let (registry, work) = (&world.registry, &world.work);
        let base_layer = registry.skopeo_inspect("library/busybox:latest").unwrap()["Layers"][0]
            .as_str()
            .unwrap()
            .to_string();
        let server = CacheServer::start().unwrap();
        let state = work.path().join("warm");
        let (out, report) = build(registry, &ctx, &state, &server.url(), &[]);
        assert!(out.status.success(), "{}", stderr(&out));
        let step = &report["steps"].as_array().unwrap()[1];
        assert_eq!(step["line"], 2);
        let key = step["key"].as_str().unwrap().to_string();
        let (status, entry) = server.get(&format!("/v1/entries/{key}")).unwrap();
        assert_eq!(status, 200, "{entry}");
        let layer_digest = step["layer"].as_str().unwrap().to_string();
        let hex = layer_digest.trim_start_matches("sha256:");
        let layer = fs::read(state.join("store/blobs/sha256").join(&hex[..2]).join(hex)).unwrap();
        let step3 = &report["steps"].as_array().unwrap()[2];
        assert_eq!(step3["line"], 3);
        let key3 = step3["key"].as_str().unwrap().to_string();
        let (status, entry3) = server.get(&format!("/v1/entries/{key3}")).unwrap();
        assert_eq!(status, 200, "{entry3}");
        let digest3 = step3["layer"].as_str().unwrap().to_string();
        let hex3 = digest3.trim_start_matches("sha256:");
        let layer3 =
            fs::read(state.join("store/blobs/sha256").join(&hex3[..2]).join(hex3)).unwrap();
        World {
            world,
            ctx,
            key,
            entry,
            layer_digest,
            layer,
            base_layer,
            line3: (key3, entry3, digest3, layer3),
        }
    }

    /// A hostile cache that has line 2's entry and answers its layer with
    /// `answer` (other blobs: 404, so base layers come from the registry).
    fn hostile(&self, answer: BlobAnswer) -> HostileCache {
        let blobs = HashMap::from([(self.layer_digest.clone(), answer)]);
        HostileCache::start(
            LookupAnswer::Entries(vec![(self.key.clone(), self.entry.clone())]),
            blobs,
        )
        .unwrap()
    }

    fn state(&self, name: &str) -> PathBuf {
        self.world.state(name)
    }
}

impl std::ops::Deref for World {
    type Target = BuildWorld;

    fn deref(&self) -> &BuildWorld {
        &self.world
    }
}

fn build(
    registry: &Registry,
    ctx: &Path,
    state: &Path,
    cache: &str,
    extra: &[&str],
) -> (Output, serde_json::Value) {
    let mut args = vec!["--cache-server", cache];
    args.extend_from_slice(extra);
    if !extra.iter().any(|a| a.starts_with("--destination")) {
        args.push("--no-push");
    }
    executor_build(registry, ctx, state, &args, |_| {})
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn cache_column(report: &serde_json::Value, line: u64) -> String {
    report["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["line"] == line)
        .and_then(|s| s["cache"].as_str())
        .unwrap_or("?")
        .to_string()
}

/// Bytes of all files below `dir`.
fn disk_usage(dir: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let Ok(m) = e.metadata() else { continue };
            if m.is_dir() {
                stack.push(e.path());
            } else {
                total += m.len();
            }
        }
    }
    total
}

/// The build succeeds, line 2 ran instead of being a hit, exactly one
/// warning about the lost layer was printed, and no entry was uploaded for
/// line 2's key (line 3's, a plain miss, was).
fn assert_lost_hit_became_a_miss(
    world: &World,
    cache: &HostileCache,
    out: &Output,
    report: &serde_json::Value,
) {
    let err = stderr(out);
    assert!(out.status.success(), "{err}");
    assert_eq!(cache_column(report, 2), "miss", "{report}");
    assert_eq!(cache_column(report, 3), "miss", "{report}");
    let warnings: Vec<&str> = err
        .lines()
        .filter(|l| l.contains("warning: the cache could not deliver layer"))
        .collect();
    assert_eq!(warnings.len(), 1, "{err}");
    assert!(warnings[0].contains(&world.layer_digest), "{err}");
    assert!(warnings[0].contains("line 2"), "{err}");
    let requests = cache.requests();
    assert!(
        !requests
            .iter()
            .any(|r| r.starts_with(&format!("PUT /v1/entries/{}", world.key))),
        "the executor uploaded over the cache's entry: {requests:?}"
    );
    assert!(
        requests.iter().any(|r| r.starts_with("PUT /v1/entries/")),
        "line 3's result was uploaded: {requests:?}"
    );
}

#[test]
fn a_hit_whose_layer_cannot_be_fetched_intact_is_built_instead() {
    let world = World::new();
    let cases = [
        ("died", BlobAnswer::Close),
        ("truncated", BlobAnswer::Truncate(world.layer.clone())),
        ("corrupt", BlobAnswer::Corrupt(world.layer.clone())),
        ("endless", BlobAnswer::Endless),
    ];
    for (name, answer) in cases {
        let cache = world.hostile(answer);
        let state = world.state(name);
        let (out, report) = build(&world.registry, &world.ctx, &state, &cache.url(), &[]);
        assert_lost_hit_became_a_miss(&world, &cache, &out, &report);
        assert!(
            disk_usage(&state) < 64 << 20,
            "{name}: the state directory grew to {} bytes",
            disk_usage(&state)
        );
    }
}

#[test]
fn a_stalled_blob_download_times_out_and_the_step_is_built() {
    let world = World::new();
    let cache = world.hostile(BlobAnswer::Stall(world.layer.clone()));
    let started = std::time::Instant::now();
    let (out, report) = build(
        &world.registry,
        &world.ctx,
        &world.state("stall"),
        &cache.url(),
        &[],
    );
    assert_lost_hit_became_a_miss(&world, &cache, &out, &report);
    assert!(
        started.elapsed() < std::time::Duration::from_secs(100),
        "took {:?}",
        started.elapsed()
    );
}

#[test]
fn a_hit_lost_only_when_the_output_needs_its_bytes_is_rebuilt_and_pushed() {
    let world = World::new();
    // Only line 2 is asked for: the image is base + line 2's layer, and
    // nothing needs that layer's files, only its bytes for the push.
    let ctx = world.work.path().join("ctx-push");
    fs::create_dir_all(&ctx).unwrap();
    let base = world.registry.reference("library/busybox:latest");
    fs::write(
        ctx.join("Dockerfile"),
        format!("FROM {base}\nRUN echo one > /one\n"),
    )
    .unwrap();
    let cache = world.hostile(BlobAnswer::Corrupt(world.layer.clone()));
    let dest = world.registry.reference("lost-hit:v1");
    let (out, report) = build(
        &world.registry,
        &ctx,
        &world.state("push"),
        &cache.url(),
        &[&format!("--destination={dest}")],
    );
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    assert_eq!(cache_column(&report, 2), "miss", "{report}");
    assert_eq!(
        err.matches("warning: the cache could not deliver layer")
            .count(),
        1,
        "{err}"
    );
    let pushed = world.registry.skopeo_inspect("lost-hit:v1").unwrap();
    assert_eq!(pushed["Layers"].as_array().unwrap().len(), 2, "{pushed}");
}

#[test]
fn a_base_layer_the_cache_corrupts_comes_from_the_registry() {
    let world = World::new();
    let blobs = HashMap::from([(world.base_layer.clone(), BlobAnswer::Endless)]);
    let cache = HostileCache::start(LookupAnswer::Entries(vec![]), blobs).unwrap();
    // The unpack path asks the cache for a base layer before the registry.
    // (A mounted base with no layer image in the cache is pulled from the
    // registry and converted in one pass, never read from the cache's tar;
    // a corrupt layer image is covered in mountable_layers.)
    let (out, report) = build(
        &world.registry,
        &world.ctx,
        &world.state("base"),
        &cache.url(),
        &["--mountable-layers=false"],
    );
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    assert_eq!(report["summary"]["misses"], 2, "{report}");
    assert_eq!(
        err.matches("warning: the cache could not deliver base layer")
            .count(),
        1,
        "{err}"
    );
    assert!(
        world.registry.log().lines().any(|l| l.contains(&format!(
            "GET /v2/library/busybox/blobs/{}",
            world.base_layer
        ))),
        "the base layer was pulled from the registry"
    );
}

#[test]
fn an_endless_lookup_answer_costs_only_a_warning() {
    let world = World::new();
    let cache = HostileCache::start(LookupAnswer::Endless, HashMap::new()).unwrap();
    let (out, report) = build(
        &world.registry,
        &world.ctx,
        &world.state("lookup"),
        &cache.url(),
        &[],
    );
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("warning: the cache is unavailable"), "{err}");
    assert!(err.contains("larger than"), "{err}");
    assert_eq!(report["summary"]["misses"], 2, "{report}");
}

#[test]
fn steps_that_ran_before_a_hit_was_lost_are_not_run_again() {
    let world = World::new();
    // Line 2 misses and runs; line 3 hits, and its layer turns out corrupt
    // only when the push needs it: the restart replays line 2.
    let (key3, entry3, digest3, layer3) = world.line3.clone();
    let cache = HostileCache::start(
        LookupAnswer::Entries(vec![(key3.clone(), entry3)]),
        HashMap::from([(digest3.clone(), BlobAnswer::Corrupt(layer3))]),
    )
    .unwrap();
    let dest = world.registry.reference("replayed:v1");
    let (out, report) = build(
        &world.registry,
        &world.ctx,
        &world.state("replay"),
        &cache.url(),
        &[&format!("--destination={dest}")],
    );
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    assert_eq!(cache_column(&report, 2), "miss", "{report}");
    assert_eq!(cache_column(&report, 3), "miss", "{report}");
    assert_eq!(
        err.matches("cache miss: RUN echo one > /one").count(),
        1,
        "line 2 ran once: {err}"
    );
    assert_eq!(
        err.matches("cache hit: RUN cat /one > /two").count(),
        1,
        "{err}"
    );
    assert_eq!(
        err.matches("cache miss: RUN cat /one > /two").count(),
        1,
        "{err}"
    );
    assert!(
        err.contains(&format!("could not deliver layer {digest3} of line 3")),
        "{err}"
    );
    let requests = cache.requests();
    assert!(
        !requests
            .iter()
            .any(|r| r.starts_with(&format!("PUT /v1/entries/{key3}"))),
        "{requests:?}"
    );
    let pushed = world.registry.skopeo_inspect("replayed:v1").unwrap();
    assert_eq!(pushed["Layers"].as_array().unwrap().len(), 3, "{pushed}");
}
