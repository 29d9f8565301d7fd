//! A real HAProxy (Debian's package, installed by `scripts/install-system-packages.sh` when
//! missing) as a test's backend: one frontend on a listening socket of the test's own, passed
//! to it as fd 3, so no port is guessed. Killed (by its PID) when dropped.

use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::OnceLock;

/// Installs HAProxy (and openssl, for the TLS tests' certificates and client) once per test
/// binary when they are missing; the path of HAProxy.
pub fn haproxy() -> &'static str {
    static BIN: OnceLock<Result<String, String>> = OnceLock::new();
    let found = BIN.get_or_init(|| {
        let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/install-system-packages.sh");
        let status = std::process::Command::new(&script)
            .args(["haproxy", "openssl"])
            .stdout(Stdio::null())
            .status()
            .map_err(|e| format!("{} does not run: {e}", script.display()))?;
        if !status.success() {
            return Err(format!("{} haproxy openssl failed ({status})", script.display()));
        }
        Ok("/usr/sbin/haproxy".to_string())
    });
    found.as_deref().unwrap_or_else(|e| panic!("{e}"))
}

pub struct Haproxy {
    pub addr: SocketAddr,
    _child: tokio::process::Child,
    dir: PathBuf,
}

impl Haproxy {
    /// HAProxy in HTTP mode whose frontend binds `bind` with the options `bind_options`
    /// (`accept-proxy`, `ssl crt FILE`) and answers every request with `lf_body` (a log-format
    /// string, such as `%[src]`).
    pub async fn start(bind: &str, bind_options: &str, lf_body: &str) -> Haproxy {
        let bin = tokio::task::spawn_blocking(haproxy).await.expect("the install does not panic");
        let listener = std::net::TcpListener::bind(bind).expect("bind the receiver's socket");
        let addr = listener.local_addr().unwrap();
        let dir = std::env::temp_dir().join(format!("static-ingress-haproxy-{}-{}", std::process::id(), addr.port()));
        std::fs::create_dir_all(&dir).unwrap();
        let config = dir.join("haproxy.cfg");
        std::fs::write(
            &config,
            format!(
                "global\n  maxconn 100\n\
                 defaults\n  mode http\n  timeout client 10s\n  timeout server 10s\n  timeout connect 5s\n\
                 frontend receiver\n  bind fd@3 {bind_options}\n\
                 \x20 http-request return status 200 content-type text/plain lf-string \"{lf_body}\"\n"
            ),
        )
        .unwrap();
        let fd = listener.as_raw_fd();
        let mut command = tokio::process::Command::new(bin);
        command.args(["-db", "-f"]).arg(&config).stdout(Stdio::null()).stderr(Stdio::inherit()).kill_on_drop(true);
        // The listening socket becomes the child's fd 3: dup2 clears close-on-exec on the copy,
        // but when the socket already is fd 3, dup2 does nothing, so clear the flag instead.
        unsafe {
            command.pre_exec(move || {
                let ok = if fd == 3 { libc::fcntl(3, libc::F_SETFD, 0) == 0 } else { libc::dup2(fd, 3) == 3 };
                if ok { Ok(()) } else { Err(std::io::Error::last_os_error()) }
            });
        }
        let child = command.spawn().expect("haproxy starts");
        drop(listener);
        Haproxy { addr, _child: child, dir }
    }

    /// HAProxy terminating TLS with the certificate `pem` (certificate and key), answering
    /// every request with `name`.
    pub async fn tls(pem: &Path, name: &str) -> Haproxy {
        Haproxy::start("127.0.0.1:0", &format!("ssl crt {}", pem.display()), name).await
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
