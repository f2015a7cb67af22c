//! Chat platform benchmark: `cargo bench --bench platforms`.
//!
//! One release gateway (echo agent, log level warn) serves every platform listed below on
//! its webhook listener; a stub of the platforms' APIs takes the replies. For each platform,
//! 64 keep-alive connections post signed webhooks of new messages (each answered 2xx only
//! after its commit: the message, its run and its reply's delivery), and `GET /health` of
//! the same binary runs in the same rounds for a ratio. The turns and replies behind the
//! answers run in the background meanwhile, as in production; each round (a platform's,
//! or `/health`'s) starts once the replies of the one before are all sent, so that none
//! is measured against another's backlog.
//!
//! Each platform is measured twice a round: closed loop (each connection posts its next
//! message once the last is answered: the most the gateway acknowledges, and the latency
//! with 64 in flight at that saturation), then open loop at BENCH_RATE messages a second
//! in all (default 5,000), each latency counted from when its request was due, as wrk2
//! does: the latency at that rate, the turns and replies behind it included in the load.
//!
//! Environment: BENCH_SECS (per round and loop, default 5), BENCH_ROUNDS (default 3),
//! BENCH_CONNS (default 64), BENCH_RATE (default 5000), BENCH_PLATFORMS (a comma list,
//! default all), BENCH_BASELINE (an older hermes-gateway binary, measured beside this one
//! in the same rounds, with the ratios of rate and p99). `BENCH_INSTRUCTIONS=1` counts
//! instead the gateway's instructions per message under callgrind (valgrind), which the
//! machine's load does not change, optionally beside `BENCH_BASELINE=/path/to/hermes-gateway`
//! (one connection, or BENCH_CONNS when set); `BENCH_CALLGRIND_OUT=PREFIX` keeps each
//! profile as PREFIX.PLATFORM.SECS, for `callgrind_annotate --inclusive=yes`.
//!
//! A platform is a module giving its configuration section and its signed requests
//! ([`run::Platform`]); `run` does the rest.

#[path = "../../tests/platforms/http_stub.rs"]
mod http_stub;
mod line;
#[path = "../support/procfs.rs"]
mod procfs;
mod run;
mod slack;
#[path = "../support/mod.rs"]
mod support;
mod twilio;
mod whatsapp;

/// The platforms measured, in this order.
const PLATFORMS: &[run::Platform] = &[
    slack::PLATFORM,
    whatsapp::PLATFORM,
    line::PLATFORM,
    twilio::PLATFORM,
];

fn main() {
    run::main(PLATFORMS);
}
