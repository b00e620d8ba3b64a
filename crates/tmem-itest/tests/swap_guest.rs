//! Issue 3, "How it is checked": a QEMU guest (TCG) uses a tmemd `swap` export as its swap
//! device under memory pressure and verifies the data it swapped: `tmem-work memcheck`
//! fills more memory than the guest has with a per-page checkable pattern and re-reads it.
//! The pool budget is far smaller than what the guest swaps and the codec is off, so most
//! swapped pages spill to the export's file and are read back from there: the guest never
//! sees an error and never a wrong byte.

use std::time::Duration;

use tmem_api::ExportInfo;
use tmem_itest::daemon::{daemon_bins, Tmemd};
use tmem_itest::TempDir;
use tmem_vm::{Drive, GuestConfig, ImageBuilder};

const BOOT: Duration = Duration::from_secs(180);
const RUN: Duration = Duration::from_secs(900);

#[test]
fn guest_swaps_through_a_tmemd_export_with_spill_and_verifies_every_page() {
    if tmem_vm::test_tool("qemu-system-x86_64").is_none() || tmem_vm::test_kernel().is_none() {
        return;
    }
    let tmp = TempDir::new("tmem-itest-swap").expect("temp dir");
    let exe = std::env::current_exe().expect("test executable path");
    let bins = daemon_bins(&exe).expect("tmemd and tmemctl binaries");
    let guest_bins =
        tmem_vm::build_guest_binaries(&tmem_itest::workspace_root()).expect("guest binaries");

    // A 24 MiB pool and no compression: the guest's ~100 MiB of swap must mostly spill.
    let d = Tmemd::start(
        &bins,
        &tmp.join("state"),
        "budget = \"24M\"\ncodec = \"none\"\n",
    )
    .expect("start tmemd");
    d.ctl(&["export", "add", "swap0", "--kind", "swap", "--size", "512M"])
        .expect("export add");

    let img = ImageBuilder::new()
        .binary("tmem-work", &guest_bins.tmem_work)
        .script(
            "tmem-work memcheck --mib 200 --passes 2 --seed 11\n\
             rc=$?\n\
             grep -E '^pswp(in|out) ' /proc/vmstat\n\
             exit $rc\n",
        )
        .swap("/dev/vda")
        .build()
        .expect("guest image");
    let guest = GuestConfig::new("swapper")
        .memory_mib(128)
        .drive(Drive::nbd(d.nbd_socket(), "swap0"))
        .image(img)
        .launch()
        .expect("launch guest");
    guest
        .wait_for_console("TMEM-SWAP /dev/vda", BOOT)
        .expect("swap on the tmemd export");
    let code = guest.wait_exit(RUN).expect("guest exit");
    let log = guest.console_text();
    assert_eq!(code, 0, "memcheck failed; console:\n{log}");
    assert!(log.contains("mismatches=0"), "{log}");
    let field = |k: &str| {
        log.lines()
            .find_map(|l| l.strip_prefix(k))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or_else(|| panic!("no {k} in:\n{log}"))
    };
    let (pswpout, pswpin) = (field("pswpout "), field("pswpin "));
    assert!(pswpout > 10_000, "the guest swapped ({pswpout} pages out)");
    assert!(pswpin > 0, "and read swapped pages back ({pswpin} in)");

    let exports: Vec<ExportInfo> = d.get("/api/v1/exports").expect("exports");
    let e = exports
        .iter()
        .find(|e| e.name == "swap0")
        .expect("swap0 listed");
    eprintln!(
        "guest swapped {pswpout} pages out / {pswpin} in; export holds {} pages in the pool, {} spilled; NBD {} writes / {} reads",
        e.backend.pool_pages, e.backend.spilled_pages, e.nbd.writes, e.nbd.reads
    );
    assert!(
        e.backend.spilled_pages > 0,
        "the small pool made pages spill: {e:?}"
    );
    assert!(
        e.backend.pool_pages > 0,
        "and the pool held what fit: {e:?}"
    );
    drop(guest);
}
