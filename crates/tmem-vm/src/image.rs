//! Guest image (kernel + initramfs) builder.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::{cache_dir, find_tool, io_err, run_cmd, write_atomic, Error, KeyHasher, Result};

/// The virtio modules loaded by default, in dependency order.
pub const DEFAULT_MODULES: &[&str] = &[
    "virtio_ring",
    "virtio",
    "virtio_pci_legacy_dev",
    "virtio_pci_modern_dev",
    "virtio_pci",
    "virtio_balloon",
    "virtio_blk",
    "virtio_console",
];

/// Bump when the image layout or `/init` changes, to invalidate cached images.
const IMAGE_FORMAT: &str = "tmem-vm-image-v1";

/// A host kernel usable for guests.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Kernel {
    /// The release, e.g. `6.1.0-56-cloud-amd64`.
    pub version: String,
    /// Path of the `vmlinuz` image.
    pub vmlinuz: PathBuf,
    /// The kernel's module directory (`/lib/modules/<version>`).
    pub modules_dir: PathBuf,
}

impl Kernel {
    /// The value of a kernel config option (e.g. `CONFIG_EXT4_FS` → `"y"`),
    /// read from `/boot/config-<version>` beside the image; `None` if unset
    /// or the config file is missing.
    pub fn config_value(&self, option: &str) -> Option<String> {
        let cfg = self
            .vmlinuz
            .with_file_name(format!("config-{}", self.version));
        let text = std::fs::read_to_string(cfg).ok()?;
        text.lines().find_map(|l| {
            l.strip_prefix(option)
                .and_then(|r| r.strip_prefix('='))
                .map(|v| v.trim_matches('"').to_string())
        })
    }
}

/// Compares version strings chunk-wise (numbers numerically).
fn version_cmp(a: &str, b: &str) -> std::cmp::Ordering {
    fn chunks(s: &str) -> Vec<(u64, String)> {
        let mut out = Vec::new();
        let mut cur = String::new();
        let mut digits = false;
        for ch in s.chars() {
            if ch.is_ascii_digit() != digits && !cur.is_empty() {
                out.push(std::mem::take(&mut cur));
            }
            digits = ch.is_ascii_digit();
            cur.push(ch);
        }
        if !cur.is_empty() {
            out.push(cur);
        }
        out.into_iter()
            .map(|c| match c.parse::<u64>() {
                Ok(n) => (n, String::new()),
                Err(_) => (0, c),
            })
            .collect()
    }
    chunks(a).cmp(&chunks(b))
}

/// Finds the newest `/boot/vmlinuz-*-cloud-amd64` that has a module directory.
///
/// `$TMEM_VM_KERNEL` (a path to a vmlinuz named `vmlinuz-<version>`) overrides.
pub fn newest_cloud_kernel() -> Result<Kernel> {
    newest_kernel_in(Path::new("/boot"), Path::new("/lib/modules"))
}

fn newest_kernel_in(boot: &Path, modules: &Path) -> Result<Kernel> {
    if let Some(p) = std::env::var_os("TMEM_VM_KERNEL").filter(|p| !p.is_empty()) {
        let vmlinuz = PathBuf::from(p);
        let version = vmlinuz
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_prefix("vmlinuz-"))
            .ok_or_else(|| {
                Error::Invalid(format!(
                    "TMEM_VM_KERNEL={} is not named vmlinuz-<version>",
                    vmlinuz.display()
                ))
            })?
            .to_string();
        return Ok(Kernel {
            modules_dir: modules.join(&version),
            version,
            vmlinuz,
        });
    }
    let missing = |detail: String| Error::Missing {
        what: "guest kernel /boot/vmlinuz-*-cloud-amd64 (package linux-image-cloud-amd64)".into(),
        detail,
    };
    let rd = std::fs::read_dir(boot).map_err(|e| missing(format!("{}: {e}", boot.display())))?;
    let mut best: Option<Kernel> = None;
    for ent in rd.flatten() {
        let name = ent.file_name();
        let Some(name) = name.to_str() else { continue };
        let Some(version) = name.strip_prefix("vmlinuz-") else {
            continue;
        };
        if !version.ends_with("-cloud-amd64") {
            continue;
        }
        let modules_dir = modules.join(version);
        if !modules_dir.join("modules.dep").is_file() {
            continue;
        }
        let k = Kernel {
            version: version.to_string(),
            vmlinuz: ent.path(),
            modules_dir,
        };
        let newer = match &best {
            None => true,
            Some(b) => version_cmp(&k.version, &b.version).is_gt(),
        };
        if newer {
            best = Some(k);
        }
    }
    best.ok_or_else(|| missing(format!("no match with modules in {}", boot.display())))
}

/// Normalizes a module name (`virtio-blk` and `virtio_blk` are the same module).
fn module_name(path: &str) -> String {
    let base = path.rsplit('/').next().unwrap_or(path);
    let base = base.split(".ko").next().unwrap_or(base);
    base.replace('-', "_")
}

/// Parsed `modules.dep`: module name → (relative path, dependency names).
fn parse_modules_dep(text: &str) -> HashMap<String, (String, Vec<String>)> {
    let mut map = HashMap::new();
    for line in text.lines() {
        let Some((path, deps)) = line.split_once(':') else {
            continue;
        };
        let deps = deps.split_whitespace().map(module_name).collect();
        map.insert(module_name(path), (path.trim().to_string(), deps));
    }
    map
}

/// Resolves `wanted` and their dependencies into load order (dependencies first).
fn resolve_modules(
    dep: &HashMap<String, (String, Vec<String>)>,
    wanted: &[String],
) -> Result<Vec<(String, String)>> {
    fn visit(
        name: &str,
        dep: &HashMap<String, (String, Vec<String>)>,
        seen: &mut Vec<String>,
        out: &mut Vec<(String, String)>,
        depth: usize,
    ) -> Result<()> {
        if seen.iter().any(|s| s == name) {
            return Ok(());
        }
        if depth > 64 {
            return Err(Error::Invalid(format!("module dependency loop at {name}")));
        }
        let (path, deps) = dep.get(name).ok_or_else(|| {
            Error::Invalid(format!(
                "kernel module {name} not found in modules.dep (built in, or misspelt?)"
            ))
        })?;
        for d in deps {
            visit(d, dep, seen, out, depth + 1)?;
        }
        if !seen.iter().any(|s| s == name) {
            seen.push(name.to_string());
            out.push((name.to_string(), path.clone()));
        }
        Ok(())
    }
    let mut seen = Vec::new();
    let mut out = Vec::new();
    for w in wanted {
        visit(&module_name(w), dep, &mut seen, &mut out, 0)?;
    }
    Ok(out)
}

/// Reads a module file, decompressing `.ko.xz`, `.ko.zst` and `.ko.gz`.
fn read_module(path: &Path) -> Result<Vec<u8>> {
    let s = path.to_string_lossy();
    let tool = if s.ends_with(".xz") {
        Some("xz")
    } else if s.ends_with(".zst") {
        Some("zstd")
    } else if s.ends_with(".gz") {
        Some("gzip")
    } else {
        None
    };
    match tool {
        None => std::fs::read(path).map_err(io_err(format!("reading {}", path.display()))),
        Some(t) => run_cmd(
            std::process::Command::new(find_tool(t)?)
                .arg("-dc")
                .arg(path),
        ),
    }
}

/// A built guest image: kernel plus initramfs.
#[derive(Clone, Debug)]
pub struct GuestImage {
    /// The kernel image to boot.
    pub kernel: PathBuf,
    /// The gzip-compressed newc initramfs.
    pub initrd: PathBuf,
    /// The kernel release.
    pub kernel_version: String,
    /// The cache key (hash of all inputs).
    pub key: String,
    /// The modules loaded by `/init`, in order.
    pub modules: Vec<String>,
}

/// Builds (and caches) a guest initramfs.
///
/// The generated `/init` mounts proc, sysfs, devtmpfs and a tmpfs on `/tmp`,
/// loads the modules in dependency order, optionally enables swap, prints
/// [`crate::MARK_READY`], runs the workload script with `sh`, prints
/// `TMEM-EXIT <code>` and powers off. The swap device can also be given at
/// boot with `tmem.swap=/dev/vdX` on the kernel command line.
#[derive(Clone, Debug)]
pub struct ImageBuilder {
    kernel: Option<Kernel>,
    modules: Vec<String>,
    binaries: Vec<(String, PathBuf)>,
    files: Vec<(String, Vec<u8>, u32)>,
    script: String,
    swap: Option<String>,
    cache_dir: PathBuf,
    busybox: Option<PathBuf>,
}

impl Default for ImageBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl ImageBuilder {
    /// A builder with the default modules, an empty workload and the default cache dir.
    pub fn new() -> Self {
        Self {
            kernel: None,
            modules: DEFAULT_MODULES.iter().map(|s| s.to_string()).collect(),
            binaries: Vec::new(),
            files: Vec::new(),
            script: "true\n".into(),
            swap: None,
            cache_dir: cache_dir(),
            busybox: None,
        }
    }

    /// Uses this kernel instead of the newest cloud kernel.
    pub fn kernel(mut self, k: Kernel) -> Self {
        self.kernel = Some(k);
        self
    }

    /// Replaces the module list (dependencies are still added automatically).
    pub fn modules<S: AsRef<str>>(mut self, mods: &[S]) -> Self {
        self.modules = mods.iter().map(|s| s.as_ref().to_string()).collect();
        self
    }

    /// Adds one module (e.g. `nbd`, `vmw_vsock_virtio_transport`).
    pub fn module(mut self, m: &str) -> Self {
        self.modules.push(m.to_string());
        self
    }

    /// Adds a static binary as `/bin/<name>`.
    pub fn binary(mut self, name: &str, path: impl Into<PathBuf>) -> Self {
        self.binaries.push((name.to_string(), path.into()));
        self
    }

    /// Adds a file with the given content and mode at an absolute guest path.
    pub fn file(mut self, guest_path: &str, content: impl Into<Vec<u8>>, mode: u32) -> Self {
        self.files
            .push((guest_path.to_string(), content.into(), mode & 0o7777));
        self
    }

    /// The workload: a shell script run by busybox `sh` after boot.
    pub fn script(mut self, script: impl Into<String>) -> Self {
        self.script = script.into();
        self
    }

    /// Runs `mkswap DEV && swapon DEV` before the workload.
    pub fn swap(mut self, dev: impl Into<String>) -> Self {
        self.swap = Some(dev.into());
        self
    }

    /// Uses this cache directory instead of [`crate::cache_dir`].
    pub fn cache_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.cache_dir = dir.into();
        self
    }

    /// Uses this busybox (must be static) instead of the one in `$PATH`.
    pub fn busybox(mut self, path: impl Into<PathBuf>) -> Self {
        self.busybox = Some(path.into());
        self
    }

    fn init_script(&self, modules: &[String]) -> String {
        let swap = self.swap.clone().unwrap_or_default();
        format!(
            r#"#!/bin/sh
export PATH=/bin HOME=/root TERM=dumb
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mkdir -p /dev/pts /tmp /run /mnt /root
mount -t tmpfs -o mode=1777 tmpfs /tmp
mount -t tmpfs tmpfs /run
exec </dev/console >/dev/console 2>&1
echo TMEM-BOOT
for m in {modules}; do
  insmod /lib/modules/$m.ko || echo "TMEM-WARN insmod $m failed"
done
swap='{swap}'
for a in $(cat /proc/cmdline); do
  case "$a" in tmem.swap=*) swap="${{a#tmem.swap=}}";; esac
done
if [ -n "$swap" ]; then
  i=0
  while [ ! -b "$swap" ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
  if mkswap "$swap" >/dev/null && swapon "$swap"; then echo "TMEM-SWAP $swap"; else echo "TMEM-WARN swap on $swap failed"; fi
fi
echo {ready}
sh /workload.sh
rc=$?
sync
printf '\n{exit} %d\n' "$rc"
poweroff -f
sleep 5
"#,
            modules = modules.join(" "),
            swap = swap.replace('\'', ""),
            ready = crate::MARK_READY,
            exit = crate::MARK_EXIT,
        )
    }

    /// Builds the image, or returns the cached one if all inputs are unchanged.
    pub fn build(&self) -> Result<GuestImage> {
        let kernel = match &self.kernel {
            Some(k) => k.clone(),
            None => newest_cloud_kernel()?,
        };
        if !kernel.vmlinuz.is_file() {
            return Err(Error::Missing {
                what: format!("kernel image {}", kernel.vmlinuz.display()),
                detail: "not a file".into(),
            });
        }
        let busybox = match &self.busybox {
            Some(b) => b.clone(),
            None => find_tool("busybox").map_err(|_| Error::Missing {
                what: "busybox (package busybox-static)".into(),
                detail: "not in PATH".into(),
            })?,
        };
        if !crate::is_static_elf(&busybox)? {
            return Err(Error::Missing {
                what: "a static busybox (package busybox-static)".into(),
                detail: format!("{} is dynamically linked", busybox.display()),
            });
        }
        let dep_path = kernel.modules_dir.join("modules.dep");
        let dep_text = std::fs::read_to_string(&dep_path).map_err(|e| Error::Missing {
            what: format!("modules of kernel {}", kernel.version),
            detail: format!("{}: {e}", dep_path.display()),
        })?;
        let dep = parse_modules_dep(&dep_text);
        let mods = resolve_modules(&dep, &self.modules)?;

        // Hash every input.
        let mut h = KeyHasher::new();
        h.update(IMAGE_FORMAT.as_bytes())
            .update(kernel.version.as_bytes())
            .update(kernel.vmlinuz.to_string_lossy().as_bytes());
        h.update_file(&busybox)?;
        let mut module_data = Vec::new();
        for (name, rel) in &mods {
            let data = read_module(&kernel.modules_dir.join(rel))?;
            h.update(name.as_bytes()).update(&data);
            module_data.push((name.clone(), data));
        }
        let mut bins = Vec::new();
        for (name, path) in &self.binaries {
            if name.is_empty() || name.contains('/') {
                return Err(Error::Invalid(format!("bad binary name {name:?}")));
            }
            let data = std::fs::read(path).map_err(io_err(format!(
                "reading guest binary {} ({})",
                name,
                path.display()
            )))?;
            if !crate::is_static_elf(path)? {
                return Err(Error::Invalid(format!(
                    "guest binary {} is not statically linked (build with -C target-feature=+crt-static)",
                    path.display()
                )));
            }
            h.update(name.as_bytes()).update(&data);
            bins.push((name.clone(), data));
        }
        for (p, c, m) in &self.files {
            if !p.starts_with('/') || p.split('/').any(|c| c == "..") {
                return Err(Error::Invalid(format!("bad guest path {p:?}")));
            }
            h.update(p.as_bytes()).update(c).update(&m.to_le_bytes());
        }
        let names: Vec<String> = mods.iter().map(|(n, _)| n.clone()).collect();
        let init = self.init_script(&names);
        h.update(init.as_bytes()).update(self.script.as_bytes());
        let key = h.hex();

        let dir = self.cache_dir.join("images").join(&key);
        let initrd = dir.join("initrd.gz");
        let image = GuestImage {
            kernel: kernel.vmlinuz.clone(),
            initrd: initrd.clone(),
            kernel_version: kernel.version.clone(),
            key,
            modules: names,
        };
        if initrd.is_file() {
            tracing::debug!(key = %image.key, "guest image cache hit");
            return Ok(image);
        }
        std::fs::create_dir_all(&dir).map_err(io_err(format!("creating {}", dir.display())))?;

        let mut w = Newc::default();
        for d in [
            "bin",
            "dev",
            "proc",
            "sys",
            "tmp",
            "run",
            "mnt",
            "root",
            "lib",
            "lib/modules",
            "etc",
        ] {
            w.dir(d, 0o755);
        }
        w.node("dev/console", 0o600, 5, 1);
        w.node("dev/null", 0o666, 1, 3);
        w.file(
            "bin/busybox",
            &std::fs::read(&busybox).map_err(io_err("reading busybox"))?,
            0o755,
        );
        let list = run_cmd(std::process::Command::new(&busybox).arg("--list"))?;
        let mut applets: Vec<&str> = std::str::from_utf8(&list)
            .map_err(|_| Error::Invalid("busybox --list is not UTF-8".into()))?
            .lines()
            .map(str::trim)
            .filter(|a| !a.is_empty() && *a != "busybox" && !a.contains('/'))
            .collect();
        applets.sort_unstable();
        applets.dedup();
        let bin_names: Vec<&str> = bins.iter().map(|(n, _)| n.as_str()).collect();
        for a in applets {
            if !bin_names.contains(&a) {
                w.symlink(&format!("bin/{a}"), "busybox");
            }
        }
        for (name, data) in &module_data {
            w.file(&format!("lib/modules/{name}.ko"), data, 0o644);
        }
        for (name, data) in &bins {
            w.file(&format!("bin/{name}"), data, 0o755);
        }
        // Parent directories of extra files.
        let mut dirs = BTreeMap::new();
        for (p, _, _) in &self.files {
            let rel = p.trim_start_matches('/');
            let mut acc = String::new();
            let parts: Vec<&str> = rel.split('/').collect();
            for part in &parts[..parts.len().saturating_sub(1)] {
                if !acc.is_empty() {
                    acc.push('/');
                }
                acc.push_str(part);
                dirs.insert(acc.clone(), ());
            }
        }
        for d in dirs.keys() {
            w.dir(d, 0o755);
        }
        for (p, c, m) in &self.files {
            w.file(p.trim_start_matches('/'), c, *m);
        }
        w.file("workload.sh", self.script.as_bytes(), 0o755);
        w.file("init", init.as_bytes(), 0o755);
        let cpio = w.finish();

        // Compress with gzip into a temp file, then rename into place.
        let tmp = crate::tmp_sibling(&initrd);
        let gzip = find_tool("gzip")?;
        let out =
            std::fs::File::create(&tmp).map_err(io_err(format!("creating {}", tmp.display())))?;
        let mut child = std::process::Command::new(gzip)
            .args(["-n", "-6", "-c"])
            .stdin(std::process::Stdio::piped())
            .stdout(out)
            .stderr(std::process::Stdio::piped())
            .spawn()
            .map_err(io_err("spawning gzip"))?;
        let mut stdin = child
            .stdin
            .take()
            .ok_or_else(|| Error::Invalid("gzip stdin".into()))?;
        let writer = std::thread::spawn(move || stdin.write_all(&cpio));
        let out = child.wait_with_output().map_err(io_err("running gzip"))?;
        let wrote = writer
            .join()
            .map_err(|_| Error::Invalid("gzip writer thread panicked".into()))?;
        if !out.status.success() {
            let _ = std::fs::remove_file(&tmp);
            return Err(Error::Command {
                cmd: "gzip".into(),
                status: out.status.to_string(),
                stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            });
        }
        wrote.map_err(io_err("writing to gzip"))?;
        std::fs::rename(&tmp, &initrd)
            .map_err(io_err(format!("renaming to {}", initrd.display())))?;
        write_atomic(&dir.join("init"), init.as_bytes())?;
        tracing::info!(key = %image.key, initrd = %initrd.display(), "built guest image");
        Ok(image)
    }
}

/// A minimal cpio "newc" archive writer (deterministic: fixed mtimes and owners).
#[derive(Default)]
struct Newc {
    buf: Vec<u8>,
    ino: u32,
}

impl Newc {
    fn header(&mut self, name: &str, mode: u32, size: usize, rdev: (u32, u32)) {
        self.ino += 1;
        let namesize = name.len() + 1;
        let fields = [
            self.ino,
            mode,
            0,
            0,
            if mode & 0o170000 == 0o040000 { 2 } else { 1 },
            0,
            size as u32,
            0,
            0,
            rdev.0,
            rdev.1,
            namesize as u32,
            0,
        ];
        self.buf.extend_from_slice(b"070701");
        for f in fields {
            self.buf.extend_from_slice(format!("{f:08x}").as_bytes());
        }
        self.buf.extend_from_slice(name.as_bytes());
        self.buf.push(0);
        self.pad();
    }

    fn pad(&mut self) {
        while self.buf.len() % 4 != 0 {
            self.buf.push(0);
        }
    }

    fn dir(&mut self, name: &str, perm: u32) {
        self.header(name, 0o040000 | perm, 0, (0, 0));
    }

    fn file(&mut self, name: &str, data: &[u8], perm: u32) {
        self.header(name, 0o100000 | perm, data.len(), (0, 0));
        self.buf.extend_from_slice(data);
        self.pad();
    }

    fn symlink(&mut self, name: &str, target: &str) {
        self.header(name, 0o120777, target.len(), (0, 0));
        self.buf.extend_from_slice(target.as_bytes());
        self.pad();
    }

    fn node(&mut self, name: &str, perm: u32, major: u32, minor: u32) {
        self.header(name, 0o020000 | perm, 0, (major, minor));
    }

    fn finish(mut self) -> Vec<u8> {
        self.ino = 0;
        self.header("TRAILER!!!", 0, 0, (0, 0));
        // Pad the archive to 512 bytes like cpio does.
        while self.buf.len() % 512 != 0 {
            self.buf.push(0);
        }
        self.buf
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_ordering() {
        use std::cmp::Ordering::*;
        assert_eq!(
            version_cmp("6.1.0-56-cloud-amd64", "6.1.0-9-cloud-amd64"),
            Greater
        );
        assert_eq!(
            version_cmp("6.10.0-1-cloud-amd64", "6.9.0-1-cloud-amd64"),
            Greater
        );
        assert_eq!(
            version_cmp("6.1.0-5-cloud-amd64", "6.1.0-5-cloud-amd64"),
            Equal
        );
    }

    #[test]
    fn module_resolution_orders_dependencies_first() {
        let dep = parse_modules_dep(
            "kernel/drivers/virtio/virtio.ko.xz: kernel/drivers/virtio/virtio_ring.ko.xz\n\
             kernel/drivers/virtio/virtio_ring.ko.xz:\n\
             kernel/drivers/block/virtio_blk.ko.zst: kernel/drivers/virtio/virtio.ko.xz kernel/drivers/virtio/virtio_ring.ko.xz\n",
        );
        let order = resolve_modules(&dep, &["virtio-blk".to_string()]).unwrap();
        let names: Vec<&str> = order.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["virtio_ring", "virtio", "virtio_blk"]);
        assert!(order[2].1.ends_with(".ko.zst"));
        assert!(resolve_modules(&dep, &["nope".to_string()]).is_err());
    }

    #[test]
    fn host_kernel_has_what_the_guests_need() {
        // Only meaningful where the guest kernel is installed (scripts/setup).
        let Some(k) = crate::test_kernel() else {
            return;
        };
        if k.config_value("CONFIG_EXT4_FS").is_none() {
            crate::missing_prerequisite(
                "the guest kernel's config file",
                "no /boot/config-* next to it",
            );
            return;
        }
        assert_eq!(k.config_value("CONFIG_EXT4_FS").as_deref(), Some("y"));
        assert_eq!(
            k.config_value("CONFIG_SERIAL_8250_CONSOLE").as_deref(),
            Some("y")
        );
        assert_eq!(k.config_value("CONFIG_SWAP").as_deref(), Some("y"));
        assert_eq!(k.config_value("CONFIG_NOT_AN_OPTION"), None);
    }

    #[test]
    fn newc_layout() {
        let mut w = Newc::default();
        w.dir("bin", 0o755);
        w.file("bin/x", b"hello", 0o755);
        w.symlink("bin/sh", "busybox");
        let out = w.finish();
        assert!(out.starts_with(b"070701"));
        assert_eq!(out.len() % 512, 0);
        let s = String::from_utf8_lossy(&out);
        assert!(s.contains("bin/x\0"));
        assert!(s.contains("hello"));
        assert!(s.contains("TRAILER!!!"));
        // Every header starts 4-aligned.
        for (i, _) in s.match_indices("070701") {
            assert_eq!(i % 4, 0);
        }
    }

    #[test]
    fn init_script_mentions_markers_and_modules() {
        let b = ImageBuilder::new().swap("/dev/vda");
        let s = b.init_script(&["virtio".into(), "virtio_blk".into()]);
        assert!(s.contains("for m in virtio virtio_blk; do"));
        assert!(s.contains("swap='/dev/vda'"));
        assert!(s.contains(crate::MARK_READY));
        assert!(s.contains(crate::MARK_EXIT));
        assert!(s.contains("poweroff -f"));
    }
}
