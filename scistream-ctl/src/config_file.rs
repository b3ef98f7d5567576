//! `s2cs --config FILE`: the same settings as the command line, in TOML.
//! Keys are the flags' names (`port_range` or `port-range`); the command line
//! wins over the environment (`S2CS_CLIENT_SECRET`), which wins over the file.
//! A key that is no flag is an error naming it, so a typo never passes silently.
//!
//! The file becomes flags put in front of the command line's and both go
//! through clap once, so a file value is checked exactly like a flag.
//!
//! ```toml
//! listener_ip = "44.205.7.224"
//! port_range = "5100-5200"
//! type = "tls"
//! data_iface = ["eth0", "eth1"]
//! keep_sessions = true
//! ```

use std::ffi::OsString;
use std::path::PathBuf;

use clap::parser::ValueSource;
use clap::{Arg, ArgAction, CommandFactory, FromArgMatches};

use crate::config::ServerArgs;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Command-line errors, `--help` and `--version`: clap prints and exits.
    #[error(transparent)]
    Cli(#[from] clap::Error),
    #[error("config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

/// Parses `s2cs`'s arguments and the `--config` file they name; prints the
/// error and exits as clap does when they are wrong.
pub fn parse_or_exit() -> ServerArgs {
    match parse_from(std::env::args_os()) {
        Ok(args) => args,
        Err(ConfigError::Cli(e)) => e.exit(),
        Err(e) => {
            eprintln!("s2cs: {e}");
            std::process::exit(2);
        }
    }
}

pub fn parse_from<I, T>(argv: I) -> Result<ServerArgs, ConfigError>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let argv: Vec<OsString> = argv.into_iter().map(Into::into).collect();
    let cmd = ServerArgs::command();
    let cli = cmd.clone().try_get_matches_from(&argv)?;
    let Some(path) = cli.get_one::<PathBuf>("config").cloned() else {
        return Ok(ServerArgs::from_arg_matches(&cli)?);
    };
    let text = std::fs::read_to_string(&path).map_err(|source| ConfigError::Read {
        path: path.clone(),
        source,
    })?;
    let invalid = |message: String| ConfigError::Invalid {
        path: path.clone(),
        message,
    };
    let table: toml::Table = text
        .parse()
        .map_err(|e: toml::de::Error| invalid(e.to_string().trim_end().to_string()))?;

    let settable: Vec<&Arg> = cmd
        .get_arguments()
        .filter(|a| {
            a.get_long().is_some() && !["config", "help", "version"].contains(&a.get_id().as_str())
        })
        .collect();
    let mut from_file: Vec<OsString> = Vec::new();
    let mut seen: Vec<&str> = Vec::new();
    for (key, value) in &table {
        let arg = settable
            .iter()
            .find(|a| names(a).any(|n| same_key(n, key)))
            .ok_or_else(|| {
                let known: Vec<&str> = settable.iter().filter_map(|a| a.get_long()).collect();
                invalid(format!(
                    "unknown key {key:?}; the keys are the s2cs flags: {}",
                    known.join(", ")
                ))
            })?;
        let id = arg.get_id().as_str();
        if seen.contains(&id) {
            return Err(invalid(format!(
                "{key:?} is set twice (snake_case and kebab-case name the same flag)"
            )));
        }
        seen.push(id);
        if matches!(
            cli.value_source(id),
            Some(ValueSource::CommandLine | ValueSource::EnvVariable)
        ) {
            continue;
        }
        let long = arg.get_long().expect("filtered on a long name");
        if matches!(arg.get_action(), ArgAction::SetTrue) {
            match value {
                toml::Value::Boolean(true) => from_file.push(format!("--{long}").into()),
                toml::Value::Boolean(false) => {}
                other => {
                    return Err(invalid(format!(
                        "{key} is true or false, not {}",
                        other.type_str()
                    )))
                }
            }
            continue;
        }
        let text = match value {
            toml::Value::Array(items) if arg.get_value_delimiter().is_some() => {
                let parts: Result<Vec<String>, ConfigError> = items
                    .iter()
                    .map(|v| scalar(key, v).map_err(&invalid))
                    .collect();
                parts?.join(",")
            }
            v => scalar(key, v).map_err(&invalid)?,
        };
        from_file.push(format!("--{long}={text}").into());
    }

    let mut merged = Vec::with_capacity(argv.len() + from_file.len());
    merged.extend(argv.first().cloned());
    merged.extend(from_file);
    merged.extend(argv.iter().skip(1).cloned());
    // The command line alone parsed, so what fails now came from the file.
    let matches = cmd
        .try_get_matches_from(merged)
        .map_err(|e| invalid(clap_message(&e)))?;
    Ok(ServerArgs::from_arg_matches(&matches)?)
}

fn names(arg: &Arg) -> impl Iterator<Item = &str> {
    arg.get_long()
        .into_iter()
        .chain(arg.get_all_aliases().unwrap_or_default())
}

fn same_key(flag: &str, key: &str) -> bool {
    flag.replace('-', "_") == key.replace('-', "_")
}

fn scalar(key: &str, v: &toml::Value) -> Result<String, String> {
    match v {
        toml::Value::String(s) => Ok(s.clone()),
        toml::Value::Integer(i) => Ok(i.to_string()),
        toml::Value::Float(f) => Ok(f.to_string()),
        toml::Value::Boolean(b) => Ok(b.to_string()),
        other => Err(format!(
            "{key} must be a string, number or boolean, not {}",
            other.type_str()
        )),
    }
}

/// clap's first line without its "error: " prefix and usage footer.
fn clap_message(e: &clap::Error) -> String {
    let text = e.render().to_string();
    let first = text.lines().next().unwrap_or_default();
    first.strip_prefix("error: ").unwrap_or(first).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{BackendKind, PortRange};

    fn with_file(name: &str, toml: &str, cli: &[&str]) -> Result<ServerArgs, ConfigError> {
        let path =
            std::env::temp_dir().join(format!("ss-config-{}-{name}.toml", std::process::id()));
        std::fs::write(&path, toml).unwrap();
        let mut argv = vec![
            "s2cs".to_string(),
            "--config".into(),
            path.display().to_string(),
        ];
        argv.extend(cli.iter().map(|s| s.to_string()));
        let r = parse_from(argv);
        let _ = std::fs::remove_file(&path);
        r
    }

    #[test]
    fn file_sets_flags_of_every_kind() {
        let a = with_file(
            "kinds",
            r#"
            listener_ip = "10.1.2.3"
            port = 6000
            port-range = "6100-6110"
            type = "splice"
            ssl = false
            guard = false
            data_iface = ["eth0", "eth1"]
            ebpf_attach = "tc"
            keep_sessions = true
            verbose = true
            experimental = false
            session_ttl = 30
            "#,
            &[],
        )
        .unwrap();
        assert_eq!(a.listener_ip.to_string(), "10.1.2.3");
        assert_eq!(a.port, 6000);
        assert_eq!(
            a.port_range,
            PortRange {
                start: 6100,
                end: 6110
            }
        );
        assert_eq!(a.backend, BackendKind::Splice);
        assert!(!a.ssl && !a.guard && a.keep_sessions && a.verbose && !a.experimental);
        assert_eq!(
            a.data_iface,
            Some(vec!["eth0".to_string(), "eth1".to_string()])
        );
        assert_eq!(a.session_ttl, 30);
        assert_eq!(a.ebpf_attach, crate::ebpf::AttachPolicy::Tc);
    }

    #[test]
    fn command_line_overrides_the_file() {
        let a = with_file(
            "override",
            "port = 6000\nssl = false\nport_range = \"6100-6110\"\n",
            &["--port", "7000", "--ssl=true"],
        )
        .unwrap();
        assert_eq!(a.port, 7000);
        assert!(a.ssl);
        assert_eq!(
            a.port_range,
            PortRange {
                start: 6100,
                end: 6110
            },
            "keys not on the command line still apply"
        );
    }

    #[test]
    fn unknown_keys_and_bad_values_name_the_key_and_the_file() {
        let e = with_file("unknown", "port = 6000\nport_rnage = \"1-2\"\n", &[])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("unknown key \"port_rnage\"")
                && e.contains("ss-config-")
                && e.contains("port_range"),
            "{e}"
        );
        let e = with_file("badvalue", "port = \"many\"\n", &[])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("--port") && e.contains("many") && e.contains("ss-config-"),
            "{e}"
        );
        let e = with_file("badbool", "verbose = \"yes\"\n", &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("verbose is true or false"), "{e}");
        let e = with_file("table", "[guard]\non = true\n", &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("guard must be"), "{e}");
        let e = with_file("twice", "port_range = \"1-2\"\nport-range = \"3-4\"\n", &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("set twice"), "{e}");
        let e = with_file("syntax", "port = \n", &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("config file"), "{e}");
    }

    /// The example shipped in deploy/ parses and shows every flag, so it
    /// cannot fall behind the command line.
    #[test]
    fn the_shipped_example_parses_and_names_every_flag() {
        let text = include_str!("../../deploy/s2cs.toml");
        let a = with_file("example", text, &[]).unwrap();
        assert!(a.keep_sessions);
        for arg in ServerArgs::command().get_arguments() {
            let Some(long) = arg.get_long() else { continue };
            if ["config", "help", "version"].contains(&long) {
                continue;
            }
            let key = format!("{} =", long.replace('-', "_"));
            let shown = text
                .lines()
                .any(|l| l.trim_start_matches(['#', ' ']).starts_with(&key));
            assert!(shown, "deploy/s2cs.toml does not show {long}");
        }
    }

    #[test]
    fn without_config_the_command_line_is_all() {
        let a = parse_from(["s2cs", "--port", "5001"]).unwrap();
        assert_eq!(a.port, 5001);
        assert!(a.config.is_none());
    }
}
