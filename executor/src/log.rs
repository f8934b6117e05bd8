//! The executor's log: every line it prints (step headers and results, the
//! output of RUN steps, progress of long transfers, warnings, the final
//! error) goes through one [`Logger`], which owns the three formats
//! `--log-format` offers, the `--verbosity` filter and `--log-timestamp`.
//!
//! - `text`: one plain line per event, the message as is (`warning: `,
//!   `error: `, `debug: ` before the messages of those levels, and
//!   `kiln-executor: error: ` before the one that ends the run), never an
//!   escape sequence;
//! - `color` (the default, as Kaniko's): `text` with the level and step
//!   outcomes coloured, but only when the output is a terminal and
//!   `NO_COLOR` is unset or empty (<https://no-color.org>); pod logs and
//!   files get exactly `text`;
//! - `json`: one JSON object per line and event, with `level`, `msg`,
//!   `time` (RFC 3339, UTC, milliseconds) and the event's structured fields
//!   (`event`, `stage`, `line`, `instruction`, `outcome`, `duration_ms`,
//!   `bytes`, ...).
//!
//! `tracing` events from the library (registry retries, skipped device
//! nodes) are routed here too by [`TracingBridge`], so the formats and the
//! filter hold for them as well. The output of RUN steps is the build's own
//! output and is printed at every verbosity, as Kaniko does.

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{Map, Value};

/// How important an event is; a logger prints the events at or above its
/// threshold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    /// The error that ends the executor (Kaniko's `fatal`); printed at
    /// every verbosity.
    Fatal,
    Error,
    Warn,
    Info,
    Debug,
    Trace,
}

impl Level {
    pub fn as_str(self) -> &'static str {
        match self {
            Level::Fatal => "fatal",
            Level::Error => "error",
            Level::Warn => "warning",
            Level::Info => "info",
            Level::Debug => "debug",
            Level::Trace => "trace",
        }
    }

    fn json_name(self) -> &'static str {
        match self {
            Level::Warn => "warn",
            other => other.as_str(),
        }
    }
}

/// `--log-format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Text,
    Color,
    Json,
}

/// What a [`Logger`] prints and how.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogConfig {
    pub format: Format,
    /// Events less important than this are dropped.
    pub max_level: Level,
    /// `--log-timestamp`: text lines start with the time (JSON always has it).
    pub timestamps: bool,
    /// Escape sequences allowed: decided once, from the terminal and
    /// `NO_COLOR` (see [`colour_allowed`]); only `color` uses them.
    pub ansi: bool,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: Format::Text,
            max_level: Level::Info,
            timestamps: false,
            ansi: false,
        }
    }
}

/// Whether the `color` format may colour stderr: a terminal, and no
/// `NO_COLOR` (any non-empty value turns colour off).
pub fn colour_allowed() -> bool {
    use std::io::IsTerminal;
    std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

/// A structured field of an event: a name and a JSON value.
pub type Field<'a> = (&'a str, Value);

/// Where every line of the executor goes. Cheap to clone (shared).
#[derive(Clone)]
pub struct Logger {
    inner: Arc<Inner>,
    /// The stage this logger's lines belong to, when stages run at once
    /// (see [`Logger::for_stage`]).
    stage: Option<Arc<str>>,
}

struct Inner {
    config: LogConfig,
    out: Mutex<Box<dyn Write + Send>>,
    /// How often a long transfer reports, in ms (2 s; shorter in tests).
    progress_interval_ms: AtomicU64,
}

impl std::fmt::Debug for Logger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Logger")
            .field("config", &self.inner.config)
            .finish()
    }
}

impl Logger {
    pub fn new(config: LogConfig, out: impl Write + Send + 'static) -> Self {
        Logger {
            inner: Arc::new(Inner {
                config,
                out: Mutex::new(Box::new(out)),
                progress_interval_ms: AtomicU64::new(2000),
            }),
            stage: None,
        }
    }

    /// The same output, every line marked with `stage` (the stage's name,
    /// or its index): `[stage] ` at the start of a text line (after the
    /// timestamp), a `stage_name` field in JSON. Used when stages build
    /// concurrently, so that interleaved lines can be told apart.
    pub fn for_stage(&self, stage: &str) -> Self {
        Logger {
            inner: self.inner.clone(),
            stage: Some(stage.into()),
        }
    }

    /// A logger on stderr.
    pub fn stderr(config: LogConfig) -> Self {
        Self::new(config, std::io::stderr())
    }

    /// Reports of long transfers every `interval` instead of every 2 s.
    pub fn with_progress_interval(self, interval: Duration) -> Self {
        self.inner
            .progress_interval_ms
            .store(interval.as_millis().max(1) as u64, Ordering::Relaxed);
        self
    }

    pub fn config(&self) -> LogConfig {
        self.inner.config
    }

    pub fn enabled(&self, level: Level) -> bool {
        level <= self.inner.config.max_level
    }

    /// Prints one event if its level passes the filter.
    pub fn log(&self, level: Level, msg: &str, fields: &[Field<'_>]) {
        if self.enabled(level) {
            self.emit(level, msg, fields);
        }
    }

    /// The error that ends the executor, whatever the verbosity.
    pub fn fatal(&self, msg: &str, fields: &[Field<'_>]) {
        self.emit(Level::Fatal, msg, fields);
    }

    pub fn error(&self, msg: &str) {
        self.log(Level::Error, msg, &[]);
    }

    pub fn warn(&self, msg: &str) {
        self.log(Level::Warn, msg, &[]);
    }

    pub fn info(&self, msg: &str) {
        self.log(Level::Info, msg, &[]);
    }

    pub fn debug(&self, msg: &str) {
        self.log(Level::Debug, msg, &[]);
    }

    /// Prints regardless of the filter (a RUN step's output).
    fn emit(&self, level: Level, msg: &str, fields: &[Field<'_>]) {
        let config = &self.inner.config;
        let mut line = match (&self.stage, config.format) {
            (None, _) => render(config, level, msg, fields, SystemTime::now()),
            (Some(stage), Format::Json) => {
                let mut with_stage = fields.to_vec();
                with_stage.push(("stage_name", stage.as_ref().into()));
                render(config, level, msg, &with_stage, SystemTime::now())
            }
            (Some(stage), Format::Text | Format::Color) => {
                let mut line = render(config, level, msg, fields, SystemTime::now());
                // After the timestamp (`<time> `), which has a fixed form.
                let at = if config.timestamps {
                    line.find(' ').map_or(0, |i| i + 1)
                } else {
                    0
                };
                line.insert_str(at, &format!("[{stage}] "));
                line
            }
        };
        line.push('\n');
        if let Ok(mut out) = self.inner.out.lock() {
            let _ = out.write_all(line.as_bytes());
            let _ = out.flush();
        }
    }

    /// The prefix and writer a RUN step's output goes through: each line
    /// becomes one event of the step (`[stage N line L] ` before it in
    /// text; `stage`, `line` and `stream: "run"` fields in JSON).
    pub fn run_output(&self, stage: usize, line: usize) -> (String, Arc<Mutex<dyn Write + Send>>) {
        let prefix = match self.inner.config.format {
            Format::Json => String::new(),
            Format::Text | Format::Color => format!("[stage {stage} line {line}] "),
        };
        let writer = LineEvents {
            logger: self.clone(),
            stage,
            line,
            pending: Vec::new(),
        };
        (prefix, Arc::new(Mutex::new(writer)))
    }

    /// Reports a long transfer of `total` bytes (if known) while the
    /// returned guard lives: a line with the bytes so far and the rate
    /// every progress interval (2 s), nothing for one that ends before the
    /// first. `counter` is read, not reset: the transfer's bytes are its
    /// growth since this call.
    pub fn progress(&self, what: &str, total: Option<u64>, counter: Arc<AtomicU64>) -> Progress {
        // Dropping the sender wakes the ticker at once: a transfer that
        // ends costs no wait for the next tick.
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        let logger = self.clone();
        let what = what.to_owned();
        let start_value = counter.load(Ordering::Relaxed);
        let interval =
            Duration::from_millis(self.inner.progress_interval_ms.load(Ordering::Relaxed));
        let handle = std::thread::Builder::new()
            .name("kiln-progress".into())
            .spawn(move || {
                let started = Instant::now();
                while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
                    stopped.recv_timeout(interval)
                {
                    let done = counter.load(Ordering::Relaxed).saturating_sub(start_value);
                    let secs = started.elapsed().as_secs_f64().max(0.001);
                    let rate = (done as f64 / secs) as u64;
                    let msg = match total {
                        Some(t) => format!(
                            "{what}: {} of {}, {}/s",
                            human_bytes(done),
                            human_bytes(t),
                            human_bytes(rate)
                        ),
                        None => format!("{what}: {}, {}/s", human_bytes(done), human_bytes(rate)),
                    };
                    logger.log(
                        Level::Info,
                        &msg,
                        &[
                            ("event", "progress".into()),
                            ("bytes", done.into()),
                            ("total", total.map_or(Value::Null, Value::from)),
                            ("rate_bytes_per_s", rate.into()),
                        ],
                    );
                }
            })
            .ok();
        Progress {
            stop: Some(stop),
            handle,
        }
    }
}

/// The ticker of [`Logger::progress`]; dropping it stops the reports.
pub struct Progress {
    stop: Option<std::sync::mpsc::Sender<()>>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Progress {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

static BYTES_RECEIVED: std::sync::LazyLock<Arc<AtomicU64>> =
    std::sync::LazyLock::new(Default::default);
static BYTES_SENT: std::sync::LazyLock<Arc<AtomicU64>> = std::sync::LazyLock::new(Default::default);

/// Bytes written into the local store by any download of this process (the
/// counter a pull's [`Logger::progress`] reads).
pub fn bytes_received() -> Arc<AtomicU64> {
    BYTES_RECEIVED.clone()
}

/// Bytes of blobs sent to registries by this process (a push's progress).
pub fn bytes_sent() -> Arc<AtomicU64> {
    BYTES_SENT.clone()
}

/// A reader that adds what it reads to a counter (for [`Logger::progress`]).
pub struct CountingReader<R> {
    inner: R,
    counter: Arc<AtomicU64>,
}

impl<R> CountingReader<R> {
    pub fn new(inner: R, counter: Arc<AtomicU64>) -> Self {
        CountingReader { inner, counter }
    }
}

impl<R: std::io::Read> std::io::Read for CountingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.counter.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}

/// A RUN step's output, cut into lines, each one event.
struct LineEvents {
    logger: Logger,
    stage: usize,
    line: usize,
    pending: Vec<u8>,
}

impl Write for LineEvents {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.pending.extend_from_slice(buf);
        while let Some(end) = self.pending.iter().position(|b| *b == b'\n') {
            let rest = self.pending.split_off(end + 1);
            let mut text = std::mem::replace(&mut self.pending, rest);
            text.pop();
            let text = String::from_utf8_lossy(&text);
            self.logger.emit(
                Level::Info,
                &text,
                &[
                    ("event", "output".into()),
                    ("stream", "run".into()),
                    ("stage", self.stage.into()),
                    ("line", self.line.into()),
                ],
            );
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

const RESET: &str = "\x1b[0m";

/// One event as the line the format prints (without the newline).
pub fn render(
    config: &LogConfig,
    level: Level,
    msg: &str,
    fields: &[Field<'_>],
    now: SystemTime,
) -> String {
    let time = rfc3339_millis(now);
    match config.format {
        Format::Json => {
            let mut object = Map::new();
            object.insert("level".into(), level.json_name().into());
            object.insert("msg".into(), msg.into());
            object.insert("time".into(), time.into());
            for (name, value) in fields {
                object.insert((*name).to_owned(), value.clone());
            }
            Value::Object(object).to_string()
        }
        Format::Text | Format::Color => {
            let colour = config.format == Format::Color && config.ansi;
            let mut line = String::new();
            if config.timestamps {
                line.push_str(&time);
                line.push(' ');
            }
            let prefix = match level {
                Level::Info => None,
                // kiln's documented form of the error that ends a run.
                Level::Fatal => Some(("kiln-executor: error: ", "\x1b[1;31m")),
                Level::Error => Some(("error: ", "\x1b[1;31m")),
                Level::Warn => Some(("warning: ", "\x1b[33m")),
                Level::Debug => Some(("debug: ", "\x1b[2m")),
                Level::Trace => Some(("trace: ", "\x1b[2m")),
            };
            if let Some((word, code)) = prefix {
                if colour {
                    line.push_str(code);
                    line.push_str(word);
                    line.push_str(RESET);
                } else {
                    line.push_str(word);
                }
            }
            let event = fields
                .iter()
                .find(|(n, _)| *n == "event")
                .and_then(|(_, v)| v.as_str());
            let outcome = fields
                .iter()
                .find(|(n, _)| *n == "outcome")
                .and_then(|(_, v)| v.as_str());
            let code = match (event, outcome) {
                (Some("step_start"), _) => Some("\x1b[1m"),
                (Some("step_end"), Some("hit")) => Some("\x1b[32m"),
                (Some("step_end"), Some("miss")) => Some("\x1b[36m"),
                _ => None,
            };
            match code.filter(|_| colour) {
                Some(code) => {
                    line.push_str(code);
                    line.push_str(msg);
                    line.push_str(RESET);
                }
                None => line.push_str(msg),
            }
            line
        }
    }
}

/// `2026-12-02T01:07:31.123Z`.
pub fn rfc3339_millis(t: SystemTime) -> String {
    let since = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let seconds = crate::driver::rfc3339(since.as_secs());
    format!(
        "{}.{:03}Z",
        seconds.trim_end_matches('Z'),
        since.subsec_millis()
    )
}

/// `512 B`, `1.5 KiB`, `12.3 MiB`, `2.0 GiB`.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut value = n as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

/// A duration as the end line of a step shows it: `0.42s`, `12.3s`, `2m05s`.
pub fn human_duration(d: Duration) -> String {
    let secs = d.as_secs_f64();
    if secs < 10.0 {
        format!("{secs:.2}s")
    } else if secs < 60.0 {
        format!("{secs:.1}s")
    } else {
        let whole = d.as_secs();
        format!("{}m{:02}s", whole / 60, whole % 60)
    }
}

/// Sends `tracing` events (from the library and its dependencies) to a
/// [`Logger`]: the executor's own at the logger's threshold, other
/// crates' (the embedded cache's store included) only when they are
/// warnings or errors (a dependency's info is noise in a CI log).
pub struct TracingBridge {
    logger: Logger,
}

impl TracingBridge {
    pub fn new(logger: Logger) -> Self {
        TracingBridge { logger }
    }

    fn level_of(metadata: &tracing::Metadata<'_>) -> Level {
        match *metadata.level() {
            tracing::Level::ERROR => Level::Error,
            tracing::Level::WARN => Level::Warn,
            tracing::Level::INFO => Level::Info,
            tracing::Level::DEBUG => Level::Debug,
            tracing::Level::TRACE => Level::Trace,
        }
    }

    fn wanted(&self, metadata: &tracing::Metadata<'_>) -> bool {
        let level = Self::level_of(metadata);
        let ours = metadata.target().starts_with("kiln_executor");
        self.logger.enabled(level) && (ours || level <= Level::Warn)
    }
}

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for TracingBridge {
    fn enabled(
        &self,
        metadata: &tracing::Metadata<'_>,
        _ctx: tracing_subscriber::layer::Context<'_, S>,
    ) -> bool {
        self.wanted(metadata)
    }

    fn on_event(
        &self,
        event: &tracing::Event<'_>,
        _ctx: tracing_subscriber::layer::Context<'_, S>,
    ) {
        if !self.wanted(event.metadata()) {
            return;
        }
        let mut visitor = FieldVisitor::default();
        event.record(&mut visitor);
        let fields: Vec<Field<'_>> = visitor
            .fields
            .iter()
            .map(|(k, v)| (k.as_str(), v.clone()))
            .collect();
        self.logger
            .log(Self::level_of(event.metadata()), &visitor.message, &fields);
    }
}

#[derive(Default)]
struct FieldVisitor {
    message: String,
    fields: Vec<(String, Value)>,
}

impl tracing::field::Visit for FieldVisitor {
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        if field.name() == "message" {
            self.message = value.to_owned();
        } else {
            self.fields.push((field.name().to_owned(), value.into()));
        }
    }

    fn record_u64(&mut self, field: &tracing::field::Field, value: u64) {
        self.fields.push((field.name().to_owned(), value.into()));
    }

    fn record_i64(&mut self, field: &tracing::field::Field, value: i64) {
        self.fields.push((field.name().to_owned(), value.into()));
    }

    fn record_bool(&mut self, field: &tracing::field::Field, value: bool) {
        self.fields.push((field.name().to_owned(), value.into()));
    }

    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            self.message = format!("{value:?}");
        } else {
            self.fields
                .push((field.name().to_owned(), format!("{value:?}").into()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A writer the test can read back.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Captured {
        fn text(&self) -> String {
            String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
        }
    }

    fn config(format: Format) -> LogConfig {
        LogConfig {
            format,
            ..LogConfig::default()
        }
    }

    fn at() -> SystemTime {
        UNIX_EPOCH + Duration::from_millis(1_795_737_600_042)
    }

    #[test]
    fn text_prints_the_message_with_the_level_word_and_no_escapes() {
        let c = config(Format::Text);
        assert_eq!(render(&c, Level::Info, "built x", &[], at()), "built x");
        assert_eq!(render(&c, Level::Warn, "slow", &[], at()), "warning: slow");
        assert_eq!(render(&c, Level::Error, "bad", &[], at()), "error: bad");
        assert_eq!(
            render(&c, Level::Fatal, "no output", &[], at()),
            "kiln-executor: error: no output"
        );
        // `ansi` is about the terminal; text never uses it.
        let ansi = LogConfig { ansi: true, ..c };
        assert!(!render(&ansi, Level::Warn, "slow", &[], at()).contains('\x1b'));
    }

    #[test]
    fn timestamps_prefix_text_lines() {
        let c = LogConfig {
            timestamps: true,
            ..config(Format::Text)
        };
        assert_eq!(
            render(&c, Level::Info, "hello", &[], at()),
            "2026-11-27T00:00:00.042Z hello"
        );
    }

    #[test]
    fn color_uses_escapes_only_when_the_terminal_allows() {
        let fields = [
            ("event", Value::from("step_end")),
            ("outcome", "hit".into()),
        ];
        let off = config(Format::Color);
        assert_eq!(render(&off, Level::Warn, "w", &[], at()), "warning: w");
        assert_eq!(render(&off, Level::Info, "m", &fields, at()), "m");
        let on = LogConfig { ansi: true, ..off };
        let warn = render(&on, Level::Warn, "w", &[], at());
        assert!(warn.starts_with("\x1b[33mwarning: \x1b[0m"), "{warn:?}");
        let hit = render(&on, Level::Info, "m", &fields, at());
        assert_eq!(hit, "\x1b[32mm\x1b[0m");
    }

    #[test]
    fn json_is_one_object_with_level_msg_time_and_fields() {
        let c = config(Format::Json);
        let line = render(
            &c,
            Level::Warn,
            "a \"quoted\"\nmessage",
            &[("stage", 1.into()), ("outcome", "miss".into())],
            at(),
        );
        assert!(!line.contains('\n'), "{line}");
        let v: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["level"], "warn");
        assert_eq!(v["msg"], "a \"quoted\"\nmessage");
        assert_eq!(v["time"], "2026-11-27T00:00:00.042Z");
        assert_eq!(v["stage"], 1);
        assert_eq!(v["outcome"], "miss");
    }

    #[test]
    fn a_stage_logger_marks_every_line_with_its_stage() {
        let out = Captured::default();
        let log = Logger::new(config(Format::Text), out.clone());
        let stage = log.for_stage("builder");
        stage.info("[stage 1 line 3] RUN make");
        stage.warn("slow");
        let (prefix, writer) = stage.run_output(1, 3);
        writeln!(writer.lock().unwrap(), "{prefix}compiling").unwrap();
        log.info("not a stage's");
        assert_eq!(
            out.text(),
            "[builder] [stage 1 line 3] RUN make\n[builder] warning: slow\n\
             [builder] [stage 1 line 3] compiling\nnot a stage's\n"
        );

        let out = Captured::default();
        let json = Logger::new(config(Format::Json), out.clone()).for_stage("0");
        json.info("hello");
        let v: Value = serde_json::from_str(out.text().trim()).unwrap();
        assert_eq!(v["msg"], "hello");
        assert_eq!(v["stage_name"], "0");
    }

    #[test]
    fn verbosity_drops_less_important_events() {
        let out = Captured::default();
        let log = Logger::new(
            LogConfig {
                max_level: Level::Warn,
                ..config(Format::Text)
            },
            out.clone(),
        );
        log.info("step line");
        log.debug("detail");
        log.warn("careful");
        log.fatal("the end", &[]);
        assert_eq!(
            out.text(),
            "warning: careful\nkiln-executor: error: the end\n"
        );
    }

    #[test]
    fn run_output_is_one_event_per_line_at_every_verbosity() {
        let out = Captured::default();
        let log = Logger::new(
            LogConfig {
                max_level: Level::Error,
                ..config(Format::Json)
            },
            out.clone(),
        );
        let (prefix, writer) = log.run_output(2, 7);
        assert_eq!(prefix, "");
        {
            let mut w = writer.lock().unwrap();
            write!(w, "{prefix}first").unwrap();
            writeln!(w, " half").unwrap();
            writeln!(w, "second").unwrap();
        }
        let lines: Vec<Value> = out
            .text()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0]["msg"], "first half");
        assert_eq!(lines[1]["msg"], "second");
        assert_eq!(lines[1]["stage"], 2);
        assert_eq!(lines[1]["line"], 7);
        assert_eq!(lines[1]["stream"], "run");

        let text = Logger::new(config(Format::Text), Captured::default());
        assert_eq!(text.run_output(2, 7).0, "[stage 2 line 7] ");
    }

    #[test]
    fn progress_reports_long_transfers_at_the_interval_and_not_fast_ones() {
        let out = Captured::default();
        let log = Logger::new(config(Format::Json), out.clone())
            .with_progress_interval(Duration::from_millis(300));
        let counter = Arc::new(AtomicU64::new(5));
        let fast = Instant::now();
        {
            let _fast = log.progress("pulling fast", Some(10), counter.clone());
        }
        assert!(
            fast.elapsed() < Duration::from_millis(80),
            "ending a transfer does not wait for the ticker"
        );
        assert_eq!(
            out.text(),
            "",
            "a transfer shorter than the interval is silent"
        );
        {
            let _slow = log.progress("pulling slow", Some(4096), counter.clone());
            counter.fetch_add(2048, Ordering::Relaxed);
            std::thread::sleep(Duration::from_millis(1000));
        }
        let events: Vec<Value> = out
            .text()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        // 1 s at a 0.3 s interval: 2 or 3 reports, never one per tick.
        assert!((2..=3).contains(&events.len()), "{events:?}");
        assert_eq!(events[0]["event"], "progress");
        assert_eq!(events[0]["bytes"], 2048);
        assert_eq!(events[0]["total"], 4096);
        assert!(events[0]["rate_bytes_per_s"].as_u64().unwrap() > 0);
        assert!(
            events[0]["msg"]
                .as_str()
                .unwrap()
                .starts_with("pulling slow: 2.0 KiB of 4.0 KiB, "),
            "{events:?}"
        );
    }

    #[test]
    fn sizes_and_durations_read_as_people_write_them() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(5 << 30), "5.0 GiB");
        assert_eq!(human_duration(Duration::from_millis(420)), "0.42s");
        assert_eq!(human_duration(Duration::from_millis(12_340)), "12.3s");
        assert_eq!(human_duration(Duration::from_secs(125)), "2m05s");
    }
}
