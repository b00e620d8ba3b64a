//! The lab's guest image (one initramfs for every guest and configuration) and data disk.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use tmem_vm::{GuestImage, ImageBuilder};

/// virtio-serial port names used by the guest script.
pub const PORT_AGENT: &str = "org.tmem.agent";
/// The lab's own stats port (a second `tmem-guest`).
pub const PORT_LAB: &str = "org.tmem.lab";
/// The start/stop signal port.
pub const PORT_GO: &str = "org.tmem.go";

/// Console markers printed by the workload script.
pub const MARK_WAIT: &str = "LAB-WAIT";
/// Printed when the workload started.
pub const MARK_GO: &str = "LAB-GO";
/// Printed with the guest's final `/proc/vmstat` counters.
pub const MARK_VMSTAT: &str = "LAB-VMSTAT";
/// Printed with the workload's exit code.
pub const MARK_DONE: &str = "LAB-DONE";
/// Printed once per cycle by the `light` work mode (`tmem-work light`), with the
/// cycle's number and work time: `LAB-CYCLE n=<i> ms=<duration>`; its scan size comes
/// from `lab.scanmib=` (MiB), its allocation and sleep from `lab.eatmib=`/`lab.eatsleep=`.
pub const MARK_CYCLE: &str = "LAB-CYCLE";

/// The workload script. Parameters come from the kernel command line (`lab.*=`), so one
/// cached image serves every guest; see [`kernel_args`].
pub const SCRIPT: &str = r#"
seed=1; work=build; jobs=2; rounds=2; wpass=1; eatmib=64; eatrounds=4; eatsleep=2000
resshared=32; resprivate=32
for a in $(cat /proc/cmdline); do
  case "$a" in
    lab.seed=*) seed="${a#lab.seed=}";;
    lab.work=*) work="${a#lab.work=}";;
    lab.jobs=*) jobs="${a#lab.jobs=}";;
    lab.rounds=*) rounds="${a#lab.rounds=}";;
    lab.wpass=*) wpass="${a#lab.wpass=}";;
    lab.eatmib=*) eatmib="${a#lab.eatmib=}";;
    lab.eatrounds=*) eatrounds="${a#lab.eatrounds=}";;
    lab.eatsleep=*) eatsleep="${a#lab.eatsleep=}";;
    lab.resshared=*) resshared="${a#lab.resshared=}";;
    lab.resprivate=*) resprivate="${a#lab.resprivate=}";;
  esac
done
port() {
  for p in /sys/class/virtio-ports/*; do
    [ "$(cat "$p/name" 2>/dev/null)" = "$1" ] && { echo "/dev/${p##*/}"; return 0; }
  done
  return 1
}
i=0
while ! port org.tmem.go >/dev/null && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
gop=$(port org.tmem.go)
# Keep the port open: a read while the host is not connected returns EOF at once.
exec 3<"$gop"
waitline() {
  while :; do
    if read -r line <&3 && [ -n "$line" ]; then echo "$line"; return 0; fi
    sleep 0.2
  done
}
tmem-guest --port org.tmem.agent --interval 1 >/dev/null 2>&1 &
tmem-guest --port org.tmem.lab --interval 1 >/dev/null 2>&1 &
mkdir -p /data
if [ -b /dev/vdb ]; then
  mount -t ext4 -o ro,noload /dev/vdb /data || echo "LAB-WARN mount /dev/vdb failed"
fi
# What every guest of one distribution holds (the same files) and its own data, loaded
# at boot like a guest's services, held through the workload and checked at the end.
res=""
case "$work" in
  *resident*)
    rm -f /tmp/resident.stop
    tmem-work resident --src /data --until /tmp/resident.stop --shared-mib "$resshared" --private-mib "$resprivate" --seed "$seed" >/tmp/resident.log 2>&1 &
    res=$!
    i=0
    while ! grep -q loaded /tmp/resident.log 2>/dev/null && [ $i -lt 3000 ]; do sleep 0.1; i=$((i+1)); done;;
esac
echo "LAB-WAIT work=$work seed=$seed"
go=$(waitline)
echo "LAB-GO $go"
rc=0
case "$work" in
  *eatmem*)
    tmem-work eatmem --max-mib "$eatmib" --rounds "$eatrounds" --sleep-ms "$eatsleep" --seed "$seed" >/tmp/eatmem.log 2>&1 &
    eat=$!;;
  *) eat="";;
esac
case "$work" in
  light*)
    scanmib=16
    for a in $(cat /proc/cmdline); do
      case "$a" in lab.scanmib=*) scanmib="${a#lab.scanmib=}";; esac
    done
    tmem-work light --src /data --scan-mib "$scanmib" --alloc-mib "$eatmib" --sleep-ms "$eatsleep" --seed "$seed" &
    light=$!
    waitline >/dev/null
    kill "$light";;
esac
case "$work" in
  *build*)
    tmem-work build --src /data --out /tmp/out --jobs "$jobs" --rounds "$rounds" --work "$wpass" --seed "$seed" >/tmp/build.log 2>&1
    rc=$?
    tail -n 2 /tmp/build.log;;
  idle*)
    waitline >/dev/null;;
esac
if [ -n "$eat" ]; then
  wait "$eat" || rc=$((rc + 100))
  tail -n 1 /tmp/eatmem.log
fi
if [ -n "$res" ]; then
  touch /tmp/resident.stop
  wait "$res" || rc=$((rc + 1000))
  tail -n 1 /tmp/resident.log
fi
rm -rf /tmp/out
v=$(grep -E '^(pswpin|pswpout|oom_kill|pgmajfault) ' /proc/vmstat | tr '\n' ' ')
echo "LAB-VMSTAT $v"
echo "LAB-DONE $rc"
waitline >/dev/null
exit $rc
"#;

/// Workload parameters passed on the kernel command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkParams {
    /// `build`, `eatmem`, `resident` joined with `+` (e.g. `build+eatmem`), or `idle`.
    pub work: String,
    /// Seed (per guest).
    pub seed: u64,
    /// Parallel build jobs.
    pub jobs: u32,
    /// Build rounds (clean + build).
    pub rounds: u32,
    /// CPU passes per file.
    pub wpass: u32,
    /// eatmem: largest allocation, MiB.
    pub eat_mib: u32,
    /// eatmem: rounds.
    pub eat_rounds: u32,
    /// eatmem: longest sleep between rounds, ms.
    pub eat_sleep_ms: u32,
    /// resident: MiB of the data disk's files every guest holds (the same pages in all).
    pub res_shared_mib: u32,
    /// resident: MiB of the guest's own text-like data.
    pub res_private_mib: u32,
}

/// The kernel command line arguments for a guest.
pub fn kernel_args(p: &WorkParams) -> Vec<String> {
    vec![
        format!("lab.work={}", p.work),
        format!("lab.seed={}", p.seed),
        format!("lab.jobs={}", p.jobs),
        format!("lab.rounds={}", p.rounds),
        format!("lab.wpass={}", p.wpass),
        format!("lab.eatmib={}", p.eat_mib),
        format!("lab.eatrounds={}", p.eat_rounds),
        format!("lab.eatsleep={}", p.eat_sleep_ms),
        format!("lab.resshared={}", p.res_shared_mib),
        format!("lab.resprivate={}", p.res_private_mib),
    ]
}

/// Builds (or reuses from the cache) the guest image with `tmem-guest` and `tmem-work`.
pub fn build_image(workspace: &Path) -> Result<GuestImage> {
    let bins = tmem_vm::build_guest_binaries(workspace).context("building guest binaries")?;
    ImageBuilder::new()
        .binary("tmem-guest", &bins.tmem_guest)
        .binary("tmem-work", &bins.tmem_work)
        .swap("/dev/vda")
        .script(SCRIPT)
        .build()
        .context("building the guest image")
}

/// The shared, seeded data image (cached; ~60% of it is the source tree).
pub fn data_image(seed: u64, size: u64) -> Result<PathBuf> {
    tmem_vm::cached_data_image(seed, size).context("building the data image")
}

/// Parses a `LAB-VMSTAT` line into `(pswpin, pswpout, oom_kill, pgmajfault)`.
pub fn parse_vmstat_line(line: &str) -> Option<(u64, u64, u64, u64)> {
    let rest = line.split_once(MARK_VMSTAT)?.1;
    let words: Vec<&str> = rest.split_whitespace().collect();
    let get = |k: &str| {
        words
            .iter()
            .position(|w| *w == k)
            .and_then(|i| words.get(i + 1))
            .and_then(|v| v.parse::<u64>().ok())
    };
    Some((
        get("pswpin")?,
        get("pswpout")?,
        get("oom_kill").unwrap_or(0),
        get("pgmajfault").unwrap_or(0),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vmstat_line() {
        let l = "LAB-VMSTAT pgmajfault 12 pswpin 3 pswpout 40 oom_kill 1 ";
        assert_eq!(parse_vmstat_line(l), Some((3, 40, 1, 12)));
        assert_eq!(parse_vmstat_line("LAB-VMSTAT "), None);
    }
}
