//! Pinned key vectors: typed inputs → the exact key.
//!
//! The values were computed by the code before this module existed
//! (946e083, where the `instruction` input was the dry-run renderer's text
//! and `layer options` a `Debug` print) and must never change: a failing
//! vector means every cache entry written by earlier executors would miss,
//! or that a changed input would still hit. Never update a value to make a
//! test pass: keep the key text as it was, or bump `KEY_SCHEME` on purpose
//! and say why in docs/decisions.md.

use super::*;
use crate::build::layer::Compression;
use crate::build::runner::security::Seccomp;
use crate::build::runner::userns::DEFAULT_MAPPING;
use crate::oci::Platform;
use crate::plan::{Plan, PlanOptions, plan_source};
use kiln_common::Digest;
use std::path::Path;

const DIGEST_A: &str = "sha256:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
const DIGEST_B: &str = "sha256:bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";

fn digest(s: &str) -> Digest {
    s.parse().unwrap()
}

/// What a stage's key chain starts from in these vectors.
fn base_identity_of(manifest: &str, platform: &str) -> String {
    let platform: Platform = platform.parse().unwrap();
    let manifest = (manifest != "scratch").then(|| digest(manifest));
    base_identity(manifest.as_ref(), &platform)
}

const DEFAULT_LAYER: LayerKeyOptions = LayerKeyOptions {
    compression: Compression::Gzip { level: 6 },
    reproducible: false,
    source_date_epoch: None,
    single_snapshot: false,
    force_build_metadata: false,
};

/// Resolved inputs the driver would find for these fixtures.
const LOCAL_FILES: [u8; 32] = [3; 32];
const BIND_FILES: [u8; 32] = [4; 32];

fn stage_key() -> CacheKey {
    base_key("a stage's last key")
}

fn image_identity() -> String {
    base_identity_of(DIGEST_B, "linux/amd64")
}

/// The sources of one instruction, combined as the driver does.
fn sources_of(plan: &Plan, ins: &PlannedInstruction) -> Option<SourceIdentity> {
    match &ins.instruction {
        Instruction::Copy(c) => Some(match (&c.from, ins.stage_refs.first()) {
            (Some(_), Some(_)) => SourceIdentity::Stage(stage_key()),
            (Some(_), None) => SourceIdentity::Image(image_identity()),
            (None, _) => SourceIdentity::Context(LOCAL_FILES),
        }),
        Instruction::Add(a) => {
            let remote: Vec<String> = a
                .sources
                .iter()
                .filter(|s| crate::sources::remote::is_remote(s))
                .map(|s| remote_file_identity(s, &digest(DIGEST_A)))
                .collect();
            Some(add_sources(LOCAL_FILES, &remote))
        }
        Instruction::Run(run) => {
            let mounts: Vec<(String, BindSource)> = run
                .mounts
                .iter()
                .filter(|m| m.kind == crate::dockerfile::MountType::Bind)
                .map(|m| {
                    let source = m.source.clone().unwrap_or_else(|| ".".into());
                    let from = match &m.from {
                        None => BindSource::Context(BIND_FILES),
                        Some(from) if plan.stages.iter().any(|s| s.name.as_ref() == Some(from)) => {
                            BindSource::Stage(stage_key())
                        }
                        Some(_) => BindSource::Image(image_identity()),
                    };
                    (source, from)
                })
                .collect();
            (!mounts.is_empty()).then(|| bind_mounts(&mounts))
        }
        _ => None,
    }
}

fn plan_of(dockerfile: &str, args: &[(&str, &str)], platform: &str) -> Plan {
    let opts = PlanOptions {
        context: "/ctx".into(),
        build_args: args
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        build_platform: Some("linux/amd64".into()),
        platform: Some(platform.into()),
        ..Default::default()
    };
    plan_source(dockerfile, Path::new("Dockerfile"), &opts).unwrap()
}

struct Build<'a> {
    dockerfile: &'a str,
    args: &'a [(&'a str, &'a str)],
    platform: &'a str,
    layer: LayerKeyOptions,
    security: Option<StepSecurity>,
}

impl Build<'_> {
    /// The key of each instruction of the target stage.
    fn keys_of(&self, plan: &Plan) -> Vec<CacheKey> {
        let mut parent = base_key(&base_identity_of(DIGEST_A, self.platform));
        let mut keys = Vec::new();
        for ins in &plan.stages[plan.target].instructions {
            let sources = sources_of(plan, ins);
            parent = step_key(
                &parent,
                StepInputs::of(ins),
                sources.as_ref(),
                &self.layer,
                self.security.as_ref(),
            )
            .key;
            keys.push(parent);
        }
        keys
    }

    /// The key of the target stage's last instruction.
    fn last_key(&self) -> String {
        let plan = plan_of(self.dockerfile, self.args, self.platform);
        self.keys_of(&plan).last().unwrap().to_hex()
    }
}

fn build(dockerfile: &str) -> Build<'_> {
    Build {
        dockerfile,
        args: &[],
        platform: "linux/amd64",
        layer: DEFAULT_LAYER,
        security: None,
    }
}

/// Compares every vector and prints all the ones that differ, so that a
/// deliberate scheme change can see its whole effect at once.
fn check(vectors: &[(&str, String, &str)]) {
    let wrong: Vec<String> = vectors
        .iter()
        .filter(|(_, got, want)| got != want)
        .map(|(name, got, want)| format!("{name}: got {got}, pinned {want}"))
        .collect();
    assert!(wrong.is_empty(), "keys changed:\n{}", wrong.join("\n"));
}

#[test]
fn instruction_keys_are_pinned() {
    let b = build;
    let with_args = |dockerfile, args| Build {
        args,
        ..build(dockerfile)
    };
    check(&[
        ("from", b("FROM --platform=linux/amd64 x:1 AS base").last_key(), "b057d43e4f85427bf1353093550ad85ed731c19e87917018d19c97d233486ada"),
        ("run shell", b("FROM x\nRUN make  all").last_key(), "d5a4121cc339615a6781cb7abd98950fa4dbd0e9716993c678f933d2916d127c"),
        ("run exec", b("FROM x\nRUN [\"sh\", \"-c\", \"echo \\\"hi\\\"\\t\\u00e9\"]").last_key(), "6a3d63b78f2e24ba214e863cc559bd9e4776649ef60a284dd00a02f75b8f9e73"),
        ("run mount cache", b("FROM x\nRUN --mount=type=cache,target=/root/.cache,id=c1,sharing=locked,mode=0755,uid=1,gid=2 make").last_key(), "94e94e9f09ad83d51d7b726772d260e72298362873e6aa840d3fb1883112feea"),
        ("run mount bind context", b("FROM x\nRUN --mount=type=bind,source=src,target=/src,rw make").last_key(), "1777bddf9527c1e4e88ec5c8761063f3ea6648491b46b3f8a7ac5dcfdaa31219"),
        ("run mount bind stage", b("FROM y AS builder\nRUN b\nFROM x\nRUN --mount=type=bind,from=builder,target=/b make").last_key(), "4f76d7bc300fc74d0ecbfe1f3b3924d7193d51c59ece2a8acbd93ad75d637ff4"),
        ("run mount bind image", b("FROM x\nRUN --mount=from=alpine:3,target=/a ls /a").last_key(), "3d776cf6af1d4b594f1b257beb726350da6559cb038c277681a827d41c314dfd"),
        ("run mount secret ssh tmpfs", b("FROM x\nRUN --mount=type=secret,id=tok,required=true,env=TOK --mount=type=ssh --mount=type=tmpfs,target=/t,size=1024 make").last_key(), "e9b285b4211a32b8f924cea594ff526178dcea5acacd58ab3b09d54e826992c7"),
        ("run network security", b("FROM x\nRUN --network=none --security=insecure make").last_key(), "35061327ef6bd8a293a6037b3523a86474835a254068b173c68a3a58d5c01ef7"),
        ("run heredoc", b("FROM x\nARG N=1\nRUN <<EOF\necho $N\nEOF\n").last_key(), "783ac04dd1ddf773eb387044395ca8693c85b1c7eb0acb7f2fda29668dafab75"),
        ("run env and args", with_args("FROM x\nARG V=1\nENV A=1 B=\"two words\"\nRUN echo $V $A", &[("V", "2")]).last_key(), "56d421f18942f7d34df91433d940ec4768d458e140a549396c5dcd72327b5535"),
        ("run proxy arg", with_args("FROM x\nRUN env", &[("HTTP_PROXY", "http://p:3128")]).last_key(), "0ba9c3aebed2aa8d4bc4d089638f7dd8123080e00f9005731ef61e1eb317bcc9"),
        ("copy context flags", b("FROM x\nCOPY --chown=1:2 --chmod=0644 --link --exclude=*.md a b /dst/").last_key(), "0431dfe56f28414d43ed25319b78405ca65039be40dd4945ad91a8aa6dccb4dc"),
        ("copy parents", b("FROM x\nCOPY --parents dir/a.txt /dst/").last_key(), "107426c8e257708a05d02369d99300bd720dec022ac7d86b9ef73f49730899fc"),
        ("copy from stage", b("FROM y AS builder\nRUN b\nFROM x\nCOPY --from=builder /out /app").last_key(), "78f975be53b2ea246cc52f0147647ed294c52a59e902611d3b9b600b9c548f27"),
        ("copy from image", b("FROM x\nCOPY --from=alpine:3 /etc/os-release /").last_key(), "2b73853460b8e721b7814a0eaff94677fa8109bf0b336b21031bea5c52fd326a"),
        ("copy heredoc", b("FROM x\nARG N=kiln\nCOPY <<EOF /hello\nhi $N\nEOF\n").last_key(), "f4e939cb9ed9e36387ea060650be48059d4b272629d0faea56ea37af622bacb4"),
        ("copy expanded", b("FROM x\nARG D=/app\nENV F=\"a file.txt\"\nCOPY $F $D/").last_key(), "957cb9de62b1e497477bff261c9c82ed8d2888973c9e73fe0b03a426aade01c4"),
        ("add local flags", b("FROM x\nADD --chown=app --chmod=755 --link a.tar.gz /opt/").last_key(), "97e43a3a0e46d0a705563e84955f7991595f113bf72ed881fe782de603055e5d"),
        ("add remote checksum", b(&format!("FROM x\nADD --checksum={DIGEST_A} https://example.com/f.txt /f.txt")).last_key(), "57b38ce55033a1a34d14c4855c57dd931a4ba92b2dd57c1fc4a16cc5fb819606"),
        ("add git keep-git-dir", b("FROM x\nADD --keep-git-dir --exclude=.github https://github.com/o/r.git#main /src").last_key(), "e4fb75990c2886b4a27bb57f84b212b05f3c8724def8989ad760fbaad46ed43a"),
        ("workdir", b("FROM x\nENV W=/srv\nWORKDIR $W/app").last_key(), "b030cf0dddb490ad32a415f3a6d822321f1835d5c2c224a7a66b36873e6e4ed6"),
        ("user", with_args("FROM x\nARG U\nUSER $U:grp", &[("U", "app")]).last_key(), "83a902a3a9c6c6a32ae4ce9c006dae6b1ef49940e6b574a9ab0df7fed0050c64"),
        ("label", b("FROM x\nARG V=1\nLABEL a=\"x y\" b=$V c=\"\" \"k app\"=\"q\\\"uote\"").last_key(), "5987d4392d7e6af2e89038245f82e17f7a09a5d7c73d6385c38b2d988af3549d"),
        ("env", b("FROM x\nENV PATH=/opt:$PATH Q='a b' R=$UNSET").last_key(), "6508f2f1549c11383e11482ab2db7573751fc86af858c3c8ecdc14e3b111e7fb"),
        ("arg as written", with_args("FROM x\nARG  V=1 W", &[("V", "2")]).last_key(), "f40891ec67e865f3f54279bc5e5ba7ab763f5b86370ea009bc17853f4deb27e0"),
        ("expose", b("FROM x\nARG P=80\nEXPOSE $P 53/udp").last_key(), "a3ead146042d572f48d833eab453322bc79c4afab3cf875734a080e2a4d3b5ea"),
        ("volume", b("FROM x\nVOLUME [\"/data\", \"/v w\"]").last_key(), "8f5225446bb94e0fa53b6b3a1995a5ca02fdffa3afd7c8b37a04d4ada4a9a5d5"),
        ("volume shell form", b("FROM x\nVOLUME /data /logs").last_key(), "3e46dcbcff08600073a82136ba1546258515f1647d56c5e5064ed90fc3ec7cd5"),
        ("stopsignal", b("FROM x\nSTOPSIGNAL SIGINT").last_key(), "363c414a1f490c632b7474810bb42a98b6b3b83ebd2519f11c5c0a392c47b374"),
        ("cmd shell", b("FROM x\nCMD echo $HOME").last_key(), "3232fe5954c644e45b59f112dc23363d22bf11272273a4309152f0f146dee6c2"),
        ("cmd exec", b("FROM x\nCMD [\"/bin/app\", \"--flag\"]").last_key(), "649684b69c0b4bec3aca160029fb3587e8b3de873748d2062ba4f810f7d1a685"),
        ("entrypoint", b("FROM x\nENTRYPOINT [\"tini\", \"--\"]").last_key(), "487ef3d28ba3b6e9ce5ae1db58db6395b767e47c40a68c3adfda57d82fa2dddd"),
        ("shell", b("FROM x\nSHELL [\"/bin/bash\", \"-c\"]").last_key(), "17bc6a52f6a0dae43ae3342138be5fc8421bb299971f8bcf543fdd550670afac"),
        ("healthcheck", b("FROM x\nHEALTHCHECK --interval=5s --timeout=1s --start-period=2s --start-interval=1s --retries=3 CMD curl -f http://localhost/").last_key(), "fa6eaf01ffeceeb8da7c35433f055888673548b4b9306526ae8b939353708912"),
        ("healthcheck none", b("FROM x\nHEALTHCHECK NONE").last_key(), "c768b3221f3daeab8b935afb608d0cfdf6113c5989545c85ec936fb7119624f9"),
        ("onbuild", b("FROM x\nONBUILD RUN echo $X").last_key(), "074f6382a8af467e610008b671ca2a178ec4461cc0ef74fd98f3ac331cd46fa0"),
        ("maintainer", b("FROM x\nMAINTAINER kiln <kiln@example.invalid>").last_key(), "afd5ab0bb78ea7067cccd0888839714021c3cac82766bc891845ed29858a164e"),
        ("a whole stage", b("FROM x AS app\nARG V=1\nENV A=$V\nWORKDIR /app\nCOPY . .\nRUN make\nUSER app\nLABEL v=$V\nEXPOSE 8080\nENTRYPOINT [\"/app/run\"]").last_key(), "c03a7c99831a116f9d192c2fd9368210c223ba0f989be10cbab143acad49362b"),
    ]);
}

#[test]
fn platform_keys_are_pinned() {
    let df = "FROM x\nARG TARGETPLATFORM TARGETARCH TARGETVARIANT\nRUN echo $TARGETARCH";
    let on = |platform| {
        Build {
            platform,
            ..build(df)
        }
        .last_key()
    };
    check(&[
        (
            "linux/amd64",
            on("linux/amd64"),
            "b9280b1ea18195c985ae05a3c06b0b9a1cca595ce1a93f929a3092bf1fead23c",
        ),
        (
            "linux/arm64",
            on("linux/arm64"),
            "2bd5d70a596f6240abf73c832a3fb0ecef0d6985883c4d3c85285103828dfe22",
        ),
        // Moved on purpose by the one `Platform` (docs/decisions.md): `v8`
        // is arm64's default variant and is now dropped as BuildKit does,
        // so TARGETVARIANT is empty for this spelling. Only builds that
        // spell `arm64/v8` miss once; the scheme is not bumped.
        (
            "linux/arm64/v8",
            on("linux/arm64/v8"),
            "0b717d5846b38a71ff0cac9ac6a197a918be65f1b6004fb392e490581ff09773",
        ),
        (
            "linux/arm/v7",
            on("linux/arm/v7"),
            "4e35f9c646d2cb5e30e541fd1f90a90b6698a49f3af1c68f6e613c459a0f8b29",
        ),
    ]);
}

#[test]
fn layer_option_keys_are_pinned() {
    let with = |layer| {
        Build {
            layer,
            ..build("FROM x\nRUN make")
        }
        .last_key()
    };
    let compressed = |compression| {
        with(LayerKeyOptions {
            compression,
            ..DEFAULT_LAYER
        })
    };
    check(&[
        (
            "gzip 6",
            compressed(Compression::Gzip { level: 6 }),
            "379e5cd45a42010668f12def7c58753b0cf51aa464b828d05e0e1b2c2cf2c614",
        ),
        (
            "gzip 0",
            compressed(Compression::Gzip { level: 0 }),
            "e774847df711f4eb50f4bd47a657ebe83cb366c6afb72fb26d47680d606865f3",
        ),
        (
            "gzip 1",
            compressed(Compression::Gzip { level: 1 }),
            "f67533b7d963f6f907d1eb03eb2bb7143a5e8b07779492614cf7f39ef399c3b3",
        ),
        (
            "gzip 9",
            compressed(Compression::Gzip { level: 9 }),
            "df742fe94ed2f76f6c3ce0af4007fa27e0013dc048f68ea24e5b2eacdcaeb82f",
        ),
        (
            "zstd 3",
            compressed(Compression::Zstd { level: 3 }),
            "dbfdcabd01c1a64fc5e855403b994214ecf7d062ff94f3f7323eb1752f96e99e",
        ),
        (
            "zstd 1",
            compressed(Compression::Zstd { level: 1 }),
            "68e473f56eb8c75919c7712408d7c5633246252730268336ab7208242da0c410",
        ),
        (
            "zstd 22",
            compressed(Compression::Zstd { level: 22 }),
            "522b561e0ae4c7365b0a36f3bcb0f6ef711fab37dda01059e6884e701d138ead",
        ),
        (
            "uncompressed",
            compressed(Compression::None),
            "c7bfc06f49f0b037cb2033b81c99f5e84d1d445ed71a8d639f13cc483284f8c5",
        ),
        (
            "reproducible",
            with(LayerKeyOptions {
                reproducible: true,
                ..DEFAULT_LAYER
            }),
            "a0e55614d1689be3eb9ddbe870faea142a7370e01a781fb1c5f3b85c32bce0c1",
        ),
        (
            "epoch 0",
            with(LayerKeyOptions {
                source_date_epoch: Some(0),
                ..DEFAULT_LAYER
            }),
            "e7a81404bdd89a762b959cf931bb3014bc1d64d45a5b89f4fe22fe764b7bd763",
        ),
        (
            "reproducible epoch",
            with(LayerKeyOptions {
                reproducible: true,
                source_date_epoch: Some(1_700_000_000),
                ..DEFAULT_LAYER
            }),
            "aeebbc1cd2f2cc2c3e52c7eed58a9587b26dc7bfbd06151ea4b38de5d5efc852",
        ),
        (
            "single snapshot",
            with(LayerKeyOptions {
                single_snapshot: true,
                ..DEFAULT_LAYER
            }),
            "2c35a26c1ea5fb0f9b3ec78b258312582b9c86feabc35751b8eb809207ce331d",
        ),
        (
            "force build metadata",
            with(LayerKeyOptions {
                force_build_metadata: true,
                ..DEFAULT_LAYER
            }),
            "39e0cbb24f6f5c2bda4567ed416ab73dac95870bd11fce5cb43a8b148e22fffa",
        ),
        (
            "both",
            with(LayerKeyOptions {
                single_snapshot: true,
                force_build_metadata: true,
                ..DEFAULT_LAYER
            }),
            "39e0cbb24f6f5c2bda4567ed416ab73dac95870bd11fce5cb43a8b148e22fffa",
        ),
        (
            "zstd 19 reproducible single snapshot",
            with(LayerKeyOptions {
                compression: Compression::Zstd { level: 19 },
                reproducible: true,
                source_date_epoch: Some(42),
                single_snapshot: true,
                force_build_metadata: false,
            }),
            "d73c769c93d961a45f95cb6233bbd4f1eba80b1d85c50157570ce7e8bb23e1ab",
        ),
    ]);
}

#[test]
fn run_security_keys_are_pinned() {
    let with = |security: StepSecurity| {
        Build {
            security: Some(security),
            ..build("FROM x\nRUN make")
        }
        .last_key()
    };
    let mut cap_add = StepSecurity::default();
    cap_add.capabilities.add("NET_ADMIN").unwrap();
    let mut cap_drop = StepSecurity::default();
    cap_drop.capabilities.drop_cap("CHOWN").unwrap();
    let unconfined = StepSecurity {
        seccomp: Seccomp::Unconfined,
        ..StepSecurity::default()
    };
    let userns = StepSecurity {
        user_namespace: Some(DEFAULT_MAPPING),
        ..StepSecurity::default()
    };
    check(&[
        (
            "default",
            with(StepSecurity::default()),
            "379e5cd45a42010668f12def7c58753b0cf51aa464b828d05e0e1b2c2cf2c614",
        ),
        (
            "cap-add NET_ADMIN",
            with(cap_add),
            "5e47ed04319f3b8b06234c72c33a94045ee18b9539f68549c6722674a2959dfc",
        ),
        (
            "cap-drop CHOWN",
            with(cap_drop),
            "6bcc693ac2a0b5603a503ff5dabd7dc255bec7d988eb4e340702de6a6d94a988",
        ),
        (
            "seccomp unconfined",
            with(unconfined),
            "e725b0d708ea63bbb7e720c04b638144dca5c2a8b309605036a3f36be80d8528",
        ),
        (
            "insecure",
            with(StepSecurity::insecure()),
            "269136c419754166523dcb74b0ccf9dd1fd2faa50d5f3233b3aabf08e787f9aa",
        ),
        (
            "userns auto",
            with(userns),
            "03337537e7b8a5de74bbee1ba02b8f60758c796592cffd3558d1f1497399f321",
        ),
    ]);
}

#[test]
fn base_and_artifact_keys_are_pinned() {
    let digest: Digest = DIGEST_A.parse().unwrap();
    check(&[
        (
            "scratch amd64",
            base_key(&base_identity_of("scratch", "linux/amd64")).to_hex(),
            "070a236227edab0dbba61aa83cb1b27a046e146d3e5e1ab2cbd58e73af4a3bba",
        ),
        (
            "image amd64",
            base_key(&base_identity_of(DIGEST_A, "linux/amd64")).to_hex(),
            "fad6a0d780b25375bac51c9d00d257a8263fd12f199fc9cb94ace8b5c90aeb88",
        ),
        (
            "image arm64",
            base_key(&base_identity_of(DIGEST_A, "linux/arm64")).to_hex(),
            "2b93a9bed6c45dd43556ad65092a214be0a9cd2156cc0408a2554bd81a8e66d5",
        ),
        (
            "image arm/v7",
            base_key(&base_identity_of(DIGEST_B, "linux/arm/v7")).to_hex(),
            "9b61fa740a5ba0897e28997f970b6d34490f252c9254e104a2d8c7e121afff91",
        ),
        (
            "base layer",
            base_layer_key(&digest).to_hex(),
            "cfe00f8e88f3ca3ff0adbd5b8ac460bbb3c572a98e63f40c0a0196a05ab80b8e",
        ),
        (
            "erofs artifact",
            kiln_common::cache_key::derived_artifact_key("erofs", &digest, 1).to_hex(),
            "119c951db54dd4586c54b49e6807a7e5cac96d76ebd011ee222d3bf8b80c6cc7",
        ),
    ]);
}

#[test]
fn source_keys_are_pinned() {
    let opts = PlanOptions {
        context: "/ctx".into(),
        build_platform: Some("linux/amd64".into()),
        platform: Some("linux/amd64".into()),
        ..Default::default()
    };
    let plan = plan_source("FROM x\nCOPY a /a\n", Path::new("Dockerfile"), &opts).unwrap();
    let copy = &plan.stages[0].instructions[1];
    let parent = base_key(&base_identity_of(DIGEST_A, "linux/amd64"));
    let with = |source: Option<SourceIdentity>| {
        step_key(
            &parent,
            StepInputs::of(copy),
            source.as_ref(),
            &DEFAULT_LAYER,
            None,
        )
        .key
        .to_hex()
    };
    check(&[
        (
            "context 1",
            with(Some(SourceIdentity::Context([1; 32]))),
            "027d000963ae780288c15f7b9cc8c2d91bd101e397c1e644658cedc38dac0dbd",
        ),
        (
            "context 2",
            with(Some(SourceIdentity::Context([2; 32]))),
            "e925c37d2cbd60cb14ec42c499cfa5b84991cb0e2d9af29d429971f56016941e",
        ),
        (
            "stage",
            with(Some(SourceIdentity::Stage(stage_key()))),
            "6504ed4f16b24a58b6b95306e14bd21533c0ea13c92db7496d4b9f951ebb2331",
        ),
        (
            "image",
            with(Some(SourceIdentity::Image(image_identity()))),
            "9e8231edd846c3a4a1ccd670602dc648eb70ce4f3680e6acd98749e573f37024",
        ),
        (
            "unresolved",
            with(None),
            "cc89f032adebf38fc10f7e9df42a7426d55a72f5495ee7acd3b78355af5d53c1",
        ),
    ]);
}

/// The context digest that `context files` carries: path, type, mode,
/// owner and content of exactly the selected files.
#[test]
fn context_digest_is_pinned() {
    use std::os::unix::fs::{PermissionsExt, symlink};
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: setting file owners needs root");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    std::fs::create_dir_all(root.join("app/src")).unwrap();
    std::fs::write(
        root.join("app/src/main.c"),
        "int main(void) { return 0; }\n",
    )
    .unwrap();
    std::fs::write(root.join("app/README"), "hi\n").unwrap();
    symlink("src/main.c", root.join("app/link")).unwrap();
    for (path, mode) in [
        ("app", 0o755),
        ("app/src", 0o750),
        ("app/src/main.c", 0o644),
        ("app/README", 0o600),
    ] {
        std::fs::set_permissions(root.join(path), std::fs::Permissions::from_mode(mode)).unwrap();
    }
    for path in ["app", "app/src", "app/src/main.c", "app/README", "app/link"] {
        std::os::unix::fs::lchown(root.join(path), Some(1000), Some(1001)).unwrap();
    }
    let include_all = |_: &str, _: bool| crate::sources::context::Visibility::Included;
    let ctx = crate::sources::context::BuildContext::scan(root, &include_all).unwrap();
    let digest_of = |sources: &[&str]| {
        let sources: Vec<String> = sources.iter().map(|s| s.to_string()).collect();
        CacheKey::from_bytes(ctx.digest(&ctx.select(&sources).unwrap()).unwrap()).to_hex()
    };
    check(&[
        (
            "app",
            digest_of(&["app"]),
            "947632980d8049602bb31324e37841b64e55abb538fe644b7acc43b0c3e57775",
        ),
        (
            "one file",
            digest_of(&["app/README"]),
            "f8bb5c9d27a5d6248dedbbbad053be504f4e1d8ec3f85150b308b260954e1e74",
        ),
        (
            "two sources",
            digest_of(&["app/src", "app/link"]),
            "a0012399490970a17e136d78880956e0107b317c27630e5afa024c83163f9ff4",
        ),
    ]);
}

/// The dry-run plan carries rendered forms of each instruction (`expanded`,
/// `flags`, `value`, `kind`); keys read none of them, so any change to the
/// renderer leaves every key where it was.
#[test]
fn changing_the_dry_run_rendering_changes_no_key() {
    let b = build(
        "FROM x AS app\nARG V=1\nENV A=$V\nWORKDIR /app\nCOPY --chown=1:2 . .\nRUN --mount=type=cache,target=/c make\nUSER app\nLABEL v=$V\n",
    );
    let plan = plan_of(b.dockerfile, b.args, b.platform);
    let mut rerendered = plan.clone();
    for ins in &mut rerendered.stages[plan.target].instructions {
        ins.expanded = format!("{} (rendered differently)", ins.expanded.to_lowercase());
        ins.flags.insert("new-flag".into(), serde_json::json!(true));
        ins.value = serde_json::json!({"renamed": ins.value.clone()});
        ins.kind = "RENAMED";
    }
    assert_eq!(b.keys_of(&plan), b.keys_of(&rerendered));
}

/// The key text is written in this module from typed fields: no `Debug`
/// formatting, no serde, no dry-run text. Checked on the module's own
/// source (comments aside), so that a shortcut through one of them fails
/// here before it can move a key.
#[test]
fn key_text_is_written_out_not_borrowed_from_debug_serde_or_the_renderer() {
    let sources = [
        ("mod.rs", include_str!("mod.rs")),
        ("text.rs", include_str!("text.rs")),
        ("resolved.rs", include_str!("resolved.rs")),
    ];
    let forbidden = [":?", "serde", "describe(", "expanded", ".flags", "to_value"];
    for (file, source) in sources {
        for (n, line) in source.lines().enumerate() {
            let code = line.trim_start();
            if code.starts_with("//") {
                continue;
            }
            for word in forbidden {
                assert!(
                    !code.contains(word),
                    "keys/{file}:{}: {word:?} in key code: {line}",
                    n + 1
                );
            }
        }
    }
}

#[test]
fn layer_options_text_is_spelled_out() {
    assert_eq!(
        DEFAULT_LAYER.text(),
        "Gzip { level: 6 } reproducible=false epoch=None"
    );
    let zstd = LayerKeyOptions {
        compression: Compression::Zstd { level: 19 },
        reproducible: true,
        source_date_epoch: Some(42),
        single_snapshot: true,
        ..DEFAULT_LAYER
    };
    assert_eq!(
        zstd.text(),
        "Zstd { level: 19 } reproducible=true epoch=Some(42) single-snapshot"
    );
    let forced = LayerKeyOptions {
        compression: Compression::None,
        single_snapshot: true,
        force_build_metadata: true,
        ..DEFAULT_LAYER
    };
    assert_eq!(
        forced.text(),
        "None reproducible=false epoch=None force-build-metadata"
    );
}

#[test]
fn json_strings_escape_as_scheme_v1_did() {
    assert_eq!(text::json_string(""), "\"\"");
    assert_eq!(
        text::json_string("a\"b\\c/d\u{8}\t\n\u{c}\r\u{1}\u{1f}\u{7f}é€"),
        "\"a\\\"b\\\\c/d\\b\\t\\n\\f\\r\\u0001\\u001f\u{7f}é€\""
    );
}

#[test]
fn resolved_identities_are_spelled_out() {
    assert_eq!(
        base_identity_of("scratch", "linux/arm64"),
        "scratch linux/arm64"
    );
    assert_eq!(
        base_identity_of(DIGEST_A, "linux/arm/v7"),
        format!("{DIGEST_A} linux/arm/v7")
    );
    assert_eq!(
        remote_file_identity("https://example.com/f", &digest(DIGEST_B)),
        format!("https://example.com/f {DIGEST_B}")
    );
    assert_eq!(
        git_identity("https://g.example/r.git", "0123abcd", Some("sub"), true),
        "git https://g.example/r.git 0123abcd sub keep-git-dir=true"
    );
    assert_eq!(
        git_identity("https://g.example/r.git", "0123abcd", None, false),
        "git https://g.example/r.git 0123abcd  keep-git-dir=false"
    );
    assert_eq!(run_security_text(&StepSecurity::default()), None);
    assert_eq!(
        run_security_text(&StepSecurity::insecure()).unwrap(),
        format!(
            "caps={:x};seccomp=unconfined;privileged=true",
            crate::build::runner::security::CapSet::all().bits()
        )
    );
}
