//! `s2uc` as a user meets it: the tutorial's output, and one clear error line
//! with a non-zero exit for an unreachable server, a certificate that does not
//! match, and an error answer.

mod common;

use std::net::SocketAddr;
use std::process::Output;

use common::Gateway;
use testbed::netns::addr;
use testbed::{bin, require_root, run_in, Node, Producer, Topology};

fn stderr_line(out: &Output) -> String {
    assert!(
        !out.status.success(),
        "expected failure, got success: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let err = String::from_utf8_lossy(&out.stderr).trim().to_string();
    assert_eq!(
        err.lines().count(),
        1,
        "one error line expected, got:\n{err}"
    );
    assert!(err.starts_with("s2uc: error:"), "{err}");
    err
}

#[test]
fn inbound_request_prints_uid_and_listeners_last_as_in_the_tutorial() {
    if !require_root("inbound_request_prints_uid_and_listeners_last_as_in_the_tutorial") {
        return;
    }
    let topo = Topology::new().unwrap();
    let producer = Producer::start(
        topo.ns(Node::Producer),
        SocketAddr::new(addr::PRODUCER.into(), 80),
        0,
    )
    .unwrap();
    let gin = Gateway::start(
        topo.ns(Node::InboundGw),
        addr::INBOUND_GW_WAN.into(),
        "5100-5199",
        "StunnelSubprocess",
        &[],
    );
    // The tutorial's spelling: --server_cert=..., --remote_ip, --receiver_ports, --num_conn.
    let cert_flag = format!("--server_cert={}", gin.cert_str());
    let control = gin.control.to_string();
    let out = run_in(
        topo.ns(Node::InboundGw),
        bin("s2uc"),
        [
            "inbound-request",
            &cert_flag,
            "--remote_ip",
            "10.91.3.2",
            "--s2cs",
            &control,
            "--receiver_ports",
            "80",
            "--num_conn",
            "1",
        ],
    )
    .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let uid_line = text
        .lines()
        .find(|l| l.starts_with("uid: "))
        .expect("a uid line");
    uuid::Uuid::parse_str(uid_line.trim_start_matches("uid: ")).expect("the uid is a UUID");
    let last = text.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("listeners: \"10.91.2.2:51"),
        "last line {last:?} of\n{text}"
    );
    assert!(
        text.contains(&format!("prod_listeners: \"{}\"", producer.addr())),
        "{text}"
    );
}

#[test]
fn errors_are_one_line_with_a_nonzero_exit() {
    if !require_root("errors_are_one_line_with_a_nonzero_exit") {
        return;
    }
    let topo = Topology::new().unwrap();
    let gin = Gateway::start(
        topo.ns(Node::InboundGw),
        addr::INBOUND_GW_WAN.into(),
        "5100-5199",
        "tls",
        &[],
    );
    let other = Gateway::start(
        topo.ns(Node::OutboundGw),
        addr::OUTBOUND_GW_WAN.into(),
        "5100-5199",
        "tls",
        &[],
    );
    let ns = topo.ns(Node::InboundGw);
    let s2uc = |args: &[&str]| run_in(ns, bin("s2uc"), args).unwrap();

    // Nobody listens there.
    let e = stderr_line(&s2uc(&[
        "release",
        "--s2cs",
        "10.91.2.2:5999",
        "--server_cert",
        gin.cert_str(),
        &uuid::Uuid::new_v4().to_string(),
    ]));
    assert!(
        e.contains("cannot connect") && e.contains("10.91.2.2:5999"),
        "{e}"
    );

    // A certificate that is not the server's.
    let control = gin.control.to_string();
    let e = stderr_line(&s2uc(&[
        "release",
        "--s2cs",
        &control,
        "--server_cert",
        other.cert_str(),
        &uuid::Uuid::new_v4().to_string(),
    ]));
    assert!(e.contains("certificate"), "{e}");

    // The server answers an error.
    let e = stderr_line(&gin.s2uc(ns, "release", &[&uuid::Uuid::new_v4().to_string()]));
    assert!(e.contains("NotFound"), "{e}");
    let e = stderr_line(&gin.s2uc(
        ns,
        "inbound-request",
        &[
            "--remote_ip",
            "10.91.3.2",
            "--receiver_ports",
            "80",
            "--num_conn",
            "0",
        ],
    ));
    assert!(
        e.contains("InvalidArgument") && e.contains("num_conn"),
        "{e}"
    );
}
