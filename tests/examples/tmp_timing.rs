use std::time::Instant;
use testbed::*;
fn main() -> anyhow::Result<()> {
    let t = Instant::now();
    let topo = Topology::new()?;
    eprintln!("topology: {:?}", t.elapsed());
    let target = topo.sock4(Node::Producer, Link::ProducerLan, 7000);
    let bytes = 512 << 20;
    let p = Producer::start(topo.ns(Node::Producer), target, bytes)?;
    let tr = consume(topo.ns(Node::Consumer), target, bytes, 1)?;
    tr.verify_with(&p.wait_for(1, std::time::Duration::from_secs(10))?, bytes)?;
    eprintln!("transfer {:.2} Gbit/s in {:?}", tr.gbit_per_s(), tr.elapsed);
    let t = Instant::now();
    drop(p); drop(topo);
    eprintln!("teardown: {:?}", t.elapsed());
    Ok(())
}
