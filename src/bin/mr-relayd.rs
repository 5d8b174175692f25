//! `mr-relayd`: a relay daemon. Receives segments from the peers of any number of jobs, sums
//! them in rank order and sends the sums back; forwards broadcast chunks. Runs in the
//! foreground, logs to stderr (`MR_LOG`, default `info` here), stops cleanly on SIGINT/SIGTERM.

use clap::Parser;
use mapreduce::relay::registration::{Grants, Registration};
use mapreduce::relay::server::{Relay, RelayConfig};
use mapreduce::validator::identity::Identity;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

#[derive(Parser, Debug)]
#[command(name = "mr-relayd", version, about = "mapreduce relay daemon")]
struct Args {
    /// Address to listen on (port 0 picks a free port; the log names it).
    #[arg(long)]
    listen: SocketAddr,
    /// Validator to register with: it assigns jobs (with their own tokens) to this relay.
    #[arg(long)]
    validator: Option<String>,
    /// The relay's identity key (sr25519 seed in hex, or a Bittensor hotkey file), created
    /// with mode 0600 on first start; the relay's id is its public key.
    #[arg(long, default_value = "mr-relayd.key")]
    key_file: std::path::PathBuf,
    /// The validator's public key (hex); when given, the validator must prove it.
    #[arg(long)]
    validator_key: Option<String>,
    /// Address peers should connect to (default: the listening address).
    #[arg(long)]
    advertise: Option<String>,
    /// Milliseconds between heartbeats to the validator.
    #[arg(long, default_value_t = 2000)]
    heartbeat_ms: u64,
    /// Most memory, in bytes, that admitted jobs may reserve together.
    #[arg(long, default_value_t = 2 << 30)]
    max_memory: usize,
    /// Job token (hex) that peers must prove knowledge of.
    #[arg(long, conflicts_with = "token_file")]
    token: Option<String>,
    /// File holding the job token (hex).
    #[arg(long)]
    token_file: Option<std::path::PathBuf>,
    /// Seconds between status lines.
    #[arg(long, default_value_t = 10)]
    status_secs: u64,
}

fn main() -> ExitCode {
    let _ = env_logger::Builder::from_env(env_logger::Env::new().filter_or("MR_LOG", "info"))
        .try_init();
    let args = Args::parse();
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            log::error!("{e}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> mapreduce::Result<()> {
    let hex =
        match (&args.token, &args.token_file) {
            (Some(t), _) => t.clone(),
            (None, Some(f)) => std::fs::read_to_string(f).map_err(|e| {
                mapreduce::Error::io(format!("cannot read token file {}", f.display()), e)
            })?,
            // With a validator, jobs bring their own tokens; a static token is optional.
            (None, None) if args.validator.is_some() => String::new(),
            (None, None) => return Err(mapreduce::Error::invalid(
                "a job token is required: pass --token HEX or --token-file FILE (or --validator)",
            )),
        };
    let token = mapreduce::config::parse_hex("token", &hex)?;
    if token.is_empty() && args.validator.is_none() {
        return Err(mapreduce::Error::invalid("the job token is empty"));
    }
    let identity = match &args.validator {
        Some(_) => Some(Arc::new(Identity::load_or_create(&args.key_file, "relay")?)),
        None => None,
    };
    let grants = identity.as_ref().map(|id| Grants::new(Some(id.clone())));
    let mut relay = Relay::bind(
        RelayConfig {
            listen: args.listen,
            token,
            grants: grants.clone(),
            max_memory: args.max_memory,
            status_interval: Duration::from_secs(args.status_secs.max(1)),
        },
        true,
    )?;
    let local = relay.local_addr()?;
    log::info!(
        "listening on {local} (max memory {} bytes)",
        args.max_memory
    );
    if let (Some(v), Some(grants), Some(identity)) = (&args.validator, grants, identity) {
        let validator_key = args
            .validator_key
            .as_deref()
            .map(|k| mapreduce::validator::identity::parse_public("--validator-key", k))
            .transpose()?;
        let reg = Registration {
            validator: v.clone(),
            validator_key,
            identity,
            bind: Some(local.ip()),
            advertise: args.advertise.clone().unwrap_or_else(|| local.to_string()),
            capacity: args.max_memory as u64,
            heartbeat: Duration::from_millis(args.heartbeat_ms.max(10)),
            grants,
        };
        log::info!("relay id {}: registering with validator {v}", reg.id());
        reg.spawn();
    }
    relay.run()
}
