//! Unit tests of `config.rs`.

use super::*;

#[test]
fn scistream_type_names_select_their_backends() {
    for (name, kind) in [
        ("StunnelSubprocess", BackendKind::StunnelSubprocess),
        ("stunnel", BackendKind::Tls),
        ("TLS", BackendKind::Tls),
        ("Haproxy", BackendKind::Splice),
        ("haproxysubprocess", BackendKind::HaproxySubprocess),
        ("nginx", BackendKind::Splice),
        ("splice", BackendKind::Splice),
        ("SockMap", BackendKind::Sockmap),
        ("xdp", BackendKind::Xdp),
        ("eBPF", BackendKind::Xdp),
    ] {
        assert_eq!(name.parse::<BackendKind>().unwrap(), kind, "{name}");
    }
    assert!("docker".parse::<BackendKind>().is_err());
}

#[test]
fn snake_and_kebab_flags_both_parse() {
    let a = ServerArgs::try_parse_from([
        "s2cs",
        "--server_crt=/a.crt",
        "--server-key",
        "/a.key",
        "--listener_ip=::1",
        "--port-range",
        "6000-6010",
        "--type=StunnelSubprocess",
        "--verbose",
        "--ssl",
        "false",
    ])
    .unwrap();
    assert_eq!(a.server_crt.unwrap().to_str(), Some("/a.crt"));
    assert_eq!(a.server_key.unwrap().to_str(), Some("/a.key"));
    assert!(a.listener_ip.is_ipv6());
    assert_eq!(
        a.port_range,
        PortRange {
            start: 6000,
            end: 6010
        }
    );
    assert_eq!(a.backend, BackendKind::StunnelSubprocess);
    assert!(a.verbose && !a.ssl);
    let b = ServerArgs::try_parse_from(["s2cs", "-v", "--ssl=False", "--port_range=1-2"]).unwrap();
    assert!(b.verbose && !b.ssl);
    let c = ServerArgs::try_parse_from([
        "s2cs",
        "--client-id",
        "abc",
        "--client_secret=s",
        "--introspect-url",
        "http://127.0.0.1:1/i",
        "--required_scope",
        "x",
        "--token-cache-secs",
        "0",
    ])
    .unwrap();
    assert_eq!(
        (c.client_id.as_deref(), c.client_secret.as_deref()),
        (Some("abc"), Some("s"))
    );
    assert_eq!(
        (
            c.introspect_url.as_str(),
            c.required_scope.as_deref(),
            c.token_cache_secs
        ),
        ("http://127.0.0.1:1/i", Some("x"), 0)
    );
    let d = ServerArgs::try_parse_from(["s2cs", "--guard", "false", "--data-iface", "eth0,eth1"])
        .unwrap();
    assert!(!d.guard);
    assert_eq!(
        d.data_iface,
        Some(vec!["eth0".to_string(), "eth1".to_string()])
    );
    let e = ServerArgs::try_parse_from(["s2cs", "--data_iface=veth0"]).unwrap();
    assert!(e.guard, "the guard is on by default");
    assert_eq!(e.data_iface, Some(vec!["veth0".to_string()]));
    assert_eq!(
        e.ebpf_attach,
        crate::ebpf::AttachPolicy::Auto,
        "auto is the default attach policy"
    );
    let f = ServerArgs::try_parse_from(["s2cs", "--ebpf_attach", "tc"]).unwrap();
    assert_eq!(f.ebpf_attach, crate::ebpf::AttachPolicy::Tc);
    assert!(
        ServerArgs::try_parse_from(["s2cs", "--ebpf-attach", "skb"]).is_err(),
        "generic XDP is no choice"
    );
}

#[test]
fn durations_past_their_bound_are_refused_at_parse_with_the_flag_named() {
    for flag in [
        "--control_timeout",
        "--control_idle_timeout",
        "--token_cache_secs",
        "--hello_timeout",
        "--tunnel_timeout",
        "--session_ttl",
        "--control_body_timeout",
        "--tcp_keepalive",
    ] {
        let e = ServerArgs::try_parse_from(["s2cs", flag, "18446744073709551615"])
            .unwrap_err()
            .to_string();
        assert!(e.contains(flag) && e.contains("not in 0.."), "{flag}: {e}");
    }
    let a = ServerArgs::try_parse_from([
        "s2cs",
        "--control_timeout",
        "3600",
        "--session_ttl",
        "31536000",
    ])
    .unwrap();
    for (name, d) in a.durations() {
        assert!(std::time::Instant::now().checked_add(d).is_some(), "{name}");
    }
}

#[test]
fn bad_port_ranges_are_rejected() {
    assert!("5200-5100".parse::<PortRange>().is_err());
    assert!("5100".parse::<PortRange>().is_err());
    assert!("0-10".parse::<PortRange>().is_err());
}
