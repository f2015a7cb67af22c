use crate::cli::ConfigArg;
use crate::config::Config;
use crate::lifecycle::ExitStatus;

pub fn run(args: &ConfigArg) -> ExitStatus {
    match Config::load_or_default(args.config.as_deref()) {
        Ok(c) => {
            println!("configuration OK: {}", c.origin());
            for (name, addr) in c.listen.by_name() {
                println!("  listen.{name:<8} {addr}");
            }
            println!("  state.dir        {}", c.state_dir.display());
            println!("  drain_timeout    {:?}", c.drain_timeout);
            ExitStatus::Stopped
        }
        Err(e) => {
            eprintln!("hermes-gateway: {e}");
            ExitStatus::Config
        }
    }
}
