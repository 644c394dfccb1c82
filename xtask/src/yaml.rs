//! Reading values out of parsed YAML by path: shared by the deploy
//! validation and the env drift test, which walk the same files.

use serde_yaml_ng::Value;

/// The value at `path` (mapping keys), if every step exists.
pub fn at<'a>(v: &'a Value, path: &[&str]) -> Option<&'a Value> {
    path.iter().try_fold(v, |v, k| v.get(*k))
}

pub fn str_at<'a>(v: &'a Value, path: &[&str]) -> Option<&'a str> {
    at(v, path).and_then(Value::as_str)
}

/// The sequence at `path`, or an empty one.
pub fn seq_at<'a>(v: &'a Value, path: &[&str]) -> &'a [Value] {
    at(v, path)
        .and_then(Value::as_sequence)
        .map(Vec::as_slice)
        .unwrap_or(&[])
}

/// A scalar as text (YAML `8080` and `"8080"` alike).
pub fn scalar(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_and_scalars() {
        let v: Value = serde_yaml_ng::from_str("a:\n  b: 8080\n  c: [x, y]\n  d: on\n").unwrap();
        assert_eq!(
            at(&v, &["a", "b"]).and_then(scalar).as_deref(),
            Some("8080")
        );
        assert_eq!(seq_at(&v, &["a", "c"]).len(), 2);
        assert!(seq_at(&v, &["a", "missing"]).is_empty());
        assert_eq!(str_at(&v, &["a", "d"]), Some("on"));
        assert_eq!(str_at(&v, &["a", "b"]), None);
    }
}
