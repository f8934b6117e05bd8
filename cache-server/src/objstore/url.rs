//! The `--storage` URL: which store, which bucket (container), which
//! prefix, with each store's naming rules checked before anything connects.

use super::ObjError;

/// The kind of store a `--storage` URL names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    /// `s3://`: AWS S3 and S3-compatible stores.
    S3,
    /// `gs://`: Google Cloud Storage.
    Gcs,
    /// `az://`: a container of Azure Blob Storage.
    Azure,
}

impl Scheme {
    const ALL: [Scheme; 3] = [Scheme::S3, Scheme::Gcs, Scheme::Azure];

    fn url_prefix(self) -> &'static str {
        match self {
            Scheme::S3 => "s3://",
            Scheme::Gcs => "gs://",
            Scheme::Azure => "az://",
        }
    }

    /// What the first URL segment names: a bucket, or Azure's container.
    fn container_word(self) -> &'static str {
        match self {
            Scheme::Azure => "container",
            Scheme::S3 | Scheme::Gcs => "bucket",
        }
    }

    /// `None` when `name` is a valid bucket (container) name of this
    /// store; otherwise the rule it breaks.
    fn name_rule_broken(self, name: &str) -> Option<&'static str> {
        let alnum = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit();
        let ends_alnum = name.starts_with(alnum) && name.ends_with(alnum);
        match self {
            Scheme::S3 => {
                let valid = |c: char| alnum(c) || matches!(c, '-' | '.');
                let ok = (3..=63).contains(&name.len()) && name.chars().all(valid);
                (!ok).then_some("3-63 of a-z, 0-9, '-', '.'")
            }
            // https://cloud.google.com/storage/docs/buckets#naming
            Scheme::Gcs => {
                const RULE: &str = "3-63 of a-z, 0-9, '-', '_', '.' (up to 222 with dots, \
                                    at most 63 between dots), starting and ending with a \
                                    letter or digit";
                let valid = |c: char| alnum(c) || matches!(c, '-' | '_' | '.');
                let max = if name.contains('.') { 222 } else { 63 };
                let ok = (3..=max).contains(&name.len())
                    && name.chars().all(valid)
                    && ends_alnum
                    && name
                        .split('.')
                        .all(|part| !part.is_empty() && part.len() <= 63);
                (!ok).then_some(RULE)
            }
            // https://learn.microsoft.com/en-us/rest/api/storageservices/naming-and-referencing-containers--blobs--and-metadata
            Scheme::Azure => {
                let valid = |c: char| alnum(c) || c == '-';
                let ok = (3..=63).contains(&name.len())
                    && name.chars().all(valid)
                    && ends_alnum
                    && !name.contains("--");
                (!ok).then_some(
                    "3-63 of a-z, 0-9, '-', starting and ending with a letter or digit, \
                     no '--'",
                )
            }
        }
    }
}

/// A parsed `--storage` URL: which store, which bucket (container), and
/// the prefix inside it ("" for its root).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StorageUrl {
    pub scheme: Scheme,
    pub bucket: String,
    pub prefix: String,
}

/// Parses `s3://bucket[/prefix]`, `gs://bucket[/prefix]` or
/// `az://container[/prefix]`, checking the name by that store's rules.
pub fn parse_storage_url(url: &str) -> Result<StorageUrl, ObjError> {
    let (scheme, rest) = Scheme::ALL
        .iter()
        .find_map(|s| url.strip_prefix(s.url_prefix()).map(|rest| (*s, rest)))
        .ok_or_else(|| {
            ObjError::Config(format!(
                "--storage {url:?}: expected s3://bucket[/prefix] (S3 and S3-compatible \
                 stores), gs://bucket[/prefix] (Google Cloud Storage) or \
                 az://container[/prefix] (Azure Blob Storage)"
            ))
        })?;
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    if let Some(rule) = scheme.name_rule_broken(bucket) {
        let word = scheme.container_word();
        return Err(ObjError::Config(format!(
            "--storage {url:?}: {bucket:?} is not a {word} name ({rule})"
        )));
    }
    Ok(StorageUrl {
        scheme,
        bucket: bucket.to_owned(),
        prefix: prefix.trim_matches('/').to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(url: &str) -> (Scheme, String, String) {
        let u = parse_storage_url(url).unwrap();
        (u.scheme, u.bucket, u.prefix)
    }

    #[test]
    fn storage_urls_name_a_bucket_and_an_optional_prefix() {
        assert_eq!(
            parsed("s3://kiln-cache"),
            (Scheme::S3, "kiln-cache".into(), String::new())
        );
        assert_eq!(
            parsed("s3://kiln-cache/team/a/"),
            (Scheme::S3, "kiln-cache".into(), "team/a".into())
        );
        assert_eq!(
            parsed("gs://kiln_cache.example.com/ci"),
            (Scheme::Gcs, "kiln_cache.example.com".into(), "ci".into())
        );
        assert_eq!(
            parsed("az://kiln-cache/team/b"),
            (Scheme::Azure, "kiln-cache".into(), "team/b".into())
        );
        for bad in [
            "s3://",
            "s3://AB",
            "kiln-cache",
            "https://kiln-cache",
            "gcs://kiln-cache",
            "azure://kiln-cache",
        ] {
            let err = parse_storage_url(bad).unwrap_err().to_string();
            assert!(err.contains(bad), "{err}");
        }
    }

    #[test]
    fn each_scheme_checks_names_by_its_own_rules() {
        let long = |n: usize| "a".repeat(n);
        let dotted_222 = format!("{}.{}.{}.{}", long(63), long(63), long(63), long(30));
        assert_eq!(dotted_222.len(), 222);
        let dotted_223 = format!("{dotted_222}a");
        for (url, ok) in [
            // S3 as before.
            (format!("s3://{}", long(63)), true),
            (format!("s3://{}", long(64)), false),
            ("s3://kiln_cache".into(), false),
            // GCS: '_' allowed, dots allow up to 222, 63 between dots.
            ("gs://kiln_cache-1".into(), true),
            (format!("gs://{}", long(63)), true),
            (format!("gs://{}", long(64)), false),
            (format!("gs://{dotted_222}"), true),
            (format!("gs://{dotted_223}"), false),
            (format!("gs://{}.com", long(64)), false),
            ("gs://ab".into(), false),
            ("gs://-kiln".into(), false),
            ("gs://kiln_".into(), false),
            ("gs://Kiln".into(), false),
            ("gs://kiln..cache".into(), false),
            // Azure: a-z, 0-9, '-' only, no '--', alphanumeric ends.
            ("az://kiln-cache-1".into(), true),
            ("az://abc".into(), true),
            (format!("az://{}", long(63)), true),
            (format!("az://{}", long(64)), false),
            ("az://ab".into(), false),
            ("az://kiln.cache".into(), false),
            ("az://kiln_cache".into(), false),
            ("az://kiln--cache".into(), false),
            ("az://-kiln".into(), false),
            ("az://kiln-".into(), false),
            ("az://Kiln".into(), false),
        ] {
            let result = parse_storage_url(&url);
            assert_eq!(result.is_ok(), ok, "{url}: {result:?}");
            if let Err(e) = result {
                let e = e.to_string();
                let word = if url.starts_with("az") {
                    "container"
                } else {
                    "bucket"
                };
                assert!(e.contains(&url) && e.contains(word), "{e}");
            }
        }
    }
}
