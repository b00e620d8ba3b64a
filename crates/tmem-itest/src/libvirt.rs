//! A private, test-only `libvirtd` and libvirt domains for the integration tests.
//!
//! [`Libvirtd::start`] runs the distribution's `libvirtd` (as root) in a mount namespace of
//! its own (`unshare -m`), with an empty tmpfs over each of libvirt's directories
//! (`/etc/libvirt`, `/run/libvirt`, `/var/lib/libvirt`, `/var/cache/libvirt`,
//! `/var/log/libvirt`) and its sockets and pid file in the test's directory: it sees none of
//! the host's domains, networks or configuration, the host sees none of its state, and a
//! libvirtd the host may run is not disturbed. Its `qemu.conf` runs QEMU as root without a
//! security driver, cgroups or virtlogd (QEMU's output goes to a file), which is what a
//! test needs and nothing more. Clients reach it with
//! `qemu+unix:///system?socket=DIR/libvirt-sock` ([`Libvirtd::uri`]).
//!
//! [`Domain`] defines and starts a domain and, on drop, destroys and undefines it (and, if
//! libvirt could not, kills its QEMU by the PID libvirt recorded). [`DomainXml`] writes the
//! XML of a direct-kernel-boot TCG guest whose disks are NBD exports on a Unix socket.
//!
//! Nothing here kills a process it did not start: libvirtd is this helper's child, killed
//! by its PID; a domain's QEMU only by the PID libvirt wrote for that domain, after checking
//! its command line names the domain.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::daemon::run;
use crate::{io_err, Error, Result};

/// libvirt's directories, each hidden under an empty tmpfs in the private instance.
pub const PRIVATE_DIRS: [&str; 5] = [
    "/etc/libvirt",
    "/run/libvirt",
    "/var/lib/libvirt",
    "/var/cache/libvirt",
    "/var/log/libvirt",
];

/// The private instance's `qemu.conf`.
pub const QEMU_CONF: &str = r#"# tmem-itest: QEMU as root, no security driver, no cgroups, output to a file.
user = "root"
group = "root"
dynamic_ownership = 0
remember_owner = 0
security_driver = "none"
stdio_handler = "file"
cgroup_controllers = [ ]
namespaces = [ ]
"#;

/// Escapes text for an XML attribute or element.
pub fn xml_escape(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '\'' => o.push_str("&apos;"),
            '"' => o.push_str("&quot;"),
            c => o.push(c),
        }
    }
    o
}

/// Single-quotes a word for `sh`.
fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// A private `libvirtd` (see the module docs); stopped (SIGTERM, then SIGKILL, by PID) on
/// drop.
#[derive(Debug)]
pub struct Libvirtd {
    child: Option<Child>,
    dir: PathBuf,
    virsh: PathBuf,
    uri: String,
    log: PathBuf,
}

impl Libvirtd {
    /// Starts `libvirtd` in a private mount namespace with its sockets in `dir` (created;
    /// keep it short: Unix socket paths). Waits until `virsh version` answers. Needs root.
    pub fn start(dir: &Path, libvirtd: &Path, unshare: &Path, virsh: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(io_err(format!("creating {}", dir.display())))?;
        let conf = dir.join("libvirtd.conf");
        let qemu_conf = dir.join("qemu.conf");
        let script = dir.join("libvirtd.sh");
        let log = dir.join("libvirtd.log");
        let pid = dir.join("libvirtd.pid");
        let d = dir.to_string_lossy();
        std::fs::write(
            &conf,
            format!(
                "unix_sock_dir = \"{d}\"\nunix_sock_group = \"root\"\nunix_sock_rw_perms = \"0700\"\n\
                 unix_sock_ro_perms = \"0700\"\nunix_sock_admin_perms = \"0700\"\n\
                 auth_unix_rw = \"none\"\nauth_unix_ro = \"none\"\nlog_outputs = \"3:stderr\"\n"
            ),
        )
        .map_err(io_err(format!("writing {}", conf.display())))?;
        std::fs::write(&qemu_conf, QEMU_CONF)
            .map_err(io_err(format!("writing {}", qemu_conf.display())))?;
        // Runs inside the new mount namespace: hide libvirt's directories, then become libvirtd.
        let mut sh = String::from("#!/bin/sh\nset -e\nmount --make-rprivate /\n");
        for p in PRIVATE_DIRS {
            sh.push_str(&format!(
                "[ -d {p} ] || mkdir -p {p}\nmount -t tmpfs -o mode=0755,size=64m tmem-itest-libvirt {p}\n"
            ));
        }
        sh.push_str(&format!(
            "cp {} /etc/libvirt/qemu.conf\nexec {} --config {} --pid-file {}\n",
            sh_quote(&qemu_conf.to_string_lossy()),
            sh_quote(&libvirtd.to_string_lossy()),
            sh_quote(&conf.to_string_lossy()),
            sh_quote(&pid.to_string_lossy()),
        ));
        std::fs::write(&script, sh).map_err(io_err(format!("writing {}", script.display())))?;
        let logf =
            std::fs::File::create(&log).map_err(io_err(format!("creating {}", log.display())))?;
        let child = Command::new(unshare)
            .args(["-m", "--propagation", "private", "sh"])
            .arg(&script)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(logf)
            .spawn()
            .map_err(io_err(format!("spawning {}", unshare.display())))?;
        let mut me = Libvirtd {
            child: Some(child),
            dir: dir.to_path_buf(),
            virsh: virsh.to_path_buf(),
            uri: format!("qemu+unix:///system?socket={d}/libvirt-sock"),
            log,
        };
        let end = Instant::now() + Duration::from_secs(120);
        loop {
            if let Some(st) = me.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                me.child = None;
                return Err(Error::Command {
                    cmd: format!("{} (private libvirtd)", libvirtd.display()),
                    status: st.to_string(),
                    stderr: me.log_text(),
                });
            }
            if me.virsh(&["version"]).is_ok() {
                return Ok(me);
            }
            if Instant::now() >= end {
                return Err(Error::Timeout {
                    what: format!("libvirtd at {}: {}", me.uri, me.log_text()),
                    secs: 120.0,
                });
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The connection URI.
    pub fn uri(&self) -> &str {
        &self.uri
    }

    /// libvirtd's PID (0 once stopped).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// The directory of its sockets and configuration.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Its log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Runs `virsh -c URI ARGS…` (LC_ALL=C); stdout, or an error with stderr.
    pub fn virsh(&self, args: &[&str]) -> Result<String> {
        let out = run(Command::new(&self.virsh)
            .env("LC_ALL", "C")
            .arg("-c")
            .arg(&self.uri)
            .args(args))?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// A file as libvirtd sees it (inside its mount namespace), e.g. a domain's pid file.
    pub fn private_path(&self, path: &str) -> Option<PathBuf> {
        let pid = self.pid();
        (pid != 0).then(|| PathBuf::from(format!("/proc/{pid}/root{path}")))
    }

    /// Stops libvirtd: SIGTERM by its PID, up to `grace`, then SIGKILL. Domains it started
    /// keep running (as with any libvirtd): destroy them first. Idempotent.
    pub fn stop(&mut self, grace: Duration) {
        let Some(mut c) = self.child.take() else {
            return;
        };
        if let Ok(None) = c.try_wait() {
            if let Ok(pid) = libc::pid_t::try_from(c.id()) {
                // SAFETY: kill(2) on the PID of our own child, not yet reaped (try_wait
                // returned None), so the PID cannot have been reused.
                unsafe {
                    libc::kill(pid, libc::SIGTERM);
                }
            }
            let end = Instant::now() + grace;
            while Instant::now() < end {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
        }
        let _ = c.wait();
    }
}

impl Drop for Libvirtd {
    fn drop(&mut self) {
        self.stop(Duration::from_secs(15));
        for s in ["libvirt-sock", "libvirt-sock-ro", "libvirt-admin-sock"] {
            let _ = std::fs::remove_file(self.dir.join(s));
        }
    }
}

/// The XML of a direct-kernel-boot TCG domain (`type='qemu'`): serial console to a file,
/// NBD disks on a Unix socket (`vda`, `vdb`, ...), virtio-serial channels on Unix sockets
/// libvirt's QEMU listens on, and a virtio balloon with free page reporting,
/// deflate-on-oom and a statistics period.
#[derive(Debug, Clone)]
pub struct DomainXml {
    /// Domain name.
    pub name: String,
    /// Memory at boot and most memory, MiB.
    pub memory_mib: u32,
    /// Kernel image.
    pub kernel: PathBuf,
    /// Initramfs.
    pub initrd: PathBuf,
    /// Kernel command line.
    pub cmdline: String,
    /// Serial console log file.
    pub console: PathBuf,
    /// NBD disks: (socket, export name).
    pub nbd_disks: Vec<(PathBuf, String)>,
    /// virtio-serial ports: (port name, socket).
    pub channels: Vec<(String, PathBuf)>,
    /// Balloon statistics period, s.
    pub stats_period: u32,
    /// The QEMU binary.
    pub emulator: PathBuf,
}

impl DomainXml {
    /// The domain XML.
    pub fn xml(&self) -> String {
        let e = |p: &Path| xml_escape(&p.to_string_lossy());
        let mut x = format!(
            "<domain type='qemu'>\n  <name>{name}</name>\n  <memory unit='MiB'>{m}</memory>\n  \
             <currentMemory unit='MiB'>{m}</currentMemory>\n  <vcpu>1</vcpu>\n  <os>\n    \
             <type arch='x86_64' machine='pc'>hvm</type>\n    <kernel>{k}</kernel>\n    \
             <initrd>{i}</initrd>\n    <cmdline>{c}</cmdline>\n  </os>\n  \
             <on_poweroff>destroy</on_poweroff>\n  <on_reboot>destroy</on_reboot>\n  \
             <on_crash>destroy</on_crash>\n  <devices>\n    <emulator>{em}</emulator>\n",
            name = xml_escape(&self.name),
            m = self.memory_mib,
            k = e(&self.kernel),
            i = e(&self.initrd),
            c = xml_escape(&self.cmdline),
            em = e(&self.emulator),
        );
        for (n, (sock, export)) in self.nbd_disks.iter().enumerate() {
            let dev = format!("vd{}", char::from(b'a' + (n % 26) as u8));
            x.push_str(&format!(
                "    <disk type='network' device='disk'>\n      <driver name='qemu' type='raw'/>\n      \
                 <source protocol='nbd' name='{}'>\n        <host transport='unix' socket='{}'/>\n      \
                 </source>\n      <target dev='{dev}' bus='virtio'/>\n    </disk>\n",
                xml_escape(export),
                e(sock)
            ));
        }
        x.push_str(&format!(
            "    <serial type='file'>\n      <source path='{}'/>\n      <target port='0'/>\n    </serial>\n",
            e(&self.console)
        ));
        for (port, sock) in &self.channels {
            x.push_str(&format!(
                "    <channel type='unix'>\n      <source mode='bind' path='{}'/>\n      \
                 <target type='virtio' name='{}'/>\n    </channel>\n",
                e(sock),
                xml_escape(port)
            ));
        }
        x.push_str(&format!(
            "    <controller type='usb' model='none'/>\n    \
             <memballoon model='virtio' autodeflate='on' freePageReporting='on'>\n      \
             <stats period='{}'/>\n    </memballoon>\n  </devices>\n</domain>\n",
            self.stats_period
        ));
        x
    }
}

/// A defined libvirt domain; destroyed and undefined on drop.
#[derive(Debug)]
pub struct Domain<'a> {
    lv: &'a Libvirtd,
    name: String,
    qemu_pid: Option<u32>,
}

impl<'a> Domain<'a> {
    /// `virsh define` of `xml` (written to `DIR/NAME.xml`).
    pub fn define(lv: &'a Libvirtd, name: &str, xml: &str) -> Result<Self> {
        let path = lv.dir().join(format!("{name}.xml"));
        std::fs::write(&path, xml).map_err(io_err(format!("writing {}", path.display())))?;
        lv.virsh(&["define", &path.to_string_lossy()])?;
        Ok(Domain {
            lv,
            name: name.to_owned(),
            qemu_pid: None,
        })
    }

    /// The domain name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `virsh start`; remembers the QEMU PID libvirt recorded.
    pub fn start(&mut self) -> Result<()> {
        self.lv.virsh(&["start", &self.name])?;
        self.qemu_pid = self
            .lv
            .private_path(&format!("/run/libvirt/qemu/{}.pid", self.name))
            .and_then(|p| std::fs::read_to_string(p).ok())
            .and_then(|s| s.trim().parse().ok());
        Ok(())
    }

    /// `virsh destroy` (the guest is pulled out, as by a power cut).
    pub fn destroy(&mut self) -> Result<()> {
        self.lv.virsh(&["destroy", &self.name])?;
        Ok(())
    }

    /// `virsh domstats --balloon`: the balloon's current size, bytes.
    pub fn balloon_current(&self) -> Result<u64> {
        let out = self.lv.virsh(&["domstats", "--balloon", &self.name])?;
        out.lines()
            .find_map(|l| l.trim().strip_prefix("balloon.current="))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(|kib| kib * 1024)
            .ok_or_else(|| Error::Parse {
                what: "virsh domstats --balloon".into(),
                detail: out.clone(),
            })
    }

    /// Whether libvirt reports the domain running.
    pub fn is_running(&self) -> bool {
        self.lv
            .virsh(&["domstate", &self.name])
            .is_ok_and(|s| s.trim() == "running")
    }

    /// The QEMU PID libvirt recorded at the last start.
    pub fn qemu_pid(&self) -> Option<u32> {
        self.qemu_pid
    }
}

impl Drop for Domain<'_> {
    fn drop(&mut self) {
        let _ = self.lv.virsh(&["destroy", &self.name]);
        let _ = self.lv.virsh(&["undefine", &self.name]);
        // If libvirt could not stop it, the QEMU it started for this domain (and only that
        // process: its command line names the domain) is killed by its PID.
        if let Some(pid) = self.qemu_pid {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let needle = format!("guest={}", self.name);
            let ours = String::from_utf8_lossy(&cmdline)
                .split('\0')
                .any(|a| a == needle || a.starts_with(&format!("{needle},")));
            if ours {
                if let Ok(p) = libc::pid_t::try_from(pid) {
                    // SAFETY: kill(2) on the QEMU libvirt started for this test's domain,
                    // identified by its pid file and command line just above.
                    unsafe {
                        libc::kill(p, libc::SIGKILL);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn domain_xml_is_escaped_and_complete() {
        let x = DomainXml {
            name: "a&b".into(),
            memory_mib: 512,
            kernel: "/boot/vmlinuz".into(),
            initrd: "/c/initrd.gz".into(),
            cmdline: "console=ttyS0 x='1'".into(),
            console: "/t/console.log".into(),
            nbd_disks: vec![("/t/nbd.sock".into(), "swap-1".into())],
            channels: vec![("org.tmem.agent".into(), "/t/agent.sock".into())],
            stats_period: 1,
            emulator: "/usr/bin/qemu-system-x86_64".into(),
        }
        .xml();
        assert!(x.contains("<name>a&amp;b</name>"), "{x}");
        assert!(
            x.contains("<cmdline>console=ttyS0 x=&apos;1&apos;</cmdline>"),
            "{x}"
        );
        assert!(x.contains("<source protocol='nbd' name='swap-1'>"), "{x}");
        assert!(
            x.contains("<host transport='unix' socket='/t/nbd.sock'/>"),
            "{x}"
        );
        assert!(x.contains("<target dev='vda' bus='virtio'/>"), "{x}");
        assert!(
            x.contains("<target type='virtio' name='org.tmem.agent'/>"),
            "{x}"
        );
        assert!(x.contains("autodeflate='on' freePageReporting='on'"), "{x}");
        assert!(x.contains("<stats period='1'/>"), "{x}");
        assert_eq!(sh_quote("a'b"), r"'a'\''b'");
    }
}
