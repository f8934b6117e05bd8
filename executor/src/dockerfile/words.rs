//! Word splitting the way BuildKit's parser does it before any expansion:
//! whitespace-separated words that keep their quotes and escapes (for ENV,
//! LABEL, ARG and heredoc markers), leading `--flag` words, and the JSON
//! array (exec) form with its fall-back to the shell form.

/// Splits on whitespace outside quotes; quotes and escapes stay in the words.
pub fn split_words(rest: &str, escape: char) -> Vec<String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut in_word = false;
    let mut quote: Option<char> = None;
    let mut blank_ok = false;
    let mut chars = rest.chars().peekable();
    while let Some(ch) = chars.next() {
        if let Some(q) = quote {
            if ch == escape && q != '\'' {
                match chars.next() {
                    Some(n) => {
                        word.push(ch);
                        word.push(n);
                    }
                    None => quote = None,
                }
                continue;
            }
            if ch == q {
                quote = None;
            }
            word.push(ch);
            continue;
        }
        if ch.is_whitespace() {
            if in_word && (blank_ok || !word.is_empty()) {
                words.push(std::mem::take(&mut word));
            }
            in_word = false;
            blank_ok = false;
            continue;
        }
        in_word = true;
        if ch == '\'' || ch == '"' {
            quote = Some(ch);
            blank_ok = true;
            word.push(ch);
            continue;
        }
        if ch == escape {
            if let Some(n) = chars.next() {
                word.push(ch);
                word.push(n);
            }
            continue;
        }
        word.push(ch);
    }
    if in_word && (blank_ok || !word.is_empty()) {
        words.push(word);
    }
    words
}

/// Takes the leading `--flag[=value]` words off an instruction's arguments.
/// Quotes in flag words are removed and escapes resolved; a bare `--` ends
/// the flags. Returns the flag words (without the leading `--`) and the rest.
pub fn extract_flags(rest: &str, escape: char) -> (Vec<String>, &str) {
    let mut flags = Vec::new();
    let mut pos = 0;
    let bytes = rest.as_bytes();
    loop {
        while pos < bytes.len() && (bytes[pos] as char).is_ascii_whitespace() {
            pos += 1;
        }
        if !rest[pos..].starts_with("--") {
            return (flags, &rest[pos..]);
        }
        let mut word = String::new();
        let mut quote: Option<char> = None;
        let mut iter = rest[pos..].char_indices();
        let mut end = rest.len();
        while let Some((i, ch)) = iter.next() {
            if let Some(q) = quote {
                if ch == q {
                    quote = None;
                } else if ch == escape && q == '"' {
                    if let Some((_, n)) = iter.next() {
                        word.push(n);
                    }
                } else {
                    word.push(ch);
                }
                continue;
            }
            if ch.is_whitespace() {
                end = pos + i;
                break;
            }
            match ch {
                '\'' | '"' => quote = Some(ch),
                c if c == escape => {
                    if let Some((_, n)) = iter.next() {
                        word.push(n);
                    }
                }
                c => word.push(c),
            }
        }
        pos = end;
        if word == "--" {
            while pos < bytes.len() && (bytes[pos] as char).is_ascii_whitespace() {
                pos += 1;
            }
            return (flags, &rest[pos..]);
        }
        flags.push(word[2..].to_string());
    }
}

/// Outcome of trying the exec (JSON array) form.
#[derive(Debug, PartialEq, Eq)]
pub enum Json {
    /// A JSON array of strings.
    Array(Vec<String>),
    /// Not JSON at all: Docker then uses the shell form.
    Plain,
    /// A JSON array with non-string members: an error in Docker.
    NonStrings,
}

pub fn parse_json_array(rest: &str) -> Json {
    let trimmed = rest.trim();
    if !trimmed.starts_with('[') {
        return Json::Plain;
    }
    match serde_json::from_str::<Vec<serde_json::Value>>(trimmed) {
        Err(_) => Json::Plain,
        Ok(values) => {
            let mut out = Vec::with_capacity(values.len());
            for v in values {
                match v {
                    serde_json::Value::String(s) => out.push(s),
                    _ => return Json::NonStrings,
                }
            }
            Json::Array(out)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_words_keeps_quotes_and_escapes() {
        assert_eq!(
            split_words(r#"a="b c" d\ e 'f g'h  "" "#, '\\'),
            vec![r#"a="b c""#, r"d\ e", "'f g'h", r#""""#]
        );
        assert_eq!(split_words("x `  y", '`'), vec!["x", "` ", "y"]);
        assert!(split_words("   ", '\\').is_empty());
    }

    #[test]
    fn extract_flags_stops_at_the_first_argument() {
        let (f, rest) = extract_flags("--from=a --chown=\"u:g\" src --x dst", '\\');
        assert_eq!(f, vec!["from=a", "chown=u:g"]);
        assert_eq!(rest, "src --x dst");
        let (f, rest) = extract_flags("--link -- --notaflag", '\\');
        assert_eq!(f, vec!["link"]);
        assert_eq!(rest, "--notaflag");
        let (f, rest) = extract_flags("-x y", '\\');
        assert!(f.is_empty());
        assert_eq!(rest, "-x y");
    }

    #[test]
    fn json_form_detection_follows_docker() {
        assert_eq!(
            parse_json_array(r#"["a", "b c"]"#),
            Json::Array(vec!["a".into(), "b c".into()])
        );
        assert_eq!(parse_json_array("[]"), Json::Array(vec![]));
        assert_eq!(parse_json_array("[a, b]"), Json::Plain);
        assert_eq!(parse_json_array("echo [1]"), Json::Plain);
        assert_eq!(parse_json_array("[1, \"a\"]"), Json::NonStrings);
    }
}
