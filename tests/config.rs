//! Absurd but well-formed config values, and the errors for files a fuzzer would write: what
//! `check-config`, `run` and `claim-eip` tell an operator, and that they exit 78 instead of
//! panicking later.

mod common;

use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use static_ingress::Config;
use static_ingress::config::keys::KEYS;
use static_ingress::config::{FileLayer, Override};

const BIN: &str = env!("CARGO_BIN_EXE_static-ingress");

/// The two values from the field report: each parses as a duration, and each panicked the
/// proxy (`Instant + Duration` overflow) once it reached a connection or the EIP claim.
const ABSURD: [&str; 2] = ["300000000000y", "18446744073709551615s"];

/// Writes `contents` to a file of its own for this test and returns its path.
fn file(name: &str, contents: &[u8]) -> String {
    let path = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("config-{name}.toml"));
    std::fs::write(&path, contents).expect("the test can write its file");
    path.display().to_string()
}

/// The binary with a clean environment: no STATIC_INGRESS_* leaks in from the caller.
fn cmd() -> Command {
    let mut c = Command::new(BIN);
    c.env_clear().env("PATH", std::env::var_os("PATH").unwrap_or_default());
    c
}

/// Runs `c` to its end, failing the test (and killing the child by its PID) if that takes
/// longer than [`BOUND`]: a `run` that wrongly accepted its config would serve forever.
fn run(c: &mut Command) -> Output {
    let mut child =
        c.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("the binary runs");
    let started = Instant::now();
    while child.try_wait().expect("the child can be waited for").is_none() {
        if started.elapsed() > BOUND {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the binary was still running after {BOUND:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    child.wait_with_output().expect("the child's output can be read")
}

/// The longest a config check may take before the test fails.
const BOUND: Duration = Duration::from_secs(20);

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The bound of every duration key, from the key table.
fn bounded_keys() -> Vec<(&'static str, &'static str)> {
    KEYS.iter().filter_map(|k| k.kind.max_duration().map(|max| (k.name, max))).collect()
}

#[test]
fn every_duration_key_refuses_absurd_values_naming_the_key() {
    let keys = bounded_keys();
    assert_eq!(keys.len(), KEYS.iter().filter(|k| k.kind.value_name() == "DURATION").count());
    for (name, max) in keys {
        for value in ABSURD {
            let err = Config::from_pairs([("backend.address", "127.0.0.1:1"), (name, value)]).unwrap_err();
            let flag = name.replace(['.', '_'], "-");
            assert_eq!(err.to_string(), format!("flag --{flag}: {name}: must be at most {max}, got \"{value}\""));

            // The same from the file, with its line.
            let (section, field) = name.split_once('.').unwrap();
            let header = if section == "backend" { String::new() } else { format!("[{section}]") };
            let text = format!("[backend]\naddress = \"127.0.0.1:1\"\n\n{header}\n{field} = \"{value}\"\n");
            let layer = FileLayer::parse(std::path::Path::new("f.toml"), &text).unwrap();
            let err = Config::from_layers(Some(&layer), &[]).unwrap_err();
            assert_eq!(err.to_string(), format!("f.toml:5: {name}: must be at most {max}, got \"{value}\""));
        }
        // The bound itself is allowed: it is a limit, not a trap. (dns.min_ttl may not exceed
        // dns.refresh_interval, so that one goes up to its bound too.)
        let overrides = [("backend.address", "127.0.0.1:1"), ("dns.refresh_interval", "1d"), (name, max)];
        let overrides: Vec<Override> = overrides.iter().map(|(k, v)| Override::flag(k, *v).unwrap()).collect();
        let ok = Config::from_layers(None, &overrides);
        assert!(ok.is_ok(), "{name} = {max}: {:?}", ok.err());
    }
}

#[test]
fn check_config_and_run_exit_78_naming_key_and_line() {
    let path = file(
        "absurd",
        b"[backend]\naddress = \"127.0.0.1:1\"\n\n[proxy]\nidle_timeout = \"300000000000y\"\n\n\
          [eip]\ndeadline = \"18446744073709551615s\"\n",
    );
    let want = format!(
        "error: {path}:5: proxy.idle_timeout: must be at most 30d, got \"300000000000y\"\n\
         error: {path}:8: eip.deadline: must be at most 1h, got \"18446744073709551615s\"\n\
         configuration invalid: 2 errors\n"
    );
    let out = run(cmd().args(["check-config", &path]));
    assert_eq!(out.status.code(), Some(78));
    assert_eq!(stderr(&out), want);
    assert!(out.stdout.is_empty());

    // `run` refuses the same file before binding anything.
    let out =
        run(cmd().args(["run", "--config", &path, "--proxy-listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"]));
    assert_eq!(out.status.code(), Some(78));
    assert_eq!(stderr(&out), want);

    // claim-eip reads only [eip], and panicked (exit 101) on such a deadline.
    let out = run(cmd().args(["claim-eip", "--config", &path]));
    assert_eq!(out.status.code(), Some(78));
    assert_eq!(
        stderr(&out),
        format!(
            "error: {path}:8: eip.deadline: must be at most 1h, got \"18446744073709551615s\"\n\
             configuration invalid: 1 error\n"
        )
    );
}

#[test]
fn flags_and_environment_are_bounded_too() {
    let out = run(cmd().args([
        "run",
        "--backend-address",
        "127.0.0.1:1",
        "--proxy-listen",
        "127.0.0.1:0",
        "--admin-listen",
        "127.0.0.1:0",
        "--proxy-idle-timeout",
        "18446744073709551615s",
    ]));
    assert_eq!(out.status.code(), Some(78));
    assert_eq!(
        stderr(&out),
        "error: flag --proxy-idle-timeout: proxy.idle_timeout: must be at most 30d, got \"18446744073709551615s\"\n\
         configuration invalid: 1 error\n"
    );

    let path = file("backend-only", b"[backend]\naddress = \"127.0.0.1:1\"\n");
    let out = run(cmd().args(["check-config", &path]).env("STATIC_INGRESS_EIP_DEADLINE", "300000000000y"));
    assert_eq!(out.status.code(), Some(78));
    assert_eq!(
        stderr(&out),
        "error: environment variable STATIC_INGRESS_EIP_DEADLINE: eip.deadline: must be at most 1h, got \
         \"300000000000y\"\nconfiguration invalid: 1 error\n"
    );

    let out = run(cmd().args(["claim-eip", "--eip-deadline", "300000000000y"]));
    assert_eq!(out.status.code(), Some(78));
    assert_eq!(
        stderr(&out),
        "error: flag --eip-deadline: eip.deadline: must be at most 1h, got \"300000000000y\"\n\
         configuration invalid: 1 error\n"
    );
}

#[test]
fn file_mistakes_are_named_with_their_line() {
    let mut huge = b"[backend]\naddress = \"127.0.0.1:1\"\n[proxy]\nidle_timeout = \"".to_vec();
    huge.push(b'5');
    // Half the largest file read (1 MiB): long enough for any message to have to cut it.
    huge.extend(std::iter::repeat_n(b'x', 1 << 19));
    huge.extend(b"\"\n");
    let cut = format!(
        "4: proxy.idle_timeout: invalid duration \"5{}…\" (unknown time unit \"{}…\"); write durations like \"5s\", \
         \"250ms\" or \"10m\"",
        "x".repeat(79),
        "x".repeat(80)
    );
    let cases: [(&str, Vec<u8>, String); 4] = [
        (
            "duplicate",
            b"[backend]\naddress = \"127.0.0.1:1\"\naddress = \"127.0.0.1:2\"\n".to_vec(),
            "3: duplicate key backend.address (first set on line 2)".into(),
        ),
        (
            "wrong-section",
            b"[backend]\naddress = \"127.0.0.1:1\"\n\n[proxy]\ndrain_delay = \"10s\"\n".to_vec(),
            "5: unknown key proxy.drain_delay (did you mean lifecycle.drain_delay?)".into(),
        ),
        (
            "not-utf8",
            b"[backend]\naddress = \"127.0.0.1:1\"\n# \xff\xfe\n".to_vec(),
            "3: the config file is not valid UTF-8 (byte 0xFF at column 3); save it as UTF-8".into(),
        ),
        ("huge-value", huge, cut),
    ];
    for (name, contents, want) in cases {
        let path = file(name, &contents);
        let out = run(cmd().args(["check-config", &path]));
        assert_eq!(out.status.code(), Some(78), "{name}");
        assert_eq!(stderr(&out), format!("error: {path}:{want}\nconfiguration invalid: 1 error\n"), "{name}");
    }
}

/// The bounds are safe to use: a proxy with every duration at its bound serves a connection
/// and counts its close (the deadlines it computes from them do not overflow).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_duration_at_its_bound_still_proxies() {
    let backend = common::Backend::echo().await;
    let proxy = common::Proxy::start(backend.addr, &bounded_keys()).await;
    let mut client = proxy.connect().await;
    assert_eq!(common::round_trip(&mut client, b"still here").await, b"still here");
    tokio::io::AsyncWriteExt::shutdown(&mut client).await.expect("half-close");
    assert_eq!(common::read_until_closed(&mut client).await.expect("a clean end"), b"");
    common::eventually("the close to be counted", async || proxy.closed("completed").await == 1.0).await;
}
