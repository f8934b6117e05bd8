//! Parsing and planning a generated 5,000-line Dockerfile: the front end
//! runs before every build (and `--dry-run`), so it must stay far below the
//! time of a single registry round trip.

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use kiln_executor::dockerfile;
use kiln_executor::plan::{PlanOptions, plan_source};
use std::hint::black_box;
use std::path::Path;

/// A realistic mix: several stages, ARG/ENV expansion, continuations,
/// heredocs, mounts and COPY --from, until `lines` physical lines.
fn generate(lines: usize) -> String {
    let mut out =
        String::from("# syntax=docker/dockerfile:1\nARG BASE=debian:bookworm\nARG VERSION=1.0\n");
    let mut n = 3;
    let mut stage = 0;
    let mut i = 0;
    while n < lines {
        let snippet = if i % 300 == 0 {
            let copy = if stage > 0 {
                format!(
                    "COPY --from=stage{} --chown=app:app /srv /prev\n",
                    stage - 1
                )
            } else {
                String::new()
            };
            stage += 1;
            format!(
                "FROM ${{BASE}} AS stage{}\nARG VERSION\nENV APP=/srv/app{} PATH=/usr/local/bin:$PATH\n{copy}",
                stage - 1,
                stage - 1
            )
        } else {
            match i % 10 {
                0 => "RUN apt-get update && \\\n    apt-get install -y --no-install-recommends \\\n      curl git && rm -rf /var/lib/apt/lists/*\n".to_string(),
                1 => "RUN --mount=type=cache,target=/root/.cache,id=c$VERSION make -j4 all\n".to_string(),
                2 => "COPY <<EOF /etc/app.conf\nversion=${VERSION:-dev}\npath=$APP\nEOF\n".to_string(),
                3 => "LABEL org.opencontainers.image.version=$VERSION \"com.example.k\"=\"v w\"\n".to_string(),
                4 => "WORKDIR ${APP}/sub\n".to_string(),
                5 => "# a comment line\n".to_string(),
                6 => "EXPOSE 80/tcp 8000-8010/udp\n".to_string(),
                7 => "ENV COUNTER=$VERSION-x OTHER=\"quoted $APP\"\n".to_string(),
                8 => "HEALTHCHECK --interval=30s --retries=3 CMD [\"/bin/check\"]\n".to_string(),
                _ => "USER app:app\n".to_string(),
            }
        };
        n += snippet.matches('\n').count();
        out.push_str(&snippet);
        i += 1;
    }
    out
}

fn parse(c: &mut Criterion) {
    let text = generate(5_000);
    let lines = text.lines().count();
    let opts = PlanOptions {
        build_args: vec![("VERSION".into(), "2.0".into())],
        build_platform: Some("linux/amd64".into()),
        ..PlanOptions::default()
    };
    // Fail loudly if the generator ever produces an invalid Dockerfile.
    let plan =
        plan_source(&text, Path::new("Dockerfile"), &opts).expect("generated Dockerfile plans");
    assert!(lines >= 5_000 && plan.stages.len() >= 10);

    let mut group = c.benchmark_group(format!("dockerfile-{lines}-lines"));
    group.throughput(Throughput::Bytes(text.len() as u64));
    group.bench_function("parse", |b| {
        b.iter(|| {
            dockerfile::parse(black_box(&text), Path::new("Dockerfile"))
                .map(|d| d.instructions.len())
        })
    });
    group.bench_function("parse+plan", |b| {
        b.iter(|| {
            plan_source(black_box(&text), Path::new("Dockerfile"), &opts).map(|p| p.stages.len())
        })
    });
    group.finish();
}

criterion_group!(benches, parse);
criterion_main!(benches);
