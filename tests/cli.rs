//! The binary as an operator runs it: check-config, exit codes, messages, real signals.

mod common;

use std::io::BufRead;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use common::*;

const BIN: &str = env!("CARGO_BIN_EXE_static-ingress");

/// A loopback address with a port nobody listens on now, for an admin server whose address
/// `reload` must find in the proxy's command line or environment.
fn free_port() -> String {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().to_string()
}

fn fixture(name: &str) -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name).display().to_string()
}

/// The binary with a clean environment: no STATIC_INGRESS_* leaks in from the caller.
fn cmd() -> Command {
    let mut c = Command::new(BIN);
    c.env_clear().env("PATH", std::env::var_os("PATH").unwrap_or_default());
    c
}

fn run(c: &mut Command) -> Output {
    c.stdin(Stdio::null()).output().expect("the binary runs")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn check_config_prints_the_effective_config_and_exits_0() {
    let file = fixture("valid.toml");
    let out = run(cmd().args(["check-config", &file]));
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.starts_with(&format!("# effective configuration: {file} (valid)\n")), "{text}");
    for line in [
        format!("connect_timeout = \"2s\"                       # {file}:4"),
        format!("address = \"blue-elb-123.eu-west-1.elb.amazonaws.com:443\" # {file}:11"),
        format!("level = \"info,static_ingress::proxy=debug\"   # {file}:24"),
    ] {
        assert!(text.contains(&line), "missing line:\n{line}\nin:\n{text}");
    }
}

#[test]
fn check_config_reports_every_bad_value_with_file_line_and_key() {
    let file = fixture("bad-values.toml");
    let out = run(cmd().args(["check-config", &file]));
    assert_eq!(out.status.code(), Some(78));
    assert_eq!(
        stderr(&out),
        format!(
            "error: {file}:3: proxy.listen: invalid address \"0.0.0.0\": expected IP:port, such as 0.0.0.0:443 or [::]:443\n\
             error: {file}:4: proxy.connect_timeout: \"5\" has no unit: write it as \"5s\" or \"5ms\"\n\
             error: {file}:5: proxy.idle_timeout: expected a duration such as \"5s\", got integer 360\n\
             error: {file}:6: proxy.max_connections: must be a whole number from 1 to 1000000, got 0\n\
             error: {file}:9: backend.address: invalid host:port \"blue-elb.example.com\": the port is missing\n\
             error: {file}:12: log.format: must be one of text, json, got \"yaml\"\n\
             configuration invalid: 6 errors\n"
        )
    );
    assert_eq!(stdout(&out), "");
}

#[test]
fn unknown_keys_and_sections_are_refused_with_a_suggestion() {
    let file = fixture("unknown-keys.toml");
    let out = run(cmd().args(["check-config", &file]));
    assert_eq!(out.status.code(), Some(78));
    assert_eq!(
        stderr(&out),
        format!(
            "error: {file}:3: unknown key proxy.conect_timeout (did you mean proxy.connect_timeout?)\n\
             error: {file}:8: unknown section [healthcheck]\n\
             configuration invalid: 2 errors\n"
        )
    );
}

#[test]
fn structural_mistakes_name_the_line() {
    let file = fixture("not-a-section.toml");
    let out = run(cmd().args(["check-config", &file]));
    assert_eq!(out.status.code(), Some(78));
    assert_eq!(
        stderr(&out),
        format!(
            "error: {file}:1: `backend` must be a section: write [backend] and put its keys below it\n\
             configuration invalid: 1 error\n"
        )
    );

    let file = fixture("syntax-error.toml");
    let out = run(cmd().args(["check-config", &file]));
    assert_eq!(out.status.code(), Some(78));
    assert!(stderr(&out).starts_with(&format!("error: {file}:")), "{}", stderr(&out));
}

#[test]
fn a_missing_file_or_missing_backend_is_a_config_error() {
    let out = run(cmd().args(["check-config", "/nonexistent/static-ingress.toml"]));
    assert_eq!(out.status.code(), Some(78));
    assert_eq!(
        stderr(&out),
        "error: /nonexistent/static-ingress.toml: cannot read the config file: No such file or directory (os error 2)\n\
         configuration invalid: 1 error\n"
    );

    let file = fixture("empty.toml");
    let out = run(cmd().args(["run", "--config", &file]));
    assert_eq!(out.status.code(), Some(78));
    assert_eq!(
        stderr(&out),
        format!(
            "error: {file}: backend.address: is required: set it in {file}, with --backend-address, or with \
             STATIC_INGRESS_BACKEND_ADDRESS\nconfiguration invalid: 1 error\n"
        )
    );
}

#[test]
fn flags_beat_environment_which_beats_the_file() {
    let file = fixture("valid.toml");
    let env_only = run(cmd().args(["check-config", &file]).env("STATIC_INGRESS_PROXY_MAX_CONNECTIONS", "7"));
    assert_eq!(env_only.status.code(), Some(0), "{}", stderr(&env_only));
    assert!(
        stdout(&env_only).contains(
            "max_connections = 7                          # environment variable STATIC_INGRESS_PROXY_MAX_CONNECTIONS"
        ),
        "{}",
        stdout(&env_only)
    );

    let both = run(cmd()
        .args(["check-config", &file, "--proxy-max-connections", "9"])
        .env("STATIC_INGRESS_PROXY_MAX_CONNECTIONS", "7"));
    assert!(stdout(&both).contains("max_connections = 9                          # flag --proxy-max-connections"));

    let bad_env = run(cmd().args(["check-config", &file]).env("STATIC_INGRESS_PROXY_MAX_CONNECTIONS", "abc"));
    assert_eq!(bad_env.status.code(), Some(78));
    assert_eq!(
        stderr(&bad_env),
        "error: environment variable STATIC_INGRESS_PROXY_MAX_CONNECTIONS: proxy.max_connections: must be a whole \
         number from 1 to 1000000, got \"abc\"\nconfiguration invalid: 1 error\n"
    );

    // The config file itself can come from the environment.
    let via_env = run(cmd().arg("check-config").env("STATIC_INGRESS_CONFIG", &file));
    assert!(stdout(&via_env).starts_with(&format!("# effective configuration: {file} (valid)")));
}

#[test]
fn version_help_and_usage_errors() {
    let out = run(cmd().arg("--version"));
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(stdout(&out), format!("static-ingress {}\n", env!("CARGO_PKG_VERSION")));

    let out = run(cmd().arg("--help"));
    assert_eq!(out.status.code(), Some(0));
    assert!(stdout(&out).contains("check-config"), "{}", stdout(&out));

    let out = run(cmd().args(["run", "--help"]));
    assert!(stdout(&out).contains("--backend-address <HOST:PORT>"), "{}", stdout(&out));
    assert!(stdout(&out).contains("STATIC_INGRESS_PROXY_IDLE_TIMEOUT"), "{}", stdout(&out));

    let out = run(cmd().args(["run", "--no-such-flag"]));
    assert_eq!(out.status.code(), Some(2));
}

/// A proxy process on loopback, on ports it picked itself (port 0). Killed on drop if still
/// running.
struct Process {
    child: Child,
    proxy: SocketAddr,
    admin: SocketAddr,
    /// Every line it has logged so far (the logs go to stdout), read by a thread of its own.
    logs: Arc<Mutex<Vec<String>>>,
    lines: mpsc::Receiver<String>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The proxy and admin addresses in the "serving" line, which the binary logs once every
/// listener is bound, in either log format.
fn serving_addrs(line: &str) -> Option<(SocketAddr, SocketAddr)> {
    let field = |name: &str| -> Option<String> {
        if line.starts_with('{') {
            let json: serde_json::Value = serde_json::from_str(line).ok()?;
            (json["message"] == "serving").then_some(())?;
            json[name].as_str().map(str::to_string)
        } else {
            line.contains(" serving ").then_some(())?;
            line.split_whitespace().find_map(|w| w.strip_prefix(&format!("{name}="))).map(str::to_string)
        }
    };
    // `proxy` is a list, `[127.0.0.1:8443]`; the tests start one listener.
    let proxy = field("proxy")?.trim_start_matches('[').trim_end_matches(']').split(", ").next()?.parse().ok()?;
    let admin = field("admin")?.parse().ok()?;
    Some((proxy, admin))
}

#[test]
fn the_serving_line_is_read_in_both_log_formats() {
    let text = "2026-12-01T11:14:09.121359Z  INFO static_ingress::server: serving version=\"0.1.0\" \
                proxy=[127.0.0.1:36575] admin=127.0.0.1:38385 backend=127.0.0.1:1";
    let json = r#"{"timestamp":"2026-12-01T11:14:11.120138Z","level":"INFO","message":"serving","version":"0.1.0","proxy":"[127.0.0.1:38699]","admin":"127.0.0.1:37961","backend":"127.0.0.1:1"}"#;
    let addr = |s: &str| s.parse::<SocketAddr>().expect("address");
    assert_eq!(serving_addrs(text), Some((addr("127.0.0.1:36575"), addr("127.0.0.1:38385"))));
    assert_eq!(serving_addrs(json), Some((addr("127.0.0.1:38699"), addr("127.0.0.1:37961"))));
    assert_eq!(serving_addrs("INFO static_ingress::proxy: stopped accepting addr=Some(127.0.0.1:1)"), None);
}

impl Process {
    async fn start(backend: SocketAddr, extra: &[&str]) -> Process {
        Process::start_under(cmd(), backend, extra).await
    }

    /// Starts the proxy through `launcher`, a command that ends with the binary's path or is it.
    async fn start_under(launcher: Command, backend: SocketAddr, extra: &[&str]) -> Process {
        let backend = backend.to_string();
        let mut args = vec!["--config", &fixture("empty.toml")].into_iter().map(String::from).collect::<Vec<_>>();
        args.extend(
            ["--backend-address", &backend, "--proxy-listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"]
                .map(String::from),
        );
        args.extend(extra.iter().map(|s| s.to_string()));
        Process::start_args(launcher, &args).await
    }

    /// Starts `run` with `args`.
    async fn start_args(mut launcher: Command, args: &[String]) -> Process {
        let mut child = launcher
            .arg("run")
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn the proxy");
        let logs = Arc::new(Mutex::new(Vec::new()));
        let (tx, lines) = mpsc::channel();
        let stdout = child.stdout.take().expect("stdout is piped");
        let kept = Arc::clone(&logs);
        let reader = std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
                kept.lock().expect("log lock").push(line.clone());
                let _ = tx.send(line);
            }
        });
        let mut p = Process {
            child,
            proxy: SocketAddr::from(([0, 0, 0, 0], 0)),
            admin: SocketAddr::from(([0, 0, 0, 0], 0)),
            logs,
            lines,
            reader: Some(reader),
        };
        (p.proxy, p.admin) = p.log_line("the proxy to log where it serves", serving_addrs);
        eventually("the proxy to answer /health", async || get(p.admin, "/health").await.status == 200).await;
        p
    }

    /// Waits (at most [`BOUND`]) for a log line that `matches`, and returns what it found in it.
    fn log_line<T>(&self, what: &str, matches: impl Fn(&str) -> Option<T>) -> T {
        // The wait blocks this thread: let the runtime move its other tasks (the test's backends) away.
        tokio::task::block_in_place(|| self.log_line_blocking(what, matches))
    }

    fn log_line_blocking<T>(&self, what: &str, matches: impl Fn(&str) -> Option<T>) -> T {
        let deadline = Instant::now() + BOUND;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    if let Some(found) = matches(&line) {
                        return found;
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    panic!("timed out after {BOUND:?} waiting for {what}:\n{}", self.logs())
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => panic!("the proxy exited before {what}:\n{}", self.logs()),
            }
        }
    }

    fn logs(&self) -> String {
        self.logs.lock().expect("log lock").join("\n")
    }

    fn signal(&self, sig: i32) {
        let pid = i32::try_from(self.child.id()).expect("pid fits");
        // SAFETY: kill(2) with a pid we spawned and still own (not yet reaped).
        assert_eq!(unsafe { libc::kill(pid, sig) }, 0, "kill failed");
    }

    /// Waits for the process to exit; returns its exit code and everything it logged.
    async fn wait(mut self) -> (Option<i32>, String) {
        let deadline = Instant::now() + BOUND;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                // The reader ends at the end of the output, which the exit closed.
                if let Some(reader) = self.reader.take() {
                    reader.join().expect("the log reader does not panic");
                }
                return (status.code(), self.logs());
            }
            assert!(Instant::now() < deadline, "the proxy did not exit within {BOUND:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

#[test]
fn refusing_addr_refuses_and_keeps_its_port() {
    let addr = tokio::runtime::Runtime::new().expect("runtime").block_on(refusing_addr());
    let err = std::net::TcpStream::connect(addr).expect_err("nothing accepts there");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused);
    // No one else can start listening there while the test uses it.
    let taken = std::net::TcpListener::bind(addr).expect_err("the port is held");
    assert_eq!(taken.kind(), std::io::ErrorKind::AddrInUse);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_proxies_and_drains_on_sigterm() {
    let backend = Backend::echo().await;
    let p = Process::start(backend.addr, &["--lifecycle-drain-delay", "300ms"]).await;
    let mut c = within(BOUND, "connect", tokio::net::TcpStream::connect(p.proxy)).await.expect("connect");
    assert_eq!(round_trip(&mut c, b"through the binary").await, b"through the binary");

    p.signal(libc::SIGTERM);
    eventually("draining", async || get(p.admin, "/health").await.body == "draining\n").await;
    drop(c);
    let (code, logs) = p.wait().await;
    assert_eq!(code, Some(0), "{logs}");
    assert!(logs.contains("draining"), "{logs}");
    assert!(logs.contains("stopped"), "{logs}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_without_stopping_and_a_second_sigint_exits_at_once_with_1() {
    let backend = Backend::echo().await;
    // The admin server on a port that `reload` can find from the proxy's command line.
    let admin = free_port();
    let p = Process::start_args(
        cmd(),
        &[
            "--config",
            &fixture("empty.toml"),
            "--backend-address",
            &backend.addr.to_string(),
            "--proxy-listen",
            "127.0.0.1:0",
            "--admin-listen",
            &admin,
            "--lifecycle-drain-delay",
            "60s",
            "--log-format",
            "json",
        ]
        .map(String::from),
    )
    .await;
    // As the unit's ExecReload asks: `static-ingress reload --pid $MAINPID`, which reads the
    // proxy's own flags and environment from /proc.
    let pid = p.child.id().to_string();
    let out = run(cmd().args(["reload", "--pid", &pid]));
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(stdout(&out), format!("configuration reloaded by process {pid}\n"));
    // No such process, or one that is not a static-ingress (this test): said, exit 1, and
    // no SIGHUP (which would end this test).
    let none = run(cmd().args(["reload", "--pid", "999999999"]));
    assert_eq!(none.status.code(), Some(1));
    assert!(stderr(&none).contains("no process 999999999"), "{}", stderr(&none));
    let me = std::process::id().to_string();
    let other = run(cmd().args(["reload", "--pid", &me]));
    assert_eq!(other.status.code(), Some(1));
    assert!(stderr(&other).contains(&format!("process {me} is ")), "{}", stderr(&other));
    assert!(stderr(&other).contains("not static-ingress; not signalling it"), "{}", stderr(&other));
    // Handled, not merely not yet delivered: the proxy says it got it, and then still serves.
    p.log_line("the SIGHUP to be handled", |l| l.contains("SIGHUP received").then_some(()));
    p.log_line("the reload to finish", |l| l.contains("configuration reloaded").then_some(()));
    assert_eq!(get(p.admin, "/health").await.status, 200, "not healthy after SIGHUP");
    let metrics = get(p.admin, "/metrics").await.body;
    assert!(metrics.contains("static_ingress_config_reloads_total{result=\"ok\"} 1"), "{metrics}");
    p.signal(libc::SIGINT);
    eventually("draining", async || get(p.admin, "/health").await.status == 503).await;
    let started = Instant::now();
    p.signal(libc::SIGINT);
    let (code, logs) = p.wait().await;
    assert_eq!(code, Some(1));
    assert!(started.elapsed() < Duration::from_secs(3));
    // Every line is JSON with a level and a message, the exit's included.
    assert!(logs.lines().count() >= 3, "{logs}");
    for line in logs.lines() {
        let json: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(["INFO", "WARN", "ERROR"].contains(&json["level"].as_str().unwrap_or("")), "{line}");
        assert!(json["message"].as_str().is_some_and(|m| !m.is_empty()), "{line}");
    }
}

/// `static-ingress reload` as `systemctl reload` runs it: it waits for the proxy's outcome and
/// says it, and fails the reload (so systemd reports it) when the file is invalid or cannot
/// be applied. The launch template's settings live in a drop-in, which a reload re-reads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_waits_for_the_outcome_and_fails_when_invalid_or_not_applied() {
    let blue = Backend::named("127.0.0.1:0".parse().unwrap(), "blue").await.unwrap();
    let green = Backend::named("127.0.0.1:0".parse().unwrap(), "green").await.unwrap();
    let dir = std::env::temp_dir().join(format!("static-ingress-cli-reload-{}", std::process::id()));
    let drop_ins = dir.join("static-ingress.toml.d");
    std::fs::create_dir_all(&drop_ins).unwrap();
    let main = dir.join("static-ingress.toml");
    std::fs::write(&main, "[proxy]\nlisten = [\"127.0.0.1:0\"]\nconnect_timeout = \"2s\"\n").unwrap();
    let fleet = drop_ins.join("50-fleet.toml");
    let backend = |b: &Backend| format!("# written by the launch template\n[backend]\naddress = \"{}\"\n", b.addr);
    std::fs::write(&fleet, backend(&blue)).unwrap();
    // An editor's backup beside it is not read.
    std::fs::write(drop_ins.join("50-fleet.toml~"), "[backend]\naddress = \"nowhere:1\"\n").unwrap();
    let config = main.display().to_string();
    // The admin address in the proxy's environment, where `reload` finds it.
    let admin = free_port();
    let mut launcher = cmd();
    launcher.env("STATIC_INGRESS_ADMIN_LISTEN", &admin);
    let p = Process::start_args(
        launcher,
        &["--config".into(), config.clone(), "--proxy-idle-timeout".into(), "60s".into()],
    )
    .await;
    assert_eq!(greeting(p.proxy).await.unwrap().0, "blue");
    let pid = p.child.id().to_string();
    // Run as systemd runs ExecReload: in the unit's environment as it is now, which here has a
    // variable the proxy did not start with (an invalid one): the proxy's environment is what
    // counts, and the difference is said.
    let reload = || run(cmd().args(["reload", "--pid", &pid]).env("STATIC_INGRESS_PROXY_CONNECT_TIMEOUT", "5"));

    // The drop-in names the new backend (and sets a key the start's flag still overrides).
    std::fs::write(&fleet, backend(&green) + "[proxy]\nidle_timeout = \"90s\"\n").unwrap();
    let out = reload();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let said = stdout(&out);
    assert!(said.ends_with(&format!("configuration reloaded by process {pid}\n")), "{said}");
    let note =
        format!("warning: STATIC_INGRESS_PROXY_CONNECT_TIMEOUT is set here but not in process {pid}'s environment");
    assert!(said.contains(&note), "{said}");
    assert!(
        said.contains("warning: proxy.idle_timeout: ")
            && said.contains("50-fleet.toml:5 sets \"1m 30s\", but flag --proxy-idle-timeout sets \"1m\", which wins"),
        "{said}"
    );
    assert_eq!(greeting(p.proxy).await.unwrap().0, "green");

    // Invalid: the errors with file:line, exit 78, and the proxy is not even signalled.
    std::fs::write(&fleet, backend(&blue) + "[proxy]\nconnect_timeout = 5\n").unwrap();
    let out = reload();
    assert_eq!(out.status.code(), Some(78), "{}", stdout(&out));
    let err = stderr(&out);
    assert!(err.contains("50-fleet.toml:5: proxy.connect_timeout:"), "{err}");
    assert!(err.contains(&format!("not reloading: process {pid} keeps running its configuration")), "{err}");
    let status: serde_json::Value = serde_json::from_str(&get(p.admin, "/status").await.body).unwrap();
    assert_eq!(status["reload"]["count"], 1, "{status}");
    assert_eq!(greeting(p.proxy).await.unwrap().0, "green");

    // Valid but not applicable: a new listener on a port another process holds. Exit 1, the
    // proxy's own error, and everything as it was.
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = held.local_addr().unwrap().port();
    std::fs::write(&fleet, backend(&blue) + &format!("[proxy]\nlisten = [\"127.0.0.1:0\", \"127.0.0.1:{port}\"]\n"))
        .unwrap();
    let out = reload();
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    let err = stderr(&out);
    assert!(
        err.contains(&format!("error: proxy.listen: cannot listen on 127.0.0.1:{port} for the proxy (another process")),
        "{err}"
    );
    assert!(err.contains(&format!("reload failed: process {pid} keeps running its previous configuration")), "{err}");
    assert_eq!(greeting(p.proxy).await.unwrap().0, "green");
    let metrics = get(p.admin, "/metrics").await.body;
    assert!(metrics.contains("static_ingress_config_reloads_total{result=\"failed\"} 1"), "{metrics}");

    // Once the port is free, the same file applies: the new listener serves the new backend.
    drop(held);
    let out = reload();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(greeting(SocketAddr::from(([127, 0, 0, 1], port))).await.unwrap().0, "blue");
    assert_eq!(greeting(p.proxy).await.unwrap().0, "blue");
    p.signal(libc::SIGKILL);
    let _ = p.wait().await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_port_in_use_names_the_address_and_exits_1() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr");
    let out = run(cmd().args([
        "run",
        "--config",
        &fixture("empty.toml"),
        "--backend-address",
        "127.0.0.1:1",
        "--admin-listen",
        "127.0.0.1:0",
        "--proxy-listen",
        &addr.to_string(),
    ]));
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stdout(&out).contains(&format!(
            "cannot listen on {addr} for the proxy (another process is already listening there): Address already in use"
        )),
        "{}",
        stdout(&out)
    );
}

#[test]
fn a_privileged_port_without_the_capability_says_what_is_needed() {
    // Run as nobody, with no capabilities, as a sandboxed service would be.
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all", "--bounding-set=-all", "--"])
        .arg(BIN)
        .args(["run", "--config", &fixture("empty.toml"), "--backend-address", "127.0.0.1:1"])
        .args(["--proxy-listen", "127.0.0.1:443", "--admin-listen", "127.0.0.1:0"])
        .env_clear()
        .stdin(Stdio::null())
        .output()
        .expect("setpriv (util-linux) runs");
    assert_eq!(out.status.code(), Some(1), "stdout: {}\nstderr: {}", stdout(&out), stderr(&out));
    assert!(
        stdout(&out).contains(
            "cannot listen on 127.0.0.1:443 for the proxy (ports below 1024 need CAP_NET_BIND_SERVICE: run as root, \
             grant the capability, or pick a port from 1024 up): Permission denied"
        ),
        "{}",
        stdout(&out)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn running_out_of_file_descriptors_does_not_kill_the_proxy_and_it_recovers() {
    let backend = Backend::echo().await;
    // 64 descriptors: the process needs about 15 for itself, each proxied connection 2.
    let mut launcher = Command::new("prlimit");
    launcher.args(["--nofile=64:64", "--", BIN]).env_clear();
    let p = Process::start_under(launcher, backend.addr, &[]).await;

    // Far more clients than descriptors. Connects still complete (the kernel queues them), but
    // the proxy runs out of descriptors while serving them: an accept fails (the connection waits
    // in the queue), or an accept takes the last descriptor and the connect to the backend fails
    // (the connection is closed). Which one depends on how many descriptors the process holds;
    // each is logged as a warning.
    const ACCEPT_BACKOFF: &str = "accept failed: out of file descriptors or memory; backing off";
    const NO_BACKEND: &str = "no backend address accepted the connection";
    // A connection the proxy accepted and then closed for want of a backend descriptor can be
    // reset before the client's connect has even been polled: that is the second outcome, not a
    // failure of the test.
    let mut clients = Vec::new();
    for _ in 0..60 {
        match within(BOUND, "connect", tokio::net::TcpStream::connect(p.proxy)).await {
            Ok(c) => clients.push(c),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
            Err(e) => panic!("connect: {e}"),
        }
    }
    let hit = p.log_line("the proxy to run out of descriptors", |line| {
        [ACCEPT_BACKOFF, NO_BACKEND].into_iter().find(|warning| line.contains(warning))
    });
    eprintln!("the shortage showed as: {hit}");
    drop(clients);

    // It is still alive, and serves again once descriptors are free. Freeing them takes a moment:
    // the proxy still has to see each dropped client's FIN (and accept the ones left queued), so a
    // connection made at once can still meet the shortage and be reset.
    eventually("/health to answer again", async || {
        tokio::net::TcpStream::connect(p.admin).await.is_ok() && get(p.admin, "/health").await.status == 200
    })
    .await;
    eventually("a proxied round trip to work again", async || {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let msg = b"after the shortage";
        let attempt = async {
            let mut c = tokio::net::TcpStream::connect(p.proxy).await?;
            c.write_all(msg).await?;
            let mut back = vec![0; msg.len()];
            c.read_exact(&mut back).await?;
            std::io::Result::Ok(back)
        };
        matches!(tokio::time::timeout(Duration::from_secs(1), attempt).await, Ok(Ok(back)) if back == msg)
    })
    .await;

    // The metrics say what the log said.
    let metrics = get(p.admin, "/metrics").await.body;
    let value = |sample: &str| -> f64 {
        let v = metrics.lines().find_map(|l| l.strip_prefix(sample).and_then(|rest| rest.strip_prefix(' ')));
        v.unwrap_or_else(|| panic!("{sample} missing from /metrics:\n{metrics}")).trim().parse().expect("number")
    };
    let accept_backoffs = value("static_ingress_accept_errors_total{reason=\"fd_limit\"}");
    let logs = p.logs();
    eprintln!("accept back-offs: {accept_backoffs}");
    if logs.contains(ACCEPT_BACKOFF) {
        assert!(accept_backoffs >= 1.0, "an accept back-off was logged but not counted:\n{metrics}");
    } else {
        assert_eq!(accept_backoffs, 0.0, "accept back-offs counted but never logged:\n{logs}");
    }
}

/// `status` against a running proxy, as an operator or a script runs it.
fn status_of(admin: SocketAddr) -> Output {
    run(cmd().args(["status", "--admin", &admin.to_string(), "--color", "never", "--env-file", "/dev/null"]))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_shows_a_healthy_proxy_its_backend_and_exits_0_then_3_when_it_has_no_address() {
    let backend = Backend::echo().await;
    let proxy = Proxy::start(backend.addr, &[]).await;
    let admin = proxy.admin;
    let out = tokio::task::spawn_blocking(move || status_of(admin)).await.unwrap();
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(0), "{text}{}", stderr(&out));
    assert!(text.contains("HEALTHY"), "{text}");
    assert!(text.contains(&format!("backend default -> {}", backend.addr)), "{text}");
    assert!(text.contains(&backend.addr.to_string()) && text.contains("healthy"), "{text}");
    assert!(text.contains("elastic ip disabled"), "{text}");
    assert!(!text.contains('\x1b'), "--color never: {text:?}");

    proxy.set_backends(&[]);
    let out = tokio::task::spawn_blocking(move || status_of(admin)).await.unwrap();
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(3), "{text}{}", stderr(&out));
    assert!(text.contains("UNHEALTHY: no backend address"), "{text}");
    assert!(text.contains("no addresses"), "{text}");

    let json =
        tokio::task::spawn_blocking(move || run(cmd().args(["status", "--admin", &admin.to_string(), "--json"])))
            .await
            .unwrap();
    assert_eq!(json.status.code(), Some(3));
    let parsed: serde_json::Value = serde_json::from_str(&stdout(&json)).expect("--json prints /status");
    assert_eq!(parsed["health"]["healthy"], false);
}

/// With a config file: the operator's listener first, then the admin port, so a proxy started
/// before the files gained `operator_listen` is still found; the health-only port's 404 is not
/// taken for an answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_finds_the_proxy_on_the_operators_listener_or_else_the_admin_port() {
    let backend = Backend::echo().await;
    let proxy = Proxy::start(backend.addr, &[("admin.operator_listen", "127.0.0.1:0")]).await;
    let dir = std::env::temp_dir().join(format!("static-ingress-cli-status-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("static-ingress.toml");
    let write = |operator: &str, admin: SocketAddr| {
        std::fs::write(
            &config,
            format!(
                "[backend]\naddress = \"{}\"\n[admin]\nlisten = \"{admin}\"\noperator_listen = [\"{operator}\"]\n",
                backend.addr
            ),
        )
        .unwrap();
    };
    let status = |config: std::path::PathBuf| {
        tokio::task::spawn_blocking(move || {
            run(cmd().args([
                "status",
                "--config",
                config.to_str().unwrap(),
                "--color",
                "never",
                "--env-file",
                "/dev/null",
            ]))
        })
    };
    // The operator's listener answers.
    write(&proxy.operator[0].to_string(), proxy.admin);
    let out = status(config.clone()).await.unwrap();
    assert_eq!(out.status.code(), Some(0), "{}{}", stdout(&out), stderr(&out));
    // The file names an operator's port nobody serves: the admin port is asked next, and its
    // health-only 404 is an error, not a status.
    write(&free_port(), proxy.admin);
    let out = status(config.clone()).await.unwrap();
    assert_eq!(out.status.code(), Some(4), "{}", stdout(&out));
    let err = stderr(&out);
    assert!(err.contains("cannot reach") && err.contains("/status answered 404"), "{err}");
    // A proxy without an operator's listener, found on its admin port.
    let plain = Proxy::start(backend.addr, &[]).await;
    write(&free_port(), plain.admin);
    let out = status(config.clone()).await.unwrap();
    assert_eq!(out.status.code(), Some(0), "{}{}", stdout(&out), stderr(&out));
    let _ = std::fs::remove_dir_all(&dir);
}

/// The unit's environment file counts: a proxy whose admin addresses come from
/// `STATIC_INGRESS_*` there (as `EnvironmentFile=` gives them to it) is found by a `status`
/// run in a shell that has none of them, or other values of them (which never reach the
/// unit's proxy); without the file, the shell's variables count.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_reads_the_units_environment_file_for_the_admin_addresses() {
    let backend = Backend::echo().await;
    let proxy = Proxy::start(backend.addr, &[("admin.operator_listen", "127.0.0.1:0")]).await;
    let dir = std::env::temp_dir().join(format!("static-ingress-cli-envfile-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let env_file = dir.join("static-ingress.env");
    let config = dir.join("static-ingress.toml");
    std::fs::write(&config, format!("[backend]\naddress = \"{}\"\n", backend.addr)).unwrap();
    std::fs::write(
        &env_file,
        format!(
            "# as an operator writes it\nSTATIC_INGRESS_ADMIN_LISTEN={}\nSTATIC_INGRESS_ADMIN_OPERATOR_LISTEN=\"{}\"\n\nOTHER=1\n",
            proxy.admin, proxy.operator[0]
        ),
    )
    .unwrap();
    let (config_arg, env_arg) = (config.to_str().unwrap().to_owned(), env_file.to_str().unwrap().to_owned());
    let status = move |shell: Vec<(&'static str, String)>| {
        let (config_arg, env_arg) = (config_arg.clone(), env_arg.clone());
        tokio::task::spawn_blocking(move || {
            run(cmd().args(["status", "--config", &config_arg, "--env-file", &env_arg, "--color", "never"]).envs(shell))
        })
    };
    let out = status(vec![]).await.unwrap();
    assert_eq!(out.status.code(), Some(0), "{}{}", stdout(&out), stderr(&out));
    // The file beats a stale variable of the shell, naming an operator's port nobody serves.
    let stale_port = free_port();
    let stale = vec![("STATIC_INGRESS_ADMIN_OPERATOR_LISTEN", stale_port.clone())];
    let out = status(stale.clone()).await.unwrap();
    assert_eq!(out.status.code(), Some(0), "{}{}", stdout(&out), stderr(&out));
    // Without the file, the shell's variables are all there is: that port is asked, then the
    // admin port (the file's setting of which is gone too) answers nobody.
    std::fs::remove_file(&env_file).unwrap();
    let out = status(stale).await.unwrap();
    assert_eq!(out.status.code(), Some(4), "{}", stdout(&out));
    assert!(stderr(&out).contains(&format!("cannot reach {stale_port}")), "{}", stderr(&out));
    // A bad value in the file is named, and the defaults are asked.
    std::fs::write(&env_file, "STATIC_INGRESS_ADMIN_LISTEN=nine\n").unwrap();
    let out = status(vec![]).await.unwrap();
    let err = stderr(&out);
    assert!(err.contains("admin.listen") && err.contains("asking the default addresses"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn status_exits_4_when_no_static_ingress_answers() {
    let nobody: SocketAddr = free_port().parse().unwrap();
    let out = status_of(nobody);
    assert_eq!(out.status.code(), Some(4));
    assert!(stderr(&out).contains(&format!("cannot reach {nobody}")), "{}", stderr(&out));

    // Something answers HTTP there, but it is not a static-ingress.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let other = listener.local_addr().unwrap();
    let server = std::thread::spawn(move || {
        use std::io::{Read, Write};
        let (mut s, _) = listener.accept().unwrap();
        let mut buf = [0u8; 1024];
        let _ = s.read(&mut buf);
        let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}");
    });
    let out = status_of(other);
    server.join().unwrap();
    assert_eq!(out.status.code(), Some(4));
    assert!(stderr(&out).contains("is not a static-ingress status"), "{}", stderr(&out));
}

/// The fields of an access-log line, in either log format; None for any other line.
fn access_fields(line: &str) -> Option<std::collections::BTreeMap<String, String>> {
    if line.starts_with('{') {
        let json: serde_json::Value = serde_json::from_str(line).ok()?;
        (json["target"] == "static_ingress::access").then_some(())?;
        let fields = json.as_object()?.iter().map(|(k, v)| {
            // Numbers are numbers, not strings, for a log pipeline to sum.
            let text = match v {
                serde_json::Value::String(s) => s.clone(),
                other => format!("json:{other}"),
            };
            (k.clone(), text)
        });
        Some(fields.collect())
    } else {
        let (_, rest) = line.split_once(" static_ingress::access: connection ")?;
        Some(rest.split_whitespace().filter_map(|w| w.split_once('=')).map(|(k, v)| (k.into(), v.into())).collect())
    }
}

/// One connection through `proxy` that sends `n` bytes, reads them back and ends cleanly;
/// returns the client's address.
async fn echoed(proxy: SocketAddr, n: usize) -> SocketAddr {
    use tokio::io::AsyncWriteExt;
    let mut c = within(BOUND, "connect", tokio::net::TcpStream::connect(proxy)).await.expect("connect");
    let me = c.local_addr().expect("local address");
    let sent = pattern(n, n as u64);
    c.write_all(&sent).await.expect("send");
    c.shutdown().await.expect("half-close");
    let back = within(BOUND, "the echo", read_until_closed(&mut c)).await.expect("read");
    assert_eq!(back.len(), n, "the echo came back whole");
    me
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_access_log_has_a_line_per_connection_whatever_the_log_level() {
    let backend = Backend::echo().await;
    // Only warnings, and the server's "serving" line that the test waits for: the access log
    // is not filtered by the level.
    let p = Process::start(
        backend.addr,
        &["--log-level", "warn,static_ingress::server=info", "--proxy-max-connections", "1"],
    )
    .await;
    let client = echoed(p.proxy, 10_000).await;
    let line = p.log_line("the completed connection's access-log line", |l| {
        access_fields(l).filter(|f| f.get("client") == Some(&client.to_string()))
    });
    assert_eq!(line["listener"], "127.0.0.1:0", "the proxy.listen entry: {line:?}");
    assert_eq!(line["route"], "default", "{line:?}");
    assert_eq!(line["backend"], backend.addr.to_string(), "{line:?}");
    assert_eq!(line["to_backend"], "10000", "{line:?}");
    assert_eq!(line["to_client"], "10000", "{line:?}");
    assert_eq!(line["reason"], "completed", "{line:?}");
    let ms: f64 = line["duration_ms"].parse().expect("a number of milliseconds");
    assert!(ms > 0.0 && ms < BOUND.as_secs_f64() * 1000.0, "{line:?}");

    // Over the limit of one: reset at once, and logged too, with no route or backend.
    let held = within(BOUND, "connect", tokio::net::TcpStream::connect(p.proxy)).await.expect("connect");
    eventually("the first connection to hold the one slot", async || {
        get(p.admin, "/metrics").await.body.contains("static_ingress_tcp_open_connections 1")
    })
    .await;
    // Bound first: the reset may come before connect() returns, and fail it.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let refused_from = socket.local_addr().unwrap().to_string();
    if let Ok(mut refused) = within(BOUND, "connect", socket.connect(p.proxy)).await {
        assert!(within(BOUND, "the reset", read_until_closed(&mut refused)).await.is_err(), "reset over the limit");
    }
    let line = p.log_line("the refused connection's line", |l| {
        access_fields(l).filter(|f| f.get("client") == Some(&refused_from))
    });
    assert_eq!(line["reason"], "over_limit", "{line:?}");
    assert!(!line.contains_key("route") && !line.contains_key("backend"), "{line:?}");
    assert_eq!((line["to_backend"].as_str(), line["to_client"].as_str()), ("0", "0"), "{line:?}");
    drop(held);
}

/// `log.access` is applied by a reload, and the lines of the last connections reach stdout
/// even when the proxy exits right after them. JSON lines carry numbers as numbers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_turns_the_access_log_on_and_the_last_lines_are_written_at_exit() {
    let backend = Backend::echo().await;
    let dir = std::env::temp_dir().join(format!("static-ingress-cli-access-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("static-ingress.toml");
    std::fs::write(&file, "[log]\naccess = false\n").unwrap();
    let p = Process::start_args(
        cmd(),
        &[
            "--config",
            &file.display().to_string(),
            "--backend-address",
            &backend.addr.to_string(),
            "--proxy-listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--lifecycle-drain-delay",
            "0s",
            "--lifecycle-grace-period",
            "200ms",
            "--log-format",
            "json",
        ]
        .map(String::from),
    )
    .await;
    let quiet = echoed(p.proxy, 100).await;
    std::fs::write(&file, "[log]\naccess = true\n").unwrap();
    p.signal(libc::SIGHUP);
    p.log_line("the reload to finish", |l| l.contains("configuration reloaded").then_some(()));
    let logged = echoed(p.proxy, 2_000).await;
    // Open until the grace period cuts it, a moment before the process exits: its line comes
    // last, and is written out all the same.
    let mut held = within(BOUND, "connect", tokio::net::TcpStream::connect(p.proxy)).await.expect("connect");
    let held_from = held.local_addr().unwrap().to_string();
    assert_eq!(round_trip(&mut held, b"still here").await, b"still here");
    p.signal(libc::SIGTERM);
    let (code, logs) = p.wait().await;
    assert_eq!(code, Some(0), "{logs}");
    assert!(logs.contains("grace period over"), "the connection was cut at the end of the grace period: {logs}");
    let lines: Vec<_> = logs.lines().filter_map(access_fields).collect();
    assert_eq!(lines.len(), 2, "two lines, for the connections after the reload:\n{logs}");
    let cut = &lines[1];
    assert_eq!((cut["client"].as_str(), cut["reason"].as_str()), (held_from.as_str(), "shutdown"), "{logs}");
    assert_eq!(cut["to_client"], "json:10", "{cut:?}");
    let line = &lines[0];
    assert_eq!(line["client"], logged.to_string(), "{line:?}");
    assert_ne!(line["client"], quiet.to_string());
    assert_eq!(line["message"], "connection", "{line:?}");
    assert_eq!(line["level"], "INFO", "{line:?}");
    assert_eq!((line["to_backend"].as_str(), line["to_client"].as_str()), ("json:2000", "json:2000"), "{line:?}");
    assert!(line["duration_ms"].strip_prefix("json:").and_then(|n| n.parse::<f64>().ok()).is_some(), "{line:?}");
    assert!(!line.contains_key("span"), "the connection's span would repeat the fields: {line:?}");
    // Applied, not merely accepted: no word of a restart.
    assert!(!logs.contains("restart"), "{logs}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A proxy started by hand on free ports with `stdout` as its standard output, its admin
/// address returned once /health answers.
async fn spawn_with_stdout(backend: SocketAddr, stdout: Stdio) -> (Child, SocketAddr, SocketAddr) {
    let (proxy, admin) = (free_port(), free_port());
    let child = cmd()
        .args(["run", "--config", &fixture("empty.toml"), "--backend-address", &backend.to_string()])
        .args(["--proxy-listen", &proxy, "--admin-listen", &admin])
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn the proxy");
    let (proxy, admin) = (proxy.parse().unwrap(), admin.parse().unwrap());
    eventually("the proxy to answer /health", async || {
        tokio::net::TcpStream::connect(admin).await.is_ok() && get(admin, "/health").await.status == 200
    })
    .await;
    (child, proxy, admin)
}

/// Nobody reads the proxy's stdout for a while (a stuck journald): the pipe fills, and the
/// connections go on as fast as ever; their lines wait in memory and all arrive once it is
/// read again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_never_wait_for_a_stdout_nobody_reads_and_no_line_is_lost() {
    const CONNECTIONS: usize = 1_000;
    let backend = Backend::echo().await;
    let (mut child, proxy, admin) = spawn_with_stdout(backend.addr, Stdio::piped()).await;
    let stdout = child.stdout.take().expect("piped");
    // About 200 bytes a line: several times what the pipe holds.
    for _ in 0..CONNECTIONS {
        echoed(proxy, 10).await;
    }
    let metrics = get(admin, "/metrics").await.body;
    assert!(metrics.contains("static_ingress_access_log_dropped_lines_total 0"), "{metrics}");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + BOUND;
    let mut logged = 0;
    while logged < CONNECTIONS {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = rx.recv_timeout(left).unwrap_or_else(|_| panic!("only {logged} of {CONNECTIONS} lines arrived"));
        if let Some(f) = access_fields(&line) {
            assert_eq!(f["reason"], "completed", "a whole line: {line}");
            logged += 1;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// stdout fails (a full disk): every line is counted as dropped, and the proxy serves on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lines_stdout_cannot_take_are_counted_as_dropped() {
    let backend = Backend::echo().await;
    let full = std::fs::OpenOptions::new().write(true).open("/dev/full").expect("/dev/full");
    let (mut child, proxy, admin) = spawn_with_stdout(backend.addr, Stdio::from(full)).await;
    for _ in 0..20 {
        echoed(proxy, 10).await;
    }
    eventually("the 20 lines to be counted as dropped", async || {
        get(admin, "/metrics").await.body.contains("static_ingress_access_log_dropped_lines_total 20")
    })
    .await;
    let _ = child.kill();
    let _ = child.wait();
}
