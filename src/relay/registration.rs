//! A relay's registration with a validator (`mr-relayd --validator`): authenticate with the
//! relay's own key (created on first start, pinned by the validator on first registration),
//! send heartbeats, and install the jobs the validator assigns so the event loop accepts
//! their peers. Reconnects after any failure, so restarts on either side heal.

use crate::error::{Error, Result};
use crate::net::bootstrap::FrameIo;
use crate::validator::proto::{self, Intro, RelayMsg};
use crate::validator::registry::relay_id;
use std::collections::HashMap;
use std::net::TcpStream;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Job tokens granted by the validator: job id → MAC key peers of that job must prove.
pub type JobGrants = Arc<Mutex<HashMap<[u8; 16], [u8; 32]>>>;

/// Most jobs remembered; the oldest grants are forgotten first.
const MAX_GRANTS: usize = 4096;

/// Read the relay key from `path`, or create a fresh one there (mode 0600).
pub fn load_or_create_key(path: &Path) -> Result<Vec<u8>> {
    if path.exists() {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::io(format!("cannot read key file {}", path.display()), e))?;
        return crate::config::parse_hex("relay key", &text);
    }
    let key = crate::wire::nonce();
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| Error::io(format!("cannot create key file {}", path.display()), e))?;
    std::io::Write::write_all(&mut f, crate::config::to_hex(&key).as_bytes())
        .map_err(|e| Error::io(format!("cannot write key file {}", path.display()), e))?;
    log::info!("created relay key {}", path.display());
    Ok(key.to_vec())
}

/// How to register.
#[derive(Clone)]
pub struct Registration {
    pub validator: String,
    pub key: Vec<u8>,
    /// Address peers connect to.
    pub advertise: String,
    pub capacity: u64,
    pub heartbeat: Duration,
    pub grants: JobGrants,
}

impl Registration {
    pub fn id(&self) -> String {
        relay_id(&self.key)
    }

    /// Keep registered in a background thread.
    pub fn spawn(self) {
        std::thread::Builder::new()
            .name("mr-registration".into())
            .spawn(move || {
                let mut enroll = false;
                loop {
                    match self.session(enroll) {
                        Err(e) if e.message.contains("unknown relay") && !enroll => {
                            log::info!(
                                "validator {}: enrolling relay {}",
                                self.validator,
                                self.id()
                            );
                            enroll = true;
                            continue;
                        }
                        Err(e) => log::warn!("validator {}: {e}; retrying", self.validator),
                        Ok(()) => {}
                    }
                    enroll = false;
                    std::thread::sleep(Duration::from_millis(500));
                }
            })
            .expect("spawn registration thread");
    }

    fn session(&self, enroll: bool) -> Result<()> {
        let intro = Intro::Relay {
            id: self.id(),
            addr: self.advertise.clone(),
            capacity: self.capacity,
            free_memory: free_memory().min(self.capacity),
            enroll: enroll.then(|| crate::config::to_hex(&self.key)),
        };
        let mut stream = crate::validator::client::connect(
            &self.validator,
            &intro,
            &crate::wire::mac_key(&self.key),
            Duration::from_secs(10),
        )?;
        log::info!(
            "registered with validator {} as relay {}",
            self.validator,
            self.id()
        );
        let writer = Arc::new(Mutex::new(
            stream
                .try_clone()
                .map_err(|e| Error::io("cloning the validator connection", e))?,
        ));
        let hb_writer = writer.clone();
        let period = self.heartbeat;
        let capacity = self.capacity;
        let grants = self.grants.clone();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let hb_stop = stop.clone();
        let hb = std::thread::spawn(move || {
            while !hb_stop.load(std::sync::atomic::Ordering::SeqCst) {
                let jobs = grants.lock().unwrap_or_else(|e| e.into_inner()).len();
                let msg = RelayMsg::Heartbeat {
                    free_memory: free_memory().min(capacity),
                    jobs,
                };
                if send(&hb_writer, &msg).is_err() {
                    let _ = hb_writer
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .shutdown(std::net::Shutdown::Both);
                    return;
                }
                std::thread::sleep(period);
            }
        });
        let result = self.serve(&mut stream, &writer);
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        let _ = stream.shutdown(std::net::Shutdown::Both);
        let _ = hb.join();
        result
    }

    fn serve(&self, stream: &mut TcpStream, writer: &Arc<Mutex<TcpStream>>) -> Result<()> {
        loop {
            let msg: RelayMsg = proto::recv_json(&mut FrameIo {
                stream,
                deadline: Instant::now() + Duration::from_secs(24 * 3600),
                what: format!("validator {}", self.validator),
            })?;
            match msg {
                RelayMsg::Job { job, token, world } => {
                    let id: [u8; 16] = crate::config::parse_hex("job id", &job)?
                        .try_into()
                        .map_err(|_| Error::remote("job id is not 16 bytes"))?;
                    let token = crate::config::parse_hex("job token", &token)?;
                    {
                        let mut g = self.grants.lock().unwrap_or_else(|e| e.into_inner());
                        if g.len() >= MAX_GRANTS {
                            g.clear();
                        }
                        g.insert(id, crate::wire::mac_key(&token));
                    }
                    log::info!(
                        "job {}: assigned by the validator ({world} peers)",
                        &job[..8]
                    );
                    send(writer, &RelayMsg::JobAck { job })?;
                }
                other => return Err(Error::remote(format!("unexpected message {other:?}"))),
            }
        }
    }
}

fn send(writer: &Arc<Mutex<TcpStream>>, msg: &RelayMsg) -> Result<()> {
    let mut w = writer.lock().unwrap_or_else(|e| e.into_inner());
    proto::send_json(
        &mut FrameIo {
            stream: &mut w,
            deadline: Instant::now() + Duration::from_secs(5),
            what: "validator".into(),
        },
        msg,
    )
}

/// Memory available on this machine (`MemAvailable`), bytes; `u64::MAX` when unknown.
pub fn free_memory() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemAvailable:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(u64::MAX, |kb| kb * 1024)
}
