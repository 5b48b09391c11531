//! Framing throughput on a realistic stanza mix, side by side with a full DOM parse of the
//! same stanzas through `minidom` (what a DOM-based server does per stanza).
//!
//! `cargo bench -p starling-benches --bench framing` prints, for each path, the time per
//! pass and criterion's throughput in bytes/s; elements/s is the element count divided by
//! the time per pass (printed once at start).

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use starling_benches::corpus;
use starling_xml::{Frame, Framer};

const STANZAS: usize = 2000;

fn framing(c: &mut Criterion) {
    let input = corpus::stream(STANZAS);
    let stanzas = corpus::stanzas(STANZAS);
    let stanza_bytes: usize = stanzas.iter().map(String::len).sum();
    eprintln!(
        "corpus: {STANZAS} stanzas, {} bytes in the stream, {} bytes of stanzas, {:.0} bytes average",
        input.len(),
        stanza_bytes,
        stanza_bytes as f64 / STANZAS as f64
    );

    let mut group = c.benchmark_group("frame-mix");
    group.throughput(Throughput::Bytes(input.len() as u64));
    for read_size in [4096usize, 65536] {
        group.bench_with_input(
            BenchmarkId::new("starling-framer", read_size),
            &read_size,
            |b, &rs| {
                b.iter(|| {
                    let mut framer = Framer::new();
                    let mut count = 0usize;
                    for chunk in input.chunks(rs) {
                        framer.feed(chunk);
                        while let Ok(Some(frame)) = framer.next_frame() {
                            if let Frame::Element(e) = frame {
                                count += e.raw().len();
                            }
                        }
                    }
                    assert!(count > 0);
                    count
                })
            },
        );
    }
    group.bench_function("minidom-dom", |b| {
        b.iter(|| {
            let mut count = 0usize;
            for s in &stanzas {
                let el = minidom::Element::from_reader_with_prefixes(
                    s.as_bytes(),
                    String::from("jabber:client"),
                )
                .expect("corpus stanzas parse");
                count += el.name().len();
            }
            count
        })
    });
    group.finish();
}

criterion_group!(benches, framing);
criterion_main!(benches);
