//! QEMU command-line helpers for the balloon device and the agent channel.

use std::path::Path;

/// Options for the virtio-balloon device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BalloonDeviceOpts {
    /// QOM id (the QMP path is `/machine/peripheral/<id>`). Default `balloon0`.
    pub id: String,
    /// `free-page-reporting=on`. Default true.
    pub free_page_reporting: bool,
    /// `deflate-on-oom=on`. Default true.
    pub deflate_on_oom: bool,
}

impl Default for BalloonDeviceOpts {
    fn default() -> Self {
        Self {
            id: "balloon0".into(),
            free_page_reporting: true,
            deflate_on_oom: true,
        }
    }
}

impl BalloonDeviceOpts {
    /// The QOM path of the device, for `qom-get`/`qom-set`.
    pub fn qom_path(&self) -> String {
        format!("/machine/peripheral/{}", self.id)
    }
}

fn onoff(b: bool) -> &'static str {
    if b {
        "on"
    } else {
        "off"
    }
}

/// `-device virtio-balloon-pci,id=..,free-page-reporting=on,deflate-on-oom=on`.
pub fn balloon_device_args(o: &BalloonDeviceOpts) -> Vec<String> {
    vec![
        "-device".into(),
        format!(
            "virtio-balloon-pci,id={},free-page-reporting={},deflate-on-oom={}",
            o.id,
            onoff(o.free_page_reporting),
            onoff(o.deflate_on_oom)
        ),
    ]
}

/// virtio-serial controller + a socket chardev (QEMU listens) + a named
/// `virtserialport`. In the guest the port appears as `/dev/vportNpM` with
/// `/sys/class/virtio-ports/vportNpM/name` = `port_name`.
pub fn agent_channel_args(chardev_id: &str, socket: &Path, port_name: &str) -> Vec<String> {
    vec![
        "-device".into(),
        "virtio-serial-pci,id=tmemvser0".into(),
        "-chardev".into(),
        format!(
            "socket,id={chardev_id},path={},server=on,wait=off",
            socket.display()
        ),
        "-device".into(),
        format!("virtserialport,bus=tmemvser0.0,chardev={chardev_id},name={port_name}"),
    ]
}

/// Default virtio-serial port name used by `tmem-guest`.
pub const AGENT_PORT_NAME: &str = "org.tmem.agent";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn args() {
        let a = balloon_device_args(&BalloonDeviceOpts::default());
        assert_eq!(
            a[1],
            "virtio-balloon-pci,id=balloon0,free-page-reporting=on,deflate-on-oom=on"
        );
        assert_eq!(
            BalloonDeviceOpts::default().qom_path(),
            "/machine/peripheral/balloon0"
        );
        let c = agent_channel_args("tmemag", Path::new("/run/x.sock"), AGENT_PORT_NAME);
        assert!(c[3].contains("path=/run/x.sock,server=on,wait=off"));
        assert!(c[5].ends_with("name=org.tmem.agent"));
    }
}
