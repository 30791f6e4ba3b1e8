//! `Workdir`: the redis-server's private temporary directory and everything in it: the
//! generated `redis.conf`, the certificate and key files, and the logs quoted when startup
//! fails. Removing the directory on drop is this type's job; the process is `server.rs`'s.

use std::path::{Path, PathBuf};

use super::{random_hex, DevCerts, DevError};

/// Lines of each log file quoted in `DevError::NotReady`: enough to show a config error or a
/// bind failure, which Redis prints just before exiting.
const LOG_TAIL_LINES: usize = 30;

pub(super) struct Workdir {
    path: PathBuf,
}

impl Workdir {
    /// A unique 0700 directory under the system temp dir; private because it holds a key and
    /// the admin password.
    pub(super) fn create() -> Result<Workdir, DevError> {
        let name = format!(
            "redis-entra-proxy-dev-{}-{}",
            std::process::id(),
            random_hex(8)
        );
        let path = std::env::temp_dir().join(name);
        let mut builder = std::fs::DirBuilder::new();
        #[cfg(unix)]
        std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
        builder.create(&path)?;
        Ok(Workdir { path })
    }

    pub(super) fn path(&self) -> &Path {
        &self.path
    }
    pub(super) fn conf(&self) -> PathBuf {
        self.path.join("redis.conf")
    }
    pub(super) fn ca(&self) -> PathBuf {
        self.path.join("ca.pem")
    }
    /// A cluster node's own record of the cluster (its id, epochs, peers), kept across
    /// restarts so a restarted node rejoins as itself.
    fn nodes_conf(&self) -> PathBuf {
        self.path.join("nodes.conf")
    }
    fn log(&self) -> PathBuf {
        self.path.join("redis.log")
    }
    /// Where the child's stdout/stderr go: config errors are printed there, before the server
    /// opens its log file.
    fn stdio(&self) -> PathBuf {
        self.path.join("stdio.log")
    }

    /// Writes `redis.conf` (and the certificate files when `certs` is given). Everything but
    /// the ports goes in the file, so a retry on other ports or a restart reuses it; the
    /// passwords stay off the command line, where `ps` would show them. `cluster` adds what
    /// makes a cluster node that announces 127.0.0.1 only (TLS on the bus too with `certs`).
    pub(super) fn write_config(
        &self,
        admin_user: &str,
        admin_password: &str,
        certs: Option<&DevCerts>,
        cluster: bool,
    ) -> Result<(), DevError> {
        let mut conf = format!(
            "bind 127.0.0.1\ndaemonize no\nsave \"\"\nappendonly no\ndir {}\nlogfile {}\n\
             user default off\nuser {admin_user} on {} ~* &* +@all\n",
            quote(&self.path),
            quote(&self.log()),
            quote_str(&format!(">{admin_password}")),
        );
        if let Some(certs) = certs {
            let cert = self.path.join("server.pem");
            let key = self.path.join("server.key");
            std::fs::write(self.ca(), &certs.ca_pem)?;
            std::fs::write(&cert, &certs.cert_pem)?;
            std::fs::write(&key, &certs.key_pem)?;
            conf.push_str(&format!(
                "tls-cert-file {}\ntls-key-file {}\ntls-ca-cert-file {}\ntls-auth-clients no\n",
                quote(&cert),
                quote(&key),
                quote(&self.ca()),
            ));
        }
        if cluster {
            conf.push_str(&format!(
                "cluster-enabled yes\ncluster-config-file {}\ncluster-announce-ip 127.0.0.1\n",
                quote(&self.nodes_conf()),
            ));
            if certs.is_some() {
                conf.push_str("tls-cluster yes\n");
            }
        }
        std::fs::write(self.conf(), conf)?;
        Ok(())
    }

    /// Forgets the node's cluster identity (before a start attempt on new ports).
    pub(super) fn remove_nodes_conf(&self) -> Result<(), DevError> {
        match std::fs::remove_file(self.nodes_conf()) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e.into()),
            _ => Ok(()),
        }
    }

    /// Fresh log files for a new run, so a failure report shows that run only. Returns the
    /// file the child's stdout and stderr should write to.
    pub(super) fn fresh_logs(&self) -> Result<std::fs::File, DevError> {
        let _ = std::fs::remove_file(self.log());
        Ok(std::fs::File::create(self.stdio())?)
    }

    /// The last lines of the child's output and of the server log, for error reports.
    pub(super) fn log_tail(&self) -> String {
        let mut tail = String::new();
        for path in [self.stdio(), self.log()] {
            let text = std::fs::read(&path).unwrap_or_default();
            let text = String::from_utf8_lossy(&text);
            let lines: Vec<&str> = text.lines().collect();
            for line in &lines[lines.len().saturating_sub(LOG_TAIL_LINES)..] {
                tail.push_str(line);
                tail.push('\n');
            }
        }
        tail
    }
}

impl Drop for Workdir {
    fn drop(&mut self) {
        // Best effort: a leftover directory in /tmp is untidy, not a failure.
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

fn quote(path: &Path) -> String {
    quote_str(&path.display().to_string())
}

/// Quotes a value for redis.conf, whose parser understands C-like escapes inside "...".
fn quote_str(value: &str) -> String {
    let mut out = String::from("\"");
    for c in value.chars() {
        match c {
            '"' | '\\' => {
                out.push('\\');
                out.push(c);
            }
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c.is_ascii_control() => out.push_str(&format!("\\x{:02x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}
