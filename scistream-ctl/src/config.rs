//! Command-line configuration of `s2cs`. Every SciStream 1.2 flag is accepted in
//! its original `--snake_case` spelling and in `--kebab-case`.

use std::net::IpAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use clap::builder::BoolishValueParser;
use clap::{ArgAction, Parser};

/// Largest `num_conn` one request may ask for; it bounds what one client can
/// take from the port range in a single call.
pub const MAX_NUM_CONN: i32 = 128;

/// Upper bounds of the duration flags, checked at parse: a larger value is
/// an operator's mistake, and an `Instant` that far ahead overflows (a panic
/// on the first connection) or outruns tokio's timer.
pub const MAX_TIMEOUT_SECS: u64 = 3_600;
pub const MAX_LONG_SECS: u64 = 86_400;
pub const MAX_TTL_SECS: u64 = 365 * 86_400;

fn secs_up_to(max: u64) -> clap::builder::RangedU64ValueParser<u64> {
    clap::value_parser!(u64).range(0..=max)
}

/// The data-plane backend (`--type`). SciStream 1.2's subprocess names run the
/// real programs; its Docker names map onto the native backends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackendKind {
    /// TLS 1.3 between the gateways (default).
    Tls,
    /// Plaintext TCP moved with splice(2).
    Splice,
    /// Plaintext TCP moved inside the kernel by an sk_skb sockmap redirect.
    Sockmap,
    /// The real stunnel per session (PSK, AEAD only), pairs with SciStream 1.2.
    StunnelSubprocess,
    /// The real HAProxy per session (plaintext TCP), as SciStream 1.2.
    HaproxySubprocess,
    /// Plaintext, not terminated: an eBPF NAT (XDP or tc per interface)
    /// rewrites packets and sends them on.
    Xdp,
}

impl FromStr for BackendKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "tls" | "stunnel" => Ok(Self::Tls),
            "splice" | "haproxy" | "nginx" => Ok(Self::Splice),
            "stunnelsubprocess" => Ok(Self::StunnelSubprocess),
            "haproxysubprocess" => Ok(Self::HaproxySubprocess),
            "sockmap" => Ok(Self::Sockmap),
            // The eBPF NAT: XDP on NICs, tc on virtual interfaces.
            "xdp" | "ebpf" => Ok(Self::Xdp),
            other => Err(format!(
                "unknown --type {other:?}; choose tls (default; also Stunnel), splice (also Haproxy, Nginx), \
                 sockmap or xdp (also ebpf; need root), StunnelSubprocess or HaproxySubprocess (run the real programs)"
            )),
        }
    }
}

impl BackendKind {
    pub fn name(self) -> &'static str {
        match self {
            Self::Tls => "tls",
            Self::Splice => "splice",
            Self::Sockmap => "sockmap",
            Self::StunnelSubprocess => "StunnelSubprocess",
            Self::HaproxySubprocess => "HaproxySubprocess",
            Self::Xdp => "xdp",
        }
    }
}

/// An inclusive `start-end` port range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortRange {
    pub start: u16,
    pub end: u16,
}

impl FromStr for PortRange {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("invalid port range {s:?}: expected start-end, e.g. 5100-5200");
        let (a, b) = s.split_once('-').ok_or_else(bad)?;
        let start: u16 = a.trim().parse().map_err(|_| bad())?;
        let end: u16 = b.trim().parse().map_err(|_| bad())?;
        if start == 0 || start > end {
            return Err(format!("invalid port range {s:?}: need 1 <= start <= end"));
        }
        Ok(Self { start, end })
    }
}

impl std::fmt::Display for PortRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.start, self.end)
    }
}

#[derive(Parser, Debug, Clone)]
#[command(
    name = "s2cs",
    version,
    about = "scistream-rs control server: negotiates streaming sessions and runs their data plane"
)]
pub struct ServerArgs {
    /// Address advertised in listener strings and used for data listeners.
    #[arg(long = "listener_ip", alias = "listener-ip", default_value = "0.0.0.0")]
    pub listener_ip: IpAddr,

    /// Control (gRPC) port.
    #[arg(long, default_value_t = 5000)]
    pub port: u16,

    /// Address the control server binds (all interfaces by default, as SciStream).
    #[arg(long = "control_ip", alias = "control-ip", default_value = "::")]
    pub control_ip: IpAddr,

    /// Data listener ports, inclusive.
    #[arg(long = "port_range", alias = "port-range", default_value = "5100-5200")]
    pub port_range: PortRange,

    /// Data-plane backend: tls | splice | sockmap | xdp | StunnelSubprocess | HaproxySubprocess (the
    /// last two run the real programs; SciStream's Stunnel, Haproxy, Nginx map to tls/splice).
    #[arg(long = "type", default_value = "tls")]
    pub backend: BackendKind,

    /// PEM certificate (chain) of this server. Without it, ./server.crt is used
    /// when present, else a self-signed certificate is made in --state_dir.
    #[arg(long = "server_crt", alias = "server-crt")]
    pub server_crt: Option<PathBuf>,

    /// PEM private key matching --server_crt.
    #[arg(long = "server_key", alias = "server-key")]
    pub server_key: Option<PathBuf>,

    /// `false` serves the control channel in plaintext (for tests only).
    #[arg(long, default_value = "true", action = ArgAction::Set, num_args = 0..=1,
          default_missing_value = "true", value_parser = BoolishValueParser::new())]
    pub ssl: bool,

    /// CA (or the peer gateway's own certificate) that the outbound side uses to
    /// verify the inbound gateway's tunnel certificate. Without it the tunnel is
    /// encrypted but the peer is not verified (a warning is printed).
    #[arg(long = "peer_ca", alias = "peer-ca")]
    pub peer_ca: Option<PathBuf>,

    /// Where s2cs keeps generated certificates (default /var/lib/scistream as
    /// root, else $XDG_STATE_HOME/scistream).
    #[arg(long = "state_dir", alias = "state-dir")]
    pub state_dir: Option<PathBuf>,

    /// Allows backends not yet safe for production (`sockmap`: it has been
    /// seen to truncate a stream under load).
    #[arg(long)]
    pub experimental: bool,

    /// Caps each session at the `rate` (kbit/s) of its request, by pacing the
    /// sockets s2cs writes to; without it the rate is only recorded and shown.
    #[arg(long = "enforce_rate", alias = "enforce-rate")]
    pub enforce_rate: bool,

    /// Seconds a tunnel peer has for the TLS handshake plus the session proof;
    /// a slow or silent peer cannot hold a connection slot longer.
    #[arg(long = "tunnel_timeout", alias = "tunnel-timeout", default_value_t = 10, value_parser = secs_up_to(MAX_TIMEOUT_SECS))]
    pub tunnel_timeout: u64,

    /// Seconds a control client has, from connecting, to complete the TLS
    /// handshake and send its HTTP/2 preface; a silent one is closed then.
    #[arg(long = "control_timeout", alias = "control-timeout", default_value_t = 10, value_parser = secs_up_to(MAX_TIMEOUT_SECS))]
    pub control_timeout: u64,

    /// Seconds a control connection with no call in flight stays open.
    #[arg(long = "control_idle_timeout", alias = "control-idle-timeout", default_value_t = 300, value_parser = secs_up_to(MAX_LONG_SECS))]
    pub control_idle_timeout: u64,

    /// Most control connections open at once; over it a new one is closed
    /// before its TLS handshake (and a warning logged), so a flood of
    /// connections cannot exhaust s2cs's descriptors or memory.
    #[arg(long = "max_control_connections", alias = "max-control-connections", default_value_t = 256,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_control_connections: u32,

    /// Seconds a `req` waits for its `hello` before the session is released.
    #[arg(long = "hello_timeout", alias = "hello-timeout", default_value_t = 180, value_parser = secs_up_to(MAX_LONG_SECS))]
    pub hello_timeout: u64,

    /// Globus Auth client id of this server (its token scope is
    /// https://auth.globus.org/scopes/<client_id>/scistream).
    #[arg(long = "client_id", alias = "client-id")]
    pub client_id: Option<String>,

    /// Client secret; with it, every call's token is checked by introspection.
    /// Without it authentication is off, as in SciStream.
    #[arg(
        long = "client_secret",
        alias = "client-secret",
        env = "S2CS_CLIENT_SECRET",
        hide_env_values = true
    )]
    pub client_secret: Option<String>,

    /// OAuth2 token introspection endpoint (RFC 7662), e.g. a Keycloak realm's.
    #[arg(long = "introspect_url", alias = "introspect-url", default_value = crate::control::auth::GLOBUS_INTROSPECT_URL)]
    pub introspect_url: String,

    /// Scope a token must carry (default: the Globus scope of --client_id;
    /// a bare client id means its Globus scistream scope).
    #[arg(long = "required_scope", alias = "required-scope")]
    pub required_scope: Option<String>,

    /// Longest time an accepted token is trusted without asking again: the
    /// most a revoked token may still be honoured. 0 asks on every call.
    #[arg(long = "token_cache_secs", alias = "token-cache-secs", default_value_t = 60, value_parser = secs_up_to(MAX_LONG_SECS))]
    pub token_cache_secs: u64,

    /// `false` turns the XDP guard off. On (the default, as root), only the
    /// ports of live sessions in --port_range get through the data
    /// interfaces; the rest is dropped in the driver. Without root or XDP, or
    /// with a range overlapping the ephemeral ports, s2cs warns and runs unguarded.
    #[arg(long, default_value = "true", action = ArgAction::Set, num_args = 0..=1,
          default_missing_value = "true", value_parser = BoolishValueParser::new())]
    pub guard: bool,

    /// Where the guard and the NAT hook into each data interface: `auto`
    /// (XDP in driver mode on physical NICs, tc on virtual interfaces such as
    /// veth, and wherever driver mode is refused), `xdp` or `tc`. Generic
    /// (skb) XDP is never used.
    #[arg(long = "ebpf_attach", alias = "ebpf-attach", value_enum, default_value_t = crate::ebpf::AttachPolicy::Auto)]
    pub ebpf_attach: crate::ebpf::AttachPolicy,

    /// Interfaces the guard attaches to (comma-separated); default: those
    /// holding --listener_ip (every non-loopback one for 0.0.0.0 / ::).
    #[arg(long = "data_iface", alias = "data-iface", value_delimiter = ',')]
    pub data_iface: Option<Vec<String>>,

    /// Serve Prometheus metrics at http://ADDR/metrics (e.g. 127.0.0.1:9100).
    #[arg(long = "metrics_addr", alias = "metrics-addr")]
    pub metrics_addr: Option<std::net::SocketAddr>,

    /// Log format: text (default) or json (one object per line).
    #[arg(long = "log_format", alias = "log-format", default_value = "text", value_parser = ["text", "json"])]
    pub log_format: String,

    /// Debug logging.
    #[arg(short = 'v', long)]
    pub verbose: bool,

    /// TOML file of settings, keys named as these flags (`port_range = "5100-5200"`);
    /// flags given on the command line override it.
    #[arg(long)]
    pub config: Option<PathBuf>,

    /// On SIGTERM/SIGINT keep the stored sessions (their data plane still
    /// stops), so the next start brings them back; without it they are forgotten.
    #[arg(long = "keep_sessions", alias = "keep-sessions")]
    pub keep_sessions: bool,

    /// Seconds a session may move no byte before it is released (0: never).
    #[arg(long = "session_ttl", alias = "session-ttl", default_value_t = 0, value_parser = secs_up_to(MAX_TTL_SECS))]
    pub session_ttl: u64,

    /// Networks (CIDR, comma-separated) `update` may forward to although
    /// they are loopback or link-local, which are refused otherwise. The
    /// gateway's own control, metrics and data ports stay refused.
    #[arg(
        long = "allow_target_nets",
        alias = "allow-target-nets",
        value_delimiter = ','
    )]
    pub allow_target_nets: Option<Vec<crate::control::targets::IpNet>>,

    /// Connections one session's data ports hold at once, per listener
    /// (num_conn): with the default 8, a session of num_conn 4 holds at most
    /// 32. Over it a new connection is closed at once (a flood cannot
    /// exhaust descriptors). Backends tls, splice and sockmap.
    #[arg(long = "max_conn_per_listener", alias = "max-conn-per-listener", default_value_t = 8,
          value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub max_conn_per_listener: u32,

    /// TCP keepalive on both legs of relayed connections: idle seconds
    /// before the first probe (then 6 probes 10 s apart); 0 turns it off.
    #[arg(long = "tcp_keepalive", alias = "tcp-keepalive", default_value_t = 60, value_parser = secs_up_to(MAX_LONG_SECS))]
    pub tcp_keepalive: u64,

    /// HTTP/2 streams (calls) one control connection may have open at once.
    #[arg(long = "max_control_streams", alias = "max-control-streams", default_value_t = 32,
          value_parser = clap::value_parser!(u32).range(4..=1024))]
    pub max_control_streams: u32,

    /// Seconds a control call's request message has to arrive whole, from
    /// its first frame; a slower one is refused (DEADLINE_EXCEEDED) and its
    /// buffer freed.
    #[arg(long = "control_body_timeout", alias = "control-body-timeout", default_value_t = 10, value_parser = secs_up_to(MAX_TIMEOUT_SECS))]
    pub control_body_timeout: u64,

    /// MiB of request bytes all control connections together may hold
    /// before their messages are whole (and their caller authenticated);
    /// past it new bytes fail their call with RESOURCE_EXHAUSTED.
    #[arg(long = "control_buffer_mib", alias = "control-buffer-mib", default_value_t = 16,
          value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub control_buffer_mib: u32,
}

impl ServerArgs {
    pub fn hello_timeout(&self) -> Duration {
        Duration::from_secs(self.hello_timeout)
    }

    pub fn control_timeout(&self) -> Duration {
        Duration::from_secs(self.control_timeout.max(1))
    }

    pub fn control_idle_timeout(&self) -> Duration {
        Duration::from_secs(self.control_idle_timeout.max(1))
    }

    pub fn tunnel_timeout(&self) -> Duration {
        Duration::from_secs(self.tunnel_timeout.max(1))
    }

    pub fn control_body_timeout(&self) -> Duration {
        Duration::from_secs(self.control_body_timeout.max(1))
    }

    pub fn tcp_keepalive(&self) -> Option<Duration> {
        (self.tcp_keepalive > 0).then(|| Duration::from_secs(self.tcp_keepalive))
    }

    /// Every duration s2cs adds to a clock, as it will use it (the fuzz
    /// target checks none can overflow).
    pub fn durations(&self) -> Vec<(&'static str, Duration)> {
        let mut d = vec![
            ("hello_timeout", self.hello_timeout()),
            ("control_timeout", self.control_timeout()),
            ("control_idle_timeout", self.control_idle_timeout()),
            ("tunnel_timeout", self.tunnel_timeout()),
            ("control_body_timeout", self.control_body_timeout()),
            (
                "token_cache_secs",
                Duration::from_secs(self.token_cache_secs),
            ),
            ("session_ttl", Duration::from_secs(self.session_ttl)),
        ];
        d.extend(self.tcp_keepalive().map(|k| ("tcp_keepalive", k)));
        d
    }

    pub fn state_dir(&self) -> PathBuf {
        self.state_dir.clone().unwrap_or_else(default_state_dir)
    }
}

/// `/var/lib/scistream` for root (a system daemon), else the user's state directory.
pub fn default_state_dir() -> PathBuf {
    if nix::unistd::geteuid().is_root() {
        return PathBuf::from("/var/lib/scistream");
    }
    if let Some(x) = std::env::var_os("XDG_STATE_HOME").filter(|v| !v.is_empty()) {
        return PathBuf::from(x).join("scistream");
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."));
    home.join(".local/state/scistream")
}

#[cfg(test)]
#[path = "config_tests.rs"]
mod tests;
