#!/usr/bin/env bash
# Turns run.sh's raw results (one JSON object per measurement) into the JSON
# file with medians and the Markdown tables. run.sh calls it at the end; it
# can also be run on the raw file of an interrupted run.
#
# usage: benches/e2e/summarize.sh RAW.jsonl OUT.json [DOCKERFILES] [START] [END]
# Environment (optional, recorded in OUT.json): E2E_RUNS, E2E_QUICK,
# E2E_KILN_SHA, E2E_BUILDAH.
set -euo pipefail
[ "$#" -ge 2 ] || { echo "usage: $0 RAW.jsonl OUT.json [DOCKERFILES] [START] [END]" >&2; exit 2; }
RESULTS=$1
JSON_OUT=$2
ONLY=${3:-$(jq -rs 'map(.dockerfile) | unique | join(" ")' "$RESULTS")}
START=${4:-unknown}
END=${5:-unknown}
RUNS=${E2E_RUNS:-$(jq -s 'map(.run) | max // 0' "$RESULTS")}
QUICK=${E2E_QUICK:-0}

jq -s --arg start "$START" --arg finish "$END" --argjson runs "$RUNS" --argjson quick "$QUICK" \
  --arg kernel "$(uname -r)" --arg nproc "$(nproc)" \
  --arg mem "$(awk '/MemTotal/ { print $2 }' /proc/meminfo)" \
  --arg kiln "${E2E_KILN_SHA:-unknown}" \
  --arg buildah "${E2E_BUILDAH:-unknown}" '
  def median: map(select(. != null)) | sort
    | if length == 0 then null
      elif length % 2 == 1 then .[length / 2 | floor]
      else (.[length / 2 - 1] + .[length / 2]) / 2 end;
  {
    started: $start, finished: $finish, runs: $runs, quick: ($quick == 1),
    machine: {nproc: ($nproc | tonumber), mem_kb: ($mem | tonumber), kernel: $kernel},
    kiln_executor_sha256_prefix: $kiln, buildah: $buildah,
    results: .,
    medians: (group_by([.dockerfile, .tool, .phase]) | map({
      dockerfile: .[0].dockerfile, tool: .[0].tool, phase: .[0].phase,
      ok_runs: (map(select(.ok == "true" or .ok == true)) | length), runs: length,
      wall_s: (map(select(.ok == "true" or .ok == true) | .wall_s) | median),
      build_s: (map(select(.ok == "true" or .ok == true) | .build_s) | median),
      push_s: (map(select(.ok == "true" or .ok == true) | .push_s) | median),
      max_rss_kb: (map(select(.ok == "true" or .ok == true) | .max_rss_kb) | median),
      bytes_downloaded: (map(.bytes_downloaded) | median),
      bytes_uploaded: (map(.bytes_uploaded) | median),
      hits: (map(.hits) | median), steps: (map(.steps) | median)
    }))
  }' "$RESULTS" >"$JSON_OUT"

# Markdown tables.
jq -r --arg only "$ONLY" '
  def f: if . == null then "failed" elif type == "string" then . elif . < 10 then (. * 100 | round / 100 | tostring) + " s"
    else (. * 10 | round / 10 | tostring) + " s" end;
  def mb: if . == null or type == "string" then "–" else (. / 1024 | round | tostring) + " MiB" end;
  def ratio(a; b): if a == null or b == null or (a | type) == "string" or (b | type) == "string" or b == 0 or a == 0 then "–"
    elif a / b >= 0.1 then (a / b * 100 | round / 100 | tostring)
    else (a / b * 10000 | round / 10000 | tostring) + " (1/" + (b / a | round | tostring) + ")" end;
  .medians as $m
  | def get(d; t; p): ($m | map(select(.dockerfile == d and .tool == t and .phase == p)) | .[0])
      // {wall_s: "not run", build_s: "not run", push_s: "not run"};
  "Medians of \(.runs) run(s); wall time, push included for both tools.\n",
  "| Dockerfile | kiln cold | kiln rebuild (1-line change) | kiln fresh executor, warm cache | buildah cold (build + push) | buildah rebuild (build + push) | cold kiln/buildah | rebuild kiln/buildah |",
  "|---|---|---|---|---|---|---|---|",
  ($only | split(" ") | map(select(. != ""))[] as $d
    | get($d; "kiln"; "cold") as $kc | get($d; "kiln"; "rebuild") as $kr | get($d; "kiln"; "fresh") as $kf
    | get($d; "buildah"; "cold") as $bc | get($d; "buildah"; "rebuild") as $br
    | "| \($d) | \($kc.wall_s | f) | \($kr.wall_s | f) | \($kf.wall_s | f) (\($kf.hits // "?")/\($kf.steps // "?") hits, \($kf.bytes_downloaded // "?") B downloaded) | \($bc.wall_s | f) (\($bc.build_s | f) + \($bc.push_s | f)) | \($br.wall_s | f) (\($br.build_s | f) + \($br.push_s | f)) | \(ratio($kc.wall_s; $bc.wall_s)) | \(ratio($kr.wall_s; $br.wall_s)) |"),
  "",
  "| Dockerfile | kiln cold RSS | kiln rebuild RSS | kiln fresh RSS | buildah cold RSS (max of build, push) | buildah rebuild RSS | cold RSS kiln/buildah |",
  "|---|---|---|---|---|---|---|",
  ($only | split(" ") | map(select(. != ""))[] as $d
    | get($d; "kiln"; "cold") as $kc | get($d; "kiln"; "rebuild") as $kr | get($d; "kiln"; "fresh") as $kf
    | get($d; "buildah"; "cold") as $bc | get($d; "buildah"; "rebuild") as $br
    | "| \($d) | \($kc.max_rss_kb | mb) | \($kr.max_rss_kb | mb) | \($kf.max_rss_kb | mb) | \($bc.max_rss_kb | mb) | \($br.max_rss_kb | mb) | \(ratio($kc.max_rss_kb; $bc.max_rss_kb)) |")
' "$JSON_OUT"
