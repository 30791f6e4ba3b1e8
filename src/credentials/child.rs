//! Child processes of token sources (the `exec` command, `az`). Each runs in a process group
//! of its own, so that one abandoned (timed out, or its fetch dropped at shutdown) is ended
//! with everything it started: killing `/bin/sh` alone would leave a hung helper running,
//! one more at every retry. And none sees the proxy's own secrets in its environment.

use std::ffi::OsStr;

use rustix::process::{kill_process_group, Pid, Signal};
use tokio::process::{Child, Command};

/// Environment variables holding the proxy's own secrets, which no token helper needs. (The
/// `AZURE_*` ones stay: a helper may run its own Entra flow with them.)
const SECRET_ENVS: [&str; 3] = [
    "REDIS_ENTRA_PROXY_TOKEN",
    "REDIS_ENTRA_PROXY_LOCAL_PASSWORD",
    "REDIS_ENTRA_PROXY_CLIENT_SECRET",
];

/// A command for `program`, to be started with [`spawn`].
pub fn command(program: impl AsRef<OsStr>) -> Command {
    let mut cmd = Command::new(program);
    for name in SECRET_ENVS {
        cmd.env_remove(name);
    }
    cmd.process_group(0).kill_on_drop(true);
    cmd
}

/// Starts `cmd` (from [`command`]); the group is killed when the returned guard is dropped
/// before [`Group::finished`].
pub fn spawn(cmd: &mut Command) -> std::io::Result<(Child, Group)> {
    let child = cmd.spawn()?;
    // The child leads its own group: its id is the group's.
    let group = Group(
        child
            .id()
            .and_then(|id| i32::try_from(id).ok())
            .and_then(Pid::from_raw),
    );
    Ok((child, group))
}

/// The process group of a running child; dropped unfinished, it kills every process in it.
#[derive(Debug)]
pub struct Group(Option<Pid>);

impl Group {
    /// The command completed: what it left running is its own business.
    pub fn finished(mut self) {
        self.0 = None;
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        if let Some(pgid) = self.0.take() {
            // Gone already, or never started anything: nothing to do.
            let _ = kill_process_group(pgid, Signal::KILL);
        }
    }
}
