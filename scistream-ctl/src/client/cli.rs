//! Command line of `s2uc`, with SciStream 1.2's commands and flags
//! (`--snake_case` and `--kebab-case` both accepted).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::builder::BoolishValueParser;
use clap::{ArgAction, Args, Parser, Subcommand};
use serde::Serialize;

use super::auth::OAuthFlags;
use super::{status_error, tunnel_keys, Connection};
use crate::control::tunnel_key::{self, KEY_LEN};

#[derive(Parser, Debug)]
#[command(
    name = "s2uc",
    version,
    about = "scistream-rs user client: sets up streaming sessions on s2cs gateways"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    #[command(flatten)]
    pub oauth: OAuthFlags,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Reserve listeners on the producer-side gateway that forward to the producer app.
    #[command(name = "inbound-request", alias = "inbound_request")]
    Inbound(InboundArgs),
    /// Open listeners on the consumer-side gateway that tunnel to the inbound gateway.
    #[command(name = "outbound-request", alias = "outbound_request")]
    Outbound(OutboundArgs),
    /// Release a session on one gateway.
    Release(ReleaseArgs),
    /// Request a producer-side session and wait for the producer app's own hello.
    #[command(name = "prod-req", alias = "prod_req")]
    ProdReq(ProdReqArgs),
    /// List the sessions of one gateway with their connections and bytes.
    List(ListArgs),
    /// Show one session; `--watch` refreshes it in place with live rates.
    Status(StatusArgs),
    /// Log in (OAuth2 authorization code with PKCE) and store tokens for a scope.
    Login(LoginArgs),
    /// Revoke every stored token at the server and delete them.
    Logout,
    /// Show the stored tokens' scope, identity and expiry.
    #[command(name = "check-auth", alias = "check_auth")]
    CheckAuth(CheckAuthArgs),
}

#[derive(Args, Debug)]
pub struct ListArgs {
    #[command(flatten)]
    pub conn: Conn,
}

#[derive(Args, Debug)]
pub struct StatusArgs {
    #[command(flatten)]
    pub conn: Conn,
    pub uid: String,
    /// Keep refreshing until the session is released (Ctrl-C to stop).
    #[arg(long)]
    pub watch: bool,
    /// Seconds between refreshes with --watch.
    #[arg(long, default_value_t = 1.0)]
    pub interval: f64,
}

#[derive(Args, Debug)]
pub struct LoginArgs {
    /// Scope of the s2cs to use (its Globus client id, or a full scope).
    /// Default: every scope config.toml's [servers] names.
    #[arg(long)]
    pub scope: Option<String>,
}

#[derive(Args, Debug)]
pub struct CheckAuthArgs {
    /// Show this scope's token (a Globus client id or a full scope).
    #[arg(long, conflicts_with = "ip")]
    pub scope: Option<String>,
    /// Show the token for the scope config.toml maps this s2cs address to.
    #[arg(long)]
    pub ip: Option<String>,
    /// Also print the access token itself.
    #[arg(long = "show-token", alias = "show_token")]
    pub show_token: bool,
}

#[derive(Args, Debug, Clone)]
pub struct Conn {
    /// The s2cs control address, host:port.
    #[arg(long, default_value = "localhost:5000")]
    pub s2cs: String,
    /// PEM certificate (or CA) to verify s2cs with; default ./server.crt.
    #[arg(long = "server_cert", alias = "server-cert")]
    pub server_cert: Option<PathBuf>,
    /// `false` for an s2cs started with --ssl false.
    #[arg(long, default_value = "true", action = ArgAction::Set, num_args = 0..=1,
          default_missing_value = "true", value_parser = BoolishValueParser::new())]
    pub ssl: bool,
    /// Scope whose token to send (from `s2uc login`); a bare Globus client id
    /// means its scistream scope. Default: the scope config.toml maps --s2cs to.
    #[arg(long)]
    pub scope: Option<String>,
    /// Print one JSON object {"uid", "listeners", "prod_listeners"} instead of
    /// text (inbound-request adds "tunnel_key" when the gateway made one).
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct InboundArgs {
    #[command(flatten)]
    pub conn: Conn,
    /// Address of the producer app, as seen from the inbound gateway.
    #[arg(long = "remote_ip", alias = "remote-ip")]
    pub remote_ip: std::net::IpAddr,
    /// Producer app port(s), comma-separated.
    #[arg(
        long = "receiver_ports",
        alias = "receiver-ports",
        value_delimiter = ',',
        required = true
    )]
    pub receiver_ports: Vec<u16>,
    #[arg(long = "num_conn", alias = "num-conn", default_value_t = 5)]
    pub num_conn: i32,
    /// Rate in kbit/s (recorded by the server).
    #[arg(long, default_value_t = 10000)]
    pub rate: i32,
    /// Sources (ip or ip/len, comma-separated) that may reach the session's
    /// listeners; the gateway's XDP guard drops and counts the rest. Default: any.
    #[arg(long = "allowed_peers", alias = "allowed-peers", value_delimiter = ',')]
    pub allowed_peers: Vec<String>,
    /// Accepted for SciStream compatibility; does nothing.
    #[arg(long, hide = true)]
    pub mock: bool,
}

#[derive(Args, Debug)]
pub struct OutboundArgs {
    #[command(flatten)]
    pub conn: Conn,
    /// Session uid printed by inbound-request.
    pub uid: String,
    /// The inbound gateway's listeners, comma-separated (printed by inbound-request).
    pub prod_listeners: String,
    /// Accepted for SciStream compatibility (sent in the hello).
    #[arg(long = "remote_ip", alias = "remote-ip")]
    pub remote_ip: Option<std::net::IpAddr>,
    #[arg(
        long = "receiver_ports",
        alias = "receiver-ports",
        value_delimiter = ','
    )]
    pub receiver_ports: Vec<u16>,
    #[arg(long = "num_conn", alias = "num-conn", default_value_t = 5)]
    pub num_conn: i32,
    #[arg(long, default_value_t = 10000)]
    pub rate: i32,
    /// Sources (ip or ip/len, comma-separated) that may reach the session's
    /// listeners; the gateway's XDP guard drops and counts the rest. Default: any.
    #[arg(long = "allowed_peers", alias = "allowed-peers", value_delimiter = ',')]
    pub allowed_peers: Vec<String>,
    /// The session's tunnel key (64 hex digits) from inbound-request's --json
    /// output or its key file. Default: the key inbound-request kept for this
    /// uid under this account (~/.config/scistream/tunnel-keys/); none for a session whose
    /// inbound gateway made none (SciStream 1.2, StunnelSubprocess).
    #[arg(
        long = "tunnel_key",
        alias = "tunnel-key",
        env = "S2UC_TUNNEL_KEY",
        hide_env_values = true
    )]
    pub tunnel_key: Option<String>,
    #[arg(long, hide = true)]
    pub mock: bool,
}

#[derive(Args, Debug)]
pub struct ReleaseArgs {
    #[command(flatten)]
    pub conn: Conn,
    pub uid: String,
}

#[derive(Args, Debug)]
pub struct ProdReqArgs {
    #[command(flatten)]
    pub conn: Conn,
    #[arg(long = "num_conn", alias = "num-conn", default_value_t = 5)]
    pub num_conn: i32,
    #[arg(long, default_value_t = 10000)]
    pub rate: i32,
    #[arg(long, hide = true)]
    pub mock: bool,
}

#[derive(Serialize)]
struct Outcome<'a> {
    uid: &'a str,
    listeners: &'a [String],
    prod_listeners: &'a [String],
    /// Only in JSON, for scripts that run outbound-request elsewhere.
    #[serde(skip_serializing_if = "Option::is_none")]
    tunnel_key: Option<String>,
}

impl Outcome<'_> {
    fn print(&self, json: bool) {
        if json {
            println!("{}", serde_json::to_string(self).unwrap_or_default());
            return;
        }
        println!("uid: {}", self.uid);
        for p in self.prod_listeners {
            println!("prod_listeners: {p:?}");
        }
        // Last, as in the SciStream tutorial: what the other side needs.
        for l in self.listeners {
            println!("listeners: {l:?}");
        }
    }
}

const CALL_TIMEOUT: Duration = Duration::from_secs(60);

async fn open(c: &Conn, oauth: &OAuthFlags, timeout: Duration) -> anyhow::Result<Connection> {
    let cert = c.server_cert.clone().or_else(|| {
        let d = PathBuf::from("server.crt");
        d.is_file().then_some(d)
    });
    // With no config directory at all (no HOME), only an explicit --scope
    // needs one; otherwise there is simply no token, as before login existed.
    let token = if c.scope.is_none() && super::auth::config_dir().is_err() {
        None
    } else {
        auth_context(oauth)?
            .token_for(&c.s2cs, c.scope.as_deref())
            .await
            .context("token")?
    };
    Connection::open(&c.s2cs, cert.as_deref(), c.ssl, token, timeout).await
}

fn auth_context(oauth: &OAuthFlags) -> anyhow::Result<super::auth::Context> {
    super::auth::Context::load(oauth).context("configuration")
}

fn new_uid() -> String {
    uuid::Uuid::new_v4().hyphenated().to_string()
}

/// Keeps the tunnel key a PROD `req` was answered with (or that there was
/// none) for `outbound-request`; returns it in hex for `--json`.
fn keep_tunnel_key(uid: &str, got: &[u8], json: bool) -> anyhow::Result<Option<String>> {
    let key: Option<[u8; KEY_LEN]> = match got.len() {
        0 => None,
        KEY_LEN => got.try_into().ok(),
        n => anyhow::bail!("s2cs answered with a tunnel key of {n} bytes, not {KEY_LEN}"),
    };
    let hex = key.map(|k| tunnel_key::hex(&k));
    match tunnel_keys::dir().and_then(|d| Ok(tunnel_keys::save(&d, uid, key.as_ref())?)) {
        Ok(path) if key.is_some() && !json => {
            eprintln!(
                "s2uc: tunnel key kept in {} for outbound-request (elsewhere: --tunnel_key)",
                path.display()
            )
        }
        Ok(_) => {}
        Err(e) => {
            if let Some(h) = hex.as_deref().filter(|_| !json) {
                eprintln!("s2uc: warning: cannot keep the tunnel key ({e:#}); give it to outbound-request: --tunnel_key {h}");
            }
        }
    }
    Ok(hex)
}

/// The key `outbound-request` sends: `--tunnel_key`, else the one
/// inbound-request kept for this uid.
fn tunnel_key_for(uid: &str, given: Option<&str>) -> anyhow::Result<Option<[u8; KEY_LEN]>> {
    if let Some(h) = given {
        return tunnel_key::parse_hex_key(h)
            .map(Some)
            .ok_or_else(|| anyhow::anyhow!("--tunnel_key must be {} hex digits", 2 * KEY_LEN));
    }
    let dir = tunnel_keys::dir().ok();
    match dir.as_deref().map(|d| tunnel_keys::load(d, uid)) {
        Some(tunnel_keys::Stored::Key(k)) => Ok(Some(k)),
        Some(tunnel_keys::Stored::NoKey) => Ok(None),
        _ => {
            eprintln!(
                "s2uc: note: no tunnel key kept for {uid} here; the tunnel is keyed by the uid alone, which matches an inbound session made by SciStream 1.2's s2uc or on a StunnelSubprocess gateway. For one made by this s2uc on another machine or account, pass its --tunnel_key."
            );
            Ok(None)
        }
    }
}

pub async fn run(cli: Cli) -> anyhow::Result<()> {
    let oauth = &cli.oauth;
    match cli.command {
        Command::Inbound(a) => {
            let conn = open(&a.conn, oauth, CALL_TIMEOUT)
                .await?
                .with_allowed_peers(&a.allowed_peers)
                .wanting_tunnel_key();
            let uid = new_uid();
            let producers: Vec<String> = a
                .receiver_ports
                .iter()
                .map(|p| std::net::SocketAddr::new(a.remote_ip, *p).to_string())
                .collect();
            if !a.conn.json {
                println!(
                    "uid; s2cs; role\n{uid} {} PROD\nwaiting for hello message",
                    a.conn.s2cs
                );
            }
            let resp = conn
                .req_with_hello(&uid, "PROD", a.num_conn, a.rate, &producers, "PROD")
                .await?;
            let upd = conn
                .update(&uid, &resp.prod_listeners, "PROD")
                .await
                .map_err(|s| status_error(&conn.target, "update", &s))?;
            let tunnel_key = keep_tunnel_key(&uid, &resp.tunnel_key, a.conn.json)?;
            Outcome {
                uid: &uid,
                listeners: &resp.listeners,
                prod_listeners: &upd.prod_listeners,
                tunnel_key,
            }
            .print(a.conn.json);
        }
        Command::Outbound(a) => {
            let uid =
                crate::control::session::parse_uid(&a.uid).map_err(|e| anyhow::anyhow!("{e}"))?;
            let key = tunnel_key_for(&uid, a.tunnel_key.as_deref())?;
            let conn = open(&a.conn, oauth, CALL_TIMEOUT)
                .await?
                .with_allowed_peers(&a.allowed_peers)
                .with_tunnel_key(key.as_ref().map(|k| &k[..]));
            let remote = crate::addr::parse_addr_list(&a.prod_listeners)
                .map_err(|e| anyhow::anyhow!("PROD_LISTENERS: {e}"))?;
            let hello_addrs: Vec<String> = match a.remote_ip {
                Some(ip) => a
                    .receiver_ports
                    .iter()
                    .map(|p| std::net::SocketAddr::new(ip, *p).to_string())
                    .collect(),
                None => Vec::new(),
            };
            let resp = conn
                .req_with_hello(&uid, "CONS", a.num_conn, a.rate, &hello_addrs, "CONS")
                .await?;
            let upd = conn
                .update(&uid, &crate::addr::to_strings(&remote), "CONS")
                .await
                .map_err(|s| status_error(&conn.target, "update", &s))?;
            Outcome {
                uid: &uid,
                listeners: &resp.listeners,
                prod_listeners: &upd.prod_listeners,
                tunnel_key: None,
            }
            .print(a.conn.json);
        }
        Command::List(a) => {
            let conn = open(&a.conn, oauth, CALL_TIMEOUT).await?;
            super::observe::list(&conn, a.conn.json).await?;
        }
        Command::Status(a) => {
            let conn = open(&a.conn, oauth, CALL_TIMEOUT).await?;
            let every = Duration::from_secs_f64(a.interval.clamp(0.1, 3600.0));
            super::observe::status(&conn, &a.uid, a.watch, every, a.conn.json).await?;
        }
        Command::Release(a) => {
            let conn = open(&a.conn, oauth, CALL_TIMEOUT).await?;
            conn.release(&a.uid)
                .await
                .map_err(|s| status_error(&conn.target, "release", &s))?;
            if a.conn.json {
                println!("{}", serde_json::json!({"uid": a.uid, "released": true}));
            } else {
                println!("Release completed");
            }
        }
        Command::ProdReq(a) => {
            // The producer app sends the hello itself; wait as long as the server does.
            let conn = open(&a.conn, oauth, Duration::from_secs(200))
                .await?
                .wanting_tunnel_key();
            let uid = new_uid();
            if !a.conn.json {
                println!(
                    "uid; s2cs; role\n{uid} {} PROD\nwaiting for hello message",
                    a.conn.s2cs
                );
            }
            let resp = conn
                .req(&uid, "PROD", a.num_conn, a.rate)
                .await
                .map_err(|s| status_error(&conn.target, "req", &s))?;
            let upd = conn
                .update(&uid, &resp.prod_listeners, "PROD")
                .await
                .map_err(|s| status_error(&conn.target, "update", &s))?;
            let tunnel_key = keep_tunnel_key(&uid, &resp.tunnel_key, a.conn.json)?;
            Outcome {
                uid: &uid,
                listeners: &resp.listeners,
                prod_listeners: &upd.prod_listeners,
                tunnel_key,
            }
            .print(a.conn.json);
        }
        Command::Login(a) => auth_context(oauth)?
            .login(a.scope.as_deref())
            .await
            .context("login")?,
        Command::Logout => auth_context(oauth)?.logout().await.context("logout")?,
        Command::CheckAuth(a) => auth_context(oauth)?
            .check_auth(a.scope.as_deref(), a.ip.as_deref(), a.show_token)
            .context("check-auth")?,
    }
    Ok(())
}

/// Entry point of the binary: one error line and exit code 1 on failure.
pub fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("s2uc: error: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)).context("") {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("s2uc: error: {:#}", e.root_cause_chain());
            std::process::ExitCode::FAILURE
        }
    }
}

trait RootCauseChain {
    fn root_cause_chain(&self) -> String;
}
impl RootCauseChain for anyhow::Error {
    fn root_cause_chain(&self) -> String {
        self.chain()
            .skip(1)
            .map(|e| e.to_string())
            .collect::<Vec<_>>()
            .join(": ")
    }
}
