//! Fuzzes the stream framer: arbitrary bytes, split at fuzzer-chosen points, must never
//! panic, must frame the same elements however they are split, and every element it
//! accepts must frame again, alone, to the same envelope.
#![no_main]

use libfuzzer_sys::fuzz_target;
use starling_xml::{Frame, Framer, Limits};

const HEADER: &[u8] = b"<stream:stream xmlns='jabber:client' \
    xmlns:stream='http://etherx.jabber.org/streams' version='1.0'>";

fn run(input: &[u8], splits: &[usize], limits: Limits) -> (Vec<Frame>, Option<starling_xml::Condition>) {
    let mut framer = Framer::with_limits(limits);
    let mut frames = Vec::new();
    let mut at = 0;
    let mut points = splits.iter().copied().chain(std::iter::once(input.len()));
    while at < input.len() {
        let next = points.next().unwrap_or(input.len()).clamp(at + 1, input.len());
        framer.feed(&input[at..next]);
        at = next;
        loop {
            match framer.next_frame() {
                Ok(Some(frame)) => frames.push(frame),
                Ok(None) => break,
                Err(e) => return (frames, Some(e.condition)),
            }
        }
    }
    (frames, None)
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    // The first byte picks the split points and whether to prepend a valid header, so the
    // fuzzer reaches element framing without having to discover a stream header first.
    let control = data[0];
    let body = &data[1..];
    let mut input = Vec::with_capacity(HEADER.len() + body.len());
    if control & 1 == 1 {
        input.extend_from_slice(HEADER);
    }
    input.extend_from_slice(body);
    let limits = Limits { max_element_size: 4096, max_depth: 8, max_attributes: 8, max_ns_declarations: 4 };
    let whole = run(&input, &[], limits);
    let step = usize::from(control >> 1) + 1;
    let splits: Vec<usize> = (1..input.len()).step_by(step).collect();
    let split = run(&input, &splits, limits);
    assert_eq!(whole.0, split.0, "frames differ between whole and split input");
    assert_eq!(whole.1.is_some(), split.1.is_some(), "only one of the two runs failed");

    // Accepted elements must frame again on their own; only under our header, since under
    // a fuzzer-made one they may use prefixes that header declared.
    let reframe = control & 1 == 1;
    for frame in whole.0.iter().filter(|_| reframe) {
        if let Frame::Element(el) = frame {
            let mut again = HEADER.to_vec();
            again.extend_from_slice(el.raw());
            let (frames, err) = run(&again, &[], limits);
            assert!(err.is_none(), "an accepted element does not frame again");
            let Some(Frame::Element(el2)) = frames.get(1) else { panic!("element lost") };
            assert_eq!(el.name(), el2.name());
            assert_eq!(el.to(), el2.to());
            assert_eq!(el.from(), el2.from());
            assert_eq!(el.first_child(), el2.first_child());
            let rewritten = el.with_addresses(Some("a@b/c"), Some("d@e/f"));
            let mut again = HEADER.to_vec();
            again.extend_from_slice(&rewritten);
            let (frames, err) = run(&again, &[], Limits { max_element_size: 8192, max_attributes: limits.max_attributes + 2, ..limits });
            assert!(err.is_none(), "a rewritten element does not frame again");
            let Some(Frame::Element(el3)) = frames.get(1) else { panic!("rewritten element lost") };
            assert_eq!(el3.to().as_deref(), Some("a@b/c"));
            assert_eq!(el3.from().as_deref(), Some("d@e/f"));
        }
    }
});
