//! The compose gateway's routes.
//!
//! `nginx -t` (step `nginx`) proves the config loads, not that it serves the fleet: this
//! checks that it routes the three prefixes of the API and lets nginx retry a POST on
//! another instance when one dies mid-request (`non_idempotent`): without it a POST to a
//! dying instance is a 502 for the client, and the services' idempotency keys are what make
//! the retry safe.

use std::fmt::Write as _;
use std::fs;
use std::path::Path;

use anyhow::{Context, Result};

use super::Problems;
use crate::validate::shared::{files_under, has_ext};

/// The compose gateway routes the three prefixes and retries POSTs on another instance.
pub(super) fn check_gateway_routes(root: &Path, p: &mut Problems) -> Result<()> {
    for conf in files_under(&root.join("deploy/gateway"), &|f| has_ext(f, "conf")) {
        let label = conf
            .strip_prefix(root)
            .unwrap_or(&conf)
            .display()
            .to_string();
        let text = fs::read_to_string(&conf).with_context(|| label.clone())?;
        let mut missing = String::new();
        for prefix in ["/orders/", "/stock/", "/payment/"] {
            if !text.contains(&format!("location {prefix}")) {
                let _ = write!(missing, " location {prefix};");
            }
        }
        let retries = text
            .lines()
            .map(|l| {
                l.split('#')
                    .next()
                    .unwrap_or("")
                    .split_whitespace()
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .any(|l| l == "proxy_next_upstream error timeout non_idempotent;");
        if !retries {
            missing.push_str(" proxy_next_upstream error timeout non_idempotent;");
        }
        p.check(missing.is_empty(), || format!("{label}: missing{missing}"));
    }
    Ok(())
}
