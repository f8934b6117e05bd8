//! Where the build context comes from: `--context` as Kaniko accepts it.
//!
//! [`ContextSpec::parse`] reads the flag's value (with `--bucket`,
//! `--context-sub-path` and `--git`) into a [`Source`]: a local directory
//! (a plain path or `dir://PATH`), a tar archive (`tar://PATH`, or
//! `tar://stdin`), a git repository (`git://host/repo.git#ref#commit`,
//! `https://…/repo.git`), an object in a bucket (`s3://`, `gs://`, `az://`,
//! `https://<account>.blob.core.windows.net/…`) or a tarball over HTTPS.
//! [`ContextSpec::materialize`] turns it into a directory: a local one is
//! used where it is; everything else is fetched into a new private (0700)
//! directory that the returned [`Materialized`] removes when it drops, on
//! success and failure alike. After that a context is a directory like any
//! other (`.dockerignore`, hashing: [`crate::sources::context`]).
//!
//! Promises: archives are unpacked by [`crate::build::unpack`], with the rules
//! (and the size limit) that apply to image layers, so an entry can never
//! write outside the context directory; a git tree goes through the same
//! unpacker as a tar stream, so hostile tree entries meet the same rules.
//! No git binary is used (gix, see docs/decisions.md). `--context-sub-path`
//! may not leave the fetched context. Every error names the context URL or
//! path and what failed, once.

use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::build::unpack::{UnpackOptions, unpack_layer};

/// The object Kaniko reads from a bucket when `--bucket`/`gs://bucket`
/// names no object.
pub const DEFAULT_OBJECT: &str = "context.tar.gz";

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("--context {context:?}: {message}")]
    Parse { context: String, message: String },
    #[error("--git {value:?}: {message}")]
    GitOption { value: String, message: String },
    #[error("--context-sub-path {sub_path:?}: {message}")]
    SubPath { sub_path: String, message: String },
    #[error("build context {context}: {message}")]
    Fetch { context: String, message: String },
}

/// The `--git` options (Kaniko's `key=value` settings).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GitOptions {
    /// A branch (or tag) name to check out, looked up as `refs/heads/NAME`
    /// then `refs/tags/NAME`; wins over the ref in the URL.
    pub branch: Option<String>,
    /// Fetch only the ref that is checked out.
    pub single_branch: bool,
    /// Fetch submodules and put their trees where the gitlinks are.
    pub recurse_submodules: bool,
    /// Accept any TLS certificate of an https git server.
    pub insecure_skip_tls: bool,
}

impl GitOptions {
    /// Applies `--git` values in order: `key=value`, or several of them
    /// separated by commas (the form Kaniko's help prints).
    pub fn parse<S: AsRef<str>>(values: &[S]) -> Result<GitOptions, SourceError> {
        let mut opts = GitOptions::default();
        for value in values {
            let value = value.as_ref();
            for setting in value.split(',').filter(|s| !s.trim().is_empty()) {
                let error = |message: String| SourceError::GitOption {
                    value: value.to_owned(),
                    message,
                };
                let (key, v) = setting
                    .split_once('=')
                    .ok_or_else(|| error(format!("{setting:?} is not key=value")))?;
                let flag = || {
                    parse_go_bool(v).ok_or_else(|| error(format!("{key}: {v:?} is not a boolean")))
                };
                match key.trim() {
                    "branch" => opts.branch = Some(v.to_owned()).filter(|b| !b.is_empty()),
                    "single-branch" => opts.single_branch = flag()?,
                    "recurse-submodules" => opts.recurse_submodules = flag()?,
                    "insecure-skip-tls" => opts.insecure_skip_tls = flag()?,
                    // Some Kaniko builds take a clone depth; the whole
                    // history is fetched here, which gives the same tree.
                    "depth" => {
                        v.parse::<i64>()
                            .map_err(|_| error(format!("depth: {v:?} is not a number")))?;
                    }
                    other => {
                        return Err(error(format!(
                            "unknown key {other:?} (branch, single-branch, recurse-submodules, insecure-skip-tls)"
                        )));
                    }
                }
            }
        }
        Ok(opts)
    }
}

/// Go's `strconv.ParseBool`, which Kaniko's flags use.
fn parse_go_bool(v: &str) -> Option<bool> {
    match v {
        "1" | "t" | "T" | "true" | "TRUE" | "True" => Some(true),
        "0" | "f" | "F" | "false" | "FALSE" | "False" => Some(false),
        _ => None,
    }
}

/// Which object store a bucket context lives in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Store {
    S3,
    Gcs,
    Azure,
}

/// An archive in a bucket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectSource {
    pub store: Store,
    pub bucket: String,
    pub key: String,
    /// The Azure account named by an `https://<account>.blob…` URL, and
    /// that URL's scheme and host (its blob endpoint).
    pub azure_account: Option<(String, String)>,
}

/// A git repository and what to check out of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GitSource {
    /// The URL fetched from (`https://`, `http://`, `git://` or `file://`).
    pub url: String,
    /// After the first `#`: a ref (`refs/heads/main`, `refs/pull/1/head`,
    /// a branch or tag name) or a commit id.
    pub reference: Option<String>,
    /// After the second `#`: the commit to check out.
    pub commit: Option<String>,
}

/// A parsed `--context`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    Dir(PathBuf),
    /// A `.tar`, `.tar.gz` (or zstd) file.
    Tar(PathBuf),
    /// A tar (gzip-compressed or not) read from standard input.
    TarStdin,
    Git(GitSource),
    Object(ObjectSource),
    /// A tarball fetched with an HTTPS GET (Kaniko's `https://` context).
    HttpsTar(String),
}

/// `--context`, `--bucket`, `--context-sub-path` and `--git`, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContextSpec {
    /// What the user gave (for messages).
    pub given: String,
    pub source: Source,
    pub sub_path: Option<String>,
    pub git: GitOptions,
}

/// A context directory ready for the build; a fetched one is removed when
/// this drops.
#[derive(Debug)]
pub struct Materialized {
    dir: PathBuf,
    scratch: Option<tempfile::TempDir>,
}

impl Materialized {
    /// The context directory (with `--context-sub-path` applied).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Whether the context was fetched into a directory of its own.
    pub fn is_fetched(&self) -> bool {
        self.scratch.is_some()
    }
}

impl ContextSpec {
    /// Parses `--context` the way Kaniko does: `SCHEME://` picks the source,
    /// anything else is a local directory. `--bucket` (a GCS bucket unless
    /// it has a scheme) replaces a `SCHEME://` context or the default one
    /// (`explicit_context` false), as in Kaniko; kiln also takes a plain
    /// `--context` that is not a local path as the object's name in it.
    /// `env` reads the environment (`GIT_PULL_METHOD`).
    pub fn parse(
        context: &str,
        explicit_context: bool,
        bucket: Option<&str>,
        sub_path: Option<&str>,
        git: GitOptions,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<ContextSpec, SourceError> {
        let bucket = bucket.filter(|b| !b.is_empty());
        let given = match bucket {
            Some(b) if !explicit_context || context.contains("://") => {
                if b.contains("://") {
                    b.to_owned()
                } else {
                    format!("gs://{b}")
                }
            }
            Some(b) if !Path::new(context).exists() => {
                let base = if b.contains("://") {
                    b.trim_end_matches('/').to_owned()
                } else {
                    format!("gs://{}", b.trim_end_matches('/'))
                };
                format!("{base}/{}", context.trim_start_matches('/'))
            }
            _ => context.to_owned(),
        };
        let source = parse_source(&given, env)?;
        if let Source::Object(o) = &source
            && o.bucket.is_empty()
        {
            return Err(SourceError::Parse {
                context: given,
                message: "no bucket name".into(),
            });
        }
        Ok(ContextSpec {
            given,
            source,
            sub_path: sub_path.filter(|s| !s.is_empty()).map(str::to_owned),
            git,
        })
    }

    /// A local directory context (plain path or `dir://`), as given.
    pub fn local_dir(&self) -> Option<&Path> {
        match &self.source {
            Source::Dir(p) => Some(p),
            _ => None,
        }
    }

    /// Makes the context a directory: a local one is checked and used in
    /// place; any other is fetched and unpacked into a new 0700 directory
    /// under `scratch_parent`. Archives may expand to at most
    /// `max_expanded_size` bytes (`--max-layer-size`).
    pub fn materialize(
        &self,
        scratch_parent: &Path,
        max_expanded_size: u64,
    ) -> Result<Materialized, SourceError> {
        let fail = |message: String| SourceError::Fetch {
            context: self.given.clone(),
            message,
        };
        if let Source::Dir(dir) = &self.source {
            match fs::metadata(dir) {
                Ok(m) if m.is_dir() => {}
                Ok(_) => return Err(fail("not a directory".into())),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    return Err(fail("no such directory".into()));
                }
                Err(e) => return Err(fail(e.to_string())),
            }
            let dir = self.apply_sub_path(dir)?;
            return Ok(Materialized { dir, scratch: None });
        }
        fs::create_dir_all(scratch_parent).map_err(|e| {
            fail(format!(
                "creating scratch space {}: {e}",
                scratch_parent.display()
            ))
        })?;
        let scratch = tempfile::Builder::new()
            .prefix("context-")
            .permissions(fs::Permissions::from_mode(0o700))
            .tempdir_in(scratch_parent)
            .map_err(|e| {
                fail(format!(
                    "creating a directory in {}: {e}",
                    scratch_parent.display()
                ))
            })?;
        let root = scratch.path().join("context");
        fs::DirBuilder::new()
            .mode(0o755)
            .create(&root)
            .map_err(|e| fail(format!("creating {}: {e}", root.display())))?;
        let unpack = UnpackOptions {
            max_expanded_size,
            ..UnpackOptions::default()
        };
        match &self.source {
            Source::Dir(_) => unreachable!("handled above"),
            Source::Tar(path) => {
                let file = fs::File::open(path).map_err(|e| fail(e.to_string()))?;
                unpack_archive(file, &root, &unpack).map_err(fail)?;
            }
            Source::TarStdin => {
                use std::io::IsTerminal;
                let stdin = io::stdin();
                if stdin.is_terminal() {
                    return Err(fail(
                        "standard input is a terminal: pipe a tar or tar.gz into kiln-executor"
                            .into(),
                    ));
                }
                unpack_archive(stdin, &root, &unpack).map_err(fail)?;
            }
            Source::Object(object) => {
                let archive = scratch.path().join(DEFAULT_OBJECT);
                download_object(object, &archive).map_err(fail)?;
                let file = fs::File::open(&archive).map_err(|e| fail(e.to_string()))?;
                unpack_archive(file, &root, &unpack).map_err(fail)?;
                let _ = fs::remove_file(&archive);
            }
            Source::HttpsTar(url) => {
                let archive = scratch.path().join(DEFAULT_OBJECT);
                download_https(url, &archive).map_err(fail)?;
                let file = fs::File::open(&archive).map_err(|e| fail(e.to_string()))?;
                unpack_archive(file, &root, &unpack).map_err(fail)?;
                let _ = fs::remove_file(&archive);
            }
            Source::Git(git) => {
                git::fetch_into(git, &self.git, scratch.path(), &root, &unpack).map_err(fail)?;
            }
        }
        // An empty stream (nothing piped into `tar://stdin`, an empty
        // object) unpacks to nothing; say so instead of a missing Dockerfile.
        if fs::read_dir(&root).map_or(true, |mut d| d.next().is_none()) {
            return Err(fail("the archive is empty (no files)".into()));
        }
        let dir = self.apply_sub_path(&root)?;
        Ok(Materialized {
            dir,
            scratch: Some(scratch),
        })
    }

    /// Materializes the context and points `plan` at it: `plan.context`
    /// becomes the context directory and `plan.dockerfile` (the
    /// `--dockerfile` flag as given) is resolved against it.
    pub fn prepare(
        &self,
        plan: &mut crate::plan::PlanOptions,
        scratch_parent: &Path,
        max_expanded_size: u64,
    ) -> Result<Materialized, SourceError> {
        let materialized = self.materialize(scratch_parent, max_expanded_size)?;
        plan.dockerfile = Some(resolve_dockerfile(
            plan.dockerfile.as_deref(),
            materialized.dir(),
        ));
        plan.context = materialized.dir().to_path_buf();
        Ok(materialized)
    }

    /// `root/<sub-path>`, which must be a directory inside `root` (also
    /// after symlinks, which a fetched archive may hold).
    fn apply_sub_path(&self, root: &Path) -> Result<PathBuf, SourceError> {
        let Some(sub) = &self.sub_path else {
            return Ok(root.to_path_buf());
        };
        let error = |message: String| SourceError::SubPath {
            sub_path: sub.clone(),
            message: format!("{message} (context {})", self.given),
        };
        let clean = crate::sources::context::clean_relative(sub)
            .ok_or_else(|| error("leaves the build context".into()))?;
        let joined = root.join(&clean);
        let real_root = fs::canonicalize(root).map_err(|e| error(e.to_string()))?;
        let real = match fs::canonicalize(&joined) {
            Ok(p) => p,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(error("no such directory in the build context".into()));
            }
            Err(e) => return Err(error(e.to_string())),
        };
        if !real.starts_with(&real_root) {
            return Err(error(
                "is a symlink pointing outside the build context".into(),
            ));
        }
        if !real.is_dir() {
            return Err(error("is not a directory".into()));
        }
        Ok(real)
    }
}

/// Resolves `--dockerfile` against the (materialized) context the way
/// Kaniko does: as given when it is absolute or exists from the working
/// directory, else relative to the context; `<context>/Dockerfile` by
/// default.
pub fn resolve_dockerfile(given: Option<&Path>, context: &Path) -> PathBuf {
    match given {
        None => context.join("Dockerfile"),
        Some(p) if p.is_absolute() || p.exists() => p.to_path_buf(),
        Some(p) => context.join(p),
    }
}

fn parse_source(
    context: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Source, SourceError> {
    let error = |message: String| SourceError::Parse {
        context: context.to_owned(),
        message,
    };
    let Some((scheme, rest)) = context.split_once("://") else {
        return Ok(Source::Dir(PathBuf::from(context)));
    };
    if rest.is_empty() {
        return Err(error("nothing after the scheme".into()));
    }
    let bucket_and_key = |store: Store, default_key: Option<&str>| {
        let (bucket, key) = rest.split_once('/').unwrap_or((rest, ""));
        let key = key.trim_start_matches('/');
        let key = match (key.is_empty(), default_key) {
            (true, Some(d)) => d.to_owned(),
            (true, None) => return Err(error("no object name after the bucket".into())),
            (false, _) => key.to_owned(),
        };
        Ok(Source::Object(ObjectSource {
            store,
            bucket: bucket.to_owned(),
            key,
            azure_account: None,
        }))
    };
    match scheme {
        "dir" => Ok(Source::Dir(PathBuf::from(rest))),
        "tar" if rest == "stdin" => Ok(Source::TarStdin),
        "tar" => Ok(Source::Tar(PathBuf::from(rest))),
        "s3" => bucket_and_key(Store::S3, None),
        "gs" => bucket_and_key(Store::Gcs, Some(DEFAULT_OBJECT)),
        "az" => bucket_and_key(Store::Azure, None),
        "git" => {
            // Kaniko: `git://` names the repository, the transport is
            // https (GIT_PULL_METHOD=http for plain http). kiln also takes
            // `git` (the git daemon protocol) and `file`.
            let method = env("GIT_PULL_METHOD").unwrap_or_default();
            let method = match method.as_str() {
                "" | "https" => "https",
                "http" | "git" | "file" => method.as_str(),
                other => {
                    return Err(error(format!(
                        "GIT_PULL_METHOD={other:?}: expected https, http, git or file"
                    )));
                }
            };
            Ok(Source::Git(git_source(&format!("{method}://{rest}"))))
        }
        "https" | "http" => {
            let url = reqwest::Url::parse(context).map_err(|e| error(e.to_string()))?;
            let host = url.host_str().unwrap_or_default().to_ascii_lowercase();
            let repo_part = context.split('#').next().unwrap_or(context);
            if let Some(account) = azure_account(&host) {
                let mut parts = url.path().trim_start_matches('/').splitn(2, '/');
                let container = parts.next().unwrap_or_default().to_owned();
                let key = parts.next().unwrap_or_default().to_owned();
                if container.is_empty() || key.is_empty() {
                    return Err(error(
                        "expected https://<account>.blob.core.windows.net/<container>/<blob>"
                            .into(),
                    ));
                }
                Ok(Source::Object(ObjectSource {
                    store: Store::Azure,
                    bucket: container,
                    key,
                    azure_account: Some((account, format!("{}://{host}", url.scheme()))),
                }))
            } else if repo_part.trim_end_matches('/').ends_with(".git") {
                Ok(Source::Git(git_source(context)))
            } else if scheme == "https" {
                Ok(Source::HttpsTar(context.to_owned()))
            } else {
                Err(error(
                    "plain http is only accepted for git repositories (a URL ending in .git)"
                        .into(),
                ))
            }
        }
        "file" => Ok(Source::Git(git_source(context))),
        other => Err(error(format!(
            "unknown scheme {other}://; use a directory, dir://, tar://, git://, https://, s3://, gs:// or az://"
        ))),
    }
}

/// Kaniko's Azure Blob Storage hosts: the account is the first label.
fn azure_account(host: &str) -> Option<String> {
    const SUFFIXES: [&str; 4] = [
        ".blob.core.windows.net",
        ".blob.core.chinacloudapi.cn",
        ".blob.core.cloudapi.de",
        ".blob.core.usgovcloudapi.net",
    ];
    SUFFIXES.iter().find_map(|s| {
        host.strip_suffix(s)
            .filter(|a| !a.is_empty() && !a.contains('.'))
            .map(str::to_owned)
    })
}

/// `URL#ref#commit`, Kaniko's git context syntax.
fn git_source(text: &str) -> GitSource {
    let mut parts = text.splitn(3, '#');
    let url = parts.next().unwrap_or_default().to_owned();
    let non_empty = |s: Option<&str>| s.filter(|s| !s.is_empty()).map(str::to_owned);
    GitSource {
        url,
        reference: non_empty(parts.next()),
        commit: non_empty(parts.next()),
    }
}

/// Unpacks a (gzip, zstd or plain) tar stream with the layer rules.
fn unpack_archive<R: Read + Send>(
    archive: R,
    root: &Path,
    opts: &UnpackOptions,
) -> Result<(), String> {
    let stats = unpack_layer(archive, root, opts, None).map_err(|e| {
        // The unpacker speaks of layers; here it is the context archive.
        e.to_string()
            .replacen("layer entry", "archive entry", 1)
            .replace("the layer expands", "the archive expands")
            .replacen("reading layer", "reading the archive", 1)
    })?;
    for warning in stats.warnings {
        tracing::warn!("build context: {warning}");
    }
    Ok(())
}

fn runtime() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("starting the async runtime: {e}"))
}

/// Streams `object` into the file `to`.
fn download_object(object: &ObjectSource, to: &Path) -> Result<(), String> {
    use futures::StreamExt;
    use object_store::ObjectStoreExt as _;
    let store = object_store_for(object, &|name| std::env::var(name).ok())?;
    let path = object_store::path::Path::from(object.key.as_str());
    runtime()?.block_on(async {
        let got = store.get(&path).await.map_err(|e| match e {
            object_store::Error::NotFound { .. } => {
                format!("object {} not found in {}", object.key, object.bucket)
            }
            e => format!("reading {}: {e}", object.key),
        })?;
        let mut file = fs::File::create(to).map_err(|e| e.to_string())?;
        let mut stream = got.into_stream();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| format!("reading {}: {e}", object.key))?;
            file.write_all(&chunk).map_err(|e| e.to_string())?;
        }
        file.sync_all().map_err(|e| e.to_string())
    })
}

/// The client for a bucket context: the store's own environment first
/// (`AWS_*`, `GOOGLE_*`, `AZURE_*` credentials, regions, endpoints,
/// `AZURE_STORAGE_USE_EMULATOR`), then Kaniko's `S3_ENDPOINT` and
/// `S3_FORCE_PATH_STYLE`. Plain HTTP is allowed when the endpoint says so.
pub fn object_store_for(
    object: &ObjectSource,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<std::sync::Arc<dyn object_store::ObjectStore>, String> {
    use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
    use object_store::azure::{AzureConfigKey, MicrosoftAzureBuilder};
    use object_store::gcp::{GoogleCloudStorageBuilder, GoogleConfigKey};
    use object_store::{ClientConfigKey, ObjectStore};
    let built = |e: object_store::Error| e.to_string();
    let store: std::sync::Arc<dyn ObjectStore> = match object.store {
        Store::S3 => {
            let mut builder = AmazonS3Builder::from_env().with_bucket_name(&object.bucket);
            if let Some(endpoint) = env("S3_ENDPOINT").filter(|e| !e.is_empty()) {
                let path_style =
                    env("S3_FORCE_PATH_STYLE").is_some_and(|v| v.eq_ignore_ascii_case("true"));
                builder = builder.with_endpoint(s3_endpoint(&endpoint, &object.bucket, path_style));
                if !path_style && virtual_host_possible(&endpoint) {
                    builder = builder.with_virtual_hosted_style_request(true);
                }
            }
            if builder
                .get_config_value(&AmazonS3ConfigKey::Endpoint)
                .is_some_and(|e| e.starts_with("http://"))
            {
                builder = builder.with_allow_http(true);
            }
            std::sync::Arc::new(builder.build().map_err(built)?)
        }
        Store::Gcs => {
            let mut builder =
                GoogleCloudStorageBuilder::from_env().with_bucket_name(&object.bucket);
            if builder
                .get_config_value(&GoogleConfigKey::BaseUrl)
                .is_some_and(|b| b.starts_with("http://"))
            {
                builder = builder
                    .with_config(GoogleConfigKey::Client(ClientConfigKey::AllowHttp), "true");
            }
            std::sync::Arc::new(builder.build().map_err(built)?)
        }
        Store::Azure => {
            let mut builder = MicrosoftAzureBuilder::from_env().with_container_name(&object.bucket);
            if let Some((account, endpoint)) = &object.azure_account {
                builder = builder.with_account(account);
                if !endpoint.ends_with(".blob.core.windows.net") {
                    builder = builder.with_endpoint(endpoint.clone());
                }
            }
            if builder
                .get_config_value(&AzureConfigKey::Endpoint)
                .is_some_and(|e| e.starts_with("http://"))
            {
                builder = builder.with_allow_http(true);
            }
            std::sync::Arc::new(builder.build().map_err(built)?)
        }
    };
    Ok(store)
}

/// Whether `endpoint`'s host can carry the bucket as a subdomain (not an
/// IP address or `localhost`).
fn virtual_host_possible(endpoint: &str) -> bool {
    match reqwest::Url::parse(endpoint) {
        Ok(url) => url.host_str().is_some_and(|h| {
            h != "localhost"
                && h.trim_matches(['[', ']'])
                    .parse::<std::net::IpAddr>()
                    .is_err()
        }),
        Err(_) => false,
    }
}

/// Kaniko's rule for `S3_ENDPOINT`: path-style requests with
/// `S3_FORCE_PATH_STYLE=true`, otherwise virtual-hosted ones
/// (`bucket.host`), which object_store wants spelled out in the endpoint.
fn s3_endpoint(endpoint: &str, bucket: &str, path_style: bool) -> String {
    if path_style || !virtual_host_possible(endpoint) {
        return endpoint.trim_end_matches('/').to_owned();
    }
    match reqwest::Url::parse(endpoint) {
        Ok(mut url) => {
            let host = format!("{bucket}.{}", url.host_str().unwrap_or_default());
            if url.set_host(Some(&host)).is_err() {
                return endpoint.to_owned();
            }
            url.as_str().trim_end_matches('/').to_owned()
        }
        Err(_) => endpoint.to_owned(),
    }
}

/// Streams an HTTPS GET into the file `to`.
fn download_https(url: &str, to: &Path) -> Result<(), String> {
    use futures::StreamExt;
    runtime()?.block_on(async {
        let response = reqwest::Client::new()
            .get(url)
            .send()
            .await
            .map_err(|e| kiln_common::errors::chain(&e))?;
        if !response.status().is_success() {
            return Err(format!("GET answered {}", response.status()));
        }
        let mut file = fs::File::create(to).map_err(|e| e.to_string())?;
        let mut stream = response.bytes_stream();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| kiln_common::errors::chain(&e))?;
            file.write_all(&chunk).map_err(|e| e.to_string())?;
        }
        file.sync_all().map_err(|e| e.to_string())
    })
}

mod git;

#[cfg(test)]
mod tests;
