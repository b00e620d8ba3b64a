//! What an operator pastes to attach a tenant's export: QEMU arguments and libvirt XML.

use std::fmt::Write;
use std::path::Path;

use tmem_api::ExportInfo;

use crate::CliError;

/// The hex key of `tenant` in a psktool/nbdkit PSK file (`identity:hexkey` lines).
pub fn key_from_file(path: &Path, tenant: &str) -> Result<String, CliError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| CliError::Usage(format!("cannot read {}: {e}", path.display())))?;
    text.lines()
        .filter_map(|l| l.trim().split_once(':'))
        .find(|(id, _)| *id == tenant)
        .map(|(_, k)| k.to_owned())
        .ok_or_else(|| {
            CliError::Usage(format!(
                "{} has no key for tenant {tenant:?} (expected a line `{tenant}:HEXKEY`)",
                path.display()
            ))
        })
}

/// The NBD socket path in an export's `nbd+unix` URI.
fn socket_of(uri: &str) -> Option<&str> {
    uri.split_once("?socket=").map(|(_, s)| s)
}

/// QEMU and libvirt settings for a tenant export; `None` for an export without a tenant.
pub fn for_export(e: &ExportInfo) -> Option<String> {
    let tenant = e.access.tenant.as_deref()?;
    let dir = e.tls_dir.as_ref()?.display().to_string();
    let sock = socket_of(&e.uri)?;
    let id = format!("tmem-tls-{tenant}");
    let node = format!("tmem-{}", e.name);
    let object = format!("tls-creds-psk,id={id},endpoint=client,dir={dir},username={tenant}");
    // A read-only export (a cached base image) must be opened read-only, or QEMU fails.
    let read_only = if e.writable { "" } else { ",read-only=on" };
    let blockdev = format!(
        "driver=nbd,node-name={node},server.type=unix,server.path={sock},export={},tls-creds={id}{read_only}",
        e.name
    );
    let device = format!("virtio-blk-pci,drive={node}");
    let mut s = String::new();
    let _ = writeln!(s, "tenant {tenant}: TLS key in {dir}/keys.psk");
    let _ = writeln!(s, "\nQEMU:");
    let _ = writeln!(
        s,
        "  -object {object} \\\n  -blockdev {blockdev} \\\n  -device {device}"
    );
    let _ = writeln!(
        s,
        "\nqemu-io / qemu-img:\n  qemu-io --object {object} --image-opts {blockdev}"
    );
    let _ = writeln!(
        s,
        "\nnbdinfo / nbdcopy (libnbd):\n  'nbds+unix://{tenant}@/{}?socket={sock}&tls-psk-file={dir}/keys.psk'",
        e.name
    );
    // libvirt's <disk> has no NBD PSK support: pass the same arguments through QEMU's
    // namespace (the domain element needs xmlns:qemu).
    let _ = writeln!(
        s,
        "\nlibvirt domain XML (<domain type='kvm' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>):"
    );
    let _ = writeln!(s, "  <qemu:commandline>");
    for a in [
        "-object",
        &object,
        "-blockdev",
        &blockdev,
        "-device",
        &device,
    ] {
        let _ = writeln!(s, "    <qemu:arg value='{a}'/>");
    }
    let _ = writeln!(s, "  </qemu:commandline>");
    let _ = writeln!(
        s,
        "  (QEMU's user needs the NBD socket (nbd_socket_group) and read access to {dir}.)"
    );
    Some(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snippet_names_the_tenant_key_and_socket() {
        let e = ExportInfo {
            name: "vm1-swap".into(),
            kind: tmem_api::ExportKind::Swap,
            size: 1 << 30,
            client: 1,
            pool: None,
            image: None,
            writable: true,
            uri: "nbd+unix:///vm1-swap?socket=/run/tmem/nbd.sock".into(),
            access: tmem_api::ExportAccess {
                tenant: Some("vm1".into()),
                ..Default::default()
            },
            tls_dir: Some("/run/tmem/tls/vm1".into()),
            backend: Default::default(),
            nbd: Default::default(),
        };
        let s = for_export(&e).unwrap_or_default();
        assert!(
            s.contains(
                "tls-creds-psk,id=tmem-tls-vm1,endpoint=client,dir=/run/tmem/tls/vm1,username=vm1"
            ),
            "{s}"
        );
        assert!(
            s.contains("server.path=/run/tmem/nbd.sock,export=vm1-swap,tls-creds=tmem-tls-vm1"),
            "{s}"
        );
        assert!(s.contains("<qemu:arg value='-blockdev'/>"), "{s}");
        assert!(!s.contains("read-only=on"), "{s}");
        let base = ExportInfo {
            kind: tmem_api::ExportKind::Cached,
            writable: false,
            ..e.clone()
        };
        let s = for_export(&base).unwrap_or_default();
        assert!(s.contains("tls-creds=tmem-tls-vm1,read-only=on"), "{s}");
        let open = ExportInfo {
            access: Default::default(),
            tls_dir: None,
            ..e
        };
        assert!(for_export(&open).is_none());
    }

    #[test]
    fn keys_come_from_psk_files() {
        let t = std::env::temp_dir().join(format!("tmemctl-psk-{}", std::process::id()));
        std::fs::write(&t, "a:0011\nvm1:abcd\n").unwrap_or_default();
        assert_eq!(key_from_file(&t, "vm1").ok().as_deref(), Some("abcd"));
        assert!(key_from_file(&t, "zz").is_err());
        let _ = std::fs::remove_file(&t);
    }
}
