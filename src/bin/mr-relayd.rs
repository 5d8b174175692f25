//! `mr-relayd`: a relay daemon. Receives segments from the peers of any number of jobs, sums
//! them in rank order and sends the sums back; forwards broadcast chunks. Runs in the
//! foreground, logs to stderr (`MR_LOG`, default `info` here), stops cleanly on SIGINT/SIGTERM.
//!
//! `mr-relayd token --job-token-file F --relay HOST:PORT` prints the token of the static relay
//! that jobs name `HOST:PORT` in `MR_RELAYS`: run it where the job's secret is kept and give
//! the relay only the printed token (`--token`/`--token-file`).

use clap::Parser;
use mapreduce::relay::limits::Limits;
use mapreduce::relay::registration::{Grants, Registration};
use mapreduce::relay::server::{Relay, RelayConfig};
use mapreduce::validator::identity::Identity;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

#[derive(Parser, Debug)]
#[command(
    name = "mr-relayd",
    version,
    about = "mapreduce relay daemon",
    args_conflicts_with_subcommands = true
)]
struct Args {
    #[command(subcommand)]
    command: Option<Command>,
    /// Address to listen on (port 0 picks a free port; the log names it).
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Validator to register with: it assigns jobs (with their own tokens) to this relay.
    /// Repeat it to serve several validators.
    #[arg(long)]
    validator: Vec<String>,
    /// The relay's identity key (sr25519 seed in hex, or a Bittensor hotkey file), created
    /// with mode 0600 on first start; the relay's id is its public key.
    #[arg(long, default_value = "mr-relayd.key")]
    key_file: std::path::PathBuf,
    /// The validator's public key (hex); when given, the validator must prove it. With several
    /// `--validator`s, give one key per validator in the same order.
    #[arg(long)]
    validator_key: Vec<String>,
    /// Address peers should connect to (default: the listening address).
    #[arg(long)]
    advertise: Option<String>,
    /// Milliseconds between heartbeats to the validator.
    #[arg(long, default_value_t = 2000)]
    heartbeat_ms: u64,
    /// Most memory, in bytes, that admitted jobs may reserve together.
    #[arg(long, default_value_t = 2 << 30)]
    max_memory: usize,
    /// This relay's token (hex) that peers must prove knowledge of (`mr-relayd token` derives
    /// it from the job secret; the relay never needs the secret itself).
    #[arg(long, conflicts_with = "token_file")]
    token: Option<String>,
    /// File holding this relay's token (hex).
    #[arg(long)]
    token_file: Option<std::path::PathBuf>,
    /// Seconds between status lines.
    #[arg(long, default_value_t = 10)]
    status_secs: u64,
    /// Most bytes per second the relay sends over all its connections (e.g. 125M, 1gbit);
    /// default: no cap.
    #[arg(long, value_parser = parse_rate)]
    max_rate: Option<u64>,
    /// Most memory, in bytes, one job may reserve (default: half of --max-memory).
    #[arg(long)]
    max_job_memory: Option<usize>,
    /// Most connections waiting to authenticate; a new one beyond it evicts the oldest.
    #[arg(long, default_value_t = 256)]
    max_unauthenticated: usize,
    /// Seconds a new connection has to authenticate.
    #[arg(long, default_value_t = 10)]
    handshake_timeout_secs: u64,
    /// Seconds a connection may pause in the middle of a frame.
    #[arg(long, default_value_t = 20)]
    frame_timeout_secs: u64,
    /// Seconds a job may go without a data frame (and a peer without reading what it was
    /// sent) before its connections are closed and its memory reservation released.
    #[arg(long, default_value_t = 300)]
    idle_timeout_secs: u64,
    /// Seconds between summary lines for refused connections beyond the first few.
    #[arg(long, default_value_t = 10)]
    reject_log_secs: u64,
}

#[derive(clap::Subcommand, Debug)]
enum Command {
    /// Print the token of a static relay, derived one-way from the job secret (`MR_TOKEN`)
    /// and the relay's address exactly as the job writes it in `MR_RELAYS`.
    Token {
        /// The job secret (hex), as in `MR_TOKEN`.
        #[arg(
            long,
            conflicts_with = "job_token_file",
            required_unless_present = "job_token_file"
        )]
        job_token: Option<String>,
        /// File holding the job secret (hex).
        #[arg(long)]
        job_token_file: Option<std::path::PathBuf>,
        /// The relay's address as written in `MR_RELAYS` (e.g. `relay1.example.org:7000`).
        #[arg(long)]
        relay: String,
    },
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

fn read_hex(hex: Option<&String>, file: Option<&std::path::PathBuf>) -> mapreduce::Result<String> {
    match (hex, file) {
        (Some(t), _) => Ok(t.clone()),
        (None, Some(f)) => std::fs::read_to_string(f).map_err(|e| {
            mapreduce::Error::io(format!("cannot read token file {}", f.display()), e)
        }),
        (None, None) => Ok(String::new()),
    }
}

fn run(args: Args) -> mapreduce::Result<()> {
    if let Some(Command::Token {
        job_token,
        job_token_file,
        relay,
    }) = &args.command
    {
        let secret = mapreduce::config::parse_hex(
            "job token",
            &read_hex(job_token.as_ref(), job_token_file.as_ref())?,
        )?;
        if secret.is_empty() {
            return Err(mapreduce::Error::invalid("the job token is empty"));
        }
        let token = mapreduce::wire::relay_token(&secret, relay.trim());
        println!("{}", mapreduce::config::to_hex(&token));
        return Ok(());
    }
    let listen = args
        .listen
        .ok_or_else(|| mapreduce::Error::invalid("--listen ADDR is required to run a relay"))?;
    let hex =
        match (&args.token, &args.token_file) {
            (Some(t), _) => t.clone(),
            (None, Some(f)) => std::fs::read_to_string(f).map_err(|e| {
                mapreduce::Error::io(format!("cannot read token file {}", f.display()), e)
            })?,
            // With a validator, jobs bring their own tokens; a static token is optional.
            (None, None) if !args.validator.is_empty() => String::new(),
            (None, None) => return Err(mapreduce::Error::invalid(
                "a job token is required: pass --token HEX or --token-file FILE (or --validator)",
            )),
        };
    let token = mapreduce::config::parse_hex("token", &hex)?;
    if token.is_empty() && args.validator.is_empty() {
        return Err(mapreduce::Error::invalid("the job token is empty"));
    }
    if !args.validator_key.is_empty() && args.validator_key.len() != args.validator.len() {
        return Err(mapreduce::Error::invalid(format!(
            "{} --validator-key for {} --validator: give one key per validator, in order",
            args.validator_key.len(),
            args.validator.len()
        )));
    }
    let identity = match args.validator.is_empty() {
        false => Some(Arc::new(Identity::load_or_create(&args.key_file, "relay")?)),
        true => None,
    };
    let grants = identity.as_ref().map(|id| Grants::new(Some(id.clone())));
    let secs = |s: u64| Duration::from_secs(s.max(1));
    let limits = Limits {
        max_unauthenticated: args.max_unauthenticated.max(1),
        max_job_memory: args.max_job_memory.unwrap_or(args.max_memory / 2),
        handshake_timeout: secs(args.handshake_timeout_secs),
        frame_timeout: secs(args.frame_timeout_secs),
        idle_timeout: secs(args.idle_timeout_secs),
        reject_log_interval: secs(args.reject_log_secs),
    };
    let mut relay = Relay::bind(
        RelayConfig {
            listen,
            token,
            grants: grants.clone(),
            max_memory: args.max_memory,
            status_interval: Duration::from_secs(args.status_secs.max(1)),
            limits,
            max_rate: args.max_rate,
        },
        true,
    )?;
    let local = relay.local_addr()?;
    log::info!(
        "listening on {local} (max memory {} bytes)",
        args.max_memory
    );
    if let (Some(grants), Some(identity)) = (grants, identity) {
        for (i, v) in args.validator.iter().enumerate() {
            let validator_key = args
                .validator_key
                .get(i)
                .map(|k| mapreduce::validator::identity::parse_public("--validator-key", k))
                .transpose()?;
            let reg = Registration {
                validator: v.clone(),
                validator_key,
                identity: identity.clone(),
                bind: Some(local.ip()),
                advertise: args.advertise.clone().unwrap_or_else(|| local.to_string()),
                capacity: args.max_memory as u64,
                heartbeat: Duration::from_millis(args.heartbeat_ms.max(10)),
                grants: grants.clone(),
            };
            log::info!("relay id {}: registering with validator {v}", reg.id());
            reg.spawn();
        }
    }
    relay.run()
}

fn parse_rate(s: &str) -> std::result::Result<u64, String> {
    mapreduce::pace::parse_rate(s).ok_or_else(|| {
        format!("{s:?} is not a rate: bytes per second, e.g. 125000000, 125M or 1gbit")
    })
}
