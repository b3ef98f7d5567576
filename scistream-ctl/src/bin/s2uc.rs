//! `s2uc`: the scistream-rs user client.

fn main() -> std::process::ExitCode {
    scistream_ctl::client::cli::main()
}
