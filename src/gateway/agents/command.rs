//! `command`: runs a program per turn (argv from the config, no shell). The turn goes to
//! its stdin as one JSON object (`session_id`, `run_id`, `model`, `messages`), its stdout
//! is the reply, streamed as it comes. A non-zero exit fails the turn with the tail of its
//! stderr; a timeout or a cancelled turn kills its whole process group.

use std::process::Stdio;
use std::time::Duration;

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{Agent, AgentError, AgentFuture, Delta, DeltaSink, Reply, TurnInput};
use crate::config::AgentConfig;

/// How much of stderr is kept for the error message.
const STDERR_TAIL: usize = 2048;

pub struct CommandAgent {
    argv: Vec<String>,
    timeout: Duration,
    max_reply: u64,
}

impl CommandAgent {
    pub fn new(argv: &[String], config: &AgentConfig) -> Self {
        CommandAgent {
            argv: argv.to_vec(),
            timeout: config.timeout,
            max_reply: config.max_reply,
        }
    }
}

/// After the program exited, what its children still write is waited for this long; then
/// its process group is killed, so that a child that kept stdout open cannot hold the
/// turn until the timeout.
const AFTER_EXIT: Duration = Duration::from_millis(500);

/// Why the reply could not be read.
enum ReadError {
    TooLong(u64),
    NotUtf8(usize),
}

/// Kills the process group when the turn ends early (timeout, cancel, gateway exit).
struct GroupKiller(Option<Pid>);

impl Drop for GroupKiller {
    fn drop(&mut self) {
        if let Some(pg) = self.0.take() {
            let _ = killpg(pg, Signal::SIGKILL);
        }
    }
}

impl Agent for CommandAgent {
    fn run<'a>(&'a self, input: &'a TurnInput, on_delta: DeltaSink<'a>) -> AgentFuture<'a> {
        Box::pin(async move {
            let (program, args) = self
                .argv
                .split_first()
                .ok_or_else(|| AgentError::Failed("no command configured".into()))?;
            let mut cmd = tokio::process::Command::new(program);
            cmd.args(args)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .process_group(0)
                .kill_on_drop(true);
            if let Some(s) = &input.session_id {
                cmd.env("HERMES_SESSION_ID", s);
            }
            if let Some(k) = &input.session_key {
                cmd.env("HERMES_SESSION_KEY", k);
            }
            cmd.env("HERMES_RUN_ID", &input.run_id);
            let mut child = cmd
                .spawn()
                .map_err(|e| AgentError::Failed(format!("cannot start `{program}`: {e}")))?;
            // Declared after `child`, so dropped first: the group dies before the child is reaped.
            let mut killer = GroupKiller(child.id().map(|p| Pid::from_raw(p as i32)));

            let payload = json!({
                "session_id": input.session_id,
                "session_key": input.session_key,
                "run_id": input.run_id,
                "model": input.model,
                "messages": input.messages,
            });
            let mut body = serde_json::to_vec(&payload)
                .map_err(|e| AgentError::Failed(format!("cannot encode the turn: {e}")))?;
            body.push(b'\n');
            let mut stdin = child.stdin.take();
            let writer = async move {
                if let Some(mut s) = stdin.take() {
                    // A program that never reads its stdin is not an error.
                    let _ = s.write_all(&body).await;
                    let _ = s.shutdown().await;
                }
            };
            let mut stdout = child
                .stdout
                .take()
                .ok_or_else(|| AgentError::Failed("no stdout".into()))?;
            let mut stderr = child
                .stderr
                .take()
                .ok_or_else(|| AgentError::Failed("no stderr".into()))?;
            let err_reader = async move {
                let mut tail: Vec<u8> = Vec::new();
                let mut buf = [0u8; 4096];
                while let Ok(n) = stderr.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    tail.extend_from_slice(&buf[..n]);
                    if tail.len() > STDERR_TAIL {
                        tail.drain(..tail.len() - STDERR_TAIL);
                    }
                }
                tail
            };
            let max_reply = self.max_reply;
            let group = killer.0;
            // A reply refused midway: the program stops now (its stderr closes with it).
            let stop = move || {
                if let Some(pg) = group {
                    let _ = killpg(pg, Signal::SIGKILL);
                }
            };
            let out_reader = async {
                let mut reply = String::new();
                let mut pending: Vec<u8> = Vec::new();
                let mut buf = [0u8; 8192];
                let mut read: u64 = 0;
                loop {
                    let n = match stdout.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    read += n as u64;
                    if read > max_reply {
                        stop();
                        return Err(ReadError::TooLong(max_reply));
                    }
                    pending.extend_from_slice(&buf[..n]);
                    // Hand over complete UTF-8 only; keep a split character for the next read.
                    let valid = match std::str::from_utf8(&pending) {
                        Ok(s) => s.len(),
                        Err(e) if e.error_len().is_none() => e.valid_up_to(),
                        Err(e) => {
                            stop();
                            return Err(ReadError::NotUtf8(reply.len() + e.valid_up_to()));
                        }
                    };
                    let chunk = std::str::from_utf8(&pending[..valid]).unwrap_or_default();
                    if !chunk.is_empty() {
                        on_delta(Delta::Text(chunk));
                        reply.push_str(chunk);
                    }
                    pending.drain(..valid);
                }
                if !pending.is_empty() {
                    // A character cut at the end of the output.
                    return Err(ReadError::NotUtf8(reply.len()));
                }
                Ok(reply)
            };
            let work = async {
                let readers = async { tokio::join!(writer, out_reader, err_reader) };
                tokio::pin!(readers);
                tokio::select! {
                    ((), reply, tail) = &mut readers => (reply, tail, child.wait().await),
                    status = child.wait() => {
                        // The program exited; children it left may hold its pipes open.
                        let r = match tokio::time::timeout(AFTER_EXIT, &mut readers).await {
                            Ok(r) => r,
                            Err(_) => {
                                stop();
                                readers.await
                            }
                        };
                        (r.1, r.2, status)
                    }
                }
            };
            let (reply, tail, status) = match tokio::time::timeout(self.timeout, work).await {
                Ok(r) => r,
                Err(_) => {
                    return Err(AgentError::Timeout(format!(
                        "`{program}` did not finish within {:?}; its process group was killed",
                        self.timeout
                    )));
                }
            };
            let reply = match reply {
                Ok(r) => r,
                // Dropping `killer` kills the process group.
                Err(ReadError::TooLong(max)) => {
                    return Err(AgentError::Failed(format!(
                        "`{program}` wrote more than {max} bytes ([agent] max_reply); its process group was killed"
                    )));
                }
                Err(ReadError::NotUtf8(at)) => {
                    return Err(AgentError::Failed(format!(
                        "`{program}` wrote invalid UTF-8 at byte {at} of its reply; its process group was killed"
                    )));
                }
            };
            // Reaped: the group is no longer ours to kill.
            killer.0 = None;
            let status =
                status.map_err(|e| AgentError::Failed(format!("waiting for `{program}`: {e}")))?;
            if !status.success() {
                let tail = String::from_utf8_lossy(&tail).trim().to_owned();
                return Err(AgentError::Failed(format!(
                    "`{program}` exited with {status}{}{tail}",
                    if tail.is_empty() { "" } else { ": " }
                )));
            }
            Ok(Reply::text(reply))
        })
    }

    fn kind(&self) -> &'static str {
        "command"
    }

    fn check(
        &self,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), String>> + Send + '_>> {
        Box::pin(async move {
            let Some(program) = self.argv.first() else {
                return Err("no command configured".into());
            };
            let p = std::path::Path::new(program);
            if p.components().count() > 1 {
                return match std::fs::metadata(p) {
                    Ok(m) if m.is_file() => Ok(()),
                    Ok(_) => Err(format!("`{program}` is not a file")),
                    Err(e) => Err(format!("`{program}`: {e}")),
                };
            }
            // A bare name is looked up on PATH, as the spawn does.
            let found = std::env::var_os("PATH").is_some_and(|path| {
                std::env::split_paths(&path).any(|d| d.join(program).is_file())
            });
            if found {
                Ok(())
            } else {
                Err(format!("`{program}` is not on PATH"))
            }
        })
    }
}
