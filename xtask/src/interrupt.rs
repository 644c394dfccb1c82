//! Ctrl-C (and SIGTERM/SIGHUP) handling for long-running commands.
//!
//! Children run in their own sessions (see `xtask::proc`), so a Ctrl-C reaches only xtask; the
//! handler merely raises a flag that `up`'s wait loops and `test`'s step runner check, and they
//! then stop the fleet in order. A third Ctrl-C gives up on the clean stop and exits at once
//! (`cargo xtask down` can still clean up afterwards).

use std::sync::atomic::{AtomicUsize, Ordering};

static PRESSED: AtomicUsize = AtomicUsize::new(0);

/// Installs the handler (once per process; later calls do nothing).
pub fn install() {
    let _ = ctrlc::set_handler(|| {
        let n = PRESSED.fetch_add(1, Ordering::SeqCst) + 1;
        match n {
            1 => eprintln!("\nxtask: interrupted; stopping (Ctrl-C twice more to abandon)"),
            2 => eprintln!("\nxtask: still stopping; one more Ctrl-C abandons the clean stop"),
            _ => {
                eprintln!("\nxtask: abandoned; run `cargo xtask down` to stop what is left");
                std::process::exit(130);
            }
        }
    });
}

/// True once Ctrl-C (or SIGTERM/SIGHUP) arrived.
pub fn requested() -> bool {
    PRESSED.load(Ordering::SeqCst) > 0
}

/// An error to return when a step was interrupted.
pub fn check() -> anyhow::Result<()> {
    if requested() {
        anyhow::bail!("interrupted");
    }
    Ok(())
}
