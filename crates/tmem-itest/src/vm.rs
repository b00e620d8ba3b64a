//! Guests for the integration tests, on top of `tmem-vm`.
//!
//! Every guest gets, besides what [`tmem_vm::GuestConfig`] provides (balloon,
//! QMP, the agent channel `org.tmem.agent` for the manager, virtio disks):
//!
//! * a second QMP monitor (`obs-qmp.sock`) so the test can watch the balloon
//!   while the manager holds the first one;
//! * a second agent port (`org.tmem.itest.obs`, `obs-agent.sock`) with its
//!   own `tmem-guest` instance, so the test sees the guest's `/proc` figures
//!   (oom_kill, pswpin/out, Committed_AS) independently of the manager;
//! * a control port (`org.tmem.itest.ctl`, `ctl.sock`): the guest's workload
//!   loop reads commands from it (`eatmem ARGS…`, `stop`), so workloads start
//!   when the test says so.

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tmem_vm::{Drive, Guest, GuestConfig, GuestImage, ImageBuilder};

use crate::{io_err, Result};

/// Name of the observer agent's virtio-serial port.
pub const OBS_PORT: &str = "org.tmem.itest.obs";
/// Name of the control port.
pub const CTL_PORT: &str = "org.tmem.itest.ctl";
/// Name of the manager's agent port (as `tmem_vm::GuestConfig::agent` names it).
pub const AGENT_PORT: &str = "org.tmem.agent";
/// Printed by the workload loop when it is ready for commands.
pub const MARK_CTL: &str = "ITEST-CTL-READY";
/// Printed before an `eatmem` command runs.
pub const MARK_EATMEM_START: &str = "ITEST-EATMEM-START";
/// Printed after an `eatmem` command, followed by its exit code.
pub const MARK_EATMEM_RC: &str = "ITEST-EATMEM-RC";

/// The workload loop run by `/init` (after swap is on and [`tmem_vm::MARK_READY`]).
///
/// `agent_interval` / `obs_interval` are the two agents' report intervals (s).
pub fn control_script(agent_interval: f64, obs_interval: f64) -> String {
    format!(
        r#"tmem-guest --port {AGENT_PORT} --interval {agent_interval} >/dev/null 2>&1 &
tmem-guest --port {OBS_PORT} --interval {obs_interval} >/dev/null 2>&1 &
CTL=
i=0
while [ -z "$CTL" ] && [ $i -lt 200 ]; do
  for d in /sys/class/virtio-ports/*; do
    [ "$(cat $d/name 2>/dev/null)" = {CTL_PORT} ] && CTL=/dev/$(basename $d)
  done
  [ -z "$CTL" ] && sleep 0.1
  i=$((i+1))
done
[ -n "$CTL" ] || {{ echo "ITEST-WARN no control port"; exit 3; }}
exec 3<"$CTL"
echo {MARK_CTL}
while true; do
  if read -r cmd args <&3; then
    case "$cmd" in
      eatmem) echo {MARK_EATMEM_START}; tmem-work eatmem $args; echo "{MARK_EATMEM_RC} $?" ;;
      stop) break ;;
      *) echo "ITEST-WARN unknown command $cmd" ;;
    esac
  else
    sleep 0.2
  fi
done
exit 0
"#
    )
}

/// Builds (or reuses from the cache) the test guest image: busybox, the
/// static `tmem-guest` and `tmem-work`, swap on `/dev/vda`, and
/// [`control_script`].
pub fn build_image(
    workspace_root: &Path,
    agent_interval: f64,
    obs_interval: f64,
) -> Result<GuestImage> {
    let bins = tmem_vm::build_guest_binaries(workspace_root)?;
    Ok(ImageBuilder::new()
        .binary("tmem-guest", &bins.tmem_guest)
        .binary("tmem-work", &bins.tmem_work)
        .swap("/dev/vda")
        .script(control_script(agent_interval, obs_interval))
        .build()?)
}

/// A launched test guest and the paths of its sockets.
#[derive(Debug)]
pub struct TestGuest {
    /// The QEMU guest (killed by PID on drop).
    pub guest: Guest,
    /// The manager's QMP socket.
    pub qmp: PathBuf,
    /// The manager's agent socket.
    pub agent: PathBuf,
    /// The observer's QMP socket.
    pub obs_qmp: PathBuf,
    /// The observer agent's socket.
    pub obs_agent: PathBuf,
    /// The control socket.
    pub ctl: PathBuf,
    /// Boot size, MiB.
    pub memory_mib: u32,
}

/// Launches a guest with `image` in `run_dir` (which the caller owns and
/// removes), `memory_mib` of RAM, virtio-balloon with free page reporting and
/// deflate-on-oom (the balloon crate's recommended options), and
/// `swap` as `/dev/vda`.
pub fn launch(
    name: &str,
    image: GuestImage,
    run_dir: &Path,
    memory_mib: u32,
    swap: Drive,
) -> Result<TestGuest> {
    std::fs::create_dir_all(run_dir).map_err(io_err(format!("creating {}", run_dir.display())))?;
    let opts = tmem_balloon::qemu::BalloonDeviceOpts::default();
    let (qmp, agent, obs_qmp, obs_agent, ctl) = (
        run_dir.join("qmp.sock"),
        run_dir.join("agent.sock"),
        run_dir.join("obs-qmp.sock"),
        run_dir.join("obs-agent.sock"),
        run_dir.join("ctl.sock"),
    );
    let mut cfg = GuestConfig::new(name)
        .memory_mib(memory_mib)
        .free_page_reporting(opts.free_page_reporting)
        .deflate_on_oom(opts.deflate_on_oom)
        .qmp_path(&qmp)
        .agent_path(&agent)
        .run_dir(run_dir)
        .drive(swap);
    cfg = cfg
        .extra_qmp(&obs_qmp)
        .serial_port(OBS_PORT, &obs_agent)
        .serial_port(CTL_PORT, &ctl);
    let guest = cfg.image(image).launch()?;
    Ok(TestGuest {
        guest,
        qmp,
        agent,
        obs_qmp,
        obs_agent,
        ctl,
        memory_mib,
    })
}

/// The host end of a guest's control port (kept open while the test runs).
#[derive(Debug)]
pub struct GuestCtl {
    stream: UnixStream,
}

impl GuestCtl {
    /// Connects to the control socket, retrying for up to `timeout` (QEMU
    /// creates the socket file before it listens).
    pub fn connect(path: &Path, timeout: Duration) -> Result<Self> {
        let end = std::time::Instant::now() + timeout;
        loop {
            match UnixStream::connect(path) {
                Ok(stream) => return Ok(Self { stream }),
                Err(e) if std::time::Instant::now() >= end => {
                    return Err(io_err(format!("connecting {}", path.display()))(e))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }

    /// Sends one command line (`eatmem --max-mib 300 …`, `stop`).
    pub fn send(&mut self, line: &str) -> Result<()> {
        let mut l = line.trim_end().to_string();
        l.push('\n');
        self.stream
            .write_all(l.as_bytes())
            .map_err(io_err(format!("sending {line:?} to the guest")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn script_names_the_ports() {
        let s = control_script(0.5, 0.25);
        assert!(s.contains("--port org.tmem.agent --interval 0.5"));
        assert!(s.contains("--port org.tmem.itest.obs --interval 0.25"));
        assert!(s.contains("= org.tmem.itest.ctl ]"));
        assert!(s.contains("tmem-work eatmem $args"));
        assert!(s.contains(MARK_EATMEM_RC));
    }
}
