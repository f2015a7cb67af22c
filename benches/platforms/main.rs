//! Chat platforms' inbound benchmark: `cargo bench --bench platforms [PLATFORM…]`.
//!
//! One module per platform, each measuring its webhook path — signed requests, each
//! answered only after its commit — against `GET /health` of the same binary in the same
//! run (rounds alternate), with the echo agent and a stub of the platform's API taking
//! the replies. Targets (issue 13): ≥ 5,000 signed requests/s, p99 ≤ 25 ms.
//!
//! Environment: BENCH_SECS (per round, default 5), BENCH_ROUNDS (default 3),
//! BENCH_CONNS (default 64). Arguments: the platforms to run (default: all).

#[path = "../support/mod.rs"]
mod support;

mod harness;
mod line;
mod twilio;

fn main() {
    let wanted: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let run = |name: &str| wanted.is_empty() || wanted.iter().any(|w| w == name);
    harness::print_machine();
    if run("line") {
        line::run();
    }
    if run("twilio") {
        twilio::run();
    }
}
