//! Shared helpers for the relay tests: real `mr-relayd` processes on loopback and whole jobs
//! of communicators in threads.
#![allow(dead_code)]

#[path = "../support/daemon.rs"]
mod daemon;

use mapreduce::{Algo, Comm, Config, UniqueId};
use std::process::{Child, Command};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The job secret of the relay tests' jobs (`MR_TOKEN`); relays get tokens derived from it.
pub const TOKEN: &str = "00112233445566778899aabbccddeeff";

/// The token of the relay at `addr` for jobs with secret `secret` (hex), as `mr-relayd token`
/// prints it.
pub fn relay_token(secret: &str, addr: &str) -> String {
    let secret = mapreduce::config::parse_hex("secret", secret).unwrap();
    mapreduce::config::to_hex(&mapreduce::wire::relay_token(&secret, addr))
}

/// A loopback address with a port that was free a moment ago.
pub fn free_addr() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().to_string()
}

/// A running relay daemon; killed on drop.
pub struct RelayProc {
    pub child: Child,
    pub addr: String,
    pub log: Arc<Mutex<Vec<String>>>,
}

impl RelayProc {
    pub fn start(token: &str) -> RelayProc {
        RelayProc::start_with(token, &[])
    }

    pub fn start_with(token: &str, extra: &[&str]) -> RelayProc {
        RelayProc::start_with_env(token, extra, &[])
    }

    /// As [`RelayProc::start_with`], with extra environment variables (test faults). The
    /// relay listens on a fresh loopback port and holds only its own token for jobs whose
    /// secret is `secret`.
    pub fn start_with_env(secret: &str, extra: &[&str], env: &[(&str, &str)]) -> RelayProc {
        let listen = free_addr();
        RelayProc::spawn(secret, &listen, &listen, extra, env, |_| {})
    }

    /// As [`RelayProc::start_with`], with the relay limited to `nofile` open descriptors.
    pub fn start_with_nofile(secret: &str, extra: &[&str], nofile: u64) -> RelayProc {
        let listen = free_addr();
        RelayProc::spawn(secret, &listen, &listen, extra, &[], |cmd| {
            use std::os::unix::process::CommandExt;
            // SAFETY: the closure runs in the child between fork and exec and only calls
            // setrlimit, which is async-signal-safe.
            unsafe {
                cmd.pre_exec(move || {
                    let lim = libc::rlimit {
                        rlim_cur: nofile,
                        rlim_max: nofile,
                    };
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        })
    }

    /// A relay listening on `listen` whose token is bound to `name`, the address the job
    /// writes in `MR_RELAYS` (a proxy's, say).
    pub fn start_named(secret: &str, listen: &str, name: &str) -> RelayProc {
        RelayProc::spawn(secret, listen, name, &[], &[], |_| {})
    }

    fn spawn(
        secret: &str,
        listen: &str,
        name: &str,
        extra: &[&str],
        env: &[(&str, &str)],
        adjust: impl FnOnce(&mut Command),
    ) -> RelayProc {
        let token = relay_token(secret, name);
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_mr-relayd"));
        cmd.args(["--listen", listen, "--token", &token, "--status-secs", "1"])
            .args(extra)
            .envs(env.iter().copied());
        adjust(&mut cmd);
        let (child, addr, log) = daemon::spawn_logged(cmd);
        RelayProc { child, addr, log }
    }

    /// Wait until a log line contains `needle`.
    pub fn wait_log(&self, needle: &str) -> bool {
        daemon::wait_line(&self.log, needle)
    }

    /// The relay's resident memory (VmRSS), in KiB.
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    }

    /// Log lines containing `needle`.
    pub fn count_log(&self, needle: &str) -> usize {
        daemon::count_lines(&self.log, needle)
    }

    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }
}

impl Drop for RelayProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn relay_config(relays: &[RelayProc], token: &str) -> Config {
    Config {
        timeout: Duration::from_secs(20),
        algo: Algo::Relay,
        relays: relays.iter().map(|r| r.addr.clone()).collect(),
        token: Some(mapreduce::config::parse_hex("token", token).unwrap()),
        chunk_bytes: 64 << 10,
        relay_chunk_bytes: 64 << 10,
        ..Config::default()
    }
}

/// Run `f(comm)` on `n` ranks in threads, each with `cfg`; returns each rank's result.
pub fn run_job<T, F>(n: usize, cfg: Config, f: F) -> Vec<T>
where
    T: Send + 'static,
    F: Fn(Comm) -> T + Send + Sync + Clone + 'static,
{
    let id = UniqueId::new(&cfg).unwrap();
    let handles: Vec<_> = (0..n)
        .map(|r| {
            let cfg = cfg.clone();
            let f = f.clone();
            std::thread::spawn(move || f(Comm::init(n, &id, r, cfg).expect("comm init")))
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

/// Authenticate to the relay at `addr` with the test token, announcing `hello`.
pub fn hello_to(
    addr: &str,
    hello: &mapreduce::relay::JobHello,
) -> mapreduce::Result<std::net::TcpStream> {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    // The relay holds its own token, derived from the job secret and its address.
    let secret = mapreduce::config::parse_hex("t", TOKEN).unwrap();
    let key = mapreduce::wire::mac_key(&mapreduce::wire::relay_token(&secret, addr));
    mapreduce::net::bootstrap::FrameIo {
        stream: &mut s,
        deadline: Instant::now() + Duration::from_secs(5),
        what: "test".into(),
    }
    .client_handshake(&key, &hello.encode())?;
    Ok(s)
}

/// Read until the relay closes the connection (EOF or reset); false if it is still open
/// after `wait`.
pub fn closed_within(s: &mut std::net::TcpStream, wait: Duration) -> bool {
    use std::io::Read;
    s.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let deadline = Instant::now() + wait;
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut =>
            {
                continue
            }
            Err(_) => return true,
        }
    }
    false
}
