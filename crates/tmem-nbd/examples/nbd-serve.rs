//! Serve `MemBackend` exports over NBD until SIGINT or SIGTERM, then shut down cleanly.
//!
//! ```text
//! nbd-serve [--unix PATH] [--tcp ADDR] [--size BYTES[K|M|G]] [--export NAME]... [--workers N]
//! ```
//! Used by `scripts/bench-nbd` as "our server" baseline. Prints `ready` on stdout once listening.

use std::io::Write;
use std::sync::Arc;

use tmem_nbd::{ListenAddr, MemBackend, ServerConfig, ServerHandle, StaticExports};

fn parse_size(s: &str) -> Option<u64> {
    let (num, mul) = match s.chars().last()? {
        'K' | 'k' => (&s[..s.len() - 1], 1u64 << 10),
        'M' | 'm' => (&s[..s.len() - 1], 1 << 20),
        'G' | 'g' => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    num.parse::<u64>().ok()?.checked_mul(mul)
}

fn main() {
    let mut listen = Vec::new();
    let mut size = 2u64 << 30;
    let mut names: Vec<String> = Vec::new();
    let mut cfg = ServerConfig::default();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let v = args.next();
        match (a.as_str(), v) {
            ("--unix", Some(p)) => listen.push(ListenAddr::Unix(p.into())),
            ("--tcp", Some(p)) => match p.parse() {
                Ok(sa) => listen.push(ListenAddr::Tcp(sa)),
                Err(e) => fail(&format!("bad --tcp {p}: {e}")),
            },
            ("--size", Some(s)) => size = parse_size(&s).unwrap_or_else(|| fail("bad --size")),
            ("--export", Some(n)) => names.push(n),
            ("--batch", Some(n)) => {
                cfg.transmission.max_batch = n.parse().unwrap_or_else(|_| fail("bad --batch"))
            }
            ("--workers", Some(n)) => cfg.transmission.workers = n.parse().unwrap_or_else(|_| fail("bad --workers")),
            _ => fail("usage: nbd-serve [--unix PATH] [--tcp ADDR] [--size N[K|M|G]] [--export NAME]... [--workers N] [--batch N]"),
        }
    }
    if names.is_empty() {
        names.push(String::new());
    }
    let mut t = StaticExports::new();
    for n in &names {
        t = t.with_export(
            n.clone(),
            format!("in-memory export {n}"),
            Arc::new(MemBackend::new(size)),
        );
    }
    // Block the signals in every thread (threads inherit the mask) and wait for them here.
    // SAFETY: plain libc calls on a local, initialised sigset.
    let set = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    };
    let h =
        ServerHandle::start(Arc::new(t), cfg, &listen).unwrap_or_else(|e| fail(&format!("{e}")));
    println!("ready");
    let _ = std::io::stdout().flush();
    let mut sig = 0;
    // SAFETY: `set` is initialised and `sig` is a valid out-pointer.
    unsafe { libc::sigwait(&set, &mut sig) };
    eprintln!("{:?}", h.all_stats());
    h.shutdown();
}

fn fail(msg: &str) -> ! {
    eprintln!("nbd-serve: {msg}");
    std::process::exit(2)
}
