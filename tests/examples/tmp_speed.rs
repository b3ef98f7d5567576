use std::time::Instant;
fn main() {
    let t = Instant::now();
    let mut p = testbed::traffic::PatternStream::new(1);
    let mut n = 0u64; let mut x = 0u8;
    while n < 1 << 30 { let c = p.next_bytes(1 << 20); x ^= c[0]; n += c.len() as u64; }
    eprintln!("pattern 1GiB: {:?} {x}", t.elapsed());
    let t = Instant::now();
    let h = testbed::expected_sha256(1, 1 << 30);
    eprintln!("pattern+sha 1GiB: {:?} {}", t.elapsed(), &h[..8]);
}
