//! Command-line options of the long commands (`chaos`, `bench`): `--name value`
//! or `--name=value`, read one at a time, so each command's parser is just a
//! `match` on the names it knows.

use anyhow::{Context, Result};

pub struct Flags<'a> {
    args: std::slice::Iter<'a, String>,
    /// The value given with `=` to the option just read.
    inline: Option<String>,
    name: String,
}

impl<'a> Flags<'a> {
    pub fn new(args: &'a [String]) -> Self {
        Flags {
            args: args.iter(),
            inline: None,
            name: String::new(),
        }
    }

    /// The next option's name (`--duration`), or `None` after the last.
    pub fn next_name(&mut self) -> Option<String> {
        let arg = self.args.next()?;
        let (name, inline) = match arg.split_once('=') {
            Some((name, value)) => (name, Some(value.to_string())),
            None => (arg.as_str(), None),
        };
        self.inline = inline;
        self.name = name.to_string();
        Some(self.name.clone())
    }

    /// The value of the option just named (after `=`, or the next argument).
    pub fn value(&mut self) -> Result<String> {
        match self.inline.take() {
            Some(value) => Ok(value),
            None => self
                .args
                .next()
                .cloned()
                .with_context(|| format!("{} needs a value", self.name)),
        }
    }

    /// The value of the option just named, parsed.
    pub fn parsed<T: std::str::FromStr>(&mut self) -> Result<T> {
        let value = self.value()?;
        value
            .parse()
            .ok()
            .with_context(|| format!("bad {} {value:?}", self.name))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn both_spellings_and_a_missing_value() {
        let a = args(&["--rate", "5", "--seed=7", "--json"]);
        let mut f = Flags::new(&a);
        assert_eq!(f.next_name().as_deref(), Some("--rate"));
        assert_eq!(f.parsed::<u32>().unwrap(), 5);
        assert_eq!(f.next_name().as_deref(), Some("--seed"));
        assert_eq!(f.value().unwrap(), "7");
        assert_eq!(f.next_name().as_deref(), Some("--json"));
        assert!(f.value().is_err());
        assert_eq!(f.next_name(), None);
        let bad = args(&["--rate", "x"]);
        let mut f = Flags::new(&bad);
        f.next_name();
        assert!(f.parsed::<u32>().is_err());
    }
}
