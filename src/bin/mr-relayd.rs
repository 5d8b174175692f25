//! `mr-relayd`: a relay daemon. Receives segments from the peers of any number of jobs, sums
//! them in rank order and sends the sums back; forwards broadcast chunks. Runs in the
//! foreground, logs to stderr (`MR_LOG`, default `info` here), stops cleanly on SIGINT/SIGTERM.

use clap::Parser;
use mapreduce::relay::server::{Relay, RelayConfig};
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

#[derive(Parser, Debug)]
#[command(name = "mr-relayd", version, about = "mapreduce relay daemon")]
struct Args {
    /// Address to listen on (port 0 picks a free port; the log names it).
    #[arg(long)]
    listen: SocketAddr,
    /// Validator to register with (not yet supported: logged and ignored).
    #[arg(long)]
    validator: Option<String>,
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
    let hex = match (&args.token, &args.token_file) {
        (Some(t), _) => t.clone(),
        (None, Some(f)) => std::fs::read_to_string(f).map_err(|e| {
            mapreduce::Error::io(format!("cannot read token file {}", f.display()), e)
        })?,
        (None, None) => {
            return Err(mapreduce::Error::invalid(
                "a job token is required: pass --token HEX or --token-file FILE",
            ))
        }
    };
    let token = mapreduce::config::parse_hex("token", &hex)?;
    if token.is_empty() {
        return Err(mapreduce::Error::invalid("the job token is empty"));
    }
    if let Some(v) = &args.validator {
        log::warn!("--validator {v}: registering with a validator is not yet supported; serving static jobs only");
    }
    let mut relay = Relay::bind(
        RelayConfig {
            listen: args.listen,
            token,
            max_memory: args.max_memory,
            status_interval: Duration::from_secs(args.status_secs.max(1)),
        },
        true,
    )?;
    log::info!(
        "listening on {} (max memory {} bytes)",
        relay.local_addr()?,
        args.max_memory
    );
    relay.run()
}
