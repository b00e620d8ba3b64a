//! The one rule for tests that need system tools (QEMU, qemu-io, nbdcopy, busybox, the guest
//! kernel, ...): when a prerequisite is missing, the test **fails** if the environment says
//! `TMEM_REQUIRE_VM=1` (CI and `scripts/test` set it; `scripts/setup` installs everything),
//! and otherwise it is skipped with a `SKIP:` line on stderr.
//!
//! ```no_run
//! #[test]
//! fn needs_qemu_io() {
//!     let Some(qemu_io) = tmem_vm::test_tool("qemu-io") else { return };
//!     // ... run it ...
//! #   let _ = qemu_io;
//! }
//! ```

use std::path::PathBuf;

use crate::{find_tool, newest_cloud_kernel, Kernel};

/// Environment variable that turns a missing test prerequisite into a failure (`1`).
pub const REQUIRE_VM_ENV: &str = "TMEM_REQUIRE_VM";

/// Whether `TMEM_REQUIRE_VM=1` (also `true`/`yes`): missing prerequisites fail tests.
pub fn vm_required() -> bool {
    std::env::var(REQUIRE_VM_ENV)
        .map(|v| matches!(v.trim(), "1" | "true" | "yes"))
        .unwrap_or(false)
}

/// Reports that a test cannot run because `what` is missing (`detail` says why): panics
/// naming it under `TMEM_REQUIRE_VM=1`, otherwise prints a `SKIP:` line. The caller then
/// returns.
#[track_caller]
pub fn missing_prerequisite(what: &str, detail: &str) {
    if vm_required() {
        panic!(
            "{what} is missing ({detail}) and {REQUIRE_VM_ENV}=1: this test cannot be skipped; \
             run `sudo scripts/setup` to install the system dependencies"
        );
    }
    eprintln!(
        "SKIP: {what} is missing ({detail}); run `sudo scripts/setup`, and set \
         {REQUIRE_VM_ENV}=1 to make this a failure"
    );
}

/// A system tool a test needs: its path, or `None` after [`missing_prerequisite`] (which
/// panics under `TMEM_REQUIRE_VM=1`).
#[track_caller]
pub fn test_tool(name: &str) -> Option<PathBuf> {
    match find_tool(name) {
        Ok(p) => Some(p),
        Err(_) => {
            missing_prerequisite(name, "not in PATH");
            None
        }
    }
}

/// Several tools at once: all their paths, or `None` after reporting the first missing one.
#[track_caller]
pub fn test_tools<const N: usize>(names: [&str; N]) -> Option<[PathBuf; N]> {
    let mut out: [PathBuf; N] = std::array::from_fn(|_| PathBuf::new());
    for (slot, name) in out.iter_mut().zip(names) {
        *slot = test_tool(name)?;
    }
    Some(out)
}

/// The guest kernel ([`newest_cloud_kernel`]), or `None` after [`missing_prerequisite`].
#[track_caller]
pub fn test_kernel() -> Option<Kernel> {
    match newest_cloud_kernel() {
        Ok(k) => Some(k),
        Err(e) => {
            missing_prerequisite("the guest kernel (linux-image-cloud-amd64)", &e.to_string());
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn present_tool_is_found() {
        assert!(test_tool("sh").is_some());
        let [a, b] = test_tools(["sh", "sh"]).expect("sh");
        assert_eq!(a, b);
    }

    #[test]
    fn missing_tool_follows_the_rule() {
        let r = std::panic::catch_unwind(|| test_tool("definitely-not-a-tool-xyz"));
        if vm_required() {
            let msg = r.expect_err("must panic under TMEM_REQUIRE_VM=1");
            let msg = msg.downcast_ref::<String>().cloned().unwrap_or_default();
            assert!(msg.contains("definitely-not-a-tool-xyz"), "{msg}");
            assert!(msg.contains(REQUIRE_VM_ENV), "{msg}");
        } else {
            assert_eq!(r.expect("no panic without TMEM_REQUIRE_VM"), None);
        }
    }
}
