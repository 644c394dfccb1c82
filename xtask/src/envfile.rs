//! `KEY=VALUE` env files (compose's `env_file`, the files under `env/`): read
//! by the deploy validation and by the env drift test, so parsed in one place.

/// The variables of an env file in file order; comments, blank lines and a
/// leading `export ` are skipped, one pair of surrounding quotes is removed.
pub fn parse(text: &str) -> Vec<(String, String)> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|l| {
            let l = l.strip_prefix("export ").unwrap_or(l);
            let (k, v) = l.split_once('=')?;
            let v = v.trim();
            let v = v
                .strip_prefix('"')
                .and_then(|v| v.strip_suffix('"'))
                .or_else(|| v.strip_prefix('\'').and_then(|v| v.strip_suffix('\'')))
                .unwrap_or(v);
            Some((k.trim().to_string(), v.to_string()))
        })
        .collect()
}

/// The `env_file` of a compose service: a string, a list of strings or of `{path: ...}`.
pub fn compose_env_files(service: &serde_yaml_ng::Value) -> Vec<String> {
    use serde_yaml_ng::Value;
    match service.get("env_file") {
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Sequence(items)) => items
            .iter()
            .filter_map(|i| {
                i.as_str()
                    .or_else(|| crate::yaml::str_at(i, &["path"]))
                    .map(str::to_string)
            })
            .collect(),
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn comments_exports_and_quotes() {
        let vars = super::parse("# c\n\nA=1\nexport B=\"two words\"\nC='x=y'\n");
        assert_eq!(
            vars,
            vec![
                ("A".to_string(), "1".to_string()),
                ("B".to_string(), "two words".to_string()),
                ("C".to_string(), "x=y".to_string()),
            ]
        );
    }
}
