//! QEMU guest configuration and lifecycle.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::{find_tool, io_err, probe_accel, Accel, Error, GuestImage, Result, MARK_EXIT};

/// Longest Unix socket path (sun_path is 108 bytes including the NUL).
const MAX_SOCKET_PATH: usize = 107;

/// Where a virtio disk's data comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DriveSource {
    /// A raw image file.
    File(PathBuf),
    /// An NBD export on a Unix socket (`nbd+unix:///EXPORT?socket=PATH`).
    Nbd {
        /// The server's Unix socket.
        socket: PathBuf,
        /// The export name (may be empty for the default export).
        export: String,
    },
}

/// A virtio-blk disk. Drives appear in the guest in order: `/dev/vda`, `/dev/vdb`, ...
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Drive {
    /// The backing data.
    pub source: DriveSource,
    /// QEMU's `cache=` mode (`none`, `writeback`, `unsafe`, ...).
    pub cache: String,
    /// Attach read-only.
    pub read_only: bool,
}

impl Drive {
    /// A raw image file, `cache=writeback` (tmpfs has no O_DIRECT for `none`).
    pub fn file(path: impl Into<PathBuf>) -> Self {
        Self {
            source: DriveSource::File(path.into()),
            cache: "writeback".into(),
            read_only: false,
        }
    }

    /// An NBD export on a Unix socket, `cache=none`.
    pub fn nbd(socket: impl Into<PathBuf>, export: impl Into<String>) -> Self {
        Self {
            source: DriveSource::Nbd {
                socket: socket.into(),
                export: export.into(),
            },
            cache: "none".into(),
            read_only: false,
        }
    }

    /// Sets the cache mode.
    pub fn cache(mut self, mode: &str) -> Self {
        self.cache = mode.to_string();
        self
    }

    /// Attaches the drive read-only.
    pub fn read_only(mut self) -> Self {
        self.read_only = true;
        self
    }

    /// The `-drive` option value.
    fn qemu_arg(&self) -> String {
        let file = match &self.source {
            DriveSource::File(p) => p.to_string_lossy().into_owned(),
            DriveSource::Nbd { socket, export } => {
                format!("nbd+unix:///{export}?socket={}", socket.to_string_lossy())
            }
        };
        let mut s = format!(
            "file={},format=raw,if=virtio,cache={}",
            qemu_escape(&file),
            qemu_escape(&self.cache)
        );
        if self.read_only {
            s.push_str(",readonly=on");
        }
        s
    }
}

/// Escapes a value for a QEMU comma-separated option (`,` → `,,`).
fn qemu_escape(s: &str) -> String {
    s.replace(',', ",,")
}

/// How a guest is launched. Build with the setters, then [`GuestConfig::launch`].
#[derive(Clone, Debug)]
pub struct GuestConfig {
    name: String,
    memory_mib: u32,
    cpus: u32,
    image: Option<GuestImage>,
    balloon: bool,
    free_page_reporting: bool,
    deflate_on_oom: bool,
    qmp: bool,
    qmp_path: Option<PathBuf>,
    agent: bool,
    agent_path: Option<PathBuf>,
    drives: Vec<Drive>,
    cmdline: Vec<String>,
    accel: Option<Accel>,
    tcg_tb_mib: Option<u32>,
    cgroup: Option<PathBuf>,
    run_dir: Option<PathBuf>,
    keep_run_dir: bool,
    extra_args: Vec<String>,
    serial_ports: Vec<(String, PathBuf)>,
    extra_qmp: Vec<PathBuf>,
}

impl GuestConfig {
    /// A config with 256 MiB, 1 CPU, a balloon device and a QMP socket.
    pub fn new(name: &str) -> Self {
        Self {
            name: name.to_string(),
            memory_mib: 256,
            cpus: 1,
            image: None,
            balloon: true,
            free_page_reporting: false,
            deflate_on_oom: false,
            qmp: true,
            qmp_path: None,
            agent: false,
            agent_path: None,
            drives: Vec::new(),
            cmdline: Vec::new(),
            accel: None,
            tcg_tb_mib: None,
            cgroup: None,
            run_dir: None,
            keep_run_dir: std::env::var_os("TMEM_VM_KEEP").is_some_and(|v| v == "1"),
            extra_args: Vec::new(),
            serial_ports: Vec::new(),
            extra_qmp: Vec::new(),
        }
    }

    /// Guest memory in MiB.
    pub fn memory_mib(mut self, mib: u32) -> Self {
        self.memory_mib = mib;
        self
    }

    /// Number of virtual CPUs.
    pub fn cpus(mut self, n: u32) -> Self {
        self.cpus = n;
        self
    }

    /// The image to boot (required).
    pub fn image(mut self, image: GuestImage) -> Self {
        self.image = Some(image);
        self
    }

    /// Adds (default) or omits the `virtio-balloon-pci` device `balloon0`.
    pub fn balloon(mut self, on: bool) -> Self {
        self.balloon = on;
        self
    }

    /// Sets the balloon's `free-page-reporting` flag.
    pub fn free_page_reporting(mut self, on: bool) -> Self {
        self.free_page_reporting = on;
        self
    }

    /// Sets the balloon's `deflate-on-oom` flag.
    pub fn deflate_on_oom(mut self, on: bool) -> Self {
        self.deflate_on_oom = on;
        self
    }

    /// Enables (default) or disables the QMP socket.
    pub fn qmp(mut self, on: bool) -> Self {
        self.qmp = on;
        self
    }

    /// Puts the QMP socket at this path (default: `qmp.sock` in the run dir).
    pub fn qmp_path(mut self, path: impl Into<PathBuf>) -> Self {
        self.qmp = true;
        self.qmp_path = Some(path.into());
        self
    }

    /// Adds the agent channel (virtio-serial port `org.tmem.agent`, socket
    /// `agent.sock` in the run dir).
    pub fn agent(mut self, on: bool) -> Self {
        self.agent = on;
        self
    }

    /// Adds the agent channel with its host socket at this path.
    pub fn agent_path(mut self, path: impl Into<PathBuf>) -> Self {
        self.agent = true;
        self.agent_path = Some(path.into());
        self
    }

    /// Adds a virtio disk (order gives `/dev/vda`, `/dev/vdb`, ...).
    pub fn drive(mut self, d: Drive) -> Self {
        self.drives.push(d);
        self
    }

    /// Appends to the kernel command line (e.g. `tmem.swap=/dev/vda`).
    pub fn cmdline(mut self, arg: &str) -> Self {
        self.cmdline.push(arg.to_string());
        self
    }

    /// Forces an accelerator (default: [`probe_accel`]).
    pub fn accel(mut self, a: Accel) -> Self {
        self.accel = Some(a);
        self
    }

    /// Under TCG, the size of QEMU's translated-code cache, MiB (`-accel tcg,tb-size=`).
    /// QEMU's default is 1 GiB, filled lazily: the cache grows QEMU's RSS by tens of MiB
    /// over a workload, memory a KVM guest's QEMU does not have. Ignored under KVM.
    pub fn tcg_tb_mib(mut self, mib: Option<u32>) -> Self {
        self.tcg_tb_mib = mib;
        self
    }

    /// Moves QEMU into this cgroup v2 directory (its `cgroup.procs`) right
    /// after spawning, before the guest runs long enough to touch memory.
    pub fn cgroup(mut self, dir: impl Into<PathBuf>) -> Self {
        self.cgroup = Some(dir.into());
        self
    }

    /// Directory for the console log and sockets (default: a fresh
    /// `<tmp>/tmem-vm/<name>.<pid>.<n>`; removed on drop unless kept).
    pub fn run_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.run_dir = Some(dir.into());
        self
    }

    /// Keeps the run dir (logs) after the guest is dropped; also `TMEM_VM_KEEP=1`.
    pub fn keep_run_dir(mut self, keep: bool) -> Self {
        self.keep_run_dir = keep;
        self
    }

    /// Adds a virtio-serial port named `name` (seen in the guest under
    /// `/sys/class/virtio-ports/*/name`) backed by a host socket (server) at `path`.
    /// Several may be added, beside the agent channel or without it.
    pub fn serial_port(mut self, name: &str, path: impl Into<PathBuf>) -> Self {
        self.serial_ports.push((name.to_string(), path.into()));
        self
    }

    /// Adds another QMP monitor on a Unix socket (e.g. for an observer while a manager
    /// holds the first one).
    pub fn extra_qmp(mut self, path: impl Into<PathBuf>) -> Self {
        self.extra_qmp.push(path.into());
        self
    }

    /// Extra raw QEMU arguments.
    pub fn extra_arg(mut self, arg: &str) -> Self {
        self.extra_args.push(arg.to_string());
        self
    }

    /// Starts QEMU. The guest boots in the background; use
    /// [`Guest::wait_for_console`] / [`Guest::wait_exit`].
    pub fn launch(self) -> Result<Guest> {
        let image = self
            .image
            .clone()
            .ok_or_else(|| Error::Invalid("GuestConfig without an image".into()))?;
        if self.memory_mib < 32 || self.cpus == 0 {
            return Err(Error::Invalid(format!(
                "memory {} MiB / {} cpus",
                self.memory_mib, self.cpus
            )));
        }
        let qemu = find_tool("qemu-system-x86_64").map_err(|_| Error::Missing {
            what: "qemu-system-x86_64 (package qemu-system-x86)".into(),
            detail: "not in PATH".into(),
        })?;
        let accel = match self.accel {
            Some(a) => a,
            None => probe_accel(),
        };
        let (run_dir, owns_run_dir) = match &self.run_dir {
            Some(d) => (d.clone(), false),
            None => (fresh_run_dir(&self.name)?, true),
        };
        std::fs::create_dir_all(&run_dir)
            .map_err(io_err(format!("creating {}", run_dir.display())))?;
        let console = run_dir.join("console.log");
        let qmp_path = self.qmp.then(|| {
            self.qmp_path
                .clone()
                .unwrap_or_else(|| run_dir.join("qmp.sock"))
        });
        let agent_path = self.agent.then(|| {
            self.agent_path
                .clone()
                .unwrap_or_else(|| run_dir.join("agent.sock"))
        });
        let mut sockets = Vec::new();
        for p in qmp_path.iter().chain(agent_path.iter()) {
            if p.as_os_str().len() > MAX_SOCKET_PATH {
                return Err(Error::Invalid(format!(
                    "socket path too long for a Unix socket: {}",
                    p.display()
                )));
            }
            // A stale socket from an earlier run would make QEMU fail to bind.
            let _ = std::fs::remove_file(p);
            sockets.push(p.clone());
        }

        let mut append = String::from("console=ttyS0 quiet panic=-1");
        for c in &self.cmdline {
            append.push(' ');
            append.push_str(c);
        }
        let mut args: Vec<String> = vec![
            "-name".into(),
            qemu_escape(&self.name),
            "-accel".into(),
            match (accel, self.tcg_tb_mib) {
                (Accel::Tcg, Some(mib)) => format!("tcg,tb-size={mib}"),
                _ => accel.name().into(),
            },
            "-nodefaults".into(),
            "-no-user-config".into(),
            "-display".into(),
            "none".into(),
            "-no-reboot".into(),
            "-m".into(),
            self.memory_mib.to_string(),
            "-smp".into(),
            self.cpus.to_string(),
            "-kernel".into(),
            image.kernel.to_string_lossy().into_owned(),
            "-initrd".into(),
            image.initrd.to_string_lossy().into_owned(),
            "-append".into(),
            append,
            "-serial".into(),
            format!("file:{}", console.to_string_lossy()),
        ];
        if self.balloon {
            let onoff = |b: bool| if b { "on" } else { "off" };
            args.push("-device".into());
            args.push(format!(
                "virtio-balloon-pci,id=balloon0,free-page-reporting={},deflate-on-oom={}",
                onoff(self.free_page_reporting),
                onoff(self.deflate_on_oom)
            ));
        }
        if let Some(q) = &qmp_path {
            args.push("-qmp".into());
            args.push(format!(
                "unix:{},server=on,wait=off",
                qemu_escape(&q.to_string_lossy())
            ));
        }
        for q in &self.extra_qmp {
            args.push("-qmp".into());
            args.push(format!(
                "unix:{},server=on,wait=off",
                qemu_escape(&q.to_string_lossy())
            ));
        }
        let mut ports: Vec<(&str, &Path)> = Vec::new();
        if let Some(a) = &agent_path {
            ports.push(("org.tmem.agent", a));
        }
        ports.extend(
            self.serial_ports
                .iter()
                .map(|(n, p)| (n.as_str(), p.as_path())),
        );
        if !ports.is_empty() {
            args.extend(["-device".into(), "virtio-serial-pci,id=vser0".into()]);
        }
        for (i, (name, path)) in ports.into_iter().enumerate() {
            args.extend([
                "-chardev".into(),
                format!(
                    "socket,id=port{i},path={},server=on,wait=off",
                    qemu_escape(&path.to_string_lossy())
                ),
                "-device".into(),
                format!("virtserialport,bus=vser0.0,chardev=port{i},name={name}"),
            ]);
        }
        for d in &self.drives {
            args.push("-drive".into());
            args.push(d.qemu_arg());
        }
        args.extend(self.extra_args.iter().cloned());

        let stderr_path = run_dir.join("qemu.stderr");
        let stderr = std::fs::File::create(&stderr_path)
            .map_err(io_err(format!("creating {}", stderr_path.display())))?;
        std::fs::write(&console, b"").map_err(io_err(format!("creating {}", console.display())))?;
        std::fs::write(run_dir.join("qemu.args"), args.join("\n"))
            .map_err(io_err("writing qemu.args"))?;
        tracing::debug!(name = %self.name, ?args, "launching QEMU");
        let child = Command::new(&qemu)
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .map_err(io_err(format!("spawning {}", qemu.display())))?;
        let pid = child.id();
        let guest = Guest {
            name: self.name.clone(),
            child: Mutex::new(Some(child)),
            exit_status: Mutex::new(None),
            console_buf: Mutex::new(Vec::new()),
            pid,
            accel,
            run_dir,
            owns_run_dir: owns_run_dir && !self.keep_run_dir,
            console,
            stderr_path,
            qmp_path,
            agent_path,
            sockets,
            started: Instant::now(),
        };
        if let Some(cg) = &self.cgroup {
            let procs = cg.join("cgroup.procs");
            if let Err(e) = std::fs::write(&procs, pid.to_string()) {
                guest.kill();
                return Err(Error::Io {
                    context: format!("moving QEMU {pid} into {}", procs.display()),
                    source: e,
                });
            }
        }
        tracing::info!(name = %guest.name, pid, %accel, "guest launched");
        Ok(guest)
    }
}

/// A fresh, short run directory under `$TMEM_VM_RUN_DIR` or `<tmp>/tmem-vm`.
fn fresh_run_dir(name: &str) -> Result<PathBuf> {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let base = std::env::var_os("TMEM_VM_RUN_DIR")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| std::env::temp_dir().join("tmem-vm"));
    std::fs::create_dir_all(&base).map_err(io_err(format!("creating {}", base.display())))?;
    let short: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '_'
            }
        })
        .take(24)
        .collect();
    loop {
        let n = N.fetch_add(1, Ordering::Relaxed);
        let d = base.join(format!("{short}.{}.{n}", std::process::id()));
        match std::fs::create_dir(&d) {
            Ok(()) => return Ok(d),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(io_err(format!("creating {}", d.display()))(e)),
        }
    }
}

/// A running QEMU guest. Dropping it kills QEMU (by PID) and removes its sockets.
#[derive(Debug)]
pub struct Guest {
    name: String,
    child: Mutex<Option<Child>>,
    exit_status: Mutex<Option<std::process::ExitStatus>>,
    console_buf: Mutex<Vec<u8>>,
    pid: u32,
    accel: Accel,
    run_dir: PathBuf,
    owns_run_dir: bool,
    console: PathBuf,
    stderr_path: PathBuf,
    qmp_path: Option<PathBuf>,
    agent_path: Option<PathBuf>,
    sockets: Vec<PathBuf>,
    started: Instant,
}

/// How often the console log is polled.
const POLL: Duration = Duration::from_millis(50);

impl Guest {
    /// The guest's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// QEMU's process id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The accelerator in use.
    pub fn accel(&self) -> Accel {
        self.accel
    }

    /// The QMP socket, if enabled.
    pub fn qmp_path(&self) -> Option<&Path> {
        self.qmp_path.as_deref()
    }

    /// The agent channel's host socket, if enabled.
    pub fn agent_path(&self) -> Option<&Path> {
        self.agent_path.as_deref()
    }

    /// The serial console log file.
    pub fn console_log(&self) -> &Path {
        &self.console
    }

    /// The directory holding the log and sockets.
    pub fn run_dir(&self) -> &Path {
        &self.run_dir
    }

    /// Time since launch.
    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    /// Reads console bytes written since the last call into the buffer.
    fn refresh_console(&self) -> std::sync::MutexGuard<'_, Vec<u8>> {
        use std::io::{Read, Seek, SeekFrom};
        let mut buf = self.console_buf.lock().unwrap_or_else(|e| e.into_inner());
        if let Ok(mut f) = std::fs::File::open(&self.console) {
            let pos = buf.len() as u64;
            if f.seek(SeekFrom::Start(pos)).is_ok() {
                let _ = f.read_to_end(&mut buf);
            }
        }
        buf
    }

    /// The console output so far (carriage returns removed).
    pub fn console_text(&self) -> String {
        String::from_utf8_lossy(&self.refresh_console()).replace('\r', "")
    }

    /// Bytes of console output so far; a position for [`Guest::wait_for_console_from`].
    pub fn console_len(&self) -> usize {
        self.refresh_console().len()
    }

    fn tail(&self) -> String {
        let text = self.console_text();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// QEMU's exit status if it has exited (non-blocking).
    pub fn try_exit_status(&self) -> Option<std::process::ExitStatus> {
        let mut st = self.exit_status.lock().unwrap_or_else(|e| e.into_inner());
        if st.is_none() {
            let mut ch = self.child.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(c) = ch.as_mut() {
                if let Ok(Some(s)) = c.try_wait() {
                    *st = Some(s);
                    *ch = None;
                }
            }
        }
        *st
    }

    /// True while QEMU runs.
    pub fn is_running(&self) -> bool {
        self.try_exit_status().is_none()
    }

    /// Polls the console until a line containing `needle` appears; returns that line.
    pub fn wait_for_console(&self, needle: &str, timeout: Duration) -> Result<String> {
        self.wait_for_console_from(0, needle, |l| l.contains(needle), timeout)
            .map(|(line, _)| line)
    }

    /// Polls the console until a line satisfies `pred`; returns that line.
    /// `what` names the condition in errors. Fails early if QEMU exits.
    pub fn wait_for_console_matching(
        &self,
        what: &str,
        pred: impl FnMut(&str) -> bool,
        timeout: Duration,
    ) -> Result<String> {
        self.wait_for_console_from(0, what, pred, timeout)
            .map(|(line, _)| line)
    }

    /// Like [`Guest::wait_for_console_matching`], but only considers lines
    /// starting at byte `from` (see [`Guest::console_len`]); returns the line
    /// and the position just after it, to wait for a later occurrence.
    pub fn wait_for_console_from(
        &self,
        from: usize,
        what: &str,
        mut pred: impl FnMut(&str) -> bool,
        timeout: Duration,
    ) -> Result<(String, usize)> {
        let start = Instant::now();
        let mut pos = from;
        loop {
            // Check exit before reading, so output written just before exit is seen.
            let exited = self.try_exit_status();
            {
                let buf = self.refresh_console();
                while pos < buf.len() {
                    let rest = &buf[pos..];
                    let (line, next) = match rest.iter().position(|&b| b == b'\n') {
                        Some(i) => (&rest[..i], pos + i + 1),
                        // A partial last line counts only once QEMU is gone.
                        None if exited.is_some() => (rest, buf.len()),
                        None => break,
                    };
                    pos = next;
                    let line = String::from_utf8_lossy(line);
                    let line = line.trim_end_matches('\r');
                    if pred(line) {
                        return Ok((line.to_string(), pos));
                    }
                }
            }
            if let Some(status) = exited {
                return Err(Error::Exited {
                    what: what.to_string(),
                    status: status.to_string(),
                    stderr: std::fs::read_to_string(&self.stderr_path)
                        .unwrap_or_default()
                        .trim()
                        .to_string(),
                    tail: self.tail(),
                });
            }
            if start.elapsed() >= timeout {
                return Err(Error::Timeout {
                    what: what.to_string(),
                    secs: timeout.as_secs_f64(),
                    tail: self.tail(),
                });
            }
            std::thread::sleep(POLL);
        }
    }

    /// Waits for the workload's `TMEM-EXIT <code>` marker and for QEMU to exit;
    /// returns the workload's exit code.
    pub fn wait_exit(&self, timeout: Duration) -> Result<i32> {
        let line =
            self.wait_for_console_matching(MARK_EXIT, |l| parse_exit(l).is_some(), timeout)?;
        let code = parse_exit(&line).ok_or_else(|| Error::Invalid(line.clone()))?;
        // `poweroff -f` follows immediately; give QEMU a moment, then make sure.
        let deadline = Instant::now() + Duration::from_secs(15);
        while self.is_running() && Instant::now() < deadline {
            std::thread::sleep(POLL);
        }
        if self.is_running() {
            tracing::warn!(name = %self.name, "guest did not power off; killing QEMU");
            self.kill();
        }
        Ok(code)
    }

    /// Kills QEMU (SIGKILL to its PID) and reaps it. Idempotent.
    pub fn kill(&self) {
        let mut ch = self.child.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(mut c) = ch.take() {
            let _ = c.kill();
            if let Ok(s) = c.wait() {
                *self.exit_status.lock().unwrap_or_else(|e| e.into_inner()) = Some(s);
            }
        }
    }
}

/// Parses a `TMEM-EXIT <code>` line.
fn parse_exit(line: &str) -> Option<i32> {
    let rest = line.trim().strip_prefix(MARK_EXIT)?;
    rest.trim().parse().ok()
}

impl Drop for Guest {
    fn drop(&mut self) {
        self.kill();
        for s in &self.sockets {
            let _ = std::fs::remove_file(s);
        }
        if self.owns_run_dir {
            let _ = std::fs::remove_dir_all(&self.run_dir);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drive_args() {
        let d = Drive::nbd("/tmp/a,b/nbd.sock", "swap0");
        assert_eq!(
            d.qemu_arg(),
            "file=nbd+unix:///swap0?socket=/tmp/a,,b/nbd.sock,format=raw,if=virtio,cache=none"
        );
        let f = Drive::file("/x/data.img").read_only().cache("unsafe");
        assert_eq!(
            f.qemu_arg(),
            "file=/x/data.img,format=raw,if=virtio,cache=unsafe,readonly=on"
        );
    }

    #[test]
    fn exit_marker_parsing() {
        assert_eq!(parse_exit("TMEM-EXIT 0"), Some(0));
        assert_eq!(parse_exit("TMEM-EXIT 137\r"), Some(137));
        assert_eq!(parse_exit("TMEM-EXIT"), None);
        assert_eq!(parse_exit("echo TMEM-EXIT 3"), None);
    }

    /// A `Guest` around an arbitrary process and a hand-written console log.
    fn fake_guest(console_text: &[u8], cmd: &str) -> Guest {
        let run_dir = fresh_run_dir("fake").unwrap();
        let console = run_dir.join("console.log");
        std::fs::write(&console, console_text).unwrap();
        let child = Command::new("sh").args(["-c", cmd]).spawn().unwrap();
        Guest {
            name: "fake".into(),
            pid: child.id(),
            child: Mutex::new(Some(child)),
            exit_status: Mutex::new(None),
            console_buf: Mutex::new(Vec::new()),
            accel: Accel::Tcg,
            stderr_path: run_dir.join("qemu.stderr"),
            run_dir,
            owns_run_dir: true,
            console,
            qmp_path: None,
            agent_path: None,
            sockets: Vec::new(),
            started: Instant::now(),
        }
    }

    #[test]
    fn console_waits_and_exit_marker() {
        let g = fake_guest(b"boot\r\ntick 1\ntick 2\nTMEM-EXIT 4\r\n", "exit 0");
        let (l, pos) = g
            .wait_for_console_from(0, "tick", |l| l.starts_with("tick"), Duration::from_secs(5))
            .unwrap();
        assert_eq!(l, "tick 1");
        let (l, _) = g
            .wait_for_console_from(
                pos,
                "tick",
                |l| l.starts_with("tick"),
                Duration::from_secs(5),
            )
            .unwrap();
        assert_eq!(l, "tick 2");
        assert_eq!(g.wait_exit(Duration::from_secs(5)).unwrap(), 4);
        assert!(!g.is_running());
        let dir = g.run_dir().to_path_buf();
        drop(g);
        assert!(!dir.exists());
    }

    #[test]
    fn console_wait_fails_on_exit_and_timeout() {
        // Process exits without the marker: an Exited error, partial line seen.
        let g = fake_guest(b"Kernel panic - not syncing", "exit 1");
        let e = g.wait_exit(Duration::from_secs(10)).unwrap_err();
        assert!(matches!(e, Error::Exited { .. }), "{e}");
        assert!(e.to_string().contains("Kernel panic"), "{e}");
        // Still running and nothing appears: a timeout; drop kills the process.
        let g = fake_guest(b"", "sleep 600");
        let e = g
            .wait_for_console("never", Duration::from_millis(200))
            .unwrap_err();
        assert!(matches!(e, Error::Timeout { .. }), "{e}");
        let pid = g.pid();
        drop(g);
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        assert!(stat.is_empty() || !stat.contains("sleep"), "{stat}");
    }

    #[test]
    fn launch_without_image_is_an_error() {
        assert!(matches!(
            GuestConfig::new("x").launch(),
            Err(Error::Invalid(_))
        ));
    }
}
