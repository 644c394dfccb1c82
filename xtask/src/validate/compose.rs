//! Step `compose`: `docker-compose.yml` against the compose specification.
//!
//! `check-jsonschema` with its built-in copy of the compose spec catches unknown keys and
//! wrong shapes without Docker installed (`docker compose config` would need it).

use std::path::Path;

use anyhow::{anyhow, Result};

use super::shared::{compose_file, exec_ok, find_program, os, python, rel_args};

pub(super) fn check_compose(root: &Path) -> Result<String> {
    let compose = compose_file(root)?;
    let py = find_program(python()).ok_or_else(|| anyhow!("python3 is missing"))?;
    let mut args = os(&[
        "-m",
        "check_jsonschema",
        "--builtin-schema",
        "vendor.compose-spec",
    ]);
    args.extend(rel_args(root, &[compose]));
    exec_ok(root, "check-jsonschema (compose spec)", &py, &args)?;
    Ok("docker-compose.yml matches the compose spec".into())
}
