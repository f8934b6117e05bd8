//! The `kiln-cache` admin command line: argument types, the commands, and
//! their exit codes. The binary only parses and calls [`run`].
//!
//! Exit codes (docs/cache-server.md): 0 success, 1 other failure, 2 usage,
//! 3 not found, 4 unauthorized or forbidden, 5 server unreachable,
//! 6 `verify` found corrupt or missing blobs, 7 a TLS certificate was
//! refused (the server's or ours).

use std::io::Write;
use std::path::PathBuf;

use kiln_common::CacheKey;
use reqwest::StatusCode;
use serde::Serialize;

use crate::auth::{self, Scope};
use crate::client::{AdminClient, ClientError, ClientTls};
use crate::units::format_size;
use kiln_common::wire::admin::Leased;
use kiln_storage::{Store, StoreConfig, VerifyReport};

pub const EXIT_OK: u8 = 0;
pub const EXIT_FAILURE: u8 = 1;
pub const EXIT_USAGE: u8 = 2;
pub const EXIT_NOT_FOUND: u8 = 3;
pub const EXIT_AUTH: u8 = 4;
pub const EXIT_UNREACHABLE: u8 = 5;
pub const EXIT_CORRUPT: u8 = 6;
pub const EXIT_CERTIFICATE: u8 = 7;

#[derive(Debug, clap::Parser)]
#[command(
    name = "kiln-cache",
    version,
    about = "Admin client of kiln-cache-server",
    after_help = "Exit codes: 0 ok, 1 failure, 2 usage, 3 not found, 4 unauthorized/forbidden, \
                  5 server unreachable, 6 verify found corrupt or missing blobs, \
                  7 TLS certificate refused."
)]
pub struct CliArgs {
    /// Server base URL.
    #[arg(
        long,
        env = "KILN_CACHE_SERVER",
        default_value = "http://127.0.0.1:7070",
        global = true
    )]
    pub server: String,
    /// Bearer token (needs the admin scope for most commands).
    #[arg(long, env = "KILN_CACHE_TOKEN", hide_env_values = true, global = true)]
    pub token: Option<String>,
    /// Read the bearer token from this file (e.g. a mounted Secret); wins
    /// over --token, and stays out of `ps` and shell history.
    #[arg(
        long,
        env = "KILN_CACHE_TOKEN_FILE",
        value_name = "FILE",
        global = true
    )]
    pub token_file: Option<PathBuf>,
    /// Output format.
    #[arg(long, value_enum, default_value = "table", global = true)]
    pub output: Output,
    /// Accept any TLS certificate (self-signed test servers only).
    #[arg(long, global = true)]
    pub insecure: bool,
    /// PEM CA certificate(s) to trust besides the default ones: the private
    /// CA that signed the server's certificate.
    #[arg(long, env = "KILN_CACHE_CA_CERT", value_name = "FILE", global = true)]
    pub ca_cert: Option<PathBuf>,
    /// PEM client certificate for a server that requires one (mutual TLS;
    /// with --client-key).
    #[arg(
        long,
        env = "KILN_CACHE_CLIENT_CERT",
        value_name = "FILE",
        global = true,
        requires = "client_key"
    )]
    pub client_cert: Option<PathBuf>,
    /// PEM private key of --client-cert.
    #[arg(
        long,
        env = "KILN_CACHE_CLIENT_KEY",
        value_name = "FILE",
        global = true,
        requires = "client_cert"
    )]
    pub client_key: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    Table,
    Json,
}

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Entry and blob counts, bytes, hit ratio, evictions.
    Stats,
    /// List entries (of the token's namespace) in key order.
    #[command(visible_alias = "entries")]
    Ls {
        /// Only keys starting with these hex characters.
        #[arg(long, default_value = "")]
        prefix: String,
        /// At most this many entries (pages through the server as needed).
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// Show one entry.
    Inspect { key: CacheKey },
    /// Delete one entry (its blob goes at the next GC).
    Rm { key: CacheKey },
    /// Run garbage collection now.
    Gc,
    /// Re-hash every blob; quarantine corrupt ones (on object storage:
    /// delete them) and drop their entries.
    Verify {
        /// Work on a data directory directly (server stopped) instead of
        /// asking the server.
        #[arg(long, value_name = "DIR")]
        data: Option<PathBuf>,
        /// Only report; change nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Token management.
    #[command(subcommand)]
    Token(TokenCommand),
}

#[derive(Debug, clap::Subcommand)]
pub enum TokenCommand {
    /// Print a new random token and the tokens-file lines granting it.
    Create {
        /// Scope to grant (repeatable).
        #[arg(long = "scope", value_enum, required = true)]
        scopes: Vec<Scope>,
        /// Bind the token to this namespace.
        #[arg(long)]
        namespace: Option<String>,
        /// A label shown in the server's logs.
        #[arg(long)]
        name: Option<String>,
    },
}

fn exit_code(e: &ClientError) -> u8 {
    match e {
        ClientError::Transport { .. } => EXIT_UNREACHABLE,
        ClientError::Certificate { .. } => EXIT_CERTIFICATE,
        ClientError::TlsFile { .. } => EXIT_USAGE,
        ClientError::Status { status, .. } => match *status {
            StatusCode::NOT_FOUND => EXIT_NOT_FOUND,
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => EXIT_AUTH,
            _ => EXIT_FAILURE,
        },
        ClientError::Decode { .. } => EXIT_FAILURE,
    }
}

/// A token file's content without surrounding whitespace (a Secret written
/// with `echo` ends in a newline); an empty file is an error.
pub fn read_token_file(path: &std::path::Path) -> Result<String, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("reading the token file {}: {e}", path.display()))?;
    let token = text.trim();
    if token.is_empty() {
        return Err(format!("the token file {} is empty", path.display()));
    }
    Ok(token.to_owned())
}

fn print_json<T: Serialize>(out: &mut impl Write, value: &T) -> std::io::Result<()> {
    serde_json::to_writer_pretty(&mut *out, value)?;
    writeln!(out)
}

fn ms_to_rfc3339(ms: u64) -> String {
    chrono::DateTime::from_timestamp_millis(ms as i64)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
        .unwrap_or_else(|| ms.to_string())
}

/// Runs one command; returns the process exit code. Output goes to
/// `out`, diagnostics to stderr.
pub async fn run(args: CliArgs, out: &mut impl Write) -> u8 {
    match run_inner(args, out).await {
        Ok(code) => code,
        Err(Failure::Client(e)) => {
            eprintln!("kiln-cache: {e}");
            exit_code(&e)
        }
        Err(Failure::Other(message)) => {
            eprintln!("kiln-cache: {message}");
            EXIT_FAILURE
        }
    }
}

enum Failure {
    Client(ClientError),
    Other(String),
}

impl From<ClientError> for Failure {
    fn from(e: ClientError) -> Self {
        Failure::Client(e)
    }
}

impl From<std::io::Error> for Failure {
    fn from(e: std::io::Error) -> Self {
        Failure::Other(format!("writing output: {e}"))
    }
}

async fn run_inner(args: CliArgs, out: &mut impl Write) -> Result<u8, Failure> {
    let json = args.output == Output::Json;
    let token = match &args.token_file {
        Some(path) => Some(read_token_file(path).map_err(Failure::Other)?),
        None => args.token.clone(),
    };
    let tls = ClientTls {
        insecure: args.insecure,
        ca_cert: args.ca_cert.clone(),
        identity: args.client_cert.clone().zip(args.client_key.clone()),
    };
    let client = || AdminClient::new(&args.server, token.clone(), &tls);
    match args.command {
        Command::Stats => {
            let stats = client()?.stats().await?;
            if json {
                print_json(out, &stats)?;
            } else {
                let limit = stats.max_size.map_or("unlimited".to_owned(), format_size);
                writeln!(out, "entries          {}", stats.entries)?;
                writeln!(out, "blobs            {}", stats.blobs)?;
                writeln!(
                    out,
                    "blob bytes       {} (limit {limit})",
                    format_size(stats.blob_bytes)
                )?;
                writeln!(
                    out,
                    "lookups          {} hit, {} miss ({:.1}% hits)",
                    stats.lookups_hit,
                    stats.lookups_miss,
                    stats.hit_ratio * 100.0
                )?;
                writeln!(out, "entries evicted  {}", stats.entries_evicted)?;
                writeln!(out, "entries expired  {}", stats.entries_expired)?;
                writeln!(out, "blobs removed    {}", stats.blobs_removed)?;
                writeln!(out, "gc runs          {}", stats.gc_runs)?;
            }
        }
        Command::Ls { prefix, limit } => {
            let client = client()?;
            let mut records = Vec::new();
            let mut after: Option<CacheKey> = None;
            while records.len() < limit {
                let page = client
                    .list(&prefix, after.as_ref(), (limit - records.len()).min(1000))
                    .await?;
                let done = page.next.is_none() || page.entries.is_empty();
                after = page.next;
                records.extend(page.entries);
                if done {
                    break;
                }
            }
            if json {
                print_json(out, &records)?;
            } else {
                writeln!(
                    out,
                    "{:<64}  {:<20}  {:>10}  CREATED BY",
                    "KEY", "CREATED", "SIZE"
                )?;
                for r in &records {
                    let size = r
                        .entry
                        .layer
                        .as_ref()
                        .map_or("-".to_owned(), |l| format_size(l.size));
                    writeln!(
                        out,
                        "{:<64}  {:<20}  {:>10}  {}",
                        r.key,
                        ms_to_rfc3339(r.created_ms),
                        size,
                        r.entry.created_by
                    )?;
                }
            }
        }
        Command::Inspect { key } => {
            let entry = client()?.get_entry(&key).await?;
            if json {
                print_json(out, &entry)?;
            } else {
                writeln!(out, "key         {key}")?;
                writeln!(out, "created by  {}", entry.created_by)?;
                writeln!(out, "created     {}", entry.created)?;
                match &entry.layer {
                    Some(l) => {
                        writeln!(out, "layer       {} ({})", l.digest, format_size(l.size))?;
                        writeln!(out, "media type  {}", l.media_type)?;
                        writeln!(out, "diff id     {}", l.diff_id)?;
                    }
                    None => writeln!(out, "layer       none (the step changed no file)")?,
                }
                for (k, v) in &entry.extra {
                    writeln!(out, "{k:<11} {v}")?;
                }
            }
        }
        Command::Rm { key } => {
            client()?.delete_entry(&key).await?;
            if json {
                print_json(out, &serde_json::json!({"deleted": key}))?;
            } else {
                writeln!(out, "deleted {key}")?;
            }
        }
        Command::Gc => {
            let answer = client()?.gc().await?;
            let report = &answer.report;
            if json {
                print_json(out, &answer)?;
            } else if answer.refused() {
                writeln!(
                    out,
                    "another replica holds the GC lease and collects; nothing done here"
                )?;
            } else {
                writeln!(
                    out,
                    "expired {} entries, evicted {}, removed {} blobs ({}), {} blobs kept while in use",
                    report.entries_expired,
                    report.entries_evicted,
                    report.blobs_removed,
                    format_size(report.bytes_freed),
                    report.blobs_pinned
                )?;
            }
        }
        Command::Verify { data, dry_run } => {
            let answer = match data {
                Some(dir) => tokio::task::spawn_blocking(move || {
                    let store = Store::open(&dir, StoreConfig::default())
                        .map_err(|e| format!("opening {}: {e}", dir.display()))?;
                    store
                        .verify(!dry_run)
                        .map_err(|e| format!("verifying {}: {e}", dir.display()))
                })
                .await
                .map_err(|e| Failure::Other(e.to_string()))?
                .map(|report| Leased {
                    report,
                    lease_held: None,
                })
                .map_err(Failure::Other)?,
                None => client()?.verify(!dry_run).await?,
            };
            print_verify(out, &answer, json)?;
            if answer.refused() {
                // Asked to repair, nothing was checked: not a clean bill.
                return Ok(EXIT_FAILURE);
            }
            let report = &answer.report;
            if !(report.corrupt.is_empty() && report.missing.is_empty()) {
                return Ok(EXIT_CORRUPT);
            }
        }
        Command::Token(TokenCommand::Create {
            scopes,
            namespace,
            name,
        }) => {
            if let Some(ns) = &namespace {
                kiln_storage::Namespace::new(ns).map_err(|e| Failure::Other(e.to_string()))?;
            }
            let token = auth::generate_token();
            let snippet = auth::token_toml(&token, name.as_deref(), &scopes, namespace.as_deref());
            if json {
                print_json(
                    out,
                    &serde_json::json!({
                        "token": token,
                        "sha256": auth::hash_token(&token),
                        "toml": snippet,
                    }),
                )?;
            } else {
                writeln!(out, "token: {token}")?;
                writeln!(out)?;
                writeln!(out, "# add to the server's tokens file:")?;
                write!(out, "{snippet}")?;
            }
        }
    }
    Ok(EXIT_OK)
}

fn print_verify(
    out: &mut impl Write,
    answer: &Leased<VerifyReport>,
    json: bool,
) -> std::io::Result<()> {
    if json {
        return print_json(out, answer);
    }
    if answer.refused() {
        return writeln!(
            out,
            "another replica holds the GC lease, so nothing was verified or repaired; \
             try again later, or verify with --dry-run"
        );
    }
    let report = &answer.report;
    writeln!(
        out,
        "checked {} blobs ({})",
        report.blobs_checked,
        format_size(report.bytes_checked)
    )?;
    for d in &report.corrupt {
        // Only a replica says whether it held the lease; a bucket has no
        // quarantine, corrupt blobs are deleted from it.
        let what = if !report.quarantined {
            "not repaired (dry run)"
        } else if answer.lease_held.is_some() {
            "deleted"
        } else {
            "quarantined"
        };
        writeln!(out, "CORRUPT {d} ({what})")?;
    }
    for d in &report.missing {
        writeln!(out, "MISSING {d}")?;
    }
    if report.entries_dropped > 0 {
        writeln!(
            out,
            "dropped {} entries naming them",
            report.entries_dropped
        )?;
    }
    if report.corrupt.is_empty() && report.missing.is_empty() {
        writeln!(out, "all blobs match their digests")?;
    }
    Ok(())
}
