//! Images in and out against real tools: kiln's registry client against a
//! real Distribution registry (no auth, Basic, token), and kiln's OCI
//! layouts / docker archives against skopeo and umoci, both directions.

use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use kiln_common::Digest;
use kiln_e2e::{BUSYBOX_APPLETS, Registry, RegistryAuth, push_busybox, run};
use kiln_executor::build::unpack::{UnpackOptions, apply_layers};
use kiln_executor::oci::archive::write_docker_archive_file;
use kiln_executor::oci::layout::OciLayout;
use kiln_executor::oci::{ImageDocuments, Platform, media};
use kiln_executor::registry::client::PulledImage;
use kiln_executor::registry::{Credentials, ImageRef, RegistryClient, RegistryOptions};
use kiln_executor::store::LocalStore;

fn options_for(reg: &Registry) -> RegistryOptions {
    let mut opts = RegistryOptions {
        insecure_registries: vec![reg.host()],
        use_docker_config: false,
        retry_backoff: Duration::from_millis(50),
        ..Default::default()
    };
    if let Some((u, p)) = reg.credentials() {
        opts.credentials
            .insert(reg.host(), Credentials::new(&u, &p));
    }
    opts
}

fn client_for(reg: &Registry) -> RegistryClient {
    RegistryClient::new(options_for(reg)).unwrap()
}

fn platform() -> Platform {
    Platform::host()
}

/// Unpacks a pulled image from the store and checks it is the busybox image.
fn unpack_and_check(store: &LocalStore, image: &ImageDocuments, root: &Path) {
    let paths: Vec<_> = image
        .manifest
        .layers
        .iter()
        .map(|l| store.path(&l.digest))
        .collect();
    let diff_ids = &image.config.rootfs.diff_ids;
    assert_eq!(diff_ids.len(), paths.len());
    apply_layers(
        paths
            .iter()
            .map(|p| p.as_path())
            .zip(diff_ids.iter().map(Some)),
        root,
        &UnpackOptions::default(),
    )
    .unwrap();
    assert_eq!(
        fs::read(root.join("bin/busybox")).unwrap(),
        fs::read("/bin/busybox").unwrap()
    );
    for applet in BUSYBOX_APPLETS {
        assert_eq!(
            fs::read_link(root.join("bin").join(applet)).unwrap(),
            Path::new("busybox")
        );
    }
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        fs::metadata(root.join("tmp")).unwrap().permissions().mode() & 0o7777,
        0o1777
    );
    assert!(
        fs::read_to_string(root.join("etc/passwd"))
            .unwrap()
            .starts_with("root:x:0:0")
    );
}

fn count(log: &str, needle: &str) -> usize {
    log.lines().filter(|l| l.contains(needle)).count()
}

async fn pull(client: &RegistryClient, reference: &str, store: &LocalStore) -> PulledImage {
    client
        .pull(&ImageRef::parse(reference).unwrap(), &platform(), store)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pull_and_unpack_busybox_without_auth_then_reuse_local_blobs() {
    let reg = Registry::start(RegistryAuth::None).unwrap();
    let work = tempfile::tempdir().unwrap();
    push_busybox(&reg, work.path(), "busybox:latest", &[]).unwrap();
    let store = LocalStore::new(work.path().join("store")).unwrap();
    let client = client_for(&reg);

    let pulled = pull(&client, &reg.reference("busybox"), &store).await;
    assert_eq!(pulled.image.manifest_media_type, media::OCI_MANIFEST);
    assert_eq!(
        pulled.reference.digest(),
        Some(&pulled.image.manifest_digest)
    );
    let skopeo_raw = reg.skopeo_raw_manifest("busybox:latest").unwrap();
    assert_eq!(Digest::of_bytes(&skopeo_raw), pulled.image.manifest_digest);
    assert_eq!(
        pulled.image.config.config.cmd.as_deref(),
        Some(&["sh".to_string()][..])
    );
    let root = work.path().join("rootfs");
    fs::create_dir(&root).unwrap();
    unpack_and_check(&store, &pulled.image, &root);

    // A second pull finds the layers in the local store: no blob GET again.
    let layer = &pulled.image.manifest.layers[0].digest;
    let needle = format!("\"GET /v2/busybox/blobs/{layer}");
    assert_eq!(count(&reg.log(), &needle), 1, "{}", reg.log());
    let again = pull(&client, &reg.reference("busybox:latest"), &store).await;
    assert_eq!(again.image.manifest_digest, pulled.image.manifest_digest);
    assert_eq!(count(&reg.log(), &needle), 1, "layer downloaded twice");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn basic_auth_pull_works_with_credentials_and_fails_without() {
    let reg = Registry::start(RegistryAuth::basic("alice", "wonderland")).unwrap();
    let work = tempfile::tempdir().unwrap();
    push_busybox(&reg, work.path(), "team/busybox:1", &[]).unwrap();
    let store = LocalStore::new(work.path().join("store")).unwrap();

    let pulled = pull(&client_for(&reg), &reg.reference("team/busybox:1"), &store).await;
    let root = work.path().join("rootfs");
    fs::create_dir(&root).unwrap();
    unpack_and_check(&store, &pulled.image, &root);

    let mut anonymous = options_for(&reg);
    anonymous.credentials.clear();
    let client = RegistryClient::new(anonymous).unwrap();
    let err = client
        .pull(
            &ImageRef::parse(&reg.reference("team/busybox:1")).unwrap(),
            &platform(),
            &store,
        )
        .await
        .unwrap_err();
    assert!(err.to_string().contains("unauthorized"), "{err}");

    let mut wrong = options_for(&reg);
    wrong
        .credentials
        .insert(reg.host(), Credentials::new("alice", "nope"));
    let err = RegistryClient::new(wrong)
        .unwrap()
        .resolve(
            &ImageRef::parse(&reg.reference("team/busybox:1")).unwrap(),
            &platform(),
        )
        .await
        .unwrap_err();
    assert!(err.to_string().contains("as alice"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_auth_pull_and_push_use_scoped_cached_tokens() {
    let reg = Registry::start(RegistryAuth::token("tok", "en")).unwrap();
    let work = tempfile::tempdir().unwrap();
    push_busybox(&reg, work.path(), "busybox:latest", &[]).unwrap();
    let store = LocalStore::new(work.path().join("store")).unwrap();
    let client = client_for(&reg);
    let before = reg.token_requests().len();

    let pulled = pull(&client, &reg.reference("busybox"), &store).await;
    let root = work.path().join("rootfs");
    fs::create_dir(&root).unwrap();
    unpack_and_check(&store, &pulled.image, &root);
    let pull_tokens = reg.token_requests()[before..].to_vec();
    assert_eq!(
        pull_tokens,
        ["repository:busybox:pull"],
        "one cached pull token for manifest, config and layers"
    );

    let dest = ImageRef::parse(&reg.reference("copy:v1")).unwrap();
    let hint = ImageRef::parse(&reg.reference("busybox")).unwrap();
    let digest = client
        .push_image(&pulled.image, &[dest], &store, &[hint])
        .await
        .unwrap();
    assert_eq!(digest, pulled.image.manifest_digest);
    let all = reg.token_requests();
    assert!(
        all.iter()
            .any(|s| s == "repository:copy:pull,push repository:busybox:pull"),
        "mount needs push on the target and pull on the source: {all:?}"
    );
    assert_eq!(
        Digest::of_bytes(&reg.skopeo_raw_manifest("copy:v1").unwrap()),
        digest
    );

    let mut anonymous = options_for(&reg);
    anonymous.credentials.clear();
    let err = RegistryClient::new(anonymous)
        .unwrap()
        .resolve(
            &ImageRef::parse(&reg.reference("busybox")).unwrap(),
            &platform(),
        )
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("token endpoint answered 401"),
        "{err}"
    );
}

/// The image a metadata-only build makes: the base's layers, a new config.
fn retagged_with_new_config(base: &ImageDocuments) -> ImageDocuments {
    let mut config = base.config.clone();
    let cc = &mut config.config;
    cc.labels = [("org.example.built-by".to_string(), "kiln".to_string())].into();
    cc.env = vec!["PATH=/bin".into(), "GREETING=hello".into()];
    ImageDocuments::build(&config, base.manifest.layers.clone(), false)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pushed_image_reaches_two_repositories_with_one_upload_and_skopeo_sees_same_digest() {
    let reg = Registry::start(RegistryAuth::basic("u", "p")).unwrap();
    let work = tempfile::tempdir().unwrap();
    push_busybox(&reg, work.path(), "busybox:latest", &[]).unwrap();
    let store = LocalStore::new(work.path().join("store")).unwrap();
    let client = client_for(&reg);
    let pulled = pull(&client, &reg.reference("busybox"), &store).await;

    let image = retagged_with_new_config(&pulled.image);
    let dests = [
        ImageRef::parse(&reg.reference("app/one:v1")).unwrap(),
        ImageRef::parse(&reg.reference("app/two:v2")).unwrap(),
    ];
    // No mount hint: the first repository gets a real upload, the second a
    // mount from the first.
    let digest = client
        .push_image(&image, &dests, &store, &[])
        .await
        .unwrap();
    assert_eq!(digest, image.manifest_digest);

    for tag in ["app/one:v1", "app/two:v2"] {
        let raw = reg.skopeo_raw_manifest(tag).unwrap();
        assert_eq!(Digest::of_bytes(&raw), digest, "{tag}");
        let info = reg.skopeo_inspect(tag).unwrap();
        assert_eq!(info["Labels"]["org.example.built-by"], "kiln");
        assert_eq!(info["Env"][1], "GREETING=hello");
        assert_eq!(info["Digest"], digest.to_string());
    }
    let log = reg.log();
    let layer = &image.manifest.layers[0].digest;
    let config = &image.manifest.config.digest;
    assert_eq!(
        count(&log, "\"PUT /v2/app/one/blobs/uploads/"),
        2,
        "layer and config uploaded once:\n{log}"
    );
    assert_eq!(
        count(&log, "\"PUT /v2/app/two/blobs/uploads/"),
        0,
        "nothing uploaded twice:\n{log}"
    );
    for d in [layer, config] {
        let mount =
            format!("\"POST /v2/app/two/blobs/uploads/?mount={d}&from=app/one HTTP/1.1\" 201");
        assert_eq!(count(&log, &mount), 1, "mounted {d}:\n{log}");
    }

    // Pushing again uploads nothing: HEAD finds every blob.
    let posts_before = count(&reg.log(), "\"POST /v2/app/");
    client
        .push_image(&image, &dests, &store, &[])
        .await
        .unwrap();
    assert_eq!(count(&reg.log(), "\"POST /v2/app/"), posts_before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_blob_is_uploaded_in_chunks_and_base_layers_are_mounted_from_the_base_repository() {
    let reg = Registry::start(RegistryAuth::None).unwrap();
    let work = tempfile::tempdir().unwrap();
    push_busybox(&reg, work.path(), "library/base:latest", &[]).unwrap();
    let store = LocalStore::new(work.path().join("store")).unwrap();
    let plain = client_for(&reg);
    let base_ref = ImageRef::parse(&reg.reference("library/base")).unwrap();
    let pulled = plain.pull(&base_ref, &platform(), &store).await.unwrap();

    // A new 1 MiB (incompressible) layer pushed in 256 KiB chunks.
    let mut w = store.writer().unwrap();
    let mut data = Vec::with_capacity(1 << 20);
    let mut x: u64 = 0x9E3779B97F4A7C15;
    while data.len() < (1 << 20) + 123 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        data.extend_from_slice(&x.to_le_bytes());
    }
    std::io::Write::write_all(&mut w, &data).unwrap();
    let (new_layer, size) = w.commit_computed().unwrap();
    let mut layers = pulled.image.manifest.layers.clone();
    layers.push(kiln_executor::oci::Descriptor::new(
        media::OCI_LAYER,
        new_layer.clone(),
        size,
    ));
    let mut config = pulled.image.config.clone();
    config.rootfs.diff_ids.push(new_layer.clone());
    let image = ImageDocuments::build(&config, layers, false);

    let chunked = RegistryClient::new(RegistryOptions {
        chunk_size: 256 * 1024,
        ..options_for(&reg)
    })
    .unwrap();
    let dest = ImageRef::parse(&reg.reference("team/app:v1")).unwrap();
    chunked
        .push_image(&image, &[dest], &store, &[base_ref])
        .await
        .unwrap();

    let log = reg.log();
    assert_eq!(
        count(&log, "\"PATCH /v2/team/app/blobs/uploads/"),
        5,
        "1 MiB + 123 B in 256 KiB chunks:\n{log}"
    );
    let base_layer = &pulled.image.manifest.layers[0].digest;
    let mount = format!(
        "\"POST /v2/team/app/blobs/uploads/?mount={base_layer}&from=library/base HTTP/1.1\" 201"
    );
    assert_eq!(count(&log, &mount), 1, "base layer mounted:\n{log}");

    // skopeo reads the chunked blob back with the right digest.
    let out = work.path().join("copy");
    run(Command::new("skopeo")
        .args([
            "copy",
            "--src-tls-verify=false",
            "--dest-oci-accept-uncompressed-layers",
        ])
        .arg(format!("docker://{}", reg.reference("team/app:v1")))
        .arg(format!("oci:{}:x", out.display())))
    .unwrap();
    let copied = fs::read(out.join("blobs/sha256").join(new_layer.hex())).unwrap();
    assert_eq!(Digest::of_bytes(&copied), new_layer);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_schema2_and_zstd_images_made_by_skopeo_pull_and_unpack() {
    let reg = Registry::start(RegistryAuth::None).unwrap();
    let work = tempfile::tempdir().unwrap();
    push_busybox(&reg, work.path(), "v2s2:latest", &["--format", "v2s2"]).unwrap();
    // Recompress locally first: pushing straight to the registry would let
    // skopeo reuse the gzip blob it already pushed there.
    let zstd_layout = work.path().join("zstd-layout");
    run(Command::new("skopeo")
        .args(["copy", "--dest-compress-format", "zstd"])
        .arg(format!(
            "oci:{}:latest",
            work.path().join("busybox-layout").display()
        ))
        .arg(format!("oci:{}:latest", zstd_layout.display())))
    .unwrap();
    reg.skopeo_copy_in(
        &format!("oci:{}:latest", zstd_layout.display()),
        "zstd:latest",
        &["--dest-compress-format", "zstd"],
    )
    .unwrap();
    let client = client_for(&reg);

    let store = LocalStore::new(work.path().join("store")).unwrap();
    let docker = pull(&client, &reg.reference("v2s2"), &store).await;
    assert_eq!(docker.image.manifest_media_type, media::DOCKER_MANIFEST);
    assert_eq!(
        docker.image.manifest.config.media_type,
        media::DOCKER_CONFIG
    );
    assert_eq!(
        docker.image.manifest.layers[0].media_type,
        media::DOCKER_LAYER_GZIP
    );
    let root = work.path().join("docker-root");
    fs::create_dir(&root).unwrap();
    unpack_and_check(&store, &docker.image, &root);

    let zstd = pull(&client, &reg.reference("zstd"), &store).await;
    assert_eq!(
        zstd.image.manifest.layers[0].media_type,
        media::OCI_LAYER_ZSTD
    );
    let magic = fs::read(store.path(&zstd.image.manifest.layers[0].digest)).unwrap();
    assert_eq!(&magic[..4], &[0x28, 0xb5, 0x2f, 0xfd]);
    let root = work.path().join("zstd-root");
    fs::create_dir(&root).unwrap();
    unpack_and_check(&store, &zstd.image, &root);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oci_layout_and_docker_archive_written_by_kiln_are_read_by_skopeo_and_umoci() {
    let reg = Registry::start(RegistryAuth::None).unwrap();
    let work = tempfile::tempdir().unwrap();
    push_busybox(&reg, work.path(), "busybox:latest", &[]).unwrap();
    let store = LocalStore::new(work.path().join("store")).unwrap();
    let pulled = pull(&client_for(&reg), &reg.reference("busybox"), &store).await;
    let image = retagged_with_new_config(&pulled.image);

    // OCI layout -> skopeo and umoci.
    let layout_dir = work.path().join("out-layout");
    let layout = OciLayout::create(&layout_dir).unwrap();
    layout.add_image(&image, &store, Some("v1")).unwrap();
    let info: serde_json::Value = serde_json::from_str(
        &run(Command::new("skopeo")
            .arg("inspect")
            .arg(format!("oci:{}:v1", layout_dir.display())))
        .unwrap(),
    )
    .unwrap();
    assert_eq!(info["Digest"], image.manifest_digest.to_string());
    assert_eq!(info["Labels"]["org.example.built-by"], "kiln");
    let bundle = work.path().join("bundle");
    run(Command::new("umoci")
        .args(["unpack", "--image"])
        .arg(format!("{}:v1", layout_dir.display()))
        .arg(&bundle))
    .unwrap();
    assert_eq!(
        fs::read(bundle.join("rootfs/bin/busybox")).unwrap(),
        fs::read("/bin/busybox").unwrap()
    );
    assert!(
        fs::read_to_string(bundle.join("config.json"))
            .unwrap()
            .contains("GREETING=hello")
    );

    // docker archive -> skopeo (inspect and copy to a layout).
    let tar = work.path().join("image.tar");
    let tag = ImageRef::parse("example.com/kiln/test:v9").unwrap();
    write_docker_archive_file(&tar, &image, &store, &[tag]).unwrap();
    let info: serde_json::Value = serde_json::from_str(
        &run(Command::new("skopeo")
            .arg("inspect")
            .arg(format!("docker-archive:{}", tar.display())))
        .unwrap(),
    )
    .unwrap();
    // skopeo names docker-archive layers by their uncompressed digests.
    let diff_ids: Vec<String> = image
        .config
        .rootfs
        .diff_ids
        .iter()
        .map(|d| d.to_string())
        .collect();
    assert_eq!(info["Layers"], serde_json::json!(diff_ids));
    // The tag is in manifest.json: skopeo can select the image by it.
    run(Command::new("skopeo").arg("inspect").arg(format!(
        "docker-archive:{}:example.com/kiln/test:v9",
        tar.display()
    )))
    .unwrap();
    let copy = work.path().join("from-archive");
    run(Command::new("skopeo")
        .arg("copy")
        .arg(format!("docker-archive:{}", tar.display()))
        .arg(format!("oci:{}:x", copy.display())))
    .unwrap();
    let bundle2 = work.path().join("bundle2");
    run(Command::new("umoci")
        .args(["unpack", "--image"])
        .arg(format!("{}:x", copy.display()))
        .arg(&bundle2))
    .unwrap();
    assert!(bundle2.join("rootfs/bin/busybox").is_file());
}

#[test]
fn umoci_layout_is_a_base_image_that_unpacks_with_kiln() {
    let work = tempfile::tempdir().unwrap();
    let layout_dir = work.path().join("umoci");
    kiln_e2e::make_busybox_layout(&layout_dir, "stable").unwrap();
    let (path, name) = kiln_executor::oci::layout::parse_layout_reference(&format!(
        "oci-layout://{}:stable",
        layout_dir.display()
    ));
    let layout = OciLayout::open(path).unwrap();
    let image = layout.resolve(name.as_deref(), &platform()).unwrap();
    let paths: Vec<_> = image
        .manifest
        .layers
        .iter()
        .map(|l| layout.path(&l.digest))
        .collect();
    let root = work.path().join("root");
    fs::create_dir(&root).unwrap();
    apply_layers(
        paths
            .iter()
            .map(|p| p.as_path())
            .zip(image.config.rootfs.diff_ids.iter().map(Some)),
        &root,
        &UnpackOptions::default(),
    )
    .unwrap();
    assert_eq!(
        fs::read(root.join("bin/busybox")).unwrap(),
        fs::read("/bin/busybox").unwrap()
    );
    assert_eq!(
        fs::read_link(root.join("bin/sh")).unwrap(),
        Path::new("busybox")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn platform_is_chosen_from_oci_index_and_docker_manifest_list() {
    let reg = Registry::start(RegistryAuth::None).unwrap();
    let work = tempfile::tempdir().unwrap();
    let layout_dir = work.path().join("multi");
    kiln_e2e::make_busybox_layout(&layout_dir, "latest").unwrap();
    let layout = OciLayout::open(&layout_dir).unwrap();
    let host_image = layout.resolve(Some("latest"), &platform()).unwrap();
    // A second "platform" sharing the layers (kiln never runs it).
    let mut other_config = host_image.config.clone();
    let (other_arch, other_variant) = if other_config.architecture == "arm64" {
        ("amd64", None)
    } else {
        ("arm64", Some("v8"))
    };
    other_config.architecture = other_arch.into();
    other_config.variant = other_variant.map(str::to_string);
    let other = ImageDocuments::build(&other_config, host_image.manifest.layers.clone(), false);
    layout.add_image(&other, &layout, Some("other")).unwrap();
    let entry = |img: &ImageDocuments| kiln_executor::oci::Descriptor {
        platform: Some(img.config.platform()),
        ..img.manifest_descriptor()
    };
    layout
        .add_index(
            &kiln_executor::oci::Index::oci(vec![entry(&host_image), entry(&other)]),
            "multi",
        )
        .unwrap();
    let src = format!("oci:{}:multi", layout_dir.display());
    reg.skopeo_copy_in(&src, "multi:oci", &["--all"]).unwrap();
    reg.skopeo_copy_in(&src, "multi:docker", &["--all", "--format", "v2s2"])
        .unwrap();

    let client = client_for(&reg);
    let raw = client
        .get_manifest(&ImageRef::parse(&reg.reference("multi:docker")).unwrap())
        .await
        .unwrap();
    assert_eq!(raw.media_type, media::DOCKER_MANIFEST_LIST);
    for tag in ["multi:oci", "multi:docker"] {
        let r = ImageRef::parse(&reg.reference(tag)).unwrap();
        let mine = client.resolve(&r, &platform()).await.unwrap();
        assert_eq!(
            mine.image.config.architecture, host_image.config.architecture,
            "{tag}"
        );
        let other_platform = Platform::new("linux", other_arch, None);
        let theirs = client.resolve(&r, &other_platform).await.unwrap();
        assert_eq!(theirs.image.config.architecture, other_arch, "{tag}");
        assert_ne!(theirs.image.manifest_digest, mine.image.manifest_digest);
        let err = client
            .resolve(&r, &"linux/s390x".parse().unwrap())
            .await
            .unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("linux/s390x") && text.contains(&format!("linux/{other_arch}")),
            "{text}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_hub_images_are_pulled_from_a_mirror() {
    // No internet here: the pull can only succeed through the mirror.
    let reg = Registry::start(RegistryAuth::None).unwrap();
    let work = tempfile::tempdir().unwrap();
    push_busybox(&reg, work.path(), "library/busybox:latest", &[]).unwrap();
    let client = RegistryClient::new(RegistryOptions {
        mirrors: vec![format!("http://{}", reg.host())],
        pull_retries: 0,
        ..options_for(&reg)
    })
    .unwrap();
    let store = LocalStore::new(work.path().join("store")).unwrap();
    let pulled = pull(&client, "busybox", &store).await;
    assert_eq!(pulled.reference.name(), "docker.io/library/busybox");
    let root = work.path().join("root");
    fs::create_dir(&root).unwrap();
    unpack_and_check(&store, &pulled.image, &root);
    assert_eq!(
        count(&reg.log(), "\"GET /v2/library/busybox/manifests/latest"),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_come_from_docker_config_json() {
    use base64::Engine;
    let reg = Registry::start(RegistryAuth::basic("carol", "s3cret")).unwrap();
    let work = tempfile::tempdir().unwrap();
    push_busybox(&reg, work.path(), "busybox:latest", &[]).unwrap();
    let config = work.path().join("config.json");
    let auth = base64::engine::general_purpose::STANDARD.encode("carol:s3cret");
    fs::write(
        &config,
        format!(
            r#"{{"auths":{{"http://{}/":{{"auth":"{auth}"}}}}}}"#,
            reg.host()
        ),
    )
    .unwrap();
    let mut opts = options_for(&reg);
    opts.credentials.clear();
    opts.use_docker_config = true;
    opts.docker_config_path = Some(config);
    let client = RegistryClient::new(opts).unwrap();
    let r = ImageRef::parse(&reg.reference("busybox")).unwrap();
    let pulled = client.resolve(&r, &platform()).await.unwrap();
    assert_eq!(pulled.image.config.os, "linux");
}

#[test]
fn docker_archive_made_by_skopeo_is_a_base_image_that_unpacks_with_kiln() {
    let work = tempfile::tempdir().unwrap();
    let layout_dir = work.path().join("umoci");
    kiln_e2e::make_busybox_layout(&layout_dir, "latest").unwrap();
    let tar = work.path().join("busybox.tar");
    run(Command::new("skopeo")
        .arg("copy")
        .arg(format!("oci:{}:latest", layout_dir.display()))
        .arg(format!("docker-archive:{}:busybox:1.0", tar.display())))
    .unwrap();
    let store = LocalStore::new(work.path().join("store")).unwrap();
    let image = kiln_executor::oci::archive::read_docker_archive(&tar, &store, Some("busybox:1.0"))
        .unwrap();
    let root = work.path().join("root");
    fs::create_dir(&root).unwrap();
    unpack_and_check(&store, &image, &root);
}

/// Unmounts on drop, so a failing assertion does not leave a mount behind.
struct Mounted(std::path::PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

fn layer_tar(entries: &[(&str, Option<&[u8]>)]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (name, data) in entries {
        let mut h = tar::Header::new_gnu();
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        match data {
            Some(d) => {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_mode(0o644);
                h.set_size(d.len() as u64);
                h.set_path(name).unwrap();
                h.set_cksum();
                b.append(&h, *d).unwrap();
            }
            None => {
                h.set_entry_type(tar::EntryType::Directory);
                h.set_mode(0o755);
                h.set_size(0);
                h.set_path(name).unwrap();
                h.set_cksum();
                b.append(&h, std::io::empty()).unwrap();
            }
        }
    }
    b.into_inner().unwrap()
}

#[test]
fn overlay_lower_dirs_mount_as_overlayfs_with_whiteouts_honoured() {
    let work = tempfile::tempdir().unwrap();
    let lower = layer_tar(&[
        ("etc/", None),
        ("etc/a", Some(b"a")),
        ("etc/b", Some(b"b")),
        ("opq/", None),
        ("opq/old", Some(b"old")),
    ]);
    let upper = layer_tar(&[
        ("etc/.wh.a", Some(b"")),
        ("opq/.wh..wh..opq", Some(b"")),
        ("opq/new", Some(b"new")),
    ]);
    let (l1, l2, merged) = (
        work.path().join("l1"),
        work.path().join("l2"),
        work.path().join("merged"),
    );
    for d in [&l1, &l2, &merged] {
        fs::create_dir(d).unwrap();
    }
    let opts = UnpackOptions::overlay_lower();
    kiln_executor::build::unpack::unpack_layer(&lower[..], &l1, &opts, None).unwrap();
    kiln_executor::build::unpack::unpack_layer(&upper[..], &l2, &opts, None).unwrap();

    run(Command::new("mount")
        .args(["-t", "overlay", "overlay", "-o"])
        .arg(format!("lowerdir={}:{}", l2.display(), l1.display()))
        .arg(&merged))
    .unwrap();
    let _guard = Mounted(merged.clone());
    assert_eq!(fs::read(merged.join("etc/b")).unwrap(), b"b");
    assert!(
        !merged.join("etc/a").exists(),
        "whiteout hides the lower file"
    );
    assert_eq!(fs::read(merged.join("opq/new")).unwrap(), b"new");
    assert!(
        !merged.join("opq/old").exists(),
        "opaque directory hides lower content"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_registry_is_trusted_through_an_extra_ca_or_skip_tls_verify_only() {
    let reg = Registry::start_tls(RegistryAuth::basic("t", "ls")).unwrap();
    let work = tempfile::tempdir().unwrap();
    push_busybox(&reg, work.path(), "busybox:latest", &[]).unwrap();
    let r = ImageRef::parse(&reg.reference("busybox")).unwrap();
    let https = |o: RegistryOptions| RegistryOptions {
        insecure_registries: vec![],
        pull_retries: 0,
        ..o
    };

    let untrusted = RegistryClient::new(https(options_for(&reg))).unwrap();
    let err = untrusted.resolve(&r, &platform()).await.unwrap_err();
    assert!(
        err.to_string().contains(&format!("https://{}", reg.host())),
        "{err}"
    );

    let with_ca = RegistryClient::new(RegistryOptions {
        ca_certificates: vec![reg.ca_certificate()],
        ..https(options_for(&reg))
    })
    .unwrap();
    let store = LocalStore::new(work.path().join("store")).unwrap();
    let pulled = with_ca.pull(&r, &platform(), &store).await.unwrap();
    let root = work.path().join("root");
    fs::create_dir(&root).unwrap();
    unpack_and_check(&store, &pulled.image, &root);

    for opts in [
        RegistryOptions {
            skip_tls_verify: true,
            ..https(options_for(&reg))
        },
        RegistryOptions {
            skip_tls_verify_registries: vec![reg.host()],
            ..https(options_for(&reg))
        },
    ] {
        let client = RegistryClient::new(opts).unwrap();
        assert_eq!(
            client
                .resolve(&r, &platform())
                .await
                .unwrap()
                .image
                .manifest_digest,
            pulled.image.manifest_digest
        );
    }
    // Pull-only skipping does not cover pushes.
    let pull_only = RegistryClient::new(RegistryOptions {
        skip_tls_verify_pull: true,
        ..https(options_for(&reg))
    })
    .unwrap();
    pull_only.resolve(&r, &platform()).await.unwrap();
    let dest = ImageRef::parse(&reg.reference("pushed:v1")).unwrap();
    assert!(
        pull_only
            .push_image(&pulled.image, &[dest], &store, &[])
            .await
            .is_err()
    );
}
