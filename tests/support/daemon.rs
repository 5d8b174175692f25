//! Spawning a daemon (`mr-relayd`, `mr-validator`) for a test: its stderr is collected, and
//! the address it reports in its "listening on ADDR" line is returned.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Start `cmd` with `MR_LOG=debug`; returns the child, its listening address and its log.
pub fn spawn_logged(mut cmd: Command) -> (Child, String, Arc<Mutex<Vec<String>>>) {
    let mut child = cmd
        .env("MR_LOG", "debug")
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn daemon");
    let log = Arc::new(Mutex::new(Vec::new()));
    let (tx, rx) = std::sync::mpsc::channel();
    let stderr = child.stderr.take().unwrap();
    let sink = log.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(|l| l.ok()) {
            if let Some(i) = line.find("listening on ") {
                let addr = line[i + 13..].split(' ').next().unwrap().to_string();
                let _ = tx.send(addr);
            }
            sink.lock().unwrap().push(line);
        }
    });
    let addr = rx
        .recv_timeout(Duration::from_secs(20))
        .expect("daemon did not report its address");
    (child, addr, log)
}

/// Lines of a daemon's `log` so far that contain `needle`.
pub fn count_lines(log: &Mutex<Vec<String>>, needle: &str) -> usize {
    log.lock()
        .unwrap()
        .iter()
        .filter(|l| l.contains(needle))
        .count()
}

/// Whether a line containing `needle` reaches `log` within 10 s (the log is read by another
/// thread, so a line the daemon has written may not be there yet).
pub fn wait_line(log: &Mutex<Vec<String>>, needle: &str) -> bool {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while count_lines(log, needle) == 0 {
        if std::time::Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    true
}
